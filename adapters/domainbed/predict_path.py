"""The part of any DomainBed algorithm that a quantization method quantizes: what ``predict`` runs.

A DomainBed algorithm builds several networks (featurizer, classifier, DANN's discriminator,
SagNet's style networks, CAD's projection head); only those that ``predict`` runs are deployed.
``PredictPath`` traces one ``predict`` call and holds the leaf modules it ran, in the order they
ran, so the quantization policy's rules for ``DGModel`` apply unchanged: the first layer that
runs is the first layer (``--first_layer``), the last ``nn.Linear`` that runs is the classifier
head (kept in full precision unless ``--quantize_head``), everything between is quantized, and
networks used in training only stay in full precision. Its modules are the algorithm's own
objects, so quantizers attached to it sit in the algorithm (and in its ``state_dict``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dg_quant.errors import ConfigError


class PredictPath(nn.Module):
    """The leaf modules an algorithm's ``predict`` runs, as children in running order.

    ``forward`` is the algorithm's ``predict`` and ``train``/``eval`` switch the whole algorithm,
    so post-training quantization can calibrate through it. Child names are the algorithm's
    module names with ``/`` for ``.`` (``featurizer/network/conv1``).
    """

    def __init__(self, algorithm: nn.Module, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "_algorithm", algorithm)  # not a child: its other networks stay out
        for name, module in modules.items():
            self.add_module(name.replace(".", "/"), module)

    @classmethod
    def trace(cls, algorithm: nn.Module, input_shape: tuple[int, ...]) -> PredictPath:
        """Run ``algorithm.predict`` once on a zero batch (eval mode, no gradient) and keep what ran."""
        names: dict[int, str] = {}
        for name, module in algorithm.named_modules():
            if name and not any(True for _ in module.children()):
                names.setdefault(id(module), name)
        ran: dict[str, nn.Module] = {}
        modules = dict(algorithm.named_modules())

        def record(module: nn.Module, _args: Any, _out: Any) -> None:
            name = names.get(id(module))
            if name is not None:
                ran.setdefault(name, module)

        handles = [modules[name].register_forward_hook(record) for name in names.values()]
        was_training = algorithm.training
        try:
            algorithm.eval()
            with torch.no_grad():
                algorithm.predict(torch.zeros(2, *input_shape))
        except Exception as exc:
            raise ConfigError(
                f"{type(algorithm).__name__}.predict failed on a zero batch of shape {(2, *input_shape)} ({exc}); "
                "quantization cannot find the networks it predicts with"
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
            algorithm.train(was_training)
        if not ran:
            raise ConfigError(f"{type(algorithm).__name__}.predict runs no module; nothing to quantize")
        return cls(algorithm, ran)

    def forward(self, x: Any) -> torch.Tensor:
        return self._algorithm.predict(x)

    def train(self, mode: bool = True) -> PredictPath:
        """Switch the whole algorithm (its BatchNorm and dropout live outside this view too)."""
        self._algorithm.train(mode)
        self.training = mode
        return self
