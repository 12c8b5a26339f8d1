"""Bit-packed export: exact reload, real sizes, and one-line errors for damaged files."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torchvision

from dg_quant.errors import CheckpointError
from dg_quant.quant import LSQConfig, QuantConfig, default_activation_config, quantize_
from dg_quant.quant.export import (
    PREAMBLE,
    export_model,
    load_export,
    pack_bits,
    size_report,
    torch_save_bytes,
    unpack_bits,
)
from dg_quant.registry import create_adapter


@pytest.mark.parametrize("bits", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("count", [1, 13, 4099])
def test_pack_unpack_round_trip(bits, count):
    codes = np.random.default_rng(bits * count).integers(0, 2**bits, size=count, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == math.ceil(count * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def _quantized_cnn(bits: int = 7, acts: int = 0, granularity: str = "per_channel"):
    model = create_adapter("test_cnn", num_classes=5)
    config = QuantConfig(weight=LSQConfig(bits=bits, granularity=granularity),
                         activation=default_activation_config(acts) if acts else None)
    quantize_(model, config)
    with torch.no_grad():  # move off the init so that steps and BN statistics are not trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    model(torch.randn(16, 3, 12, 12))  # BN statistics and activation steps from a batch
    return model.eval()


@pytest.mark.parametrize("bits,acts,granularity", [(7, 0, "per_channel"), (3, 8, "per_tensor"), (4, 4, "per_channel")])
def test_loaded_model_outputs_equal_the_fake_quant_model(tmp_path, bits, acts, granularity):
    model = _quantized_cnn(bits, acts, granularity)
    path = tmp_path / "m.dgq"
    report = export_model(model, path, meta={"backbone": "test_cnn", "num_classes": 5})
    loaded = load_export(path)  # rebuilt from the registry, no model handed over
    x = torch.randn(7, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any("parametrizations" in k for k in loaded.state_dict())  # plain weights
    assert report.file_bytes == os.path.getsize(path)
    assert report.quantized_params == 8 * 3 * 9 + 16 * 8 * 9
    expected_codes = math.ceil(8 * 3 * 9 * bits / 8) + math.ceil(16 * 8 * 9 * bits / 8)
    assert report.packed_weight_bytes == expected_codes


def test_disabled_quantizers_export_full_precision_weights(tmp_path):
    model = create_adapter("test_cnn", num_classes=5).eval()
    quantize_(model, QuantConfig(enabled=False))
    path = tmp_path / "fp.dgq"
    report = export_model(model, path)
    assert report.quantized_params == 0
    fresh = create_adapter("test_cnn", num_classes=5)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(load_export(path, fresh)(x), model(x))


def test_resnet18_file_is_close_to_bits_over_32(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    quantize_(model, QuantConfig(weight=LSQConfig(bits=7)))
    model.eval()
    path = tmp_path / "r18.dgq"
    report = export_model(model, path)
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert report.quantized_params == conv_params
    ideal = conv_params * 7 / 8 + report.scale_bytes + report.fp_bytes
    assert report.file_bytes == pytest.approx(ideal, rel=0.01)  # header and padding are tiny
    fp32_file = torch_save_bytes(model)
    assert 0.20 < report.file_bytes / fp32_file < 0.25  # ~7/32 = 0.219 plus the FP parts
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_export(path, torchvision.models.resnet18(num_classes=10))(x), model(x))


def _damaged(tmp_path, mutate) -> str:
    model = _quantized_cnn()
    path = tmp_path / "m.dgq"
    export_model(model, path, meta={"backbone": "test_cnn", "num_classes": 5})
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))
    return str(path)


def _flip(data: bytearray, index: int) -> bytearray:
    data[index] ^= 0xFF
    return data


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: d + b"xx", "trailing"),
        (lambda d: _flip(d, len(d) - 3), "checksum"),
        (lambda d: _flip(d, PREAMBLE.size + 5), "checksum"),
        (lambda d: b"PK" + d[2:], "not a dg-quant export"),
        (lambda d: b"", "truncated"),
    ],
)
def test_damaged_files_give_one_line_errors(tmp_path, mutate, message):
    path = _damaged(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message) as info:
        load_export(path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        size_report(path)


def test_missing_file_and_wrong_model_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_export(tmp_path / "nope.dgq")
    model = _quantized_cnn()
    path = tmp_path / "m.dgq"
    export_model(model, path)
    with pytest.raises(CheckpointError, match="does not name its backbone"):
        load_export(path)
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_export(path, create_adapter("test_cnn", num_classes=5, width=4))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_resnet50_7bit_size_numbers(tmp_path):
    model = torchvision.models.resnet50(num_classes=7)
    quantize_(model, QuantConfig(weight=LSQConfig(bits=7)))
    model.eval()
    path = tmp_path / "r50.dgq"
    report = export_model(model, path)
    fp32_file = torch_save_bytes(model)
    conv_bytes = report.quantized_params * 4
    print(f"\nresnet50 7-bit: file {report.file_bytes} B, fp32 torch.save {fp32_file} B, ratio "
          f"{report.file_bytes / fp32_file:.4f}; conv FP32 {conv_bytes} B -> codes {report.packed_weight_bytes} B "
          f"({report.packed_weight_bytes / conv_bytes:.4f}); scales {report.scale_bytes} B; FP {report.fp_bytes} B")
    assert report.packed_weight_bytes / conv_bytes == pytest.approx(7 / 32, rel=1e-4)
    assert report.file_bytes == pytest.approx(7 / 32 * conv_bytes + report.scale_bytes + report.fp_bytes, rel=0.01)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_export(path, torchvision.models.resnet50(num_classes=7))(x), model(x))
