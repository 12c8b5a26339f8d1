"""Each adapter's quantization policy: which weight tensors are quantized, and what stays FP.

The policy is declared by the adapter (module kinds inside the featurizer) rather than derived
from ``quantize_``, so a test can check that training really quantized exactly what the adapter
promises. It matches ``quantize_``'s default plan (every conv, linear and attention input
projection except the head) for the models built here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dg_quant.quant.api import weight_names

FEATURIZER = "featurizer"
HEAD = "classifier"


@dataclass(frozen=True)
class QuantPolicy:
    """Quantize the weights (and, if asked, input activations) of ``kinds`` inside the featurizer.

    ``full_precision`` says in words what is left in floating point, and why.
    """

    kinds: tuple[type[nn.Module], ...]
    full_precision: str = "classifier head, normalisation layers, biases"

    def quantized_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules whose weights the policy quantizes, by ``model.named_modules()`` name."""
        featurizer = getattr(model, FEATURIZER)
        return {
            name: m
            for name, m in featurizer.named_modules(prefix=FEATURIZER)
            if isinstance(m, self.kinds) and weight_names(m)
        }

    def quantized_weights(self, model: nn.Module) -> set[str]:
        """``module.tensor`` names of every quantized weight (``attn.in_proj_weight`` for MHA)."""
        return {f"{name}.{t}" for name, m in self.quantized_modules(model).items() for t in weight_names(m)}

    def filter_fn(self, model: nn.Module) -> Callable[[nn.Module, str], bool]:
        """A ``quantize_(..., filter_fn=...)`` that keeps exactly this policy's modules."""
        allowed = set(self.quantized_modules(model))
        return lambda _module, name: name in allowed


CONV = QuantPolicy(kinds=(nn.Conv2d,))
TRANSFORMER = QuantPolicy(
    kinds=(nn.Conv2d, nn.Linear, nn.MultiheadAttention),
    full_precision="classifier head, position/class embeddings, LayerNorms, biases",
)
TEXT = QuantPolicy(
    kinds=(nn.Linear,),
    full_precision="classifier head, token/position embeddings, LayerNorms, biases",
)


def policy_of(model: nn.Module) -> QuantPolicy:
    """The policy an adapter attached to its model (``model.quant_policy``)."""
    policy = getattr(model, "quant_policy", None)
    if not isinstance(policy, QuantPolicy):
        raise TypeError(f"{type(model).__name__} was not built by a backbone adapter with a quant_policy")
    return policy


def attach(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Record ``policy`` on the model (a plain attribute: not saved in the state dict)."""
    model.quant_policy = policy
    return model
