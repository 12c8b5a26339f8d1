"""A trained PACS run deployed: top-1 on the held-out domain of the fake-quant model, its ONNX file in
onnxruntime and its torchao conversion, with file sizes and batch-32 latency, on the same images.

    dgq_export runs/pacs_fqat -o fqat.onnx --format onnx --verify          # the one export command
    python benchmarks/pacs_deploy.py runs/pacs_fqat fqat.onnx --folder PACS/sketch

Every image goes through the run's evaluation transform (``model.transform``) once; the same
tensors feed the three models, so differences are the deployment's, not the preprocessing's.
Latency is wall time per image at batch 32 (``--threads`` threads), the three models interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("onnx")
    parser.add_argument("--folder", type=Path, required=True, help="CLASS/ image folders of the held-out domain")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pacs_deploy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from PIL import Image

    from dg_quant.adapters.wilds.checkpoints import build_model, read_checkpoint
    from dg_quant.adapters.wilds.export import _resolve
    from dg_quant.deploy.onnx import onnx_session
    from dg_quant.deploy.torchao import to_torchao, torchao_layers

    path = _resolve(args.run_dir, args.checkpoint)
    state = read_checkpoint(path)
    config = argparse.Namespace(**state["config"])
    config.plugins = list(getattr(config, "plugins", None) or [])
    model = build_model(state, config).eval()
    session = onnx_session(args.onnx, threads=args.threads)
    classes = json.loads(session.get_modelmeta().custom_metadata_map["dg_quant.classes"])
    files, labels = [], []
    for k, name in enumerate(classes):
        found = sorted(p for p in (args.folder / name).iterdir() if p.suffix.lower() in (".jpg", ".png"))
        files += found
        labels += [k] * len(found)
    x = torch.stack([model.transform(Image.open(f).convert("RGB")) for f in files])
    y = np.asarray(labels)
    ao_model, converted = to_torchao(model)
    runners = {
        "fake_quant": lambda b: model(b).numpy(),
        "onnx": lambda b: session.run(None, {"input": b.numpy()})[0],
        "torchao": lambda b: ao_model(b).float().numpy(),
    }
    preds, times = {}, {k: [] for k in runners}
    with torch.inference_mode():
        for key, run in runners.items():
            preds[key] = np.concatenate([run(b) for b in x.split(32)]).argmax(1)
        batch = x[:32]
        for r in range(args.rounds):
            for key in list(runners)[r % 3 :] + list(runners)[: r % 3]:
                tic = time.perf_counter()
                runners[key](batch)
                times[key].append((time.perf_counter() - tic) / len(batch))
    result = {
        "run": str(args.run_dir),
        "checkpoint": str(path),
        "images": len(files),
        "folder": str(args.folder),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": args.threads,
        "onnx_bytes": Path(args.onnx).stat().st_size,
        "top1": {k: float((p == y).mean()) for k, p in preds.items()},
        "agreement_with_fake_quant": {k: float((p == preds["fake_quant"]).mean()) for k, p in preds.items()},
        "ms_per_image_b32": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "torchao_layers": {
            kind: sum(1 for v in torchao_layers(ao_model).values() if v == kind)
            for kind in set(torchao_layers(ao_model).values())
        },
        "torchao_converted": len(converted),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
