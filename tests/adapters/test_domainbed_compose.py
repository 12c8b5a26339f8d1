"""Quantization attached to DomainBed's own algorithms (``<Algorithm>_<Method>``).

Fast tests on the fake DomainBed tree of ``test_domainbed`` (its CORAL, IRM that rebuilds its
optimizer, and DANN with two optimizers); every algorithm of a real checkout with every method is
the slow test at the end (``DGQ_DOMAINBED=<checkout root>``).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from dg_quant.adapters.domainbed import compose, launcher
from dg_quant.errors import ConfigError
from dg_quant.quant import iter_quantized_weights, step_parameters
from dg_quant.quant.inq import FROZEN_BUFFER
from tests.adapters.test_domainbed import _forget_domainbed, _hparams, _minibatches, _train

SHAPE = (3, 8, 8)


def test_composed_names_resolve_on_demand_and_never_join_algorithms(domainbed):
    algorithms, _registry, before, registered = domainbed
    assert algorithms.ALGORITHMS == before + registered  # dg-quant's own 7, no composed name
    cls = algorithms.get_algorithm_class("CORAL_QTDoG")
    assert issubclass(cls, algorithms.CORAL) and issubclass(cls, compose.ComposedAlgorithm)
    assert cls.__name__ == "CORAL_QTDoG" and cls.__module__ == "domainbed.algorithms"
    assert cls.PLUGINS == ("dg_quant.qtdog",) and cls.BASE == "CORAL"
    assert algorithms.get_algorithm_class("CORAL_QTDoG") is cls and algorithms.DANN_INQ.BASE == "DANN"
    assert algorithms.ALGORITHMS == before + registered
    with pytest.raises(NotImplementedError):
        algorithms.get_algorithm_class("CORAL_FOO")
    with pytest.raises(NotImplementedError):
        algorithms.get_algorithm_class("Nope_QTDoG")
    with pytest.raises(ConfigError, match="dg-quant algorithm already"):
        algorithms.get_algorithm_class("SAGM_QTDoG")
    names = compose.composed_names(algorithms)
    assert {"CORAL_QTDoG", "DANN_OBC", "IRM_INQ", "ERM_LSQ"} <= set(names) and "QTDoG_LSQ" not in names


def test_refused_combinations_name_the_reason():
    assert "WholeFish" in compose.refusal("Fish", "QTDoG")
    assert compose.refusal("ANDMask", "INQ") is None and "autograd.grad" in compose.refusal("ANDMask", "OBC")
    assert compose.refusal("ANDMask", "LSQ") is None and "create_graph" in compose.refusal("IGA", "LSQ")
    assert compose.split_name("CausIRL_CORAL_QTDoG") == ("CausIRL_CORAL", "QTDoG")
    assert compose.split_name("LSQ_SAGM") is None and compose.split_name("QTDoG") is None


def test_default_sweep_runs_the_algorithms_it_ran_before(fake_root, capsys):
    assert launcher.main(["sweep", "--domainbed", str(fake_root), "--command_launcher", "dummy"]) == 0
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Dummy launcher:")]
    names = [line.split("--algorithm ")[1].split()[0] for line in jobs]
    assert names[:4] == ["ERM", "CORAL", "IRM", "DANN"] and "QTDoG" in names
    assert not any(compose.split_name(n) for n in names)


def test_hparams_are_the_algorithms_plus_the_methods(domainbed):
    _algorithms, registry, _, _ = domainbed
    coral, qtdog = registry.default_hparams("CORAL", "Toy"), registry.default_hparams("QTDoG", "Toy")
    composed = registry.default_hparams("CORAL_QTDoG", "Toy")
    assert composed == {**qtdog, **coral}
    assert composed["mmd_gamma"] == 1.0 and composed["quant_start_step"] == 2000 and composed["bits"] == 7
    assert (
        registry.random_hparams("CORAL_QTDoG", "Toy", 3)["mmd_gamma"]
        == registry.random_hparams("CORAL", "Toy", 3)["mmd_gamma"]
    )
    assert registry.default_hparams("DANN_INQ", "Toy")["inq_partitions"] == "0.5,0.75,0.875,1.0"


# (algorithm, method, quantized flags of 4 updates with the switch at step 2)
CASES = [
    ("CORAL", "QTDoG", [0.0, 0.0, 1.0, 1.0]),
    ("IRM", "LSQ", [0.0, 0.0, 1.0, 1.0]),
    ("DANN", "QTDoG", [0.0, 0.0, 1.0, 1.0]),
    ("DANN", "INQ", [0.0, 0.0, 0.0, 1.0]),
    ("CORAL", "OBC", [0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize(("base", "method", "quantized"), CASES, ids=[f"{b}_{m}" for b, m, _ in CASES])
def test_contract_update_predict_state_dict(domainbed, tmp_path, base, method, quantized):
    algorithms, registry, _, _ = domainbed
    name = f"{base}_{method}"
    cls = algorithms.get_algorithm_class(name)
    switch = {"quant_start_step": 2} if method in ("QTDoG", "LSQ") else {}
    hparams = _hparams(registry, name, lr=1e-2, **switch)
    if method == "INQ":
        hparams["inq_start_step"] = 0
        cls.TOTAL_STEPS = 4  # partitions at steps 0..3, as register(total_steps=4) gives
    algorithm = cls(SHAPE, 3, 2, hparams)
    before = {k: v.clone() for k, v in algorithm.state_dict().items() if isinstance(v, torch.Tensor)}
    logs = [algorithm.update(_minibatches(seed=i)) for i in range(4)]
    assert [log["quantized"] for log in logs] == quantized
    own = {"CORAL": {"loss", "penalty"}, "IRM": {"loss"}, "DANN": {"disc_loss", "gen_loss"}}[base]
    assert own <= set().union(*logs) and algorithm.trainer.step == 4  # the algorithm's own update ran
    after = algorithm.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(("original", "weight")))

    x = torch.randn(5, *SHAPE)
    algorithm.eval()
    logits = algorithm.predict(x)
    path = tmp_path / "model.pkl"
    torch.save({"model_hparams": hparams, "model_dict": algorithm.state_dict()}, path)
    saved = torch.load(path, weights_only=True)  # DomainBed's reload recipe
    clone = cls(SHAPE, 3, 2, saved["model_hparams"])
    clone.load_state_dict(saved["model_dict"])
    clone.eval()
    assert torch.equal(clone.predict(x), logits) and clone.trainer.step == 4


def test_the_networks_predict_runs_are_quantized_the_training_only_ones_are_not(domainbed):
    algorithms, registry, _, _ = domainbed
    algorithm = algorithms.get_algorithm_class("DANN_LSQ")(SHAPE, 3, 2, _hparams(registry, "DANN_LSQ"))
    quantized = {id(m) for _, m, _, _ in iter_quantized_weights(algorithm)}
    assert quantized == {id(algorithm.featurizer.conv)}  # the head and the discriminator stay FP
    steps = {id(p) for p in step_parameters(algorithm)}
    in_gen = {id(p) for g in algorithm.gen_opt.param_groups for p in g["params"]}
    in_disc = {id(p) for g in algorithm.disc_opt.param_groups for p in g["params"]}
    assert steps <= in_gen and not steps & in_disc  # the step sizes train with their weights


def test_inq_masks_hold_through_every_optimizer_the_algorithm_steps(domainbed):
    """DANN steps its discriminator and its generator on alternate updates; INQ's frozen weights
    never move under either, and IRM's optimizer rebuilt inside update() is hooked too."""
    algorithms, registry, _, _ = domainbed
    for name in ("DANN_INQ", "IRM_INQ"):
        cls = algorithms.get_algorithm_class(name)
        cls.TOTAL_STEPS = 8
        algorithm = cls(SHAPE, 3, 2, _hparams(registry, name, lr=1e-1, inq_partitions="0.5,1.0"))
        conv = algorithm.featurizer.conv if name == "DANN_INQ" else algorithm.network[0].conv
        algorithm.update(_minibatches(seed=0))  # the first partition: half the conv frozen
        frozen = getattr(conv, FROZEN_BUFFER).clone()
        kept = conv.weight.detach()[frozen].clone()
        assert 0 < frozen.float().mean() < 1
        for seed in range(1, 4):
            algorithm.update(_minibatches(seed=seed))
            assert torch.equal(conv.weight.detach()[frozen], kept), name


