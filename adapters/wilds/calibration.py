"""Calibration data of a ``wilds_run`` run: the ``calibration`` argument of ``dgq_train_end``.

Post-training quantization (``dg_quant.obc``) runs the model over calibration images once per
layer (GPTQ/OBQ's sequential passes, BatchNorm re-estimation). The images are the run's
training split (its source domains; the held-out domains are never seen) with the *evaluation*
transform, so every pass sees the same pixels, and the batches are read once and kept.
``wilds_run`` (at the end of training) and ``dgq_ptq`` (on a saved run) use the same class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def calibration_batches(
    subset: Any, num_samples: int, batch_size: int, device: torch.device | str, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Up to ``num_samples`` shuffled inputs of ``subset`` (a WILDS subset of the training split).

    The order depends on ``seed`` only, so repeated calls see the same images.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, generator=generator)
    seen = 0
    for x, _y, _meta in loader:
        if seen >= num_samples:
            break
        x = x[: num_samples - seen]
        seen += len(x)
        yield x.to(device)


class TrainingCalibration:
    """``calibration(num_samples, batch_size)``: the same seeded batches of ``subset`` at every
    call, read from disk (and transformed) once, kept on the CPU and moved to ``device`` per pass."""

    def __init__(self, subset: Any, device: torch.device | str, seed: int = 0) -> None:
        self.subset, self.device, self.seed = subset, device, seed
        self._cache: dict[tuple[int, int], list[Any]] = {}

    def __call__(self, num_samples: int, batch_size: int = 64) -> Iterator[Any]:
        key = (num_samples, batch_size)
        if key not in self._cache:
            self._cache[key] = list(calibration_batches(self.subset, num_samples, batch_size, "cpu", self.seed))
        for x in self._cache[key]:
            yield x.to(self.device)
