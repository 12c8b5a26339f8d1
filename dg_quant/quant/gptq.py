"""Layer-wise PTQ solvers' shared part and GPTQ (Frantar et al., ICLR 2023; METHODS.md 5.1, 5.3).

A solver owns one Conv2d/Linear layer and follows the verbs ``add_batch(inp, out)`` (accumulate
the Hessian H = 2 E[x x^T] of the layer's inputs) -> ``quantize()`` (write quantized weights,
return errors) -> ``free()``. The grid is per output channel, signed like the LSQ weight
quantizer ([-2^(b-1), 2^(b-1)-1] times a step), with the step from the MSE search, so that
the result can be held by an ``LSQQuantizer`` and exported as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from dg_quant.errors import ConfigError
from dg_quant.quant.init import mse_step
from dg_quant.quant.lsq import integer_bounds


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
        return {"layer": self.name, "method": self.method, "rows": self.rows, "cols": self.cols,
                "error": self.error, "rtn_error": self.rtn_error, "relative_error": self.relative_error,
                "relative_rtn_error": self.relative_rtn_error}


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
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ConfigError(f"{name}: PTQ supports Conv2d with groups=1, zero and numeric padding only")
        elif not isinstance(layer, nn.Linear):
            raise ConfigError(f"{name}: PTQ supports Conv2d and Linear layers, not {type(layer).__name__}")
        self.layer, self.bits, self.name, self.damp = layer, bits, name, damp
        self.weight = solver_weight(layer)
        self.qn, self.qp = integer_bounds(bits, signed=True)
        self.cols = self.weight[0].numel()
        self.H: torch.Tensor | None = torch.zeros(self.cols, self.cols, dtype=torch.float64,
                                                  device=self.weight.device)
        self.nsamples = 0
        self.step: torch.Tensor | None = None

    # -- verbs ----------------------------------------------------------------------------

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Fold one batch of layer inputs into the running mean H <- H n/(n+B) + 2/(n+B) X X^T."""
        batch = inp.shape[0]
        x = self._columns(inp.detach()).double()
        self.H.mul_(self.nsamples / (self.nsamples + batch))
        self.nsamples += batch
        self.H.addmm_(x, x.T, alpha=2.0 / self.nsamples)

    def quantize(self) -> LayerResult:
        """Quantize the layer's weight in place; returns the solver's and RTN's errors."""
        if self.nsamples == 0:
            raise ConfigError(f"{self.name}: no calibration batch reached this layer")
        W = self.weight.detach().reshape(self.weight.shape[0], -1).double()
        self.step = mse_step(W, self.qn, self.qp, per_channel=True).double().clamp_min(1e-12)
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W_solve = W.clone()
        W_solve[:, dead] = 0.0
        H += self.damp * torch.mean(torch.diag(H)) * torch.eye(self.cols, dtype=H.dtype, device=H.device)
        Q = self._solve(W_solve, H)
        Q = self.fake_quant(Q)  # exactly on the grid (the solvers already are, up to float noise)
        result = LayerResult(self.name, self.method, W.shape[0], self.cols, self.error(W, Q),
                             self.error(W, self.fake_quant(W)), self.energy(W))
        with torch.no_grad():
            self.weight.copy_(Q.reshape(self.weight.shape).to(self.weight.dtype))
        return result

    def free(self) -> None:
        self.H = None

    # -- helpers --------------------------------------------------------------------------

    def _solve(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        s = (self.step if step is None else step).reshape(-1, *([1] * (W.dim() - 1)))
        return torch.clamp(torch.round(W / s), -self.qn, self.qp) * s

    def error(self, W: torch.Tensor, Q: torch.Tensor) -> float:
        """E_x ||(W - Q) x||^2 = tr(dW (H/2) dW^T) with the undamped Hessian."""
        d = W - Q
        return float(((d @ self.H) * d).sum() / 2)

    def energy(self, W: torch.Tensor) -> float:
        return float(((W @ self.H) * W).sum() / 2)


class GPTQ(LayerSolver):
    """Columns left to right (or by descending diag H), lazy blocks, Cholesky of H^-1.

    For column i: q_i = quant(w_i), err = (w_i - q_i)/U_ii, and the later columns absorb
    err * U[i, i+1:]; blocks of ``blocksize`` columns defer the update to the rest of the matrix.
    """

    method = "gptq"

    def __init__(self, layer: nn.Module, bits: int, name: str = "", damp: float = 0.01,
                 blocksize: int = 128, act_order: bool = False) -> None:
        super().__init__(layer, bits, name, damp)
        self.blocksize, self.act_order = blocksize, act_order

    def _solve(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        W = W.clone()
        perm = torch.argsort(torch.diag(H), descending=True) if self.act_order else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        Q = torch.zeros_like(W)
        step = self.step.unsqueeze(1)
        for i1 in range(0, self.cols, self.blocksize):
            i2 = min(i1 + self.blocksize, self.cols)
            W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                w = W1[:, i:i + 1]
                q = self.fake_quant(w, step)
                Q[:, i1 + i] = q[:, 0]
                err = (w - q) / U1[i, i]
                W1[:, i:] -= err @ U1[i:i + 1, i:]
                Err1[:, i] = err[:, 0]
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return Q
