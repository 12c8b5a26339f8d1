"""Each hook is called by the host at its phase, with its documented arguments and effect."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch import nn

from dg_quant import PluginHost, Trainer, create_adapter, hookimpl
from dg_quant.context import RunContext
from dg_quant.errors import PluginError


class Recorder:
    """A plugin that records every call it receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    @hookimpl
    def dgq_add_options(self, parser):
        parser.add_argument("--recorder-flag", type=int, default=5)
        self.calls.append(("dgq_add_options", {}))

    @hookimpl
    def dgq_configure(self, config, host, context):
        self.calls.append(("dgq_configure", {"flag": config.recorder_flag, "host": host, "context": context}))

    @hookimpl
    def dgq_configure_model(self, model, config):
        model.recorded = True
        self.calls.append(("dgq_configure_model", {}))

    @hookimpl
    def dgq_configure_optimizer(self, optimizer, model):
        optimizer.param_groups[0]["lr"] = 0.5
        self.calls.append(("dgq_configure_optimizer", {}))

    @hookimpl
    def dgq_step_start(self, step, context):
        self.calls.append(("dgq_step_start", {"step": step, "context": context}))

    @hookimpl
    def dgq_after_backward(self, model, step):
        grads = [p.grad is not None for p in model.parameters()]
        self.calls.append(("dgq_after_backward", {"step": step, "grads": all(grads)}))

    @hookimpl
    def dgq_after_step(self, step, metrics):
        metrics["seen_by_recorder"] = 1.0
        self.calls.append(("dgq_after_step", {"step": step}))

    @hookimpl
    def dgq_evaluate(self, model, step):
        self.calls.append(("dgq_evaluate", {"step": step, "training": model.training}))
        return {"recorder/step": step}

    @hookimpl
    def dgq_train_end(self, model, log_dir, calibration):
        self.calls.append(("dgq_train_end", {"log_dir": log_dir, "calibration": calibration}))
        return {"recorder/done": 1}


@pytest.fixture()
def run() -> tuple[Recorder, Trainer]:
    torch.manual_seed(0)
    host, recorder = PluginHost(), Recorder()
    host.register(recorder, name="recorder")
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args(["--recorder-flag", "7"])
    settings = dict(vars(config))
    host.configure(config, RunContext(host="test", total_steps=12, steps_per_epoch=4))
    assert vars(config) == settings  # the settings are read-only: the host writes nothing into them
    model = create_adapter("test_cnn", num_classes=3)
    trainer = Trainer.build(
        host, model, config, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss()
    )
    return recorder, trainer


def batch():
    return torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))


def test_hook_dgq_add_options(run) -> None:
    recorder, trainer = run
    assert recorder.names()[0] == "dgq_add_options"
    assert trainer.config.recorder_flag == 7


def test_hook_dgq_configure(run) -> None:
    recorder, trainer = run
    call = dict(recorder.calls)["dgq_configure"]
    assert call["flag"] == 7 and call["host"] is trainer.host
    assert call["context"] is trainer.context
    assert trainer.context == RunContext(host="test", total_steps=12, steps_per_epoch=4, plugins=())


def test_every_hook_gets_the_context_the_host_configured(run) -> None:
    recorder, trainer = run
    trainer.train_step(batch())
    (step_call,) = [c for name, c in recorder.calls if name == "dgq_step_start"]
    assert step_call["context"] is trainer.context and step_call["context"].total_steps == 12
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.context.total_steps = 3


def test_hook_dgq_configure_model(run) -> None:
    recorder, trainer = run
    assert trainer.model.recorded is True
    assert recorder.names().index("dgq_configure_model") < recorder.names().index("dgq_configure_optimizer")


def test_hook_dgq_configure_optimizer(run) -> None:
    _, trainer = run
    assert trainer.optimizer.param_groups[0]["lr"] == 0.5


def test_hook_dgq_step_start(run) -> None:
    recorder, trainer = run
    trainer.train_step(batch())
    trainer.train_step(batch())
    assert [c[1]["step"] for c in recorder.calls if c[0] == "dgq_step_start"] == [0, 1]


def test_hook_dgq_compute_gradients(run) -> None:
    _, trainer = run

    class HalfLoss:
        @hookimpl
        def dgq_compute_gradients(self, model, batch, loss_fn):
            x, y = batch
            loss = 0.5 * loss_fn(model(x), y)
            loss.backward()
            return {"loss": loss.detach(), "custom": 1.0}

    default = trainer.train_step(batch())
    assert set(default) == {"loss", "seen_by_recorder"}
    trainer.host.register(HalfLoss())
    metrics = trainer.train_step(batch())
    assert metrics["custom"] == 1.0  # first result wins: the default ERM step did not run


def test_hook_dgq_after_backward(run) -> None:
    recorder, trainer = run
    trainer.train_step(batch())
    call = dict(recorder.calls)["dgq_after_backward"]
    assert call == {"step": 0, "grads": True}


def test_hook_dgq_after_step(run) -> None:
    recorder, trainer = run
    metrics = trainer.train_step(batch())
    assert metrics["seen_by_recorder"] == 1.0
    assert recorder.names()[-1] == "dgq_after_step"


def test_hook_dgq_evaluate(run) -> None:
    _, trainer = run
    trainer.train_step(batch())
    extras = trainer.evaluation_extras()
    assert extras["recorder/step"] == 1
    assert "compression_ratio" in extras  # the host's own evaluate hook


