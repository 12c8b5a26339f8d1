"""Bit-packed export: exact reload, real sizes, and one-line errors for damaged files."""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from dg_quant.errors import CheckpointError
from dg_quant.quant import (
    LSQConfig,
    QuantConfig,
    compression_report,
    default_activation_config,
    iter_quantized_weights,
    latent_weight,
    quantize_,
)
from dg_quant.quant.export import (
    VERSION,
    export_model,
    load_export,
    pack_bits,
    read_export,
    size_report,
    torch_save_bytes,
    unpack_bits,
)
from dg_quant.quant.inq import INQ_BUFFERS, inq_levels, iter_inq_layers
from dg_quant.registry import create_adapter, rebuild_adapter


@pytest.mark.parametrize("bits", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("count", [1, 13, 4099])
def test_pack_unpack_round_trip(bits, count):
    codes = np.random.default_rng(bits * count).integers(0, 2**bits, size=count, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == math.ceil(count * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def _quantized_cnn(bits: int = 7, acts: int = 0, granularity: str = "per_channel"):
    model = create_adapter("test_cnn", num_classes=5)
    config = QuantConfig(
        weight=LSQConfig(bits=bits, granularity=granularity),
        activation=default_activation_config(acts) if acts else None,
    )
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
    loaded = load_export(path, rebuild_adapter)  # rebuilt from the registry, no model handed over
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


def _header_end(data: bytearray) -> int:
    return 8 + struct.unpack_from("<Q", data)[0]


def _edit_metadata(data: bytearray, old: bytes, new: bytes) -> bytearray:
    """Change the header JSON in place, padding with spaces so that the tensor offsets stay valid."""
    end = _header_end(data)
    text = bytes(data[8:end]).replace(old, new, 1)
    assert len(text) <= end - 8
    return data[:8] + text + b" " * (end - 8 - len(text)) + data[end:]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: d + b"xx", "trailing"),
        (lambda d: _flip(d, len(d) - 3), "checksum"),  # a tensor byte
        (lambda d: _edit_metadata(d, b'\\"num_classes\\":5', b'\\"num_classes\\":6'), "checksum"),
        (lambda d: _flip(d, 20), "corrupt"),  # the safetensors index is no longer JSON
        (lambda d: b"PK\x03\x04" + bytes(60), "not a dg-quant export"),
        (
            lambda d: _edit_metadata(d, b'"format":"dg-quant packed model"', b'"format":"someone elses model!"'),
            "not a dg-quant export",
        ),
        (lambda d: b"", "truncated"),
    ],
)
def test_damaged_files_give_one_line_errors(tmp_path, mutate, message):
    path = _damaged(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message) as info:
        load_export(path, rebuild_adapter)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        size_report(path)


def test_missing_file_and_wrong_model_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_export(tmp_path / "nope.dgq", rebuild_adapter)
    model = _quantized_cnn()
    path = tmp_path / "m.dgq"
    export_model(model, path)
    with pytest.raises(CheckpointError, match="does not name its backbone"):
        load_export(path, rebuild_adapter)
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_export(path, create_adapter("test_cnn", num_classes=5, width=4))
    assert "\n" not in str(info.value)


# -- INQ: power-of-two codes -----------------------------------------------------------------

META = {"backbone": "test_cnn", "num_classes": 5}


def _inq_cnn(bits: int = 5, due: int = 4, partitions: str = "0.5,0.75,0.875,1"):
    """test_cnn after ``due`` INQ partitions, its free weights moved on as retraining would."""
    from dg_quant.plugins.inq import INQOptions, apply_partitions, prepare_inq

    model = create_adapter("test_cnn", num_classes=5)
    options = INQOptions(bits=bits, inq_partitions=partitions)
    prepare_inq(model, options)
    model.train()
    model(torch.randn(16, 3, 12, 12))  # BN statistics
    apply_partitions(model, None, options, due)
    with torch.no_grad():
        for layer in iter_inq_layers(model):
            layer.module.weight.add_(0.01 * torch.randn_like(layer.module.weight) * ~layer.frozen)
    return model.eval()


