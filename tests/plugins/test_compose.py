"""Every DG-method plugin composes with every quantization plugin through the host-neutral Trainer:
a few steps past the switch, the final (averaged) model is the quantized one, state round trips.

Two plugins that own one part of a run (the gradient step, the averaging) are refused in one line.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from dg_quant import PluginHost, Trainer, create_adapter
from dg_quant.context import RunContext
from dg_quant.errors import PluginError
from dg_quant.loop import same_state, state_snapshot
from dg_quant.ownership import GRADIENT_COMPUTATION, WEIGHT_AVERAGING
from dg_quant.quant import is_quantized

METHODS = {
    "dg_quant.coral": ["--coral_weight", "1.0"],
    "dg_quant.mixstyle": ["--mixstyle_layers", "1,2", "--mixstyle_p", "1.0", "--mixstyle_mix", "crossdomain"],
    "dg_quant.swad": ["--swad_n_converge", "1", "--swad_n_tolerance", "2", "--bn_batches", "2"],
    "dg_quant.swa": ["--swa_start", "0.5", "--bn_batches", "2"],
    "dg_quant.sam": ["--rho", "0.05"],
}
QUANTIZERS = {
    "dg_quant.qtdog": ["--bits", "7", "--quant_start_step", "2"],
    "dg_quant.lsq": ["--bits", "6"],
    "dg_quant.fqat": ["--bits", "4", "--quant_start_step", "2"],
    "dg_quant.inq": ["--bits", "5", "--inq_partitions", "0.5,1.0"],
    "dg_quant.obc": ["--bits", "8", "--ptq_samples", "16", "--ptq_batch_size", "8"],
}
STEPS = 6


def build(plugins: list[str], argv: list[str]) -> Trainer:
    torch.manual_seed(0)
    host = PluginHost(plugins)
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args(argv)
    config.val_metric = "id_val/acc_avg"
    host.configure(config, RunContext(total_steps=STEPS, dataset="digits"))
    model = create_adapter("test_cnn", num_classes=3)
    return Trainer.build(host, model, config, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), nn.CrossEntropyLoss())


def batch(step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    return (x, y), torch.arange(12) % 3


def inputs(n: int):
    for i in range(n):
        yield batch(100 + i)[0][0]


def train(trainer: Trainer, until: int, losses: list[float] | None = None) -> list[dict]:
    out = []
    while trainer.step < until:
        out.append(trainer.train_step(*batch(trainer.step)))
        if trainer.step % 2 == 0:  # an evaluation every 2 steps: SWAD's segments
            trainer.evaluated({"id_val/loss": (losses or [1.0, 0.9, 0.8, 0.85, 0.9, 1.0])[trainer.step // 2 - 1]})
    return out


def combos() -> list[tuple[str, str]]:
    refused = {("dg_quant.sam", "dg_quant.fqat")}
    return [(m, q) for m in METHODS for q in QUANTIZERS if (m, q) not in refused]


@pytest.mark.parametrize(("method", "quantizer"), combos())
def test_method_composes_with_quantizer(method: str, quantizer: str) -> None:
    argv = METHODS[method] + QUANTIZERS[quantizer]
    trainer = build([method, quantizer], argv)
    metrics = train(trainer, 4)
    assert all(torch.isfinite(torch.as_tensor(m["loss"])) for m in metrics)
    if method == "dg_quant.coral":
        assert "coral/penalty" in metrics[-1]

    # checkpoint at step 4, resume in a fresh run: the next steps are the same
    state = copy.deepcopy(trainer.state_dict())
    resumed = build([method, quantizer], argv)
    resumed.load_state_dict(state)
    torch.manual_seed(1)
    train(trainer, STEPS)
    torch.manual_seed(1)
    train(resumed, STEPS)
    assert same_state(state_snapshot(trainer.model), state_snapshot(resumed.model))

    summary = trainer.final_model(inputs)
    if method in ("dg_quant.swad", "dg_quant.swa"):
        assert summary is not None and summary.get("swad/segments", summary.get("swa/snapshots", 0)) >= 1
    else:
        assert summary is None
    trainer.end(None, calibration=lambda n, b: inputs(max(n // b, 1)))
    assert is_quantized(trainer.model)
    trainer.model.eval()
    assert torch.isfinite(trainer.model(batch(0)[0][0])).all()


def test_swad_final_model_is_the_valley_average_of_quantized_weights() -> None:
    trainer = build(["dg_quant.swad", "dg_quant.qtdog"], METHODS["dg_quant.swad"] + QUANTIZERS["dg_quant.qtdog"])
    snapshots = {}
    while trainer.step < STEPS:
        trainer.train_step(*batch(trainer.step))
        snapshots[trainer.step] = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        if trainer.step % 2 == 0:
            trainer.evaluated({"id_val/loss": {2: 1.0, 4: 0.5, 6: 0.6}[trainer.step]})
    summary = trainer.final_model(inputs)
    # quantization switched on at step 2: SWAD restarted there, so the segments are steps 3-4 and 5-6;
    # n_converge 1: the valley starts at the first quantized segment and the next one joins
    assert summary["swad/restarts"] == 1 and summary["swad/start_step"] == 3 and summary["swad/end_step"] == 6
    for name, p in trainer.model.named_parameters():
        seg1 = (snapshots[3][name] + snapshots[4][name]) / 2
        seg2 = (snapshots[5][name] + snapshots[6][name]) / 2
        assert torch.allclose(p, (seg1 + seg2) / 2, atol=1e-6), name


@pytest.mark.parametrize(
    ("first", "second", "part"),
    [
        ("dg_quant.sam", "dg_quant.sagm", GRADIENT_COMPUTATION),
        ("dg_quant.sam", "dg_quant.fqat", GRADIENT_COMPUTATION),
        ("dg_quant.fqat", "dg_quant.sam", GRADIENT_COMPUTATION),
        ("dg_quant.swa", "dg_quant.swad", WEIGHT_AVERAGING),
        ("dg_quant.swad", "dg_quant.swa", WEIGHT_AVERAGING),
    ],
)
def test_two_owners_are_refused_in_one_line(first: str, second: str, part: str) -> None:
    with pytest.raises(PluginError) as info:
        PluginHost([first, second])
    message = str(info.value)
    assert "\n" not in message and first in message and second in message and part in message


def test_coral_term_reaches_the_gradients_of_a_plugin_that_owns_the_step() -> None:
    """SAM scores the loss twice: the CORAL term is in both passes, so it changes SAM's gradient."""
    grads = {}
    for weight in ("0", "100"):
        trainer = build(["dg_quant.coral", "dg_quant.sam"], ["--coral_weight", weight])
        trainer.train_step(*batch(0))
        grads[weight] = [p.detach().clone() for p in trainer.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(grads["0"], grads["100"]))