def test_hook_dgq_train_end(run, tmp_path) -> None:
    recorder, trainer = run
    assert trainer.end(str(tmp_path)).numbers == {"recorder/done": 1}
    assert dict(recorder.calls)["dgq_train_end"] == {"log_dir": str(tmp_path), "calibration": None}


def test_end_of_training_passes_calibration_and_tells_a_changed_model(run, tmp_path) -> None:
    recorder, trainer = run
    images = [torch.randn(2, 3, 8, 8)]

    def calibration(num_samples, batch_size):
        return iter(images)

    end = trainer.end(str(tmp_path), calibration=calibration)
    assert end.numbers == {"recorder/done": 1} and end.model_changed is False
    assert dict(recorder.calls)["dgq_train_end"]["calibration"] is calibration

    class Rounder:
        @hookimpl
        def dgq_train_end(self, model, calibration):
            with torch.no_grad():
                for x in calibration(2, 2):
                    model(x)
                model.classifier.weight.mul_(0.5)

    trainer.host.register(Rounder())
    assert trainer.end(None, calibration=calibration).model_changed is True


# -- checkpoints: each Stateful plugin object's state travels in Trainer.state_dict() under its name


class Counter:
    """A stateful plugin: counts its steps in a tensor (plus a list, to check containers)."""

    def __init__(self, by: int) -> None:
        self.by, self.count, self.seen = by, torch.zeros((), dtype=torch.long), []
        self.loaded: list = []

    @hookimpl
    def dgq_after_step(self, step):
        self.count = self.count + self.by
        self.seen.append(step)

    def state_dict(self):
        return {"count": self.count.clone(), "seen": list(self.seen)}

    def load_state_dict(self, state):
        self.loaded.append(state)
        self.count, self.seen = state["count"].clone(), list(state["seen"])


def counting_trainer(*counters: tuple[str, Counter]) -> Trainer:
    torch.manual_seed(0)
    host = PluginHost()
    for name, counter in counters:
        host.register(counter, name=name)
    config = argparse.Namespace()
    host.configure(config)
    return Trainer.build(
        host,
        create_adapter("test_cnn", num_classes=3),
        config,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
    )


def test_stateful_plugins_store_their_state_under_their_name(tmp_path) -> None:
    a, b = Counter(by=1), Counter(by=10)
    trainer = counting_trainer(("count.a", a), ("count.b", b))
    for _ in range(3):
        trainer.train_step(batch())
    state = trainer.state_dict()
    assert set(state["plugins"]) == {"count.a", "count.b"}  # keyed by name: no collision
    assert int(state["plugins"]["count.a"]["count"]) == 3 and int(state["plugins"]["count.b"]["count"]) == 30
    assert state["plugins"]["count.a"]["seen"] == [0, 1, 2]
    path = tmp_path / "last.pt"
    torch.save(state, path)
    assert torch.load(path, weights_only=True)["plugins"]["count.b"]["count"].item() == 30

    class Quiet:  # returns None: nothing stored, nothing loaded back
        def state_dict(self):
            return None

        def load_state_dict(self, state):
            raise AssertionError("nothing was stored")

    trainer.host.register(Quiet(), name="quiet")
    assert set(trainer.state_dict()["plugins"]) == {"count.a", "count.b"}


def test_stateful_plugins_get_their_own_state_back(tmp_path) -> None:
    trainer = counting_trainer(("count.a", Counter(by=1)), ("count.b", Counter(by=10)))
    for _ in range(2):
        trainer.train_step(batch())
    torch.save(trainer.state_dict(), tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)

    a, b = Counter(by=1), Counter(by=10)
    resumed = counting_trainer(("count.a", a), ("count.b", b))
    resumed.load_state_dict(saved)
    assert resumed.step == 2
    assert [int(c.count) for c in (a, b)] == [2, 20]  # each got its own entry
    assert a.loaded[0] is saved["plugins"]["count.a"] and b.loaded[0] is saved["plugins"]["count.b"]
    resumed.train_step(batch())
    assert int(a.count) == 3 and a.seen == [0, 1, 2]


def test_a_checkpoint_without_plugin_states_still_loads() -> None:
    trainer = counting_trainer(("count.a", Counter(by=1)))
    trainer.train_step(batch())
    old = trainer.state_dict()
    del old["plugins"]  # written before plugin states existed
    fresh = Counter(by=1)
    resumed = counting_trainer(("count.a", fresh))
    resumed.load_state_dict(old)
    assert resumed.step == 1 and fresh.loaded == [] and int(fresh.count) == 0
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_plugin_state_of_a_plugin_not_loaded_is_ignored_with_a_warning() -> None:
    trainer = counting_trainer(("count.a", Counter(by=1)), ("count.b", Counter(by=1)))
    state = trainer.state_dict()
    only_a = Counter(by=1)
    with pytest.warns(UserWarning, match="count.b"):
        counting_trainer(("count.a", only_a)).load_state_dict(state)
    assert len(only_a.loaded) == 1


def test_a_stateful_plugin_registered_without_a_name_is_refused() -> None:
    trainer = counting_trainer()
    with pytest.raises(PluginError, match="name="):  # pluggy would key it by id(): not stable across runs
        trainer.host.register(Counter(by=1))
