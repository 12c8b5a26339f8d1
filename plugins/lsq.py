"""Plain LSQ quantization-aware training from the first step (the QAT baseline of both papers).

Same options as ``dg_quant.qtdog``; only the switch-on step defaults to 0.
"""

from dg_quant.ownership import WEIGHT_QUANTIZATION
from dg_quant.qat import QATHooks

DGQ_OWNS = (WEIGHT_QUANTIZATION,)  # LSQ quantizers on the weights; one quantizer per run

_hooks = QATHooks(default_start=0)

dgq_add_options = _hooks.dgq_add_options
dgq_configure = _hooks.dgq_configure
dgq_configure_model = _hooks.dgq_configure_model
dgq_step_start = _hooks.dgq_step_start
dgq_after_step = _hooks.dgq_after_step
