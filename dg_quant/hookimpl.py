"""The marker plugins use for their hook implementations: ``@dg_quant.hookimpl``."""

import pluggy

hookimpl = pluggy.HookimplMarker("dg_quant")
