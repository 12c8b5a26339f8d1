"""dg-quant: quantization-aware training for domain generalization, as pluggy plugins.

Public API: ``hookimpl`` for plugins, ``quantize_`` and configs for models, ``create_adapter``
and ``list_adapters`` for backbones, ``PluginHost`` and ``Trainer`` for hosts.
"""

from dg_quant.errors import CheckpointError, ConfigError, DataError, DGQuantError, PluginError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import BUILTIN_PLUGINS, PluginHost, known_plugins
from dg_quant.loop import Trainer
from dg_quant.model import DGModel
from dg_quant.quant import LSQConfig, QuantConfig, compression_report, quantize_, set_quantization
from dg_quant.registry import create_adapter, list_adapters, register_adapter

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_PLUGINS",
    "CheckpointError",
    "ConfigError",
    "DGModel",
    "DGQuantError",
    "DataError",
    "LSQConfig",
    "PluginError",
    "PluginHost",
    "QuantConfig",
    "Trainer",
    "__version__",
    "compression_report",
    "create_adapter",
    "hookimpl",
    "known_plugins",
    "list_adapters",
    "quantize_",
    "register_adapter",
    "set_quantization",
]
