"""Method plugins bundled with dg-quant, one per module (``--plugin dg_quant.<name>``)."""