def _assert_bit_exact(loaded, model):
    """Every tensor of the reloaded plain model has the INQ model's bits; logits are equal."""
    own = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in INQ_BUFFERS}
    state = loaded.state_dict()
    assert set(state) == set(own)  # no INQ training buffers in the plain model
    for key, value in own.items():
        bytes_of = [t.reshape(-1).view(torch.uint8) for t in (value, state[key])]
        assert value.dtype == state[key].dtype and torch.equal(*bytes_of), key
    x = torch.randn(6, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("bits", [2, 5, 7])
def test_inq_model_is_stored_as_b_bit_codes_and_reloads_bit_exactly(tmp_path, bits):
    model = _inq_cnn(bits)
    layers = list(iter_inq_layers(model))
    assert [layer.bits for layer in layers] == [bits, bits]
    path = tmp_path / "inq.dgq"
    report = export_model(model, path, META)
    _assert_bit_exact(load_export(path, rebuild_adapter), model)
    numels = [layer.module.weight.numel() for layer in layers]
    assert report.bits == [bits, bits] and report.escape_params == 0 and report.scale_bytes == 0
    assert report.quantized_params == sum(numels)
    assert report.packed_weight_bytes == sum(math.ceil(n * bits / 8) for n in numels)
    # the INQ weights shrink 32/b-fold (up to the last partial byte of each tensor)
    assert report.quantized_params * 4 / report.packed_weight_bytes == pytest.approx(32 / bits, rel=0.01)
    header, _ = read_export(path)
    pow2 = [e for e in header["entries"] if e["kind"] == "pow2"]
    assert [(e["n1"], e["n2"]) for e in pow2] == [(layer.n1, layer.n2) for layer in layers]
    # the compression report predicts the file up to the header and the int64 BN step counters
    estimate = compression_report(model)
    assert [(lb.bits, lb.scales, lb.unfrozen) for lb in estimate.layers] == [(bits, 0, 0)] * 2
    assert 0 <= report.file_bytes - report.header_bytes - estimate.packed_bytes <= 2 * 8 + 2


def test_unfinished_inq_partition_keeps_the_free_weights_exactly(tmp_path):
    model = _inq_cnn(bits=5, due=2)  # 75% of each tensor on levels, the rest still training
    free = sum(int((~layer.frozen).sum()) for layer in iter_inq_layers(model))
    assert free > 0
    path = tmp_path / "half.dgq"
    report = export_model(model, path, META)
    loaded = load_export(path, rebuild_adapter)
    _assert_bit_exact(loaded, model)
    assert report.escape_params == free and report.bits == [5, 5]
    for layer in iter_inq_layers(model):  # frozen weights are on levels, the free ones are not
        levels = inq_levels(layer.n1, layer.n2).float()
        assert bool(torch.isin(layer.module.weight[layer.frozen], levels).all())
    # still smaller than FP32: 5-bit codes + a 1-bit mask + the 25% free weights in FP32 (the ~3 kB
    # safetensors index and header, most of a file this small, left out)
    assert report.file_bytes - report.header_bytes < 0.35 * torch_save_bytes(model)
    estimate = compression_report(model)
    assert sum(lb.unfrozen for lb in estimate.layers) == free
    assert estimate.packed_bytes == pytest.approx(report.file_bytes - report.header_bytes, abs=20)


def test_inq_tensors_that_codes_would_not_shrink_stay_fp(tmp_path):
    model = _inq_cnn(bits=5, due=1, partitions="0.05,1")  # 95% of the weights still free
    report = export_model(model, tmp_path / "early.dgq", META)
    assert report.quantized_params == 0  # codes + mask + 95% FP values > FP: written as FP
    _assert_bit_exact(load_export(tmp_path / "early.dgq", rebuild_adapter), model)
    assert compression_report(model).ratio == pytest.approx(1.0, abs=0.01)
    untouched = _inq_cnn(bits=5, due=0)  # no partition yet: n1, n2 unknown, plain FP
    assert export_model(untouched, tmp_path / "fp.dgq", META).quantized_params == 0
    _assert_bit_exact(load_export(tmp_path / "fp.dgq", rebuild_adapter), untouched)
    assert not compression_report(untouched).layers


def _write_version_1(model, path, meta) -> None:
    """The version-1 layout, written independently of the exporter (a frozen copy of the spec)."""
    entries, chunks, offset = [], [], 0
    lsq = {}
    for name, module, tensor, q in iter_quantized_weights(model):
        prefix = f"{name}.parametrizations.{tensor}"
        lsq[f"{name}.{tensor}"] = (
            module,
            tensor,
            q,
            {f"{prefix}.original", f"{prefix}.0.step", f"{prefix}.0._extra_state"},
        )
    skip = set().union(*(keys for *_, keys in lsq.values()))

    def add(data: bytes) -> int:
        nonlocal offset
        chunks.append(data)
        offset += len(data)
        return offset - len(data)

    def raw(t: torch.Tensor) -> bytes:
        return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    for key, value in model.state_dict().items():
        if key not in skip:  # v1 wrote every plain tensor raw, the INQ buffers included
            entries.append(
                {
                    "name": key,
                    "kind": "fp",
                    "dtype": str(value.dtype)[6:],
                    "shape": list(value.shape),
                    "offset": add(raw(value)),
                    "nbytes": len(chunks[-1]),
                }
            )
    for key, (module, tensor, q, _) in lsq.items():
        latent = latent_weight(module, tensor)
        qn = q.bounds[0]
        codes = (q.integers(latent) + qn).to(torch.uint8).reshape(-1).numpy()
        planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, : q.bits]
        packed = np.packbits(planes.reshape(-1), bitorder="little").tobytes()
        step = q.step.detach().float()
        entries.append(
            {
                "name": key,
                "kind": "packed",
                "dtype": "float32",
                "shape": list(latent.shape),
                "offset": add(packed),
                "nbytes": len(packed),
                "bits": q.bits,
                "qn": qn,
                "step_shape": list(step.shape),
                "step_offset": add(raw(step)),
                "step_nbytes": step.numel() * 4,
            }
        )
    header = json.dumps(
        {"format": "dg-quant packed model", "version": 1, **meta, "act_quantizers": {}, "entries": entries},
        sort_keys=True,
    ).encode()
    payload = b"".join(chunks)
    crc = zlib.crc32(payload, zlib.crc32(header))
    path.write_bytes(struct.pack("<4sHHIQI", b"DGQX", 1, 0, len(header), len(payload), crc) + header + payload)


