"""Forward passes that leave normalisation statistics untouched.

A second, perturbed or probing forward pass (SAGM's perturbed gradient, EWGS's Hessian probes) must
not move BatchNorm running statistics, or the model would depend on how many extra passes ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Run the block with every BatchNorm's running statistics left exactly as they were.

    SAGM sets BN momentum to 0 for the perturbed pass; this is the exact version of that (it also
    keeps ``num_batches_tracked`` and cumulative-average BNs unchanged). A training-mode BatchNorm
    normalises with batch statistics either way, so switching ``track_running_stats`` off for the
    block skips the update without copying a buffer; other norms with buffers (InstanceNorm
    updates them regardless of that flag) are saved and restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    tracking = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    others = [m for m in norms if not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in others]
    for module in tracking:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in tracking:
            module.track_running_stats = True
        with torch.no_grad():
            for module, buffers in zip(others, saved):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
