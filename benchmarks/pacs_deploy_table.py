"""Deployment table on real PACS: for each backbone, FP and quantized runs (W8 QT-DoG, W8A8 LSQ, W4A4
FQAT) exported to ONNX and run in onnxruntime and through torchao, next to the fake-quant model.

    python benchmarks/pacs_deploy_table.py --runs /tmp/runs --root_dir DATA --train   # train missing runs
    python benchmarks/pacs_deploy_table.py --runs /tmp/runs --root_dir DATA           # the table only

Runs live in ``RUNS/<model>_<method>``. ``--train`` trains the missing ones with ``wilds_run``, one
after the other (the protocol below: a short FP run per backbone, from scratch or from ImageNet
weights, then each quantized run fine-tuned from that FP run's featurizer). The table exports
every run with ``dgq_export --format onnx`` (W4A4 also with ``--int4``) and measures, on a fixed
stratified subset of the held-out domain (every ``--every``-th image of each class): top-1 of
the fake-quant model, the ONNX file as deployed and op for op, and torchao; agreement with the
fake-quant model and the logit margins of the images that change prediction; file sizes; ONNX
latency at batch 1 and 32. Writes ``pacs_deploy_<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.pacs_deploy import compare, held_out_images, latency_ms, load_run, predict, runners  # noqa: E402

METHODS = {
    "fp": [],
    "w8": ["--plugin", "dg_quant.qtdog", "--bits", "8", "--quant_start_step", "0"],
    "w8a8": ["--plugin", "dg_quant.lsq", "--bits", "8", "--act_bits", "8"],
    "w4a4": ["--plugin", "dg_quant.fqat", "--bits", "4", "--act_bits", "4"],
    "w8a8_fqat": ["--plugin", "dg_quant.fqat", "--bits", "8", "--act_bits", "8"],  # the agreement check
}
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "deit_tiny")


@dataclass(frozen=True)
class Protocol:
    """How the runs are trained (short CPU runs: enough to be clearly above chance, 1/7)."""

    test_domain: str = "art_painting"
    image_size: int = 224
    batch_size: int = 8
    holdout_fraction: float = 0.05  # a small source validation split (id_val), evaluated once at the end
    fp_steps: dict[str, int] = field(
        default_factory=lambda: {"resnet18": 300, "resnet50": 400, "mobilenet_v2": 150, "deit_tiny": 300}
    )
    fp_lr: dict[str, float] = field(
        default_factory=lambda: {"resnet18": 1e-3, "resnet50": 1e-3, "mobilenet_v2": 1e-4, "deit_tiny": 5e-4}
    )
    fp_weights: dict[str, str] = field(default_factory=lambda: {"mobilenet_v2": "default"})  # else from scratch
    quant_steps: dict[str, int] = field(default_factory=lambda: {"w8": 20, "w8a8": 20, "w4a4": 12, "w8a8_fqat": 20})
    quant_lr: float = 1e-4
    seed: int = 0


def wilds_args(protocol: Protocol, model: str, method: str, run_dir: Path, root_dir: str, init: Path | None) -> list:
    """The ``wilds_run`` command line of one run."""
    steps = protocol.fp_steps[model] if method == "fp" else protocol.quant_steps[method]
    lr = protocol.fp_lr[model] if method == "fp" else protocol.quant_lr
    weights = protocol.fp_weights.get(model) if method == "fp" else str(init)
    args = [
        *METHODS[method],
        *("--dataset", "pacs", "--root_dir", root_dir, "--test_domain", protocol.test_domain),
        *("--model", model, "--image_size", str(protocol.image_size), "--batch_size", str(protocol.batch_size)),
        *("--n_steps", str(steps), "--lr", str(lr), "--holdout_fraction", str(protocol.holdout_fraction)),
        *("--eval_splits", "id_val", "--eval_every", str(steps), "--seed", str(protocol.seed)),
        *("--threads", "1", "--no_progress", "--log_dir", str(run_dir)),
    ]
    return args + (["--weights", weights] if weights else [])


def featurizer_init(fp_run: Path, model: str) -> Path:
    """The FP run's featurizer as a plain torchvision/timm checkpoint (``--weights FILE``) whose
    1000-class head is a fresh one; the quantized runs start from it (and train a new head)."""
    out = fp_run / "featurizer_init.pt"
    if out.is_file():
        return out
    state = torch.load(fp_run / "model.pt", map_location="cpu", weights_only=False)["model"]
    features = {k.removeprefix("featurizer."): v for k, v in state.items() if k.startswith("featurizer.")}
    if model == "deit_tiny":
        import timm

        net = timm.create_model("deit_tiny_patch16_224")
    else:
        import torchvision

        net = getattr(torchvision.models, model)()
    missing, unexpected = net.load_state_dict(features, strict=False)
    head = {"resnet18": "fc.", "resnet50": "fc.", "mobilenet_v2": "classifier.", "deit_tiny": "head."}[model]
    if unexpected or any(not k.startswith(head) for k in missing):
        raise SystemExit(
            f"{fp_run}: featurizer does not fit {model} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    torch.save(net.state_dict(), out)
    return out


def train(runs: Path, root_dir: str, models: list[str], methods: list[str], protocol: Protocol) -> None:
    """Train each missing run (no ``final.json``), one process at a time: FP and W8A8 of every model
    first (the target), then the other methods."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("wilds_run")
    first = [m for m in ("fp", "w8a8") if m in methods or m == "fp"]
    for group in (first, [m for m in methods if m not in first]):
        for model in models:
            for method in group:
                run_dir = runs / f"{model}_{method}"
                if (run_dir / "final.json").is_file():
                    continue
                init = featurizer_init(runs / f"{model}_fp", model) if method != "fp" else None
                cmd = [str(exe), *wilds_args(protocol, model, method, run_dir, root_dir, init)]
                print("+", " ".join(cmd), flush=True)
                tic = time.time()
                subprocess.run(cmd, env=env, check=True)
                print(f"  {run_dir.name}: {time.time() - tic:.0f} s", flush=True)


