"""EoQ: an ensemble of quantized models that averages member logits (QT-DoG Eq. 6).

``y = argmax_k softmax((1/E) * sum_i f(x; w_q^i))_k``: the softmax does not change the argmax, so
the ensemble's output is the mean of the members' logits (EoA sums them; same prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant import compression_report


class LogitEnsemble(nn.Module):
    """Members' mean logits; members keep their own (fake-)quantized weights."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member model")
        self.members = nn.ModuleList(members)
        # The first member's input transform (members of one EoQ share the backbone).
        self.transform = getattr(members[0], "transform", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


@dataclass
class EnsembleSize:
    """Stored size of the ensemble against one full-precision member (QT-DoG Table 1's point)."""

    members: int
    member_packed_mb: list[float]
    ensemble_packed_mb: float
    fp_model_mb: float
    ensemble_over_fp: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"EoQ of {self.members}: {self.ensemble_packed_mb:.3f} MiB packed vs one FP32 model "
            f"{self.fp_model_mb:.3f} MiB ({self.ensemble_over_fp:.2f}x its size)"
        )


def ensemble_size(members: Sequence[nn.Module], fp_model: nn.Module | None = None) -> EnsembleSize:
    """Sum of the members' bit-packed sizes, and the FP32 size of one model.

    Without ``fp_model`` the reference is the first member stored entirely in FP32 (its
    quantizers' step sizes not counted), i.e. the same architecture unquantized.
    """
    if not members:
        raise ConfigError("an ensemble needs at least one member model")
    packed = [compression_report(m).packed_bytes / 2**20 for m in members]
    reference = compression_report(fp_model if fp_model is not None else members[0])
    fp_mb = reference.fp32_bytes / 2**20
    total = float(sum(packed))
    return EnsembleSize(len(members), packed, total, fp_mb, total / fp_mb)
