"""Backbone adapters; importing this package registers them with ``dg_quant.registry``.

Each module registers its adapters with ``@register_adapter``; an adapter returns a
``dg_quant.DGModel`` (featurizer + classifier head, ``d_out``, input transform or tokenizer).
"""

from dg_quant.adapters.backbones import small  # noqa: F401  (registers on import)