@pytest.mark.parametrize("kind", ["lsq", "inq"])
def test_version_1_files_still_load(tmp_path, kind):
    model = _quantized_cnn(bits=4) if kind == "lsq" else _inq_cnn(bits=5)
    path = tmp_path / "v1.dgq"
    _write_version_1(model, path, META)
    assert path.read_bytes()[:6] == b"DGQX\x01\x00"
    loaded = load_export(path, rebuild_adapter)  # v1 INQ files carry the training buffers: dropped for the plain model
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    report = size_report(path)
    assert report.file_bytes == path.stat().st_size
    assert report.quantized_params == (8 * 3 * 9 + 16 * 8 * 9 if kind == "lsq" else 0)


DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("kind", ["lsq", "inq"])
def test_version_2_files_written_by_the_old_writer_still_load(kind):
    """tests/data/dgq_v2_*.dgq were written by dg-quant's DGQX writer (version 2) before the move to
    safetensors, with the outputs of the model they came from (W4A4 LSQ test_cnn; 5-bit INQ test_cnn)."""
    path = DATA / f"dgq_v2_{kind}.dgq"
    assert path.read_bytes()[:6] == b"DGQX\x02\x00"
    expected = torch.load(DATA / "dgq_v2_expected.pt")
    with torch.no_grad():
        assert torch.equal(load_export(path, rebuild_adapter)(expected["input"]), expected[kind])
    report = size_report(path)
    assert report.file_bytes == path.stat().st_size and report.bits == ([4, 4] if kind == "lsq" else [5, 5])