def export(run_dir: Path, int4: bool = False, int8_kernels: bool = False) -> dict[str, Any]:
    """``dgq_export RUN --format onnx [--int4] [--low_bit_int8_kernels] --checkpoint last`` into the run folder."""
    from dg_quant.adapters.wilds.export import build_parser, export_run

    flags = (["--int4"] if int4 else []) + (["--low_bit_int8_kernels"] if int8_kernels else [])
    out = run_dir / f"model{'_int4' if int4 else ''}{'_int8_kernels' if int8_kernels else ''}.onnx"
    argv = [str(run_dir), "-o", str(out), "--format", "onnx", "--checkpoint", "last"]
    return export_run(build_parser().parse_args(argv + flags))


def optimized_ops(onnx_path: str | Path) -> dict[str, int]:
    """Op types of the graph onnxruntime runs after its optimizations (QLinearConv = int8 conv)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    kinds = [n.op_type for n in nodes]
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def measure_run(
    run_dir: Path, folder: Path, every: int, threads: int, rounds: int, op_for_op: bool = True
) -> dict[str, Any]:
    """Export one run and measure it (see the module docstring)."""
    from dg_quant.deploy.onnx import onnx_session

    report = export(run_dir)
    model, path = load_run(run_dir, "last")
    classes = json.loads(
        onnx_session(report["output"], threads=1).get_modelmeta().custom_metadata_map["dg_quant.classes"]
    )
    x, y = held_out_images(folder, classes, model.transform, every)
    quantized_inputs = report["activation_qdq"] > 0  # op for op only where activations are quantized
    run = runners(model, report["output"], threads, op_for_op=op_for_op and quantized_inputs)
    config = json.loads((run_dir / "config.json").read_text())
    logits = predict(run, x)  # every runner once; the extra files below are compared with these
    row: dict[str, Any] = {
        "checkpoint": str(path),
        "training": {k: config.get(k) for k in ("plugins", "bits", "act_bits", "n_steps", "lr", "weights")},
        "images": len(y),
        "onnx_bytes": report["file_bytes"],
        "int_weights": report["int_weights"],
        "activation_qdq": report["activation_qdq"],
        "onnxruntime_ops": optimized_ops(report["output"]),
        "onnx_export": {
            k: report.get(k, 0)
            for k in (
                "int_weight_params",
                "float_params",
                "float_convolutions",
                "low_bit_int8_convs",
                "low_bit_float_convs",
            )
        },
        **compare(logits, y),
    }
    row["ms_per_image_b32"] = latency_ms({"onnx": run["onnx"]}, x, 32, rounds)
    row["ms_per_image_b1"] = latency_ms({"onnx": run["onnx"]}, x, 1, 5 * rounds)
    if (run_dir.name.endswith("w4a4")) and report["int_weights"]:
        small = export(run_dir, int4=True)
        session = onnx_session(small["output"], threads=threads)
        int4_run = {"onnx": run["onnx"], "onnx_int4": lambda b: session.run(None, {"input": b.numpy()})[0]}
        int4_logits = predict({"onnx_int4": int4_run["onnx_int4"]}, x)["onnx_int4"]
        row["int4"] = {
            "onnx_bytes": small["file_bytes"],
            "int4_weights": small["int4_weights"],
            "onnxruntime_ops": optimized_ops(small["output"]),
            "ms_per_image_b32": latency_ms(int4_run, x, 32, rounds)["onnx_int4"],
            "agreement_with_int8_file": float((int4_logits.argmax(1) == logits["onnx"].argmax(1)).mean()),
        }
        # the opt-in QLinearConv for activations below 8 bits: faster, with the int32 bias rounded
        fast = export(run_dir, int8_kernels=True)
        fast_session = onnx_session(fast["output"], threads=threads)

        def fast_onnx(b: torch.Tensor) -> np.ndarray:
            return fast_session.run(None, {"input": b.numpy()})[0]

        fast_logits = predict({"onnx": fast_onnx}, x)["onnx"]
        row["int8_kernels"] = {
            "onnxruntime_ops": optimized_ops(fast["output"]),
            "widened_weights": fast["widened_weights"],
            "ms_per_image_b32": latency_ms({"onnx": fast_onnx}, x, 32, rounds)["onnx"],
            "agreement_with_fake_quant": float((fast_logits.argmax(1) == logits["fake_quant"].argmax(1)).mean()),
            "mean_abs_logit_diff": float(np.abs(fast_logits - logits["fake_quant"]).mean()),
        }
    return row


def int8_ops(ops: dict[str, int]) -> int:
    """How many ops of the optimized graph run integer kernels (QLinearConv, QLinearMatMul, ...)."""
    return sum(n for op, n in ops.items() if op.startswith("QLinear") or "Integer" in op)


def markdown(result: dict[str, Any]) -> str:
    """The two tables: accuracy/size/speed, and the agreement investigation."""
    lines = [
        f"# Deployed models on real PACS ({result['protocol']['test_domain']} held out, "
        f"{result['protocol']['image_size']} px)",
        "",
        f"{result['date']}, load average {result['load_average']}, {result['threads']} thread(s), "
        f"`{result['command']}`. Protocol: {json.dumps(result['protocol'])}.",
        "",
        "| model | method | images | fake-quant top-1 | ONNX top-1 | ONNX agrees | torchao top-1 | ONNX MB "
        "| x FP size | int8 ops | ms/img b1 | ms/img b32 | x FP speed b32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in result["rows"].items():
        fp = rows.get("fp")
        for method, r in rows.items():
            if "error" in r:
                lines.append(f"| {model} | {method} | {r['error']} |")
                continue
            size = r["onnx_bytes"] / fp["onnx_bytes"] if fp and "onnx_bytes" in fp else float("nan")
            speed = fp["ms_per_image_b32"]["onnx"] / r["ms_per_image_b32"]["onnx"] if fp and "error" not in fp else 0
            lines.append(
                f"| {model} | {method} | {r['images']} | {r['top1']['fake_quant']:.3f} | {r['top1']['onnx']:.3f} "
                f"| {r['agreement_with_fake_quant']['onnx']:.3f} | {r['top1']['torchao']:.3f} "
                f"| {r['onnx_bytes'] / 2**20:.2f} | {size:.3f} | {int8_ops(r['onnxruntime_ops'])} "
                f"| {r['ms_per_image_b1']['onnx']:.1f} "
                f"| {r['ms_per_image_b32']['onnx']:.1f} | {speed:.2f} |"
            )
    lines += [
        "",
        "Agreement with the fake-quant model, and the logit margins (fake-quant top-1 minus top-2) of",
        "the images whose prediction changes:",
        "",
        "| model | method | margin median | ONNX agrees (op for op) | flipped: max margin | mean abs dlogit "
        "| ONNX agrees (deployed) | flipped: max margin | mean abs dlogit | torchao agrees |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in result["rows"].items():
        for method, r in rows.items():
            if "error" in r:
                continue
            a, d = r["agreement_with_fake_quant"], r["deployment"]

            def cells(key: str, a=a, d=d) -> str:
                if key not in d:
                    return "— | — | —"
                return f"{a[key]:.3f} | {d[key]['flipped_margin_max']:.3f} | {d[key]['mean_abs_logit_diff']:.2e}"

            lines.append(
                f"| {model} | {method} | {r['fake_quant_margin_median']:.3f} | {cells('onnx_op_for_op')} "
                f"| {cells('onnx')} | {a['torchao']:.3f} |"
            )
    low = [
        (m, method, r["onnx_export"])
        for m, rows in result["rows"].items()
        for method, r in rows.items()
        if r.get("onnx_export", {}).get("low_bit_int8_convs", 0)
        + r.get("onnx_export", {}).get("low_bit_float_convs", 0)
    ]
    if low:
        lines += ["", "Convolutions between activation quantizers below 8 bits in the default export (int8 where"]
        lines += [
            "QLinearConv rounds the bias by at most the threshold, `dg_quant.deploy.onnx.BIAS_ERROR_THRESHOLD`):",
            "",
        ]
        lines += ["| model | method | int8 QLinearConv | float |", "|---|---|---|---|"]
        lines += [f"| {m} | {k} | {e['low_bit_int8_convs']} | {e['low_bit_float_convs']} |" for m, k, e in low]
    int4 = [(m, r["int4"]) for m, rows in result["rows"].items() for r in rows.values() if "int4" in r]
    if int4:
        lines += ["", "W4A4 with `--int4` (ONNX INT4 weights) against the int8-container file of the same run:", ""]
        lines += ["| model | INT4 MB | int8 ops | INT4 ms/img b32 | predictions equal to the int8 file |"]
        lines += ["|---|---|---|---|---|"]
        lines += [
            f"| {m} | {r['onnx_bytes'] / 2**20:.2f} | {int8_ops(r['onnxruntime_ops'])} | {r['ms_per_image_b32']:.1f} "
            f"| {r['agreement_with_int8_file']:.3f} |"
            for m, r in int4
        ]
    fast = [(m, r["int8_kernels"]) for m, rows in result["rows"].items() for r in rows.values() if "int8_kernels" in r]
    if fast:
        lines += ["", "W4A4 with `--low_bit_int8_kernels` (QLinearConv between 4-bit quantizers, codes widened):", ""]
        lines += [
            "| model | int8 ops | ms/img b32 | ONNX agrees (deployed) | mean abs dlogit |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {int8_ops(r['onnxruntime_ops'])} | {r['ms_per_image_b32']:.1f} "
            f"| {r['agreement_with_fake_quant']:.3f} | {r['mean_abs_logit_diff']:.2e} |"
            for m, r in fast
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of the runs, RUNS/<model>_<method>")
    parser.add_argument("--root_dir", default="data", help="folder holding PACS/ (wilds_run --root_dir)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--train", action="store_true", help="train the missing runs first")
    parser.add_argument("--train_only", action="store_true", help="train the missing runs, no table")
    parser.add_argument("--every", type=int, default=8, help="every N-th held-out image of each class")
    parser.add_argument(
        "--no_op_for_op", action="store_true", help="skip the op-for-op ONNX run (graph optimizations off)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="pacs_deploy_table")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = Protocol()
    if args.train or args.train_only:
        train(args.runs, args.root_dir, args.models, args.methods, protocol)
    if args.train_only:
        return 0
    folder = Path(args.root_dir) / "PACS" / protocol.test_domain
    rows: dict[str, dict[str, Any]] = {}
    for model in args.models:
        for method in args.methods:
            run_dir = args.runs / f"{model}_{method}"
            if not (run_dir / "final.json").is_file():
                continue
            print(f"measuring {run_dir.name}", flush=True)
            try:
                rows.setdefault(model, {})[method] = measure_run(
                    run_dir, folder, args.every, args.threads, args.rounds, not args.no_op_for_op
                )
            except Exception as exc:  # noqa: BLE001 - one failing run is a row of the table, not the end
                rows.setdefault(model, {})[method] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": args.threads,
        "command": "python benchmarks/pacs_deploy_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol": {**asdict(protocol), "every": args.every, "folder": str(folder)},
        "runs": str(args.runs),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
