"""MixStyle and SWAD as DomainBed algorithms, alone and with a quantization method by name.

Fast tests on the fake DomainBed tree of ``test_domainbed`` (its ``Toy16`` data run through a
featurizer with stages layer1..3, where MixStyle attaches); the real checkout is driven by the
slow test of ``test_domainbed_compose``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from dg_quant.adapters.domainbed import compose, launcher
from dg_quant.errors import ConfigError
from dg_quant.methods import mixstyle as mixstyle_maths
from dg_quant.methods.averaging import parameters_of
from tests.adapters.test_domainbed import _hparams, _load, _rebuild, _train

SHAPE16 = (3, 16, 16)
# train.py's flags as the launcher leaves them in sys.argv: 6 steps, a checkpoint every 2 (0, 2, 4, 5)
SWAD_ARGV = [
    "train.py",
    "--dataset",
    "Toy",
    "--data_dir",
    "unused",
    "--test_envs",
    "0",
    "--steps",
    "6",
    "--checkpoint_freq",
    "2",
]
CHECKPOINTS = (0, 2, 4, 5)
# Every segment joins the valley (it starts at the first, no loss exceeds the threshold): the
# final model is the mean of the segment means, whatever the losses.
ALL_SEGMENTS = {"swad_n_converge": 1, "swad_n_tolerance": 1, "swad_tolerance_ratio": 1e9}


def _batches(shape: tuple[int, ...], seed: int, n_classes: int = 2, n_domains: int = 2, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g) + d, torch.randint(0, n_classes, (batch,), generator=g))
        for d in range(n_domains)
    ]


def _round_trip(cls, shape, hparams, algorithm):
    clone = cls(shape, 2, 2, hparams)
    clone.load_state_dict(algorithm.state_dict())
    return clone


def test_mixstyle_and_swad_are_registered_and_take_the_methods_by_name(domainbed):
    algorithms, registry, before, registered = domainbed
    assert {"MixStyle", "SWAD"} <= set(registered)
    expected = {
        "MixStyle_QTDoG": ("dg_quant.mixstyle", "dg_quant.qtdog"),
        "MixStyle_OBC": ("dg_quant.mixstyle", "dg_quant.obc"),
        "SWAD_QTDoG": ("dg_quant.swad", "dg_quant.qtdog"),
        "SWAD_INQ": ("dg_quant.swad", "dg_quant.inq"),
        "SWAD_LSQ": ("dg_quant.swad", "dg_quant.lsq"),
    }
    for name, plugins in expected.items():
        cls = algorithms.get_algorithm_class(name)
        assert cls.PLUGINS == plugins and cls.__name__ == name and issubclass(cls, algorithms.Algorithm)
        assert algorithms.get_algorithm_class(name) is cls
    assert algorithms.ALGORITHMS == before + registered  # built on demand, never listed
    mix = registry.default_hparams("MixStyle_QTDoG", "Toy")
    assert mix["mixstyle_p"] == 0.5 and mix["mixstyle_layers"] == "1,2,3" and mix["mixstyle_mix"] == "random"
    assert mix["quant_start_step"] == 2000 and mix["bits"] == 7 and mix["lr"] == 5e-5  # QTDoG's switch
    swad = registry.default_hparams("SWAD_QTDoG", "Toy")
    assert swad["swad_n_tolerance"] == 6 and swad["bn_batches"] == 500 and swad["quant_start_step"] == 2000
    assert "quant_start_step" not in registry.default_hparams("SWAD", "Toy")
    assert registry.default_hparams("SWAD_LSQ", "Toy")["quant_start_step"] == 0
    names = compose.composed_names(algorithms)
    assert names["MixStyle_QTDoG"] is None and names["SWAD_OBC"] is None and "SAGM_QTDoG" not in names
    with pytest.raises(ConfigError, match="MixStyle, SWAD"):
        algorithms.get_algorithm_class("SAGM_QTDoG")


@pytest.mark.parametrize("name", ["MixStyle", "MixStyle_QTDoG"])
def test_mixstyle_contract_mixes_across_the_environments(domainbed, monkeypatch, name):
    algorithms, registry, _, _ = domainbed
    cls = algorithms.get_algorithm_class(name)
    switch = {"quant_start_step": 2} if name.endswith("QTDoG") else {}
    hparams = _hparams(registry, name, lr=1e-2, mixstyle_mix="crossdomain", mixstyle_p=1.0, **switch)
    algorithm = cls(SHAPE16, 2, 2, hparams)
    run = algorithm.trainer.host.pm.get_plugin("dg_quant.mixstyle.run")
    featurizer = algorithm.featurizer
    assert len(run.sites) == 3
    pairs = []
    partners = mixstyle_maths.mixing_partners

    def recorded(domains, batch_size, mode):
        chosen = partners(domains, batch_size, mode)
        pairs.append((domains.clone(), chosen))
        return chosen

    monkeypatch.setattr(mixstyle_maths, "mixing_partners", recorded)
    before = featurizer.layer1[0].weight.detach().clone()
    logs = [algorithm.update(_batches(SHAPE16, seed=i)) for i in range(4)]
    # DomainBed's environment index of each sample reached every site, and each was mixed with the other's
    labels = torch.tensor([0] * 4 + [1] * 4)
    assert len(pairs) == 3 * 4 and all(torch.equal(d, labels) for d, _ in pairs)
    assert all(torch.all(d[p] != d) for d, p in pairs)
    assert [log["quantized"] for log in logs] == ([0.0, 0.0, 1.0, 1.0] if switch else [0.0] * 4)
    assert not torch.equal(before, featurizer.layer1[0].weight.detach()) and algorithm.trainer.step == 4
    x = torch.randn(5, *SHAPE16)
    algorithm.eval()
    logits = algorithm.predict(x)
    assert torch.equal(logits, algorithm.predict(x))  # no mixing in eval mode
    clone = _round_trip(cls, SHAPE16, hparams, algorithm).eval()
    assert torch.equal(clone.predict(x), logits) and clone.trainer.step == 4


def test_mixstyle_on_a_featurizer_without_stages_is_one_line(domainbed):
    algorithms, registry, _, _ = domainbed
    with pytest.raises(ConfigError, match="cannot attach to Conv") as info:
        algorithms.MixStyle((3, 8, 8), 2, 2, _hparams(registry, "MixStyle"))
    assert "\n" not in str(info.value)


def _validation_loss(algorithm) -> float:
    """SWAD's tr_outloss written out: each training environment's out-split (train.py's split of
    the fake Toy data, test env 0), mean cross-entropy in eval mode, averaged over environments."""
    import domainbed.datasets as datasets
    import domainbed.lib.misc as misc

    dataset = datasets.Toy("unused", [0], {})
    losses = []
    algorithm.eval()
    with torch.no_grad():
        for env_i in (1, 2):
            out, _in = misc.split_dataset(dataset[env_i], 6, misc.seed_hash(0, env_i))
            x = torch.stack([out[i][0] for i in range(len(out))])
            y = torch.stack([out[i][1] for i in range(len(out))])
            losses.append(float(F.cross_entropy(algorithm.predict(x), y)))
    algorithm.train()
    return sum(losses) / 2


@pytest.mark.parametrize(("name", "freeze_bn"), [("SWAD", False), ("SWAD_QTDoG", True)])
def test_swad_ends_with_the_average_of_its_segments(domainbed, monkeypatch, name, freeze_bn):
    """The algorithm measures the validation loss at train.py's checkpoints, and after the last
    update its network is the average of the segment averages (QT-DoG's switch restarts SWAD)."""
    algorithms, registry, _, _ = domainbed
    monkeypatch.setattr(sys, "argv", SWAD_ARGV)
    cls = algorithms.get_algorithm_class(name)
    online_cls = type(name, (cls,), {"TOTAL_STEPS": 100})  # the same run that never reaches its end
    switch = {"quant_start_step": 2} if name.endswith("QTDoG") else {}
    hparams = _hparams(registry, name, lr=1e-2, bn_batches=3, batch_size=4, freeze_bn=freeze_bn, **ALL_SEGMENTS)
    hparams.update(switch)
    torch.manual_seed(0)
    algorithm = cls((3, 8, 8), 2, 2, hparams)
    torch.manual_seed(0)
    online = online_cls((3, 8, 8), 2, 2, hparams)
    snapshots, logs = [], []
    for step in range(6):
        batches = _batches((3, 8, 8), seed=step)
        logs.append(algorithm.update(batches))
        online.update(batches)
        snapshots.append({k: v.detach().clone() for k, v in parameters_of(online.network).items()})
        if step == 2:
            assert logs[2]["id_val_loss"] == pytest.approx(_validation_loss(online), rel=1e-5)
    assert [s for s, log in enumerate(logs) if "id_val_loss" in log] == list(CHECKPOINTS)
    assert [log.get("dgq_final_model") for log in logs] == [None] * 5 + [1.0]

    # segments end at the checkpoints; QT-DoG's switch (step 2) starts SWAD afresh
    first = 2 if switch else 0
    bounds = [first] + [c + 1 for c in CHECKPOINTS if c >= first]
    segments = [range(a, b) for a, b in zip(bounds, bounds[1:])]
    means = [{k: torch.stack([snapshots[i][k] for i in seg]).mean(0) for k in snapshots[0]} for seg in segments]
    expected = {k: torch.stack([m[k] for m in means]).mean(0) for k in means[0]}
    got = parameters_of(algorithm.network)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    summary = algorithm.final_summary
    assert summary["swad/segments"] == len(segments) and summary["swad/restarts"] == (1 if switch else 0)
    assert summary["swad/start_step"] == first + 1 and summary["swad/end_step"] == 6

    bn, online_bn = algorithm.featurizer.bn, online.featurizer.bn
    if freeze_bn:  # frozen statistics stay DomainBed's (SWAD skips update_bn with freeze_bn)
        assert torch.equal(bn.running_mean, online_bn.running_mean) and int(bn.num_batches_tracked) == 0
    else:  # re-estimated for the averaged weights on bn_batches training batches
        assert int(bn.num_batches_tracked) == 3 and not torch.equal(bn.running_mean, online_bn.running_mean)

    x = torch.randn(5, 3, 8, 8)
    algorithm.eval(), online.eval()
    logits = algorithm.predict(x)
    assert not torch.allclose(logits, online.predict(x))  # predict runs the average, not the online model
    clone = _round_trip(cls, (3, 8, 8), hparams, algorithm).eval()
    assert torch.equal(clone.predict(x), logits) and clone.final_summary == summary and clone.trainer.step == 6


def test_swad_without_train_py_flags_is_one_line(domainbed, monkeypatch):
    algorithms, registry, _, _ = domainbed
    monkeypatch.setattr(sys, "argv", ["my_script.py"])
    algorithm = algorithms.SWAD((3, 8, 8), 2, 2, _hparams(registry, "SWAD"))  # reloading needs no flags
    with pytest.raises(ConfigError, match="train.py's flags") as info:
        algorithm.update(_batches((3, 8, 8), seed=0))
    assert "\n" not in str(info.value)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_launcher_reports_swads_average_and_mixstyle(fake_root, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    flags = ("--dataset", "Toy", "--data_dir", "unused", "--steps", "5", "--checkpoint_freq", "2")
    swad = {"bn_batches": 2, "batch_size": 8}
    assert _train(fake_root, sweep / "swad", "SWAD", *flags, **swad) == 0
    assert _train(fake_root, sweep / "swad_qtdog", "SWAD_QTDoG", *flags, quant_start_step=1, **swad) == 0
    ptq = {"bits": 4, "ptq_samples": 16, "ptq_batch_size": 8}
    assert _train(fake_root, sweep / "swad_obc", "SWAD_OBC", *flags, **swad, **ptq) == 0
    mix = ("--dataset", "Toy16", "--steps", "3")
    assert _train(fake_root, sweep / "mixstyle_qtdog", "MixStyle_QTDoG", *mix, quant_start_step=1) == 0

    records = _records(sweep / "swad")
    assert [r["step"] for r in records] == [0, 2, 4] and all(r["id_val_loss"] > 0 for r in records)
    assert [r.get("dgq_final_model") for r in records] == [None, None, 1.0]
    final = json.loads((sweep / "swad" / "dgq_final.json").read_text())
    assert final["final_model"] is True and final["swad/end_step"] == 5 and final["model_changed"] is False
    saved = _load(sweep / "swad" / "model.pkl")  # train.py saved the averaged model
    assert _rebuild(saved).final_summary["swad/segments"] == final["swad/segments"]
    obc = _records(sweep / "swad_obc")
    assert [r.get("dgq_phase") for r in obc] == [None, None, None, "train_end"]
    assert obc[-1]["dgq_final_model"] == 1.0 and obc[-1]["quantized"] == 1.0  # PTQ of the average

    capsys.readouterr()
    assert launcher.main(["collect_results", "--domainbed", str(fake_root), "--input_dir", str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines() if "|" in line}
    assert set(rows) == {"SWAD", "SWAD_QTDoG", "SWAD_OBC", "MixStyle_QTDoG"}
    assert rows["SWAD"][0] == "4" and rows["SWAD"][4] == "1.0"  # the averaged model, whatever its accuracy
    assert float(rows["SWAD"][3]) == records[-1]["env0_in_acc"]
    assert rows["SWAD_QTDoG"][4] == "1.0" and float(rows["SWAD_QTDoG"][1]) == 1.0
    assert rows["SWAD_OBC"][2] == "train_end" and rows["SWAD_OBC"][4] == "1.0"
    assert float(rows["MixStyle_QTDoG"][1]) > 0
    assert "3 evaluations of online models" in out  # SWAD's 2, SWAD_QTDoG's 1 after its switch, SWAD_OBC's 0
