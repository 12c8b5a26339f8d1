"""Layer-wise PTQ solvers' shared part and GPTQ (Frantar et al., ICLR 2023; docs/methods.md 5.1, 5.3).

A solver owns one Conv2d/Linear layer and follows the verbs ``add_batch(inp, out)`` (accumulate
the Hessian H = 2 E[x x^T] of the layer's inputs) -> ``quantize()`` (write quantized weights,
return errors) -> ``free()``. The grid is per output channel, signed like the LSQ weight
quantizer ([-2^(b-1), 2^(b-1)-1] times a step), with the step from the MSE search, so that
the result can be held by an ``LSQQuantizer`` and exported as is.

A grouped conv (``groups`` > 1, depthwise included) is ``groups`` independent problems: the
output channels of group g only see the input channels of group g. Its solver keeps one Hessian
per group, ``H`` of shape [groups, cols, cols], and works on the weight as [groups, rows/groups,
cols]; every step (accumulation, Cholesky, the solvers' column loops) is batched over the groups
instead of looping over them in Python. With ``groups == 1`` the tensors stay 2-D and the
arithmetic is the same as for an ungrouped layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from dg_quant.errors import ConfigError
from dg_quant.quant.init import mse_step
from dg_quant.quant.lsq import integer_bounds

GROUP_CHUNK_ELEMENTS = 1 << 24  # unfolded input values per Hessian update of a grouped conv


@dataclass
class LayerResult:
    """Reconstruction error E||W x - W_q x||^2 per calibration image, for the solver and for RTN."""

    name: str
    method: str
    rows: int
    cols: int
    error: float
    rtn_error: float
    output_energy: float

    @property
    def relative_error(self) -> float:
        return self.error / max(self.output_energy, 1e-30)

    @property
    def relative_rtn_error(self) -> float:
        return self.rtn_error / max(self.output_energy, 1e-30)

    def to_dict(self) -> dict:
        return {
            "layer": self.name,
            "method": self.method,
            "rows": self.rows,
            "cols": self.cols,
            "error": self.error,
            "rtn_error": self.rtn_error,
            "relative_error": self.relative_error,
            "relative_rtn_error": self.relative_rtn_error,
        }


def layer_groups(layer: nn.Module) -> int:
    """How many independent weight groups the layer has (a conv's ``groups``; 1 otherwise)."""
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def diagonal(H: torch.Tensor) -> torch.Tensor:
    """The diagonal of H, or of each group's H, as a contiguous [..., cols] tensor."""
    return torch.diagonal(H, dim1=-2, dim2=-1).contiguous()


def inverse_hessian(H: torch.Tensor, name: str) -> torch.Tensor:
    """H^-1 (per group) via Cholesky; a matrix that is not positive definite is a config error."""
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(H))
    except torch.linalg.LinAlgError:
        raise ConfigError(
            f"{name}: the calibration Hessian is singular; raise the damping (--ptq_damp / PTQConfig.damp)"
        ) from None


