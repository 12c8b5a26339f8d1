"""The INQ and OBC plugins through the real host, Trainer and wilds_run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from dg_quant.context import RunContext
from dg_quant.host import PluginHost
from dg_quant.loop import Trainer
from dg_quant.plugins import inq
from dg_quant.quant.inq import inq_levels
from dg_quant.registry import create_adapter


def _config(**kw) -> argparse.Namespace:
    host = PluginHost(["dg_quant.inq"])
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    total_steps = kw.pop("total_steps", None)
    config = parser.parse_args([])
    for k, v in kw.items():
        setattr(config, k, v)
    host.configure(config, RunContext(total_steps=total_steps))
    return config, host


OPTIMIZERS = {  # every optimizer must leave a frozen weight exactly where it was
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    # DomainBed's optimizer: L2 weight decay inside Adam moves weights whose gradient is zero
    "adam_wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=5e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=5e-2),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_inq_frozen_weights_never_change_and_end_on_levels(opt):
    config, host = _config(total_steps=12, bits=5)
    model = create_adapter("test_cnn", num_classes=3)

    trainer = Trainer.build(host, model, config, lambda m: OPTIMIZERS[opt](m.parameters()), nn.CrossEntropyLoss())
    prepared = dict(inq.inq_modules(model))
    assert set(prepared) == {"featurizer.0", "featurizer.3"}  # classifier stays FP
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    snapshots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(host.context.total_steps):
        trainer.train_step((x, y))
        for name, module in prepared.items():
            frozen = module.inq_frozen
            if name in snapshots:
                old_w, old_mask = snapshots[name]
                assert torch.equal(module.weight[old_mask], old_w[old_mask]), f"frozen weight moved at {step}"
                free = ~frozen
                if free.any() and step not in (3, 6, 9):
                    assert not torch.equal(module.weight[free], old_w[free])  # free weights do train
            state = trainer.optimizer.state[module.weight]
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == frozen.shape:
                    assert not value[frozen].any()
            snapshots[name] = (module.weight.detach().clone(), frozen.clone())
    result = trainer.end(None).numbers
    assert result["inq/frozen_fraction"] == 1.0 and result["inq/levels"] == 17
    for module in prepared.values():
        n1, n2 = (int(v) for v in module.inq_exponents)
        levels = set(inq_levels(n1, n2).float().tolist())
        assert set(module.weight.detach().unique().tolist()) <= levels


def test_inq_partition_fractions_follow_the_schedule():
    config, host = _config(total_steps=8, inq_partitions="0.5,0.75,1")
    model = create_adapter("test_cnn", num_classes=3)
    trainer = Trainer.build(
        host, model, config, lambda m: torch.optim.SGD(m.parameters(), lr=0.01), nn.CrossEntropyLoss()
    )
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    fractions = []
    for _ in range(8):
        trainer.train_step((x, y))
        fractions.append(inq.frozen_fraction(model))
    # partitions at steps 0, 2, 5 (evenly spread over 8 steps)
    assert fractions[0] == pytest.approx(0.5, abs=0.01)
    assert fractions[2] == pytest.approx(0.75, abs=0.01)
    assert fractions[5] == 1.0


def test_inq_wilds_run_end_to_end(tmp_path):
    from dg_quant.adapters.wilds.cli import main

    log_dir = tmp_path / "inq"
    rc = main(
        [
            "--plugin",
            "dg_quant.inq",
            "--bits",
            "5",
            "--n_steps",
            "6",
            "--eval_every",
            "6",
            "--batch_size",
            "16",
            "--frac",
            "0.2",
            "--log_dir",
            str(log_dir),
            "--no_progress",
        ]
    )
    assert rc == 0
    final = json.loads((log_dir / "final.json").read_text())
    assert final["inq/frozen_fraction"] == 1.0
    assert final["last"]["inq/frozen_fraction"] > 0.5


def _train_run(tmp_path, name: str, *plugin_args: str):
    from dg_quant.adapters.wilds.cli import main

    log_dir = tmp_path / name
    argv = [
        *plugin_args,
        "--n_steps",
        "8",
        "--eval_every",
        "8",
        "--batch_size",
        "32",
        "--frac",
        "0.3",
        "--log_dir",
        str(log_dir),
        "--no_progress",
    ]
    assert main(argv) == 0
    return log_dir


def test_obc_plugin_quantizes_at_train_end_and_beats_rtn(tmp_path):
    from dg_quant.adapters.wilds.checkpoints import load_run_model
    from dg_quant.quant import compression_report, iter_quantized_weights

    log_dir = _train_run(tmp_path, "obc", "--plugin", "dg_quant.obc", "--bits", "4", "--ptq_samples", "128")
    ptq = json.loads((log_dir / "ptq.json").read_text())
    assert ptq["calibration_split"] == "train" and ptq["bits"] == 4
    assert [row["method"] for row in ptq["layers"]] == ["obq", "gptq", "gptq", "gptq"]  # 9 cols vs 288/576
    for row in ptq["layers"]:
        assert row["error"] < row["rtn_error"], row
    final = json.loads((log_dir / "final.json").read_text())
    assert final["ptq/layers"] == 4 and len(final["compression"]["layers"]) == 4
    # the runner evaluated the post-training-quantized model again: "last" describes model.pt
    records = [json.loads(line) for line in (log_dir / "results.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in records] == [None, "train_end"]
    assert final["last"] == records[-1] and final["last"]["compression_ratio"] > 4
    assert records[0]["compression_ratio"] == 1.0
    # model.pt holds the PTQ model and reloads through the plugin; the selected model is the PTQ one
    # too (a quantization method's selection picks among its quantized evaluations)
    last, _config, _ = load_run_model(log_dir, "last")
    assert all(q.enabled and q.bits == 4 for *_, q in iter_quantized_weights(last))
    assert final["best"] == records[-1] and final["best"]["quantized"] is True
    best, _config, _ = load_run_model(log_dir, "best")
    assert compression_report(best).layers


def test_calibration_uses_only_training_split_images(tmp_path):
    from dg_quant.adapters.wilds.calibration import TrainingCalibration, calibration_batches
    from dg_quant.adapters.wilds.checkpoints import load_run_model

    log_dir = _train_run(tmp_path, "erm")
    model, config, load_dataset = load_run_model(log_dir, "last")
    dataset = load_dataset()
    train = dataset.get_subset("train", frac=config.frac, transform=model.transform)
    test = dataset.get_subset("test", transform=model.transform)
    calib = torch.cat(list(calibration_batches(train, 100, 32, "cpu", seed=1)))
    assert calib.shape[0] == 100
    train_keys = {x.numpy().tobytes() for x, _y, _m in train}
    test_keys = {x.numpy().tobytes() for x, _y, _m in test}
    keys = {x.numpy().tobytes() for x in calib}
    assert keys <= train_keys and not keys & test_keys
    again = torch.cat(list(calibration_batches(train, 100, 32, "cpu", seed=1)))
    assert torch.equal(calib, again)  # repeated passes see the same images

    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            reads.append(i)
            return train[i]

    calibration = TrainingCalibration(Counting(), "cpu", seed=1)
    first = torch.cat(list(calibration(100, 32)))
    read_once = len(reads)
    passes = [first] + [torch.cat(list(calibration(100, 32))) for _ in range(2)]
    assert all(torch.equal(p, calib) for p in passes)  # the same images as calibration_batches
    assert 100 <= read_once < 200 and len(reads) == read_once  # read (and transformed) once, not per pass


def test_dgq_ptq_then_dgq_export_reproduce_outputs(tmp_path, capsys):
    from dg_quant.adapters.wilds.export import main as export_main
    from dg_quant.adapters.wilds.ptq import main as ptq_main

    log_dir = _train_run(tmp_path, "erm")
    argv = ["--ptq_method", "gptq", "--bits", "5", "--ptq_samples", "128", "--ptq_bn_reestimate", "true"]
    assert ptq_main([str(log_dir), *argv]) == 0
    record = json.loads((log_dir / "ptq_gptq_w5.json").read_text())
    assert record["ptq/layers"] == 4 and record["ptq/layers_better_than_rtn"] == 4
    assert "test/acc_avg" in record["before"] and "test/acc_avg" in record["after"]
    out = tmp_path / "ptq.dgq"
    assert export_main([str(log_dir), "-o", str(out), "--checkpoint", "ptq_gptq_w5.pt", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and out.stat().st_size > 0
    assert export_main([str(log_dir), "-o", str(tmp_path / "x.dgq"), "--checkpoint", "nope.pt"]) == 2
    assert "dgq_export: error: checkpoint nope.pt not found" in capsys.readouterr().err


def test_dgq_export_of_a_qat_run_is_bit_exact(tmp_path, capsys):
    from dg_quant.adapters.wilds.export import main as export_main
    from dg_quant.quant.export import size_report

    log_dir = _train_run(tmp_path, "qtdog", "--plugin", "dg_quant.qtdog", "--bits", "6", "--quant_start_step", "0")
    out = tmp_path / "qat.dgq"
    assert export_main([str(log_dir), "-o", str(out), "--checkpoint", "last", "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    report = size_report(out)
    assert set(report.bits) == {6} and report.file_bytes == out.stat().st_size
