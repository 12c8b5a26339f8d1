"""Classify images with a dg-quant ONNX export using only onnxruntime, numpy and Pillow (no dg-quant, no torch).

    python examples/onnx_predict.py model.onnx cat.jpg dog.jpg          # one line per image: class (probability)
    python examples/onnx_predict.py model.onnx --folder PACS/sketch     # CLASS/*.jpg folders: top-1 accuracy

Preprocessing is the evaluation transform of ``wilds_run``: RGB, resize to the run's image size
(bilinear), scale to [0, 1], normalise with the ImageNet mean and std. ``dgq_export --format onnx``
stores the image size, the normalisation and the class names in the file's metadata
(``dg_quant.*`` keys), so nothing else is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def preprocess(path: Path, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """One image as a float32 [3, size, size] array, as torchvision's Resize + ToTensor + Normalize."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - mean) / std).transpose(2, 0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an ONNX file written by dgq_export --format onnx")
    parser.add_argument("images", nargs="*", type=Path, help="image files (or folders of them) to classify")
    parser.add_argument("--folder", type=Path, help="a folder of CLASS/image files: print the top-1 accuracy")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args(argv)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    try:
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for missing and corrupt files
        parser.error(
            f"{args.model}: onnxruntime cannot load it ({str(exc).splitlines()[0][:160]}); export it with dgq_export --format onnx"
        )
    meta = session.get_modelmeta().custom_metadata_map
    size = int(meta.get("dg_quant.image_size") or session.get_inputs()[0].shape[-1])
    mean = np.asarray(json.loads(meta.get("dg_quant.normalize_mean", "[0.485, 0.456, 0.406]")), dtype=np.float32)
    std = np.asarray(json.loads(meta.get("dg_quant.normalize_std", "[0.229, 0.224, 0.225]")), dtype=np.float32)
    classes = json.loads(meta.get("dg_quant.classes", "null"))
    input_name = session.get_inputs()[0].name

    files, labels = [], []
    for path in args.images:  # a folder stands for the images in it
        if path.is_dir():
            files += sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            parser.error(f"{path}: no such image file or folder")
    if args.folder:
        if not classes:
            parser.error("--folder needs the class names in the file's metadata (export it with dgq_export)")
        for index, name in enumerate(classes):
            found = sorted(p for p in (args.folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [index] * len(found)
    if not files:
        parser.error("give image files or --folder")

    predictions, seconds = [], 0.0
    for start in range(0, len(files), args.batch_size):
        batch = np.stack([preprocess(p, size, mean, std) for p in files[start : start + args.batch_size]])
        tic = time.perf_counter()
        logits = session.run(None, {input_name: batch})[0]
        seconds += time.perf_counter() - tic
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        for path, row in zip(files[start : start + args.batch_size], probs):
            k = int(row.argmax())
            predictions.append(k)
            if not args.folder:
                print(f"{path}: {classes[k] if classes else k} ({row[k]:.1%})")
    if args.folder:
        correct = sum(int(p == y) for p, y in zip(predictions, labels))
        print(
            f"top-1 {correct / len(files):.4f} ({correct}/{len(files)} images of {args.folder}); "
            f"onnxruntime {1e3 * seconds / len(files):.2f} ms per image at batch {args.batch_size}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