def solver_weight(layer: nn.Module) -> torch.Tensor:
    """The tensor a solver reads and overwrites: the latent weight behind a (disabled) quantizer."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


class LayerSolver:
    """Hessian accumulation, grid and error bookkeeping shared by OBQ and GPTQ."""

    method = "base"

    def __init__(self, layer: nn.Module, bits: int, name: str = "", damp: float = 0.01) -> None:
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ConfigError(f"{name}: PTQ supports Conv2d with zero and numeric padding only")
        elif not isinstance(layer, nn.Linear):
            raise ConfigError(f"{name}: PTQ supports Conv2d and Linear layers, not {type(layer).__name__}")
        self.layer, self.bits, self.name, self.damp = layer, bits, name, damp
        self.weight = solver_weight(layer)
        self.qn, self.qp = integer_bounds(bits, signed=True)
        self.cols = self.weight[0].numel()  # inputs per output: one group's C_in/groups * kh * kw
        self.groups = layer_groups(layer)
        shape = (self.cols, self.cols) if self.groups == 1 else (self.groups, self.cols, self.cols)
        self.H: torch.Tensor | None = torch.zeros(shape, dtype=torch.float64, device=self.weight.device)
        self.nsamples = 0
        self.step: torch.Tensor | None = None

    # -- verbs ----------------------------------------------------------------------------

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Fold one batch of layer inputs into the running mean H <- H n/(n+B) + 2/(n+B) X X^T."""
        batch = inp.shape[0]
        inp = inp.detach()
        self.H.mul_(self.nsamples / (self.nsamples + batch))
        self.nsamples += batch
        if self.groups == 1:
            x = self._columns(inp).double()
            self.H.addmm_(x, x.T, alpha=2.0 / self.nsamples)
            return
        for g1, g2 in self._group_chunks(inp):
            x = self._group_columns(inp, g1, g2).double()  # [g2 - g1, cols, tokens]
            self.H[g1:g2].baddbmm_(x, x.transpose(1, 2), alpha=2.0 / self.nsamples)

    def quantize(self) -> LayerResult:
        """Quantize the layer's weight in place; returns the solver's and RTN's errors."""
        if self.nsamples == 0:
            raise ConfigError(f"{self.name}: no calibration batch reached this layer")
        W = self.weight.detach().reshape(self.weight.shape[0], -1).double()
        self.step = mse_step(W, self.qn, self.qp, per_channel=True).double().clamp_min(1e-12)
        H = self.H.clone()
        dead = diagonal(H) == 0  # [cols], or [groups, cols]: inputs never nonzero
        H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
        W_solve = self.grouped(W).masked_fill(dead.unsqueeze(-2), 0.0)
        H.diagonal(dim1=-2, dim2=-1).add_(self.damp * torch.mean(diagonal(H), dim=-1, keepdim=True))
        Q = self._solve(W_solve, H).reshape(W.shape)
        Q = self.fake_quant(Q)  # exactly on the grid (the solvers already are, up to float noise)
        result = LayerResult(
            self.name,
            self.method,
            W.shape[0],
            self.cols,
            self.error(W, Q),
            self.error(W, self.fake_quant(W)),
            self.energy(W),
        )
        with torch.no_grad():
            self.weight.copy_(Q.reshape(self.weight.shape).to(self.weight.dtype))
        return result

    def free(self) -> None:
        self.H = None

    # -- helpers --------------------------------------------------------------------------

    def _solve(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """Quantize ``W`` ([rows, cols], or [groups, rows/groups, cols]) against the damped ``H``."""
        raise NotImplementedError

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor [rows, ...] as [groups, rows/groups, ...]; unchanged for one group."""
        return t if self.groups == 1 else t.reshape(self.groups, -1, *t.shape[1:])

    def _group_chunks(self, inp: torch.Tensor) -> list[tuple[int, int]]:
        """Group ranges whose unfolded inputs fit ``GROUP_CHUNK_ELEMENTS`` (at least one group each)."""
        layer = self.layer
        out_hw = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(inp.shape[-2:], layer.padding, layer.dilation, layer.kernel_size, layer.stride)
        ]
        per_group = self.cols * inp.shape[0] * out_hw[0] * out_hw[1]
        chunk = max(1, GROUP_CHUNK_ELEMENTS // max(per_group, 1))
        return [(g, min(g + chunk, self.groups)) for g in range(0, self.groups, chunk)]

    def _group_columns(self, inp: torch.Tensor, g1: int, g2: int) -> torch.Tensor:
        """Groups g1..g2-1's unfolded inputs as [g2 - g1, cols, tokens] (group g sees only its channels)."""
        layer = self.layer
        per_group = layer.in_channels // self.groups
        unfold = nn.Unfold(layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        patches = unfold(inp[:, g1 * per_group : g2 * per_group])  # [N, (g2-g1)*cols, L], group-major
        n, _, length = patches.shape
        return patches.reshape(n, g2 - g1, self.cols, length).permute(1, 2, 0, 3).reshape(g2 - g1, self.cols, -1)

    def _columns(self, inp: torch.Tensor) -> torch.Tensor:
        """Layer inputs as [cols, tokens]: unfolded patches for a conv, rows of features for a linear."""
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            unfold = nn.Unfold(layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
            patches = unfold(inp)  # [N, C*kh*kw, L], same column order as weight.flatten(1)
            return patches.permute(1, 0, 2).reshape(self.cols, -1)
        return inp.reshape(-1, self.cols).T

    def fake_quant(self, W: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        """Round to the per-row grid; ``step`` broadcasts against ``W`` (defaults to the layer's)."""
        s = (self.step if step is None else step).reshape(*W.shape[:-1], 1)
        return torch.clamp(torch.round(W / s), -self.qn, self.qp) * s

    def error(self, W: torch.Tensor, Q: torch.Tensor) -> float:
        """E_x ||(W - Q) x||^2 = tr(dW (H/2) dW^T) with the undamped Hessian (summed over groups)."""
        d = self.grouped(W - Q)
        return float(((d @ self.H) * d).sum() / 2)

    def energy(self, W: torch.Tensor) -> float:
        W = self.grouped(W)
        return float(((W @ self.H) * W).sum() / 2)


class GPTQ(LayerSolver):
    """Columns left to right (or by descending diag H), lazy blocks, Cholesky of H^-1.

    For column i: q_i = quant(w_i), err = (w_i - q_i)/U_ii, and the later columns absorb
    err * U[i, i+1:]; blocks of ``blocksize`` columns defer the update to the rest of the matrix.
    """

    method = "gptq"

    def __init__(
        self,
        layer: nn.Module,
        bits: int,
        name: str = "",
        damp: float = 0.01,
        blocksize: int = 128,
        act_order: bool = False,
    ) -> None:
        super().__init__(layer, bits, name, damp)
        self.blocksize, self.act_order = blocksize, act_order

    def _solve(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        W = W.clone()
        perm = torch.argsort(diagonal(H), dim=-1, descending=True) if self.act_order else None
        if perm is not None:  # each group gets its own order
            W = W.gather(-1, perm.unsqueeze(-2).expand_as(W))
            H = H.gather(-2, perm.unsqueeze(-1).expand_as(H)).gather(-1, perm.unsqueeze(-2).expand_as(H))
        U = torch.linalg.cholesky(inverse_hessian(H, self.name), upper=True)
        Q = torch.zeros_like(W)
        step = self.grouped(self.step.unsqueeze(1))
        for i1 in range(0, self.cols, self.blocksize):
            i2 = min(i1 + self.blocksize, self.cols)
            W1, U1 = W[..., i1:i2].clone(), U[..., i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                w = W1[..., i : i + 1]
                q = self.fake_quant(w, step)
                Q[..., i1 + i] = q[..., 0]
                err = (w - q) / U1[..., i : i + 1, i : i + 1]
                W1[..., i:] -= err @ U1[..., i : i + 1, i:]
                Err1[..., i] = err[..., 0]
            W[..., i2:] -= Err1 @ U[..., i1:i2, i2:]
        if perm is not None:
            Q = Q.gather(-1, torch.argsort(perm, dim=-1).unsqueeze(-2).expand_as(Q))
        return Q