def test_launcher_trains_composed_algorithms_and_collect_results_reports_them(fake_root, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    ptq = {"bits": 4, "ptq_samples": 16, "ptq_batch_size": 8}
    assert _train(fake_root, sweep / "coral_obc", "CORAL_OBC", "--steps", "3", **ptq) == 0
    assert _train(fake_root, sweep / "coral_qtdog", "CORAL_QTDoG", "--steps", "4", quant_start_step=2) == 0
    assert _train(fake_root, sweep / "coral", "CORAL", "--steps", "3") == 0
    final = json.loads((sweep / "coral_obc" / "dgq_final.json").read_text())
    assert final["algorithm"] == "CORAL_OBC" and final["plugins"] == ["dg_quant.obc"]
    assert (
        final["model_changed"] is True and final["ptq/layers"] == 1 and (sweep / "coral_obc" / "model_fp.pkl").exists()
    )
    saved = torch.load(sweep / "coral_obc" / "model.pkl", weights_only=True)
    import domainbed.algorithms as algorithms

    rebuilt = algorithms.get_algorithm_class("CORAL_OBC")(
        saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"], saved["model_hparams"]
    )
    rebuilt.load_state_dict(saved["model_dict"])
    assert [q.enabled for _, _, _, q in iter_quantized_weights(rebuilt)] == [True]  # PTQ weights reloaded
    capsys.readouterr()
    assert launcher.main(["collect_results", "--domainbed", str(fake_root), "--input_dir", str(sweep)]) == 0
    rows = {line.split("|")[0]: line.split("|")[1:] for line in capsys.readouterr().out.splitlines() if "|" in line}
    assert set(rows) == {"CORAL", "CORAL_OBC", "CORAL_QTDoG"}
    assert rows["CORAL_OBC"][2] == "train_end" and float(rows["CORAL_OBC"][1]) == 1.0
    assert int(rows["CORAL_QTDoG"][0]) >= 2 and float(rows["CORAL_QTDoG"][1]) > 0
    assert rows["CORAL"][1] == "None"


def test_launcher_lists_the_composed_names(fake_root, capsys):
    assert launcher.main(["algorithms", "--domainbed", str(fake_root)]) == 0
    out = capsys.readouterr().out
    assert "DomainBed (a default sweep runs these): ERM CORAL IRM DANN\n" in out
    assert "  CORAL_QTDoG\n" in out and "  DANN_OBC\n" in out and "QTDoG_LSQ" not in out


# -- every algorithm of a real checkout with every method (slow; DGQ_DOMAINBED=<root>) --------


def _real_domainbed():
    root = os.environ.get("DGQ_DOMAINBED")
    if not root:
        pytest.skip("set DGQ_DOMAINBED to the root of a DomainBed checkout")
    _forget_domainbed()
    sys.path.insert(0, root)
    import domainbed.algorithms as algorithms
    import domainbed.hparams_registry as registry

    from dg_quant.adapters.domainbed import register

    before = list(algorithms.ALGORITHMS)
    registered = register(total_steps=4)
    return algorithms, registry, before, registered


def _drive(cls, hparams, shape, steps=4):
    """Construct, ``steps`` updates, predict; returns (algorithm, logs)."""
    torch.manual_seed(0)
    algorithm = cls(shape, 2, 2, hparams)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, *shape, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(2)]
    logs = [algorithm.update(batches) for _ in range(steps)]
    algorithm.eval()
    assert algorithm.predict(batches[0][0]).shape == (4, 2)
    return algorithm, logs


