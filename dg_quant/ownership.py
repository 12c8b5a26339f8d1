"""What a plugin owns, so that two plugins that would fight over one part of a run are refused.

A plugin module (or object) may declare ``DGQ_OWNS``: a tuple of the parts of a run it takes
over. Two loaded plugins that own the same part cannot work together: two weight quantizers put
two sets of quantizers on the same weights (and the size report counts every weight twice); two
gradient computations each replace the step's gradients. Parts nobody else claims compose freely
(``dg_quant.qtdog`` owns the weight quantization, ``dg_quant.sagm`` the gradient computation,
``dg_quant.swad`` the weight averaging, so the three run together), and a plugin that declares
nothing, such as a loss term (``dg_quant.coral``), conflicts with none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dg_quant.errors import PluginError

OWNS_ATTRIBUTE = "DGQ_OWNS"
WEIGHT_QUANTIZATION = "weight quantization"
GRADIENT_COMPUTATION = "gradient computation"
WEIGHT_AVERAGING = "weight averaging"

# Why a part can have only one owner (for the error message); other parts get a generic reason.
WHY_ONE_OWNER = {
    WEIGHT_QUANTIZATION: "each would quantize the same weights with its own quantizers",
    GRADIENT_COMPUTATION: "each replaces the step's gradients with its own (dgq_compute_gradients)",
    WEIGHT_AVERAGING: "each would replace the final model by its own average (dgq_final_model)",
}


def owned_parts(plugin: Any) -> tuple[str, ...]:
    """The parts ``plugin`` declares in ``DGQ_OWNS`` (a string or a sequence of strings)."""
    owns = getattr(plugin, OWNS_ATTRIBUTE, ())
    return (owns,) if isinstance(owns, str) else tuple(owns)


def check_owners(loaded: Mapping[str, Any], name: str, plugin: Any) -> None:
    """Refuse ``plugin`` (called ``name``) if a part it owns is owned by a plugin in ``loaded``."""
    mine = owned_parts(plugin)
    for other, other_plugin in loaded.items():
        shared = [part for part in mine if part in owned_parts(other_plugin)]
        if shared:
            part = shared[0]
            why = WHY_ONE_OWNER.get(part, "a run can have only one")
            raise PluginError(
                f"--plugin {other} and --plugin {name} cannot run together: both own the {part} ({why}); "
                "drop one of them"
            )
