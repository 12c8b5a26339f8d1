"""FQAT's options: the shared QAT flags with FQAT's defaults, SAGM's ρ/α, and the freezing switches.

Defaults follow the paper (docs/methods.md 7.1, 7.4, 7.5): weights *and* activations at the same bit
width, first conv with only its input quantized, classifier FP, MSE range initialisation,
quantization from the first step; scale factors whose task-gradient disorder over the last K steps
is below τ lose their task gradient for the next K steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from dg_quant.errors import ConfigError
from dg_quant.options import option
from dg_quant.plugins.fqat.disorder import SIGNALS
from dg_quant.plugins.qat import QATOptions
from dg_quant.quant import LSQConfig
from dg_quant.sharpness import SAGMOptions


@dataclass
class FQATOptions(QATOptions, SAGMOptions):
    """Every FQAT setting (one flag each; ``search`` gives the DomainBed random-search draw)."""

    rho: float = option(0.05, "SAGM perturbation radius ρ (FQAT keeps SAM's 0.05, not searched)")
    alpha: float = option(
        0.001, "SAGM α, set per dataset as in SAGM (PACS/OfficeHome 0.001, DomainNet 0.0005), not searched"
    )
    bits: int = option(
        4, "weight (and by default activation) bit width, 2..8", search=lambda r: int(r.choice([3, 4, 5]))
    )
    quant_start_step: int | None = option(
        0, "step at which quantization switches on (FQAT: 0, from an FP fine-tuned model)", type=int
    )
    weight_init: str = option("mse", "step initialisation for weights", choices=("lsq", "mse"))
    act_bits: int | None = option(None, "input-activation bit width (default: same as --bits)", type=int)
    act_init: str = option("mse", "step initialisation for activations (first batch)", choices=("lsq", "mse"))
    first_layer: str = option("activations_only", "first layer policy", choices=("full", "fp", "activations_only"))
    quantizer: str = option(
        "lsq", "backward of the quantizers: LSQ's STE or EWGS's scaled gradient", choices=("lsq", "ewgs")
    )
    ewgs_delta: float = option(1e-3, "EWGS fixed δ (on inputs normalised to [0, 1]; 0 = STE)")
    ewgs_hessian: bool = option(False, "EWGS: estimate δ per layer from the Hessian trace instead")
    ewgs_update_every: int = option(0, "EWGS Hessian δ refresh interval in steps (0: once per epoch)")
    ewgs_hessian_batches: int = option(
        10, "EWGS Hessian δ: average over up to this many batches of 16 samples, cut from the step's batch (EWGS: 10)"
    )
    freeze_steps: int = option(
        100,
        "K: steps per disorder window and per freezing decision",
        search=lambda r: int(r.choice([50, 100, 200, 500])),
    )
    freeze_tau: float = option(
        0.3, "τ: disorder threshold of the freezing rule", search=lambda r: float(r.choice([0.1, 0.2, 0.3, 0.4, 0.5]))
    )
    freeze_if: str = option(
        "below_tau",
        "freeze scale factors whose disorder is below τ (paper) or above it (Reverse Freeze)",
        choices=("below_tau", "above_tau"),
    )
    freeze_mode: str = option(
        "drop_task_grad",
        "a frozen scale factor gets only the flatness gradient (paper) or no update at all (Freeze Both)",
        choices=("drop_task_grad", "freeze_s"),
    )
    unfreeze: bool = option(True, "re-select the frozen set every K steps (false: frozen stays frozen)")
    update_mode: str = option(
        "joint",
        "scale factors get g_QAT + g_flat (joint) or g_QAT and g_flat "
        "on alternate steps without freezing (Alter Update)",
        choices=("joint", "alternate"),
    )
    disorder_signal: str = option("task", "which gradient's sign flips define the disorder", choices=SIGNALS)
    disorder_reduce: str = option(
        "mean", "one decision per scale tensor (mean over channels) or per element", choices=("mean", "per_element")
    )
    perturb_s: bool = option(True, "include the scale factors in SAGM's perturbation")
    grad_combine: str = option("half", "½(g_QAT + g_flat) as SAGM's code, or the plain sum", choices=("half", "sum"))
    scale_lr: float | None = option(
        None, "fixed learning rate of the scale factors (default: the optimizer's)", type=float
    )

    def __post_init__(self) -> None:
        SAGMOptions.__post_init__(self)
        if self.act_bits is None:
            self.act_bits = self.bits
        if self.act_bits != 0:
            LSQConfig(bits=self.act_bits)
        if self.quant_start_step is not None and self.quant_start_step < 0:
            raise ConfigError(f"quant_start_step must be >= 0; got {self.quant_start_step}")
        if self.qtdog_compat:
            raise ConfigError("--qtdog_compat is a QT-DoG switch; FQAT trains every quantizer, drop it")
        if self.freeze_steps < 2:
            raise ConfigError(f"freeze_steps (K) must be >= 2 to see a sign flip; got {self.freeze_steps}")
        if not 0 <= self.freeze_tau <= 1:
            raise ConfigError(f"freeze_tau is a fraction of flips, in [0, 1]; got {self.freeze_tau}")
        if self.ewgs_delta < 0 or self.ewgs_update_every < 0:
            raise ConfigError("ewgs_delta and ewgs_update_every must be >= 0")
        if self.ewgs_hessian_batches < 1:
            raise ConfigError(f"ewgs_hessian_batches must be >= 1; got {self.ewgs_hessian_batches}")
        if self.scale_lr is not None and not self.scale_lr > 0:
            raise ConfigError(f"scale_lr must be > 0; got {self.scale_lr}")

    @property
    def combine_weight(self) -> float:
        return 0.5 if self.grad_combine == "half" else 1.0