def test_files_are_safetensors_with_packed_uint8_codes_and_steps(tmp_path):
    from safetensors import safe_open

    model = _quantized_cnn(bits=3, acts=4)
    path = tmp_path / "m.dgq"
    report = export_model(model, path, META)
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        codes = {k: f.get_tensor(k) for k in keys if k.endswith(":codes")}
        steps = {k: f.get_tensor(k) for k in keys if k.endswith(":step")}
    assert metadata["format"] == "dg-quant packed model" and int(metadata["version"]) == VERSION
    header = json.loads(metadata["header"])
    assert header["backbone"] == "test_cnn" and len(header["act_quantizers"]) == 2
    assert len(codes) == len(steps) == 2 and all(c.dtype == torch.uint8 for c in codes.values())
    assert (
        sum(c.numel() for c in codes.values())
        == report.packed_weight_bytes
        == math.ceil(8 * 3 * 9 * 3 / 8) + math.ceil(16 * 8 * 9 * 3 / 8)
    )
    for _name, module, tensor, q in iter_quantized_weights(model):  # the codes unpack to the model's integers
        key = next(k for k in codes if k.startswith(f"{_name}.{tensor}:"))
        ints = unpack_bits(codes[key].numpy().tobytes(), 3, latent_weight(module, tensor).numel()).astype(np.int64)
        want = (q.integers(latent_weight(module, tensor)) + q.bounds[0]).reshape(-1).numpy()
        np.testing.assert_array_equal(ints, want)
        assert torch.equal(steps[key.replace(":codes", ":step")], q.step.detach())


def test_dgq_export_of_an_inq_run_verifies_and_reports_sizes(tmp_path, capsys):
    from dg_quant.adapters.wilds.cli import main as wilds_main
    from dg_quant.adapters.wilds.export import main as export_main

    log_dir = tmp_path / "inq"
    assert (
        wilds_main(
            [
                "--plugin",
                "dg_quant.inq",
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
    capsys.readouterr()
    out = tmp_path / "inq.dgq"
    assert export_main([str(log_dir), "-o", str(out), "--checkpoint", "last", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and "at 4 bits" in printed
    report = size_report(out)
    assert set(report.bits) == {4} and report.escape_params == 0
    assert report.packed_weight_bytes * 8 == pytest.approx(report.quantized_params * 4, abs=8 * len(report.bits))


@pytest.mark.slow
def test_resnet50_7bit_size_numbers(tmp_path):
    model = torchvision.models.resnet50(num_classes=7)
    quantize_(model, QuantConfig(weight=LSQConfig(bits=7)))
    model.eval()
    path = tmp_path / "r50.dgq"
    report = export_model(model, path)
    fp32_file = torch_save_bytes(model)
    conv_bytes = report.quantized_params * 4
    print(
        f"\nresnet50 7-bit: file {report.file_bytes} B, fp32 torch.save {fp32_file} B, ratio "
        f"{report.file_bytes / fp32_file:.4f}; conv FP32 {conv_bytes} B -> codes {report.packed_weight_bytes} B "
        f"({report.packed_weight_bytes / conv_bytes:.4f}); scales {report.scale_bytes} B; FP {report.fp_bytes} B"
    )
    assert report.packed_weight_bytes / conv_bytes == pytest.approx(7 / 32, rel=1e-4)
    assert report.file_bytes == pytest.approx(7 / 32 * conv_bytes + report.scale_bytes + report.fp_bytes, rel=0.01)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_export(path, torchvision.models.resnet50(num_classes=7))(x), model(x))
