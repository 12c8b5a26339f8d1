"""``dgq_export --format onnx`` on a real (tiny) FQAT run: 4-bit weights and activations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dg_quant.adapters.wilds.cli import main as wilds_main
from dg_quant.adapters.wilds.export import main as export_main

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def fqat_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("fqat") / "run"
    assert (
        wilds_main(
            [
                "--plugin",
                "dg_quant.fqat",
                "--bits",
                "4",
                "--n_steps",
                "4",
                "--eval_every",
                "4",
                "--batch_size",
                "16",
                "--frac",
                "0.1",
                "--log_dir",
                str(log_dir),
                "--no_progress",
            ]
        )
        == 0
    )
    return log_dir


def test_fqat_run_exports_and_verifies_in_onnxruntime(fqat_run, tmp_path, capsys):
    out = tmp_path / "fqat.onnx"
    capsys.readouterr()
    assert (
        export_main(
            [
                str(fqat_run),
                "--checkpoint",
                "last",
                "--format",
                "onnx",
                "-o",
                str(out),
                "--verify",
                "--verify_images",
                "40",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 int8 weight tensors" in printed and "4 activation quantize/dequantize pairs" in printed
    assert "on 40 test images" in printed
    assert "op for op (optimizations off): top-1 agreement 100.00%" in printed
    graph = onnx.load(str(out)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    codes = [inits[n.input[0]] for n in graph.node if n.op_type in ("DequantizeLinear", "Cast") and n.input[0] in inits]
    assert len(codes) == 3
    # 4-bit codes; a QLinearConv weight's codes are widened by a power of two (widen_qlinearconv_weights)
    factors = [int(np.gcd.reduce(np.abs(c).astype(np.int64).ravel())) for c in codes]
    assert all(f & (f - 1) == 0 for f in factors)
    assert all(c.dtype == np.int8 and c.min() // f >= -8 and c.max() // f <= 7 for c, f in zip(codes, factors))
    assert sum(c.size for c in codes) == 92_160  # the three quantized convs; the first conv and head stay FP
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}  # for users without dg-quant
    assert json.loads(meta["dg_quant.classes"]) == [str(c) for c in range(10)]


def test_unrepresentable_layer_is_one_line(fqat_run, tmp_path, capsys):
    state = torch.load(fqat_run / "model.pt", weights_only=False)
    state["model"]["featurizer.6.parametrizations.weight.0.step"][5] = float("nan")
    torch.save(state, tmp_path / "bad.pt")
    capsys.readouterr()
    assert (
        export_main(
            [
                str(fqat_run),
                "--checkpoint",
                str(tmp_path / "bad.pt"),
                "--format",
                "onnx",
                "-o",
                str(tmp_path / "bad.onnx"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("dgq_export: error: featurizer.6.weight: its quantization step is not a positive finite")
    assert not (tmp_path / "bad.onnx").exists()


def test_verify_only_rejects_a_corrupt_or_foreign_file(fqat_run, tmp_path, capsys):
    from torch import nn

    from dg_quant.deploy.onnx import export_onnx

    good = tmp_path / "good.onnx"
    assert export_main([str(fqat_run), "--checkpoint", "last", "--format", "onnx", "-o", str(good)]) == 0
    capsys.readouterr()
    assert (
        export_main(
            [
                str(fqat_run),
                "--checkpoint",
                "last",
                "--format",
                "onnx",
                "-o",
                str(good),
                "--verify_only",
                "--verify_images",
                "16",
            ]
        )
        == 0
    )
    assert "op for op (optimizations off): top-1 agreement 100.00%" in capsys.readouterr().out
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good.read_bytes()[:-500])
    foreign = tmp_path / "foreign.onnx"
    export_onnx(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval(),
        torch.randn(1, 3, 8, 8),
        foreign,
    )
    for path, message in (
        (corrupt, "corrupt.onnx is not a loadable ONNX model"),
        (foreign, "foreign.onnx takes inputs of shape ['batch', 3, 8, 8]"),
    ):
        assert (
            export_main([str(fqat_run), "--checkpoint", "last", "--format", "onnx", "-o", str(path), "--verify_only"])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_int4_export_of_a_4_bit_run_verifies(fqat_run, tmp_path, capsys):
    out = tmp_path / "fqat_int4.onnx"
    args = [str(fqat_run), "--checkpoint", "last", "--format", "onnx", "--int4", "-o", str(out)]
    assert export_main([*args, "--verify", "--verify_images", "16"]) == 0
    printed = capsys.readouterr().out
    assert "3 int8 weight tensors (3 of them INT4)" in printed
    assert "op for op (optimizations off): top-1 agreement 100.00%" in printed
    int8 = tmp_path / "fqat_int8.onnx"
    assert export_main([str(fqat_run), "--checkpoint", "last", "--format", "onnx", "-o", str(int8)]) == 0
    assert out.stat().st_size < int8.stat().st_size - 92_160 // 2 + 4096  # half a byte saved per weight


def test_low_bit_int8_kernels_flag_writes_qlinearconv_weights(fqat_run, tmp_path, capsys):
    """A 4-bit run's convs between quantizers are QLinearConv (DequantizeLinear'd weights) where the bias
    rounding is below --float_conv_threshold and float convs (int8 codes behind Cast + Mul) elsewhere,
    as the printed counts say; --low_bit_int8_kernels keeps QLinearConv for all, their codes widened."""

    def dequantized_weights(path) -> list[np.ndarray]:
        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]

    base = [str(fqat_run), "--checkpoint", "last", "--format", "onnx", "-o"]
    capsys.readouterr()
    assert export_main([*base, str(tmp_path / "int8.onnx"), "--low_bit_int8_kernels"]) == 0
    candidates = len(dequantized_weights(tmp_path / "int8.onnx"))
    assert f"below 8 bits: {candidates} int8 QLinearConv, 0 float" in capsys.readouterr().out
    widened = dequantized_weights(tmp_path / "int8.onnx")
    assert widened and all(np.abs(c).max() > 8 for c in widened)
    assert export_main([*base, str(tmp_path / "float.onnx"), "--float_conv_threshold", "0"]) == 0
    assert f"below 8 bits: 0 int8 QLinearConv, {candidates} float" in capsys.readouterr().out
    assert dequantized_weights(tmp_path / "float.onnx") == []
    assert export_main([*base, str(tmp_path / "default.onnx")]) == 0
    kept = len(dequantized_weights(tmp_path / "default.onnx"))
    assert f"below 8 bits: {kept} int8 QLinearConv, {candidates - kept} float" in capsys.readouterr().out
    assert export_main([*base, str(tmp_path / "bad.onnx"), "--float_conv_threshold", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--float_conv_threshold must be a finite number >= 0" in err
    assert not (tmp_path / "bad.onnx").exists()
