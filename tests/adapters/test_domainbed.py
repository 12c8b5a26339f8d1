"""The DomainBed host against a small module tree shaped like DomainBed's (written here).

The tree mimics DomainBed's contracts only: ``algorithms`` (``Algorithm``, ``ALGORITHMS``,
``get_algorithm_class`` by ``globals()``), ``hparams_registry`` (``_hparams`` with one RNG per
name, ``default_hparams``, ``random_hparams``), ``networks`` (``Featurizer`` with BatchNorm and
``freeze_bn``, ``Classifier``), ``lib.misc.seed_hash``, plus scripts that the launcher runs. A run
against a real checkout is the slow test at the end (set ``DGQ_DOMAINBED`` to its root).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dg_quant.adapters.domainbed import algorithms as dgq_algorithms
from dg_quant.adapters.domainbed import launcher
from dg_quant.adapters.domainbed.hparams import HParam, extend_registry
from dg_quant.errors import ConfigError
from dg_quant.quant import is_quantization_enabled, iter_quantized_weights
from dg_quant.speed import SpeedOptions

FAKE_TREE = {
    "domainbed/__init__.py": "",
    "domainbed/lib/__init__.py": "",
    "domainbed/scripts/__init__.py": "",
    "domainbed/lib/misc.py": """
        import hashlib

        import numpy as np
        import torch

        def seed_hash(*args):
            return int(hashlib.sha1(repr(args).encode()).hexdigest()[:7], 16)

        def split_dataset(dataset, n, seed=0):
            keys = list(range(len(dataset)))
            np.random.RandomState(seed).shuffle(keys)
            return torch.utils.data.Subset(dataset, keys[:n]), torch.utils.data.Subset(dataset, keys[n:])

        def accuracy(network, loader, weights, device):
            correct = total = 0
            network.eval()
            with torch.no_grad():
                for x, y in loader:
                    correct += (network.predict(x.to(device)).argmax(1) == y.to(device)).sum().item()
                    total += len(y)
            network.train()
            return correct / total
    """,
    "domainbed/datasets.py": """
        import torch

        BUILT = []  # the hparams each dataset was built with (the tests count and inspect them)

        def get_dataset_class(name):
            if name not in globals():
                raise NotImplementedError(name)
            return globals()[name]

        class Toy:
            N_WORKERS = 0
            CHECKPOINT_FREQ = 1  # train.py evaluates after every step
            input_shape, num_classes = (3, 8, 8), 2

            def __init__(self, root, test_envs, hparams):
                BUILT.append(dict(hparams))
                g = torch.Generator().manual_seed(0)
                self.datasets = []
                for env in range(3):  # env i's pixels are about i; pixel [0, 0, 0] is the sample's id
                    x = torch.randn(30, *self.input_shape, generator=g) * 0.1 + env
                    x[:, 0, 0, 0] = torch.arange(30) + 100 * env
                    y = torch.randint(0, 2, (30,), generator=g)
                    self.datasets.append(torch.utils.data.TensorDataset(x, y))

            def __getitem__(self, index):
                return self.datasets[index]

            def __len__(self):
                return len(self.datasets)

        class LongToy(Toy):
            N_STEPS = 12  # train.py runs this many steps without --steps

        class DomainNet(Toy):
            N_STEPS = 5001  # DomainBed's default for every dataset, DomainNet included

        class Toy224(Toy):
            INPUT_SHAPE = (3, 224, 224)  # fed to the ImageNet featurizer, as PACS is

        class Toy16(Toy):
            input_shape = (3, 16, 16)  # the staged featurizer (layer1..3), where MixStyle attaches
    """,
    "domainbed/algorithms.py": """
        import torch
        from domainbed import networks

        ALGORITHMS = ["ERM", "CORAL", "IRM", "DANN"]

        def get_algorithm_class(name):
            if name not in globals():
                raise NotImplementedError(name)
            return globals()[name]

        class Algorithm(torch.nn.Module):
            def __init__(self, input_shape, num_classes, num_domains, hparams):
                super().__init__()
                self.hparams = hparams

        class ERM(Algorithm):
            def __init__(self, input_shape, num_classes, num_domains, hparams):
                super().__init__(input_shape, num_classes, num_domains, hparams)
                featurizer = networks.Featurizer(input_shape, hparams)
                self.network = torch.nn.Sequential(featurizer, networks.Classifier(8, num_classes))
                self.optimizer = torch.optim.Adam(self.network.parameters(), lr=hparams["lr"])

            def update(self, minibatches, unlabeled=None):
                x = torch.cat([x for x, _ in minibatches])
                y = torch.cat([y for _, y in minibatches])
                loss = torch.nn.functional.cross_entropy(self.network(x), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                return {"loss": loss.item()}

            def predict(self, x):
                return self.network(x)

        class CORAL(ERM):
            # ERM plus a penalty between the domains' mean features (DomainBed's CORAL, cut down).

            def update(self, minibatches, unlabeled=None):
                features = [self.network[0](x) for x, _ in minibatches]
                loss = sum(torch.nn.functional.cross_entropy(self.network[1](f), y)
                           for f, (_, y) in zip(features, minibatches))
                penalty = (features[0].mean(0) - features[-1].mean(0)).pow(2).mean()
                self.optimizer.zero_grad()
                (loss + self.hparams["mmd_gamma"] * penalty).backward()
                self.optimizer.step()
                return {"loss": loss.item(), "penalty": penalty.item()}

        class IRM(ERM):
            # Rebuilds its optimizer inside update(), as DomainBed's IRM does at penalty_anneal_iters.

            def __init__(self, input_shape, num_classes, num_domains, hparams):
                super().__init__(input_shape, num_classes, num_domains, hparams)
                self.update_count = 0

            def update(self, minibatches, unlabeled=None):
                self.update_count += 1
                if self.update_count == 2:
                    self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.hparams["lr"])
                return super().update(minibatches, unlabeled)

        class DANN(Algorithm):
            # A domain discriminator with its own optimizer, stepped on alternate updates (DomainBed's DANN).

            def __init__(self, input_shape, num_classes, num_domains, hparams):
                super().__init__(input_shape, num_classes, num_domains, hparams)
                self.featurizer = networks.Featurizer(input_shape, hparams)
                self.classifier = networks.Classifier(8, num_classes)
                self.discriminator = torch.nn.Sequential(
                    torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, num_domains))
                self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=hparams["lr"])
                self.gen_opt = torch.optim.Adam(
                    list(self.featurizer.parameters()) + list(self.classifier.parameters()), lr=hparams["lr"])
                self.update_count = 0

            def update(self, minibatches, unlabeled=None):
                x = torch.cat([x for x, _ in minibatches])
                y = torch.cat([y for _, y in minibatches])
                d = torch.cat([torch.full((len(x),), i) for i, (x, _) in enumerate(minibatches)])
                features = self.featurizer(x)
                disc_loss = torch.nn.functional.cross_entropy(self.discriminator(features), d)
                self.update_count += 1
                if self.update_count % 2:
                    self.disc_opt.zero_grad()
                    disc_loss.backward()
                    self.disc_opt.step()
                    return {"disc_loss": disc_loss.item()}
                gen_loss = torch.nn.functional.cross_entropy(self.classifier(features), y) - 0.1 * disc_loss
                self.gen_opt.zero_grad()
                gen_loss.backward()
                self.gen_opt.step()
                return {"gen_loss": gen_loss.item()}

            def predict(self, x):
                return self.classifier(self.featurizer(x))
    """,
    "domainbed/hparams_registry.py": """
        import numpy as np
        from domainbed.lib import misc

        def _hparams(algorithm, dataset, random_seed):
            hparams = {}

            def _hparam(name, default, sample):
                assert name not in hparams
                hparams[name] = (default, sample(np.random.RandomState(misc.seed_hash(random_seed, name))))

            _hparam("data_augmentation", True, lambda r: True)
            _hparam("freeze_bn", False, lambda r: False)
            _hparam("resnet_dropout", 0.0, lambda r: float(r.choice([0.0, 0.1, 0.5])))
            _hparam("nonlinear_classifier", False, lambda r: False)
            _hparam("lr", 5e-5, lambda r: 10 ** r.uniform(-5, -3.5))
            _hparam("weight_decay", 0.0, lambda r: 10 ** r.uniform(-6, -2))
            _hparam("batch_size", 32, lambda r: int(2 ** r.uniform(3, 5.5)))
            if algorithm == "CORAL":
                _hparam("mmd_gamma", 1.0, lambda r: 10 ** r.uniform(-1, 1))
            return hparams

        def default_hparams(algorithm, dataset):
            return {k: d for k, (d, _) in _hparams(algorithm, dataset, 0).items()}

        def random_hparams(algorithm, dataset, seed):
            return {k: r for k, (_, r) in _hparams(algorithm, dataset, seed).items()}
    """,
    "domainbed/networks.py": """
        import torch
        import torchvision
        from torch import nn

        def Featurizer(input_shape, hparams):
            # by input shape, as DomainBed's: 16x16 gets stages layer1..3 (as its Wide_ResNet/ResNet)
            return Staged(input_shape, hparams) if input_shape[1:] == (16, 16) else Conv(input_shape, hparams)

        class Staged(nn.Module):
            n_outputs = 8

            def __init__(self, input_shape, hparams):
                super().__init__()
                self.hparams = hparams
                self.layer1 = nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

            def forward(self, x):
                return self.layer3(self.layer2(self.layer1(x))).mean((2, 3))

        class Conv(nn.Module):
            n_outputs = 8

            def __init__(self, input_shape, hparams):
                super().__init__()
                self.hparams = hparams
                if input_shape[1:] == (224, 224):  # as DomainBed's ResNet: ImageNet weights, downloaded
                    self.backbone = torchvision.models.resnet18(pretrained=True)
                self.conv = nn.Conv2d(input_shape[0], 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8)
                self.dropout = nn.Dropout(hparams["resnet_dropout"])

            def forward(self, x):
                return self.dropout(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

            def train(self, mode=True):
                super().train(mode)
                if self.hparams["freeze_bn"]:
                    self.bn.eval()
                return self

        def Classifier(in_features, out_features, is_nonlinear=False):
            return nn.Linear(in_features, out_features)
    """,
    "domainbed/command_launchers.py": """
        def dummy_launcher(commands):
            for command in commands:
                print("Dummy launcher:", command)

        REGISTRY = {"dummy": dummy_launcher}
    """,
    "domainbed/scripts/train.py": """
        import argparse, json, os
        import torch
        from torch.utils.data import DataLoader
        from domainbed import algorithms, datasets, hparams_registry
        from domainbed.lib import misc

        if __name__ == "__main__":  # DomainBed's train.py, cut down to its contracts
            parser = argparse.ArgumentParser()
            parser.add_argument("--data_dir", default="unused")
            parser.add_argument("--dataset", default="Toy")
            parser.add_argument("--algorithm", default="ERM")
            parser.add_argument("--hparams")
            parser.add_argument("--trial_seed", type=int, default=0)
            parser.add_argument("--seed", type=int, default=0)
            parser.add_argument("--steps", type=int, default=2)
            parser.add_argument("--checkpoint_freq", type=int, default=None)
            parser.add_argument("--test_envs", type=int, nargs="+", default=[0])
            parser.add_argument("--output_dir", required=True)
            parser.add_argument("--holdout_fraction", type=float, default=0.2)
            parser.add_argument("--skip_model_save", action="store_true")
            args = parser.parse_args()
            os.makedirs(args.output_dir, exist_ok=True)
            hparams = hparams_registry.default_hparams(args.algorithm, args.dataset)
            hparams.update(json.loads(args.hparams or "{}"))
            torch.manual_seed(args.seed)
            dataset = datasets.get_dataset_class(args.dataset)(args.data_dir, args.test_envs, hparams)
            in_splits, out_splits = [], []
            for env_i, env in enumerate(dataset):
                out, in_ = misc.split_dataset(env, int(len(env) * args.holdout_fraction),
                                              misc.seed_hash(args.trial_seed, env_i))
                in_splits.append((in_, None))
                out_splits.append((out, None))
            train_loaders = [DataLoader(env, batch_size=4, shuffle=True, drop_last=True)
                             for i, (env, _) in enumerate(in_splits) if i not in args.test_envs]
            eval_loaders = [DataLoader(env, batch_size=64) for env, _ in in_splits + out_splits]
            eval_weights = [None for _ in eval_loaders]
            eval_loader_names = [f"env{i}_in" for i in range(len(in_splits))]
            eval_loader_names += [f"env{i}_out" for i in range(len(out_splits))]
            algorithm = algorithms.get_algorithm_class(args.algorithm)(
                dataset.input_shape, dataset.num_classes, len(dataset) - len(args.test_envs), hparams)
            checkpoint_freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ
            for step in range(args.steps):
                batches = [next(iter(loader)) for loader in train_loaders]
                step_vals = algorithm.update(batches)
                if step % checkpoint_freq and step != args.steps - 1:
                    continue  # the real one averages step_vals over the window; the tests read the last
                record = {"step": step, **step_vals, "hparams": hparams, "args": vars(args)}
                for name, loader, weights in zip(eval_loader_names, eval_loaders, eval_weights):
                    record[name + "_acc"] = misc.accuracy(algorithm, loader, weights, "cpu")
                with open(os.path.join(args.output_dir, "results.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\\n")
            if not args.skip_model_save:
                torch.save({"args": vars(args), "model_input_shape": dataset.input_shape,
                            "model_num_classes": dataset.num_classes,
                            "model_num_domains": len(dataset) - len(args.test_envs),
                            "model_hparams": hparams, "model_dict": algorithm.state_dict()},
                           os.path.join(args.output_dir, "model.pkl"))
            with open(os.path.join(args.output_dir, "done"), "w") as f:
                f.write("done")
    """,
    "domainbed/lib/reporting.py": """
        import json, os

        class Q(list):
            pass

        def load_records(path):
            records = []
            for sub in sorted(os.listdir(path)):
                results = os.path.join(path, sub, "results.jsonl")
                if os.path.exists(results):
                    with open(results) as f:
                        records += [json.loads(line) for line in f]
            return Q(records)
    """,
    "domainbed/scripts/collect_results.py": """
        import argparse
        from domainbed.lib import reporting

        if __name__ == "__main__":  # training-domain validation selection, one line per algorithm
            parser = argparse.ArgumentParser()
            parser.add_argument("--input_dir", required=True)
            records = reporting.load_records(parser.parse_args().input_dir)
            best = {}
            for r in records:
                algorithm, val = r["args"]["algorithm"], r["env1_out_acc"] + r["env2_out_acc"]
                if algorithm not in best or val > best[algorithm][0]:
                    best[algorithm] = (val, r)
            for algorithm, (val, r) in sorted(best.items()):
                print(f"{algorithm}|{r['step']}|{r.get('quantized')}|{r.get('dgq_phase')}|{r['env0_in_acc']}"
                      f"|{r.get('dgq_final_model')}")
    """,
    "domainbed/scripts/sweep.py": """
        import shlex
        import sys
        from domainbed import algorithms, command_launchers

        if __name__ == "__main__":
            extra = ""
            if "--hparams" in sys.argv:  # passed to every job (part of its folder's hash in DomainBed)
                extra = " --hparams " + shlex.quote(sys.argv[sys.argv.index("--hparams") + 1])
            jobs = [f"python -m domainbed.scripts.train --algorithm {a} --output_dir out/{a}{extra}"
                    for a in algorithms.ALGORITHMS]
            command_launchers.REGISTRY[sys.argv[sys.argv.index("--command_launcher") + 1]](jobs)
    """,
}

QAT_NAMES = ("QTDoG", "LSQ", "LSQ_SAGM", "FQAT")
RESERVED = {"step", "epoch", "step_time", "mem_gb", "hparams", "args"}


def _write_tree(root: Path) -> None:
    for rel, text in FAKE_TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _forget_domainbed() -> None:
    for name in [n for n in sys.modules if n == "domainbed" or n.startswith("domainbed.")]:
        del sys.modules[name]


def _hparams(registry, name: str, **overrides) -> dict:
    hparams = registry.default_hparams(name, "Toy")
    hparams.update(overrides)
    return hparams


def _minibatches(n_domains: int = 2, batch: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_domains)
    ]


# -- registration and hparams ---------------------------------------------------------------


def test_register_adds_available_algorithms(domainbed):
    algorithms, _registry, _before, registered = domainbed
    assert {"QTDoG", "LSQ"} <= set(registered)
    expected = [s.name for s in dgq_algorithms.available_specs()]
    assert registered == expected
    for name in registered:
        cls = algorithms.get_algorithm_class(name)
        assert issubclass(cls, algorithms.Algorithm)
        assert cls.__module__ == "domainbed.algorithms" and cls.__name__ == name
        assert algorithms.ALGORITHMS.count(name) == 1
    assert algorithms.ALGORITHMS[0] == "ERM"


def test_register_is_idempotent_and_keeps_foreign_classes(fake_root):
    import domainbed.algorithms as algorithms
    import domainbed.hparams_registry as registry

    from dg_quant.adapters.domainbed import register

    algorithms.LSQ = type("LSQ", (algorithms.Algorithm,), {})  # a fork's own algorithm of that name
    with pytest.warns(UserWarning, match="already defines LSQ"):
        first = register()
    with pytest.warns(UserWarning, match="already defines LSQ"):
        second = register()
    assert "LSQ" not in first and first == second
    assert algorithms.ALGORITHMS.count("QTDoG") == 1
    assert "bits" not in registry.default_hparams("LSQ", "Toy")
    # One wrapper, not two stacked: the original registry runs once per call.
    assert registry._hparams._dgq_original.__module__ == "domainbed.hparams_registry"


def test_default_hparams_follow_the_plugin_options(domainbed):
    _algorithms, registry, _before, _ = domainbed
    qtdog = registry.default_hparams("QTDoG", "Toy")
    lsq = registry.default_hparams("LSQ", "Toy")
    assert qtdog["quant_start_step"] == 2000 and lsq["quant_start_step"] == 0
    assert qtdog["bits"] == 7 and qtdog["granularity"] == "per_channel"
    assert qtdog["lr"] == 5e-5 and qtdog["freeze_bn"] is False  # DomainBed's own entries stay
    assert "bits" not in registry.default_hparams("ERM", "Toy")


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_hparams_are_plain_and_in_range(domainbed, seed):
    _algorithms, registry, _before, registered = domainbed
    for name in registered:
        hparams = registry.random_hparams(name, "Toy", seed)
        json.dumps(hparams)
        for key, value in hparams.items():
            assert value is None or type(value) in (bool, int, float, str), (name, key, value)
    qtdog = registry.random_hparams("QTDoG", "Toy", seed)
    assert qtdog["quant_start_step"] in (1000, 2000, 3000)
    assert qtdog["bits"] == 7  # the model size is never searched


def test_random_search_varies_and_erm_is_untouched(fake_root):
    import domainbed.hparams_registry as registry

    from dg_quant.adapters.domainbed import register

    erm_before = [registry.random_hparams("ERM", "Toy", s) for s in range(1, 6)]
    register()
    assert [registry.random_hparams("ERM", "Toy", s) for s in range(1, 6)] == erm_before
    starts = {registry.random_hparams("QTDoG", "Toy", s)["quant_start_step"] for s in range(1, 30)}
    assert len(starts) > 1


def test_adding_an_hparam_does_not_shift_the_others(fake_root):
    import domainbed.hparams_registry as registry
    import domainbed.lib.misc as misc

    specs = {"A": {"x": HParam(1, lambda r: int(r.randint(0, 10**6))), "z": HParam(0.5, lambda r: float(r.uniform()))}}
    extend_registry(registry, specs, misc.seed_hash)
    before = [registry.random_hparams("A", "Toy", s) for s in range(1, 6)]
    specs["A"]["y"] = HParam(2, lambda r: int(r.randint(0, 10**6)))
    extend_registry(registry, specs, misc.seed_hash)
    after = [registry.random_hparams("A", "Toy", s) for s in range(1, 6)]
    for b, a in zip(before, after):
        assert a["y"] is not None
        assert {k: a[k] for k in b} == b


TOY_PLUGIN = """
    from dataclasses import dataclass
    from dg_quant.hookimpl import hookimpl
    from dg_quant.options import add_options, option

    @dataclass
    class ToyOptions:
        width: int = option(4, "a searched option", search=lambda r: r.choice([8, 16, 32]))
        mode: str = option("a", "an option without a search range", choices=("a", "b"))
        bits: int = option(6, "a model size", search=lambda r: int(r.choice([2, 3])))

    @hookimpl
    def dgq_add_options(parser):
        add_options(parser, ToyOptions, "toy")
"""


def test_plugin_options_become_hparams_with_their_samplers(fake_root, tmp_path, monkeypatch):
    import domainbed.hparams_registry as registry
    import domainbed.lib.misc as misc
    import numpy as np

    from dg_quant.adapters.domainbed.hparams import plugin_hparams

    (tmp_path / "toy_dgq_plugin.py").write_text(textwrap.dedent(TOY_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = plugin_hparams(["toy_dgq_plugin"])
    speed = dataclasses.asdict(SpeedOptions())  # every algorithm also gets the host's speed settings
    assert {k: v.default for k, v in specs.items()} == {**speed, "width": 4, "mode": "a", "bits": 6}
    extend_registry(registry, {"Toy": specs}, misc.seed_hash)
    for seed in range(1, 6):
        drawn = registry.random_hparams("Toy", "Toy", seed)
        expected = np.random.RandomState(misc.seed_hash(seed, "width")).choice([8, 16, 32])
        assert drawn["width"] == expected and type(drawn["width"]) is int  # np.int64 unwrapped
        assert drawn["mode"] == "a" and drawn["bits"] == 6


# -- the algorithm contract -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["QTDoG", "LSQ", "SAGM", "LSQ_SAGM", "FQAT", "INQ", "OBC"])
def test_contract_update_predict_state_dict(domainbed, name, tmp_path):
    algorithms, registry, _before, registered = domainbed
    if name not in registered:
        pytest.skip(f"plugin of {name} not installed")
    cls = algorithms.get_algorithm_class(name)
    overrides = {"quant_start_step": 2} if name in QAT_NAMES else {}
    hparams = _hparams(registry, name, lr=1e-3, **overrides)
    algorithm = cls((3, 8, 8), 3, 2, hparams)
    before = [p.detach().clone() for p in algorithm.parameters()]
    logs = [algorithm.update(_minibatches(seed=i)) for i in range(4)]
    for log in logs:
        assert log and all(type(v) is float for v in log.values()), log
        assert not RESERVED & set(log), log
        assert all(not k.startswith("env") for k in log)
    assert "loss" in logs[0]
    changed = [not torch.equal(b, p) for b, p in zip(before, algorithm.parameters())]
    assert any(changed)
    if name in QAT_NAMES:
        assert [log["quantized"] for log in logs] == [0.0, 0.0, 1.0, 1.0]

    x = torch.randn(5, 3, 8, 8)
    algorithm.eval()
    logits = algorithm.predict(x)
    assert logits.shape == (5, 3)

    path = tmp_path / "model.pkl"  # what train.py saves, reloaded as DomainBed's recipe (#21)
    torch.save({"model_hparams": hparams, "model_dict": algorithm.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    clone = cls((3, 8, 8), 3, 2, saved["model_hparams"])
    clone.load_state_dict(saved["model_dict"])
    clone.eval()
    assert torch.equal(clone.predict(x), logits)
    assert clone.trainer.step == 4
    assert is_quantization_enabled(clone.network) == is_quantization_enabled(algorithm.network)


def test_fqat_model_pkl_reloads_the_frozen_set_and_open_windows(domainbed, tmp_path):
    algorithms, registry, _before, registered = domainbed
    if "FQAT" not in registered:
        pytest.skip("plugin of FQAT not installed")
    # τ = 0 with the reverse rule freezes every scale factor at the first window (K = 3 steps).
    hparams = _hparams(registry, "FQAT", freeze_steps=3, freeze_if="above_tau", freeze_tau=0.0)
    algorithm = algorithms.FQAT((3, 8, 8), 3, 2, hparams)
    for i in range(5):  # one window closed at step 3, the next one open with 2 gradients
        algorithm.update(_minibatches(seed=i))
    run = algorithm.trainer.host.pm.get_plugin("dg_quant.fqat.run")
    assert run.frozen and run.rows and all(w.pairs == 1 for w in run.windows.values())

    path = tmp_path / "model.pkl"
    torch.save({"model_hparams": hparams, "model_dict": algorithm.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    clone = algorithms.FQAT((3, 8, 8), 3, 2, saved["model_hparams"])
    clone.load_state_dict(saved["model_dict"])
    again = clone.trainer.host.pm.get_plugin("dg_quant.fqat.run")
    assert clone.trainer.step == 5 and again.rows == run.rows
    assert again.frozen.keys() == run.frozen.keys() == run.scales.keys()
    assert all(torch.equal(again.frozen[k], m) for k, m in run.frozen.items())
    for label, window in run.windows.items():
        assert again.windows[label].pairs == window.pairs
        assert torch.equal(again.windows[label].events, window.events)
    assert clone.update(_minibatches(seed=9))["fqat/frozen_scales"] == len(run.scales)


def test_deepcopy_rebuilds_an_independent_equal_algorithm(domainbed):
    algorithms, registry, _before, _ = domainbed
    algorithm = algorithms.QTDoG((3, 8, 8), 3, 2, _hparams(registry, "QTDoG", quant_start_step=1))
    for i in range(2):
        algorithm.update(_minibatches(seed=i))
    algorithm.eval()
    clone = copy.deepcopy(algorithm)
    x = torch.randn(4, 3, 8, 8)
    assert not clone.training and clone.trainer.step == 2
    assert torch.equal(clone.predict(x), algorithm.predict(x))
    clone.train()
    clone.update(_minibatches(seed=5))
    algorithm.eval()
    clone.eval()
    assert not torch.equal(clone.predict(x), algorithm.predict(x))


def test_qtdog_waits_for_quant_start_step_then_quantizes_weights(domainbed):
    algorithms, registry, _before, _ = domainbed
    algorithm = algorithms.QTDoG((3, 8, 8), 3, 2, _hparams(registry, "QTDoG", quant_start_step=3))
    quantized = {name for name, *_ in iter_quantized_weights(algorithm.network)}
    assert quantized == {"featurizer.conv"}  # the head (classifier) stays in full precision
    flags = [algorithm.update(_minibatches(seed=i))["quantized"] for i in range(5)]
    assert flags == [0.0, 0.0, 0.0, 1.0, 1.0]
    conv = algorithm.network.featurizer.conv
    quantizer = conv.parametrizations.weight[0]
    integers = conv.weight / quantizer.step
    assert torch.allclose(integers, integers.round(), atol=1e-4)


@pytest.mark.parametrize("freeze_bn", [True, False])
@pytest.mark.parametrize("name", ["LSQ", "LSQ_SAGM", "FQAT", "INQ"])
def test_quantization_respects_frozen_batchnorm(domainbed, name, freeze_bn):
    algorithms, registry, _before, registered = domainbed
    if name not in registered:
        pytest.skip(f"plugin of {name} not installed")
    overrides = {"quant_start_step": 0} if name in QAT_NAMES else {}
    hparams = _hparams(registry, name, freeze_bn=freeze_bn, lr=1e-2, **overrides)
    algorithm = algorithms.get_algorithm_class(name)((3, 8, 8), 3, 2, hparams)
    bn = algorithm.network.featurizer.bn
    stats, affine = bn.running_mean.clone(), bn.weight.detach().clone()
    for i in range(3):
        log = algorithm.update(_minibatches(seed=i))
    assert log["quantized"] == (1.0 if name in QAT_NAMES else 0.0)  # INQ: 3 of 4 partitions
    assert torch.equal(bn.running_mean, stats) == freeze_bn
    assert not torch.equal(bn.weight, affine)  # frozen BN keeps a trainable affine (as DomainBed)
    assert bn.training is not freeze_bn


def test_bad_choice_in_hparams_is_a_config_error(domainbed):
    algorithms, registry, _before, _ = domainbed
    with pytest.raises(ConfigError, match="granularity"):
        algorithms.QTDoG((3, 8, 8), 3, 2, _hparams(registry, "QTDoG", granularity="per_row"))


def test_speed_hparams_reach_training_and_prediction(domainbed):
    algorithms, registry, _before, _ = domainbed
    assert registry.default_hparams("FQAT", "Toy")["precision"] == "fp32"
    hparams = _hparams(registry, "QTDoG", quant_start_step=0, precision="bf16", channels_last=True)
    algorithm = algorithms.QTDoG((3, 8, 8), 3, 2, hparams)
    conv = algorithm.featurizer.conv
    seen = []
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    algorithm.update(_minibatches())
    assert seen == [torch.bfloat16]
    assert conv.parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    algorithm.eval()
    assert algorithm.predict(torch.randn(5, 3, 8, 8)).dtype == torch.float32
    assert seen[-1] == torch.bfloat16


# -- the run length (DomainBed never tells its algorithms) ----------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--steps", "300", "--dataset", "LongToy"], 300),
        (["--dataset", "LongToy"], 12),
        (["--dataset=LongToy", "--algorithm", "INQ"], 12),
        (["--dataset", "Toy"], None),
        ([], None),
        (["--steps", "x"], None),
    ],
)
def test_run_length_is_read_as_train_py_reads_it(fake_root, argv, expected):
    from dg_quant.adapters.domainbed.runlength import run_length

    assert run_length(argv) == expected  # --steps, else the dataset's N_STEPS (Toy has none)


def test_inq_partitions_are_spread_over_the_launcher_run(fake_root, tmp_path):
    out = tmp_path / "inq"
    assert _train(fake_root, out, "INQ", "--steps", "8") == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # partitions at steps 0, 2, 4, 6 of 8 (not 0-3): the model is all powers of two from step 6
    assert [r["quantized"] for r in records] == [0.0] * 6 + [1.0] * 2
    final = json.loads((out / "dgq_final.json").read_text())
    assert final["inq/frozen_fraction"] == 1.0 and final["quantized"] is True and final["steps"] == 8


def test_run_length_reaches_algorithms_from_register_and_dataset_defaults(fake_root, monkeypatch):
    import domainbed.algorithms as algorithms
    import domainbed.hparams_registry as registry

    from dg_quant.adapters.domainbed import register

    monkeypatch.setattr(sys, "argv", ["my_train.py", "--dataset", "LongToy"])
    register()
    hparams = registry.default_hparams("INQ", "LongToy")
    assert algorithms.INQ((3, 8, 8), 3, 2, hparams).trainer.context.total_steps == 12  # N_STEPS
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--steps", "30"])
    assert algorithms.INQ((3, 8, 8), 3, 2, hparams).trainer.context.total_steps == 30
    register(total_steps=40)  # a script with other flags says it itself
    assert algorithms.INQ((3, 8, 8), 3, 2, hparams).trainer.context.total_steps == 40
    assert registry.default_hparams("QTDoG", "LongToy")["quant_start_step"] == 16  # 40% of 40


def test_qtdog_switch_step_follows_the_paper_per_dataset(fake_root, monkeypatch):
    import domainbed.hparams_registry as registry

    from dg_quant.adapters.domainbed import register

    register()
    monkeypatch.setattr(sys, "argv", ["train.py", "--dataset", "DomainNet", "--steps", "15001"])
    assert registry.default_hparams("QTDoG", "DomainNet")["quant_start_step"] == 8000  # of 15,000
    assert {registry.random_hparams("QTDoG", "DomainNet", s)["quant_start_step"] for s in range(1, 30)} == {
        4000,
        8000,
        12000,
    }
    assert registry.default_hparams("QTDoG", "Toy")["quant_start_step"] == 2000  # of 5,000
    monkeypatch.setattr(sys, "argv", ["train.py", "--dataset", "DomainNet"])  # N_STEPS: 5001
    assert registry.default_hparams("QTDoG", "DomainNet")["quant_start_step"] == round(5001 * 8000 / 15000)
    assert registry.default_hparams("LSQ", "DomainNet")["quant_start_step"] == 0


# -- the launcher ---------------------------------------------------------------------------


def test_rewrite_command_sends_train_jobs_through_the_launcher():
    prefix = "/venv/bin/python -m dg_quant.adapters.domainbed train --domainbed /db"
    job = "python -m domainbed.scripts.train --algorithm QTDoG --hparams '{\"bits\": 4}'"
    assert launcher.rewrite_command(job, prefix) == prefix + " --algorithm QTDoG --hparams '{\"bits\": 4}'"
    assert launcher.rewrite_command("echo hi", prefix) == "echo hi"
    seen = []
    registry = {"local": seen.extend}
    launcher.route_sweep_jobs(registry, prefix)
    registry["local"]([job])
    assert seen == [launcher.rewrite_command(job, prefix)]


def test_launcher_train_runs_domainbed_script_with_registered_algorithm(fake_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = launcher.main(
        [
            "train",
            "--domainbed",
            str(fake_root),
            "--algorithm",
            "QTDoG",
            "--steps",
            "3",
            "--hparams",
            '{"quant_start_step": 1}',
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["quantized"] for r in records] == [0.0, 1.0, 1.0]
    assert records[0]["hparams"]["bits"] == 7


def test_launcher_sweep_jobs_come_back_through_the_launcher(fake_root, capsys):
    code = launcher.main(["sweep", "--domainbed", str(fake_root), "--no_pretrained", "--command_launcher", "dummy"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Dummy launcher:")]
    assert any("--algorithm QTDoG" in line for line in lines)
    for line in lines:
        assert f"-m dg_quant.adapters.domainbed train --domainbed {fake_root} --no_pretrained" in line


def test_data_workers_reach_every_dataset_and_the_sweep_jobs(fake_root, capsys):
    import domainbed.datasets as datasets

    assert launcher.set_data_workers(datasets, 3) == ["Toy"]  # the class defining it; subclasses inherit
    assert datasets.Toy.N_WORKERS == datasets.Toy16.N_WORKERS == 3
    code = launcher.main(["sweep", "--domainbed", str(fake_root), "--data_workers", "0", "--command_launcher", "dummy"])
    assert code == 0
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Dummy launcher:")]
    assert jobs and all(f"train --domainbed {fake_root} --data_workers 0 " in line for line in jobs)
    assert launcher.main(["train", "--domainbed", str(fake_root), "--data_workers", "-1"]) == 2
    assert "--data_workers must be >= 0" in capsys.readouterr().err


def test_launcher_errors_are_one_line(tmp_path, capsys):
    assert launcher.main(["train", "--domainbed", str(tmp_path), "--algorithm", "QTDoG"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--domainbed" in err and "error:" in err


# -- random weights and offline machines ----------------------------------------------------


def _offline(monkeypatch, tmp_path) -> None:
    """No network and an empty torch hub cache: any weights download fails as it does offline."""
    import urllib.error

    def no_network(url, *_args, **_kwargs):
        raise urllib.error.URLError(f"offline: {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_missing_pretrained_weights_fail_at_once_in_one_line(fake_root, tmp_path, monkeypatch, capsys):
    import domainbed.datasets as datasets

    _offline(monkeypatch, tmp_path)
    code = launcher.main(
        [
            "train",
            "--domainbed",
            str(fake_root),
            "--dataset",
            "Toy224",
            "--algorithm",
            "QTDoG",
            "--steps",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
            "--hparams",
            '{"resnet18": true}',
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "resnet18-f37072fd.pth" in err and "--no_pretrained" in err and "URLError" in err
    assert datasets.BUILT == []  # failed before train.py loaded any data


def test_no_pretrained_runs_are_marked_everywhere(fake_root, tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    sweep = tmp_path / "sweep"
    assert (
        _train(
            fake_root,
            sweep / "random",
            "QTDoG",
            "--steps",
            "2",
            "--no_pretrained",
            "--dataset",
            "Toy224",
            quant_start_step=1,
        )
        == 0
    )
    assert "RANDOM weights" in capsys.readouterr().err
    records = [json.loads(line) for line in (sweep / "random" / "results.jsonl").read_text().splitlines()]
    assert all(r["hparams"]["dgq_random_init"] is True for r in records)
    assert _load(sweep / "random" / "model.pkl")["model_hparams"]["dgq_random_init"] is True
    assert _train(fake_root, sweep / "toy", "QTDoG", "--steps", "2", quant_start_step=1) == 0
    capsys.readouterr()
    assert launcher.main(["collect_results", "--domainbed", str(fake_root), "--input_dir", str(sweep)]) == 0
    rows = {line.split("|")[0] for line in capsys.readouterr().out.splitlines() if "|" in line}
    assert rows == {"QTDoG", "QTDoG (random init)"}  # never mixed with runs from ImageNet weights
    # A sweep passes the mark to every job in --hparams, which DomainBed hashes into the job folder.
    assert (
        launcher.main(
            [
                "sweep",
                "--domainbed",
                str(fake_root),
                "--no_pretrained",
                "--command_launcher",
                "dummy",
                "--hparams",
                '{"bits": 4}',
            ]
        )
        == 0
    )
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Dummy launcher:")]
    assert jobs and all('"dgq_random_init": true' in line and '"bits": 4' in line for line in jobs)


def test_load_algorithm_rebuilds_offline_without_downloading(fake_root, tmp_path, monkeypatch):
    from dg_quant.adapters.domainbed import load_algorithm, register
    from dg_quant.adapters.domainbed.weights import random_init_backbones

    register()
    import domainbed.algorithms as algorithms
    import domainbed.hparams_registry as registry

    hparams = registry.default_hparams("QTDoG", "Toy224")
    with random_init_backbones():
        trained = algorithms.QTDoG((3, 224, 224), 2, 2, hparams)
    path = tmp_path / "model.pkl"
    torch.save(
        {
            "args": {"algorithm": "QTDoG"},
            "model_input_shape": (3, 224, 224),
            "model_num_classes": 2,
            "model_num_domains": 2,
            "model_hparams": hparams,
            "model_dict": trained.state_dict(),
        },
        path,
    )
    _offline(monkeypatch, tmp_path)
    reloaded = load_algorithm(str(path))
    pairs = [
        (a, b)
        for a, b in zip(reloaded.state_dict().values(), trained.state_dict().values())
        if isinstance(a, torch.Tensor)
    ]
    assert len(pairs) > 100 and all(torch.equal(a, b) for a, b in pairs)  # ResNet-18 included
    with pytest.raises(Exception, match="offline"):  # the plain recipe would download (and fail offline)
        algorithms.QTDoG((3, 224, 224), 2, 2, hparams)


def test_no_pretrained_covers_torch_hub_backbones(monkeypatch):
    from dg_quant.adapters.domainbed.weights import random_init_backbones

    seen = []

    def hub_load(repo, model, **kwargs):
        seen.append(kwargs)
        if kwargs.get("pretrained", True):
            raise AssertionError("weights requested")
        raise RuntimeError("It looks like there is no internet connection and the repo could not be found")

    monkeypatch.setattr(torch.hub, "load", hub_load)
    with random_init_backbones(), pytest.raises(ConfigError, match="--no_pretrained skips the weights"):
        torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")  # DomainBed's DinoV2 call
    assert seen == [{"pretrained": False}] and torch.hub.load is hub_load  # restored afterwards


# -- the end of training (dgq_train_end after train.py) -------------------------------------


def _train(root: Path, out: Path, algorithm: str, *extra: str, **hparams) -> int:
    return launcher.main(
        [
            "train",
            "--domainbed",
            str(root),
            "--algorithm",
            algorithm,
            "--output_dir",
            str(out),
            "--hparams",
            json.dumps(hparams),
            *extra,
        ]
    )


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # DomainBed's reload recipe (#21)


def _rebuild(saved: dict):
    import domainbed.algorithms as algorithms

    cls = algorithms.get_algorithm_class(saved["args"]["algorithm"])
    algorithm = cls(
        saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"], saved["model_hparams"]
    )
    algorithm.load_state_dict(saved["model_dict"])
    return algorithm


def _on_grid(algorithm) -> list[bool]:
    """Per quantized weight: do its values lie on its quantizer's integer grid?"""
    flags = []
    for _name, module, tensor_name, q in iter_quantized_weights(algorithm.network):
        steps = getattr(module, tensor_name) / q.step
        flags.append(q.enabled and bool(torch.allclose(steps, steps.round(), atol=1e-3)))
    return flags


PTQ_HPARAMS = {"bits": 4, "ptq_samples": 16, "ptq_batch_size": 8}


def test_obc_algorithm_ends_with_ptq_weights_and_a_final_record(fake_root, tmp_path):
    import domainbed.datasets as datasets

    out = tmp_path / "obc"
    assert _train(fake_root, out, "OBC", "--steps", "3", **PTQ_HPARAMS) == 0
    fp, ptq = _rebuild(_load(out / "model_fp.pkl")), _rebuild(_load(out / "model.pkl"))
    assert _on_grid(fp) == [False] and _on_grid(ptq) == [True]  # featurizer.conv; the head stays FP
    assert ptq.trainer.step == fp.trainer.step == 3
    final = json.loads((out / "dgq_final.json").read_text())
    assert final["algorithm"] == "OBC" and final["model_changed"] is True and final["fp_model"] == "model_fp.pkl"
    assert final["quantized"] is True and final["compression_ratio"] > 1 and final["packed_mb"] > 0
    assert final["steps"] == 3 and final["ptq/layers"] == 1 and final["ptq/error"] <= final["ptq/rtn_error"]
    # The PTQ model is scored again on every split, as train.py scores it.
    for split in ("env0_in", "env1_in", "env2_out"):
        assert 0.0 <= final[f"{split}_acc"] <= 1.0
    assert json.loads((out / "ptq.json").read_text())["calibration_split"] == "train"
    # Calibration built the dataset once more, without augmentation; train.py's was the first.
    assert [b["data_augmentation"] for b in datasets.BUILT] == [True, False]


def test_collect_results_reports_the_quantized_models(fake_root, tmp_path, capsys):
    """OBC's row is its post-training-quantized model; QT-DoG's a step after its switch."""
    sweep = tmp_path / "sweep"
    assert _train(fake_root, sweep / "obc", "OBC", "--steps", "3", **PTQ_HPARAMS) == 0
    assert _train(fake_root, sweep / "qtdog", "QTDoG", "--steps", "4", quant_start_step=2) == 0
    assert _train(fake_root, sweep / "erm", "ERM", "--steps", "3") == 0
    obc = [json.loads(line) for line in (sweep / "obc" / "results.jsonl").read_text().splitlines()]
    final = json.loads((sweep / "obc" / "dgq_final.json").read_text())
    assert [r.get("dgq_phase") for r in obc] == [None, None, None, "train_end"] and final["results_record"]
    assert obc[-1]["quantized"] == 1.0 and obc[-1]["step"] == obc[-2]["step"] and obc[-1]["args"] == obc[-2]["args"]
    assert all(obc[-1][k] == final[k] for k in final if k.endswith("_acc"))
    assert [r["quantized"] for r in obc[:3]] == [0.0, 0.0, 0.0]
    capsys.readouterr()
    assert launcher.main(["collect_results", "--domainbed", str(fake_root), "--input_dir", str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines() if "|" in line}
    assert rows["OBC"][2] == "train_end" and float(rows["OBC"][3]) == final["env0_in_acc"]
    assert int(rows["QTDoG"][0]) >= 2 and float(rows["QTDoG"][1]) > 0  # after the switch at step 2
    assert set(rows) == {"OBC", "QTDoG", "ERM"}
    assert "5 full-precision evaluations" in out  # OBC's 3, QT-DoG's steps 0 and 1


def test_calibration_draws_training_in_splits_only_seeded(fake_root):
    import domainbed.datasets as datasets
    import domainbed.lib.misc as misc

    from dg_quant.adapters.domainbed.finish import DomainBedCalibration

    args = {
        "dataset": "Toy",
        "data_dir": "unused",
        "test_envs": [0],
        "holdout_fraction": 0.2,
        "trial_seed": 1,
        "seed": 3,
    }
    calibration = DomainBedCalibration(args, {"data_augmentation": True}, torch.device("cpu"))
    assert datasets.BUILT == []  # nothing is loaded until a plugin asks
    first = torch.cat(list(calibration(40, 16)))
    assert len(datasets.BUILT) == 1 and datasets.BUILT[0]["data_augmentation"] is False
    assert first.shape == (40, 3, 8, 8)
    assert torch.equal(first, torch.cat(list(calibration(40, 16))))  # every pass sees the same images
    ids = {int(v) for v in first[:, 0, 0, 0]}
    allowed = set()
    for env_i in (1, 2):
        _out, in_ = misc.split_dataset(range(30), 6, misc.seed_hash(1, env_i))
        allowed |= {100 * env_i + k for k in in_}
    assert ids <= allowed and len(ids) == 40  # training envs' in-splits: no test env, no out-split
    other_seed = DomainBedCalibration({**args, "seed": 4}, {}, torch.device("cpu"))
    assert not torch.equal(first, torch.cat(list(other_seed(40, 16))))


def test_fqat_writes_its_disorder_log_without_loading_data(fake_root, tmp_path):
    import domainbed.datasets as datasets

    out = tmp_path / "fqat"
    assert _train(fake_root, out, "FQAT", "--steps", "4", freeze_steps=2) == 0
    rows = [json.loads(line) for line in (out / "fqat_disorder.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {2, 4} and all("disorder" in r for r in rows)
    final = json.loads((out / "dgq_final.json").read_text())
    assert final["model_changed"] is False and final["fqat/scale_factors"] > 0
    assert final["quantized"] is True and "compression_ratio" in final
    assert not (out / "model_fp.pkl").exists() and "fp_model" not in final
    assert len(datasets.BUILT) == 1  # train.py's own dataset only: FQAT asked for no images


def test_erm_output_is_untouched(fake_root, tmp_path):
    out = tmp_path / "erm"
    assert _train(fake_root, out, "ERM", "--steps", "2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["done", "model.pkl", "results.jsonl"]


def test_end_of_training_runs_once_per_saved_model(fake_root, tmp_path):
    from dg_quant.adapters.domainbed import finish

    out = tmp_path / "obc"
    assert _train(fake_root, out, "OBC", "--steps", "2", **PTQ_HPARAMS) == 0
    assert finish.is_finished(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = _load(out / "model.pkl")["args"]
    assert finish.finish_training({"args": args}) is None  # done already: nothing is quantized twice
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    (out / "dgq_final.json").unlink()  # as if the process died right after rewriting model.pkl
    assert finish.is_finished(out) and finish.finish_training({"args": args}) is None
    assert (out / "model_fp.pkl").stat().st_mtime_ns == stamps["model_fp.pkl"]  # the FP model is kept
    torch.save(_load(out / "model_fp.pkl"), out / "model.pkl")  # a new train.py run saved a new model
    assert not finish.is_finished(out)


def test_a_run_without_its_algorithm_is_finished_from_model_pkl(fake_root, tmp_path, monkeypatch):
    from dg_quant.adapters.domainbed import finish

    seen = []
    monkeypatch.setattr(finish, "finish_training", lambda namespace: seen.append(dict(namespace)))
    out = tmp_path / "obc"
    assert _train(fake_root, out, "OBC", "--steps", "2", **PTQ_HPARAMS) == 0
    assert not (out / "dgq_final.json").exists() and seen[0]["algorithm"].trainer.step == 2
    monkeypatch.undo()
    final = finish.finish_training({"args": seen[0]["args"]})  # the script's globals minus its algorithm
    assert final is not None and final["model_changed"] is True and final["steps"] == 2
    assert "env0_in_acc" not in final  # no loaders of the rebuilt model's run: no re-scoring
    assert _on_grid(_rebuild(_load(out / "model.pkl"))) == [True]


def test_a_damaged_model_pkl_is_one_line_not_finished(fake_root, tmp_path, monkeypatch):
    """model.pkl's zip records carry CRC-32s: a flipped byte in its weights is refused when the end
    of training reloads it, instead of being quantized and saved as the run's model."""
    import zipfile

    from dg_quant.adapters.domainbed import finish
    from dg_quant.errors import CheckpointError

    seen = []
    monkeypatch.setattr(finish, "finish_training", lambda namespace: seen.append(dict(namespace)))
    out = tmp_path / "obc"
    assert _train(fake_root, out, "OBC", "--steps", "2", **PTQ_HPARAMS) == 0
    monkeypatch.undo()
    path = out / "model.pkl"
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    start += int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    raw[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.pkl is damaged"):
        finish.finish_training({"args": seen[0]["args"]})
    assert not (out / "dgq_final.json").exists()


# -- a real DomainBed checkout (slow; DGQ_DOMAINBED=<checkout root>) --------------------------


@pytest.mark.slow
def test_real_domainbed_train_and_collect_results(tmp_path):
    root = os.environ.get("DGQ_DOMAINBED")
    if not root:
        pytest.skip("set DGQ_DOMAINBED to the root of a DomainBed checkout")
    out = tmp_path / "sweep"
    hparams = json.dumps(
        {"resnet18": True, "resnet50_augmix": False, "freeze_bn": True, "batch_size": 4, "quant_start_step": 1}
    )
    run = [sys.executable, "-m", "dg_quant.adapters.domainbed"]
    subprocess.run(
        [
            *run,
            "sweep",
            "launch",
            "--domainbed",
            root,
            "--no_pretrained",
            "--datasets",
            "Debug224",
            "--algorithms",
            "QTDoG",
            "--n_hparams",
            "1",
            "--n_trials",
            "1",
            "--single_test_envs",
            "--steps",
            "3",
            "--hparams",
            hparams,
            "--data_dir",
            str(tmp_path),
            "--output_dir",
            str(out),
            "--command_launcher",
            "local",
            "--skip_confirmation",
        ],
        check=True,
        timeout=1200,
    )
    runs = sorted(out.glob("*/results.jsonl"))
    assert len(runs) == 3 and all((p.parent / "done").exists() for p in runs)
    last = json.loads(runs[0].read_text().splitlines()[-1])
    assert last["quantized"] == 1.0 and last["hparams"]["bits"] == 7
    for path in runs:  # sweep jobs come back through the launcher, so their end of training runs
        final = json.loads((path.parent / "dgq_final.json").read_text())
        assert final["algorithm"] == "QTDoG" and final["steps"] == 3 and final["compression_ratio"] > 1
    assert all(json.loads(line)["hparams"]["dgq_random_init"] is True for line in runs[0].read_text().splitlines())
    table = subprocess.run(
        [*run, "collect_results", "--domainbed", root, "--input_dir", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "QTDoG (random init)" in table and "full-precision evaluations" in table


@pytest.mark.slow
def test_real_domainbed_inq_spreads_its_partitions_over_the_run(tmp_path):
    root = os.environ.get("DGQ_DOMAINBED")
    if not root:
        pytest.skip("set DGQ_DOMAINBED to the root of a DomainBed checkout")
    out = tmp_path / "inq"
    hparams = json.dumps({"resnet18": True, "resnet50_augmix": False, "freeze_bn": True, "batch_size": 2})
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dg_quant.adapters.domainbed",
            "train",
            "--domainbed",
            root,
            "--no_pretrained",
            "--dataset",
            "Debug224",
            "--algorithm",
            "INQ",
            "--steps",
            "8",
            "--checkpoint_freq",
            "1",
            "--hparams",
            hparams,
            "--data_dir",
            str(tmp_path),
            "--output_dir",
            str(out),
        ],
        check=True,
        timeout=1200,
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["quantized"] for r in records] == [0.0] * 6 + [1.0] * 2  # partitions at steps 0, 2, 4, 6
    final = json.loads((out / "dgq_final.json").read_text())
    assert final["quantized"] is True and final["inq/frozen_fraction"] == 1.0
