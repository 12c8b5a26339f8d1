"""QT-DoG (Javed et al., ICML 2025): ERM, then LSQ weight quantization from a given step.

Defaults follow the paper: 7-bit signed weights, per-channel steps, switched on at step 2000
(40% of a shorter run), classifier and activations in full precision. Unlike the released code,
the step sizes and the quantized weights keep training after the switch; ``--qtdog-compat true``
reproduces the released behaviour (docs/methods.md 11.3).
"""

from dg_quant.ownership import WEIGHT_QUANTIZATION
from dg_quant.qat import QATHooks

DGQ_OWNS = (WEIGHT_QUANTIZATION,)  # LSQ quantizers on the weights; one quantizer per run

_hooks = QATHooks(default_start=None)

dgq_add_options = _hooks.dgq_add_options
dgq_configure = _hooks.dgq_configure
dgq_configure_model = _hooks.dgq_configure_model
dgq_step_start = _hooks.dgq_step_start
dgq_after_step = _hooks.dgq_after_step
