"""Speed settings (--precision, --channels_last, --compile, --quant_kernels) through the Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dg_quant import PluginHost, Trainer, create_adapter, speed
from dg_quant.errors import ConfigError
from dg_quant.options import read_options
from dg_quant.quant import iter_quantized_weights, iter_quantizers, latent_weight
from dg_quant.speed import SpeedOptions, prepare_model
from tests.test_qat import make_config


def build(*argv: str, plugin: str = "dg_quant.qtdog") -> Trainer:
    torch.manual_seed(0)
    host = PluginHost([plugin])
    config = make_config(host, "--quant_start_step", "0", *argv)
    model = create_adapter("test_cnn", num_classes=3)
    return Trainer.build(
        host, model, config, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), nn.CrossEntropyLoss()
    )


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def conv_output_dtypes(model: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_runs_the_forward_in_bf16_and_keeps_parameters_and_gradients_fp32() -> None:
    trainer = build("--precision", "bf16")
    seen = conv_output_dtypes(trainer.model)
    trainer.train_step(fixed_batch())
    assert seen and set(seen) == {torch.bfloat16}
    for p in trainer.model.parameters():
        assert p.dtype == torch.float32
        assert p.grad is None or p.grad.dtype == torch.float32


@pytest.mark.parametrize("plugin", ["dg_quant.qtdog", "dg_quant.fqat"])
def test_bf16_training_tracks_fp32_training(plugin: str) -> None:
    """Same run in both precisions: bf16 losses follow the fp32 ones and both fit the batch."""
    extra = ("--act_bits", "8") if plugin == "dg_quant.fqat" else ()
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = build("--precision", precision, *extra, plugin=plugin)
        losses[precision] = [float(trainer.train_step(fixed_batch())["loss"]) for _ in range(30)]
    fp32, bf16 = torch.tensor(losses["fp32"]), torch.tensor(losses["bf16"])
    assert abs(bf16[0] - fp32[0]) < 0.02 * fp32[0]
    assert bf16[-1] < 0.15 * bf16[0] and fp32[-1] < 0.15 * fp32[0]
    assert (bf16 - fp32).abs().max() < 0.1


def test_channels_last_stores_nhwc_weights_and_computes_the_same_losses() -> None:
    plain, nhwc = build(), build("--channels_last", "true")
    weights = [latent_weight(m, t) for _, m, t, _ in iter_quantized_weights(nhwc.model)]
    four_d = [w for w in weights if w.dim() == 4]
    assert four_d and all(w.is_contiguous(memory_format=torch.channels_last) for w in four_d)
    for _ in range(3):
        a = plain.train_step(fixed_batch())["loss"]
        b = nhwc.train_step(fixed_batch())["loss"]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_quant_kernels_compiled_switches_every_quantizer_the_method_attached() -> None:
    trainer = build("--quant_kernels", "compiled", "--act_bits", "8", plugin="dg_quant.lsq")
    quantizers = [q for _, q in iter_quantizers(trainer.model)]
    assert len(quantizers) > 2 and all(q.compiled for q in quantizers)
    assert not any(q.compiled for _, q in iter_quantizers(build().model))


def test_quant_kernels_auto_follows_the_environment_and_the_compiler(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv(speed.KERNELS_ENV, "compiled")
    assert speed.resolve_quant_kernels("auto", cpu) == "compiled"
    assert speed.resolve_quant_kernels("eager", cpu) == "eager"
    monkeypatch.setenv(speed.KERNELS_ENV, "fast")
    with pytest.raises(ConfigError, match=speed.KERNELS_ENV):
        speed.resolve_quant_kernels("auto", cpu)
    monkeypatch.delenv(speed.KERNELS_ENV, raising=False)
    monkeypatch.setattr("dg_quant.speed.shutil.which", lambda _name: None)
    assert speed.resolve_quant_kernels("auto", cpu) == "eager"  # no C++ compiler: eager, no error


def test_quant_kernels_auto_falls_back_to_eager_when_the_kernels_do_not_build(monkeypatch) -> None:
    def broken(*_args):
        raise RuntimeError("inductor: cannot build")

    monkeypatch.delenv(speed.KERNELS_ENV, raising=False)
    monkeypatch.setattr(speed, "lsq_fake_quant", broken)
    monkeypatch.setattr(speed, "compiler_available", lambda _device: True)
    speed._compiled_kernels_work.cache_clear()
    try:
        with pytest.warns(UserWarning, match="cannot build"):
            trainer = build("--quant_kernels", "auto")
    finally:
        speed._compiled_kernels_work.cache_clear()
    assert not any(q.compiled for _, q in iter_quantizers(trainer.model))


@pytest.mark.parametrize("field, value", [("precision", "fp16"), ("quant_kernels", "triton")])
def test_unknown_settings_are_config_errors(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SpeedOptions(**{field: value})


def test_compile_without_a_cpu_compiler_fails_before_training(monkeypatch) -> None:
    monkeypatch.setattr("dg_quant.speed.shutil.which", lambda _name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        prepare_model(nn.Linear(2, 2), SpeedOptions(compile=True))


def test_every_host_gets_the_speed_options_from_the_defaults() -> None:
    config = make_config(PluginHost(["dg_quant.sagm"]), "--precision", "bf16", "--compile", "true")
    options = read_options(SpeedOptions, config)
    assert options.precision == "bf16" and options.compile and not options.channels_last


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_and_keeps_its_checkpoint_keys() -> None:
    eager, compiled = build(), build("--compile", "true")
    for _ in range(3):
        a = eager.train_step(fixed_batch())["loss"]
        b = compiled.train_step(fixed_batch())["loss"]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()["model"]) == list(eager.state_dict()["model"])