def _reloaded(cls, hparams, shape, algorithm):
    clone = cls(shape, 2, 2, hparams)
    clone.load_state_dict(algorithm.state_dict())
    return clone


@pytest.mark.slow
def test_real_domainbed_every_algorithm_with_every_method():
    algorithms, registry, before, registered = _real_domainbed()
    try:
        assert algorithms.ALGORITHMS == before + registered
        shape, checked, skipped = (2, 28, 28), [], {}
        for base in before:
            hparams = registry.default_hparams(base, "ColoredMNIST")
            try:
                plain, _ = _drive(algorithms.get_algorithm_class(base), hparams, shape)
            except Exception as exc:  # DomainBed itself cannot run it here (CUDA, backpack)
                skipped[base] = f"{type(exc).__name__}: {exc}"[:80]
                continue
            try:  # GroupDRO's and Fish's own state_dicts do not load into a fresh instance
                _reloaded(algorithms.get_algorithm_class(base), hparams, shape, plain)
                reloads = True
            except RuntimeError:
                reloads = False
            for method in compose.COMPOSABLE:
                name = compose.composed_name(base, method)
                if compose.refusal(base, method):
                    with pytest.raises(ConfigError, match="not available"):
                        algorithms.get_algorithm_class(name)
                    continue
                cls = algorithms.get_algorithm_class(name)
                hp = registry.default_hparams(name, "ColoredMNIST")
                if method == "QTDoG":
                    hp["quant_start_step"] = 2
                if method == "LSQ" and base in ("ANDMask", "SANDMask"):
                    with pytest.raises(ConfigError, match="set quant_start_step=0"):
                        cls(shape, 2, 2, {**hp, "quant_start_step": 2})
                algorithm, logs = _drive(cls, hp, shape)
                expected = 0.0 if method == "OBC" else 1.0
                assert logs[-1]["quantized"] == expected, name
                if method != "INQ":
                    assert list(iter_quantized_weights(algorithm)), name
                checked.append(name)
                if not reloads:
                    continue
                clone = _reloaded(cls, hp, shape, algorithm)
                ours, theirs = algorithm.state_dict(), clone.state_dict()
                assert ours.keys() == theirs.keys(), name
                for key, value in ours.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, theirs[key]), (name, key)
                assert clone.trainer.step == 4
        assert algorithms.ALGORITHMS == before + registered
        print(f"{len(checked)} combinations driven; DomainBed bases it cannot run here: {skipped}")
        assert len(checked) >= 100
    finally:
        _forget_domainbed()


