"""examples/onnx_predict.py: the dg-quant-free inference script reads the metadata and preprocesses as wilds_run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dg_quant.deploy.onnx import export_onnx
from dg_quant.quant.api import quantize_
from dg_quant.quant.config import LSQConfig, QuantConfig, default_activation_config

pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onnx_predict.py"


def _example():
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_classifies_a_class_folder_like_the_torch_eval_transform(tmp_path, capsys):
    from dg_quant.adapters.backbones.transforms import IMAGENET_MEAN, IMAGENET_STD
    from dg_quant.adapters.wilds.transforms import resize_transform

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    quantize_(model, QuantConfig(weight=LSQConfig(bits=8), activation=default_activation_config(8)))
    model.eval()
    rng = np.random.default_rng(0)
    files = []
    for k, name in enumerate(["cat", "dog", "fox"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            files.append(tmp_path / "data" / name / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (20 + k, 17, 3), dtype=np.uint8)).save(files[-1])
    tf = resize_transform(12)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        model(x)  # activation steps
        want = model(x).argmax(1).tolist()
    meta = {
        "dg_quant.classes": json.dumps(["cat", "dog", "fox"]),
        "dg_quant.image_size": "12",
        "dg_quant.normalize_mean": json.dumps(list(IMAGENET_MEAN)),
        "dg_quant.normalize_std": json.dumps(list(IMAGENET_STD)),
    }
    export_onnx(model, x[:1], tmp_path / "m.onnx", metadata=meta)
    example = _example()
    # its preprocessing is the torchvision evaluation transform's, up to float rounding
    np.testing.assert_allclose(
        example.preprocess(files[0], 12, np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)),
        x[0].numpy(),
        atol=1e-5,
    )
    assert example.main([str(tmp_path / "m.onnx"), *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [["cat", "dog", "fox"][k] for k in want]
    assert example.main([str(tmp_path / "m.onnx"), "--folder", str(tmp_path / "data")]) == 0
    correct = sum(int(p == y) for p, y in zip(want, [0, 0, 1, 1, 2, 2]))
    assert capsys.readouterr().out.startswith(f"top-1 {correct / 6:.4f} ({correct}/6 images")
    # a folder given as an image argument stands for its images
    assert example.main([str(tmp_path / "m.onnx"), str(tmp_path / "data" / "dog")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [["cat", "dog", "fox"][k] for k in want[2:4]]
    # a missing image, a missing or corrupt model: one line naming the file, no traceback
    (tmp_path / "bad.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:200])
    for argv, named in [
        ([str(tmp_path / "m.onnx"), str(tmp_path / "nope.png")], "nope.png: no such image file or folder"),
        ([str(tmp_path / "none.onnx"), str(files[0])], "none.onnx: onnxruntime cannot load it"),
        ([str(tmp_path / "bad.onnx"), str(files[0])], "bad.onnx: onnxruntime cannot load it"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            example.main(argv)
        assert exit_info.value.code == 2 and named in capsys.readouterr().err
