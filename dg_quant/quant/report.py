"""Compression report: bits per layer and the bit-packed model size against FP32."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from dg_quant.quant.api import ACT_QUANTIZER, iter_quantized_weights, iter_quantizers
from dg_quant.quant.inq import iter_inq_layers

FP_BITS = 32


@dataclass
class LayerBits:
    """One weight tensor: how many values, at how many bits, with how many FP32 scales.

    ``unfrozen`` counts INQ weights not yet on a level; the export keeps them exactly, at one
    mask bit per weight of the tensor plus their FP32 value.
    """

    name: str
    numel: int
    bits: int
    scales: int
    unfrozen: int = 0

    @property
    def packed_bits(self) -> int:
        packed = self.numel * self.bits + self.scales * FP_BITS
        if not self.unfrozen:
            return packed
        return min(packed + self.numel + self.unfrozen * FP_BITS, self.numel * FP_BITS)  # as the export


@dataclass
class CompressionReport:
    """Sizes in bytes of the model stored as FP32 and stored bit-packed (fp parts in FP32)."""

    layers: list[LayerBits] = field(default_factory=list)
    fp_params: int = 0
    buffer_bytes: int = 0

    @property
    def fp32_bytes(self) -> int:
        quantized = sum(layer.numel for layer in self.layers)
        return (quantized + self.fp_params) * FP_BITS // 8 + self.buffer_bytes

    @property
    def packed_bytes(self) -> int:
        packed_bits = sum(layer.packed_bits for layer in self.layers) + self.fp_params * FP_BITS
        return -(-packed_bits // 8) + self.buffer_bytes

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.packed_bytes, 1)

    @property
    def quantized_fraction(self) -> float:
        total = sum(layer.numel for layer in self.layers) + self.fp_params
        return sum(layer.numel for layer in self.layers) / max(total, 1)

    def summary(self) -> dict:
        """Flat numbers for result files."""
        return {
            "fp32_mb": self.fp32_bytes / 2**20,
            "packed_mb": self.packed_bytes / 2**20,
            "compression_ratio": self.ratio,
            "quantized_param_fraction": self.quantized_fraction,
            "quantized_layers": len(self.layers),
        }

    def table(self) -> str:
        """A plain-text table: one row per quantized tensor, then the totals."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'params':>10}  bits"]
        lines += [f"{layer.name:<{width}}  {layer.numel:>10}  {layer.bits:>4}" for layer in self.layers]
        s = self.summary()
        lines.append(
            f"FP32 {s['fp32_mb']:.3f} MiB -> packed {s['packed_mb']:.3f} MiB "
            f"(x{s['compression_ratio']:.2f}; {100 * s['quantized_param_fraction']:.1f}% of parameters quantized)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers], **self.summary()}


def compression_report(model: nn.Module, include_disabled: bool = False) -> CompressionReport:
    """Count what a bit-packed export of ``model`` would hold.

    Quantized weights cost ``bits`` each plus one FP32 scale per step entry; every other
    parameter is FP32; floating buffers (BatchNorm statistics) count at their own size. Step
    sizes are counted as the scales, not as parameters. Disabled quantizers count as FP unless
    ``include_disabled``. INQ weights (``dg_quant.inq``) count at their code width b once their
    first partition is applied (no scales: n1, n2 are two header integers), with the weights of
    an unfinished partition as ``unfrozen``; INQ's integer training buffers are not counted.
    """
    report = CompressionReport()
    quantized_ids: set[int] = set()
    for name, module, tensor_name, q in iter_quantized_weights(model):
        if not (q.enabled or include_disabled):
            continue
        latent = module.parametrizations[tensor_name].original
        quantized_ids.add(id(latent))
        report.layers.append(LayerBits(f"{name}.{tensor_name}", latent.numel(), q.bits, q.step.numel()))
    for layer in iter_inq_layers(model):
        weight = layer.module.weight
        if id(weight) in quantized_ids or not layer.partitions_applied:  # b is known from n1, n2 only
            continue
        quantized_ids.add(id(weight))
        unfrozen = int((~layer.frozen).sum())
        report.layers.append(LayerBits(f"{layer.name}.weight", weight.numel(), layer.bits, 0, unfrozen))
    step_ids = {id(q.step) for _, q in iter_quantizers(model)}
    act_ids = {
        id(p)
        for _, m in model.named_modules()
        if hasattr(m, ACT_QUANTIZER)
        for p in getattr(m, ACT_QUANTIZER).parameters()
    }
    for p in model.parameters():
        if id(p) in quantized_ids:
            continue
        if id(p) in step_ids and id(p) not in act_ids:
            continue
        report.fp_params += p.numel()
    report.buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    return report