@pytest.mark.slow
def test_real_domainbed_mixstyle_and_swad_with_every_method(tmp_path, monkeypatch):
    """dg-quant's MixStyle (on DomainBed's Wide_ResNet, 32x32: layer1..3) and SWAD (on its Debug28
    data, which SWAD's validation loss and BatchNorm batches rebuild from train.py's flags), alone
    and with every quantization method: construct, updates past the switch, predict, round trip."""
    algorithms, registry, before, registered = _real_domainbed()
    argv = ["train.py", "--dataset", "Debug28", "--data_dir", str(tmp_path), "--test_envs", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "4", "--checkpoint_freq", "2"])
    try:
        assert {"MixStyle", "SWAD"} <= set(registered)
        checked = []
        for base, shape in (("MixStyle", (3, 32, 32)), ("SWAD", (3, 28, 28))):
            for method in ("", *compose.COMPOSABLE):
                name = f"{base}_{method}" if method else base
                cls = algorithms.get_algorithm_class(name)
                hp = registry.default_hparams(name, "Debug28")
                hp.update({"quant_start_step": 2} if method == "QTDoG" else {})
                hp.update({"bn_batches": 2, "batch_size": 4} if base == "SWAD" else {"mixstyle_mix": "crossdomain"})
                algorithm, logs = _drive(cls, hp, shape)
                quantized = {"": 0.0, "OBC": 0.0}.get(method, 1.0)
                assert logs[-1]["quantized"] == quantized, name
                if base == "SWAD":  # checkpoints 0, 2 and the last step 3; then the average
                    assert [("id_val_loss" in log) for log in logs] == [True, False, True, True], name
                    assert logs[-1]["dgq_final_model"] == 1.0 and algorithm.final_summary["swad/end_step"] == 4
                clone = _reloaded(cls, hp, shape, algorithm)
                ours, theirs = algorithm.state_dict(), clone.state_dict()
                assert ours.keys() == theirs.keys(), name
                assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if isinstance(v, torch.Tensor)), name
                assert clone.trainer.step == 4 and clone.final_summary == algorithm.final_summary
                checked.append(name)
        assert algorithms.ALGORITHMS == before + registered
        assert len(checked) == 10
    finally:
        _forget_domainbed()
