"""Backbone adapters; importing this package registers them with ``dg_quant.registry``.

Each module registers its adapters with ``@register_adapter``; an adapter returns a
``dg_quant.DGModel`` (featurizer + classifier head, ``d_out``, input transform or tokenizer)
whose quantizable modules are every convolution, linear and attention input projection of the
featurizer (``dg_quant.quant.quantize_``'s default plan), the head staying in full precision.
Names starting with ``test_`` are tiny variants of the real code paths, for fast tests.

| family | adapters |
|---|---|
| small CNNs | ``digits_cnn``, ``test_cnn`` |
| resnet | ``resnet50``, ``resnet18``, ``test_resnet`` |
| resnext | ``resnext50_32x4d``, ``resnext50_32x4d_ig1b``, ``test_resnext`` |
| mobilenet | ``mobilenet_v2``, ``test_mobilenet`` |
| densenet | ``densenet121`` (WILDS Camelyon17), ``test_densenet`` |
| deit | ``deit_tiny``, ``deit_small``, ``deit_base``, ``test_deit`` |
| clip | ``clip_vit_b16``, ``test_clip_vit`` |
| distilbert / text | ``distilbert``, ``hf_encoder``, ``test_distilbert`` |
"""

from dg_quant.adapters.backbones import (  # noqa: F401  (register on import)
    clip_vit,
    deit,
    densenet,
    mobilenet,
    resnet,
    small,
    text,
)
