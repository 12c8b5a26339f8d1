"""The hooks that let DG methods compose: loss terms, domain labels, evaluation records, final model."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dg_quant import PluginHost, Trainer, create_adapter, hookimpl


def make_trainer(*plugins: object) -> Trainer:
    torch.manual_seed(0)
    host = PluginHost()
    for i, plugin in enumerate(plugins):
        host.register(plugin, name=f"plugin{i}")
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args([])
    host.configure(config)
    model = create_adapter("test_cnn", num_classes=3)
    return Trainer.build(host, model, config, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss())


def batch():
    return torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))


def test_hook_dgq_loss_terms() -> None:
    seen = []

    class Term:
        @hookimpl
        def dgq_loss_terms(self, model, features, logits, y, domains, step):
            seen.append((features.shape, logits.shape, domains.tolist(), step))
            return {"term/l2": 10.0 * features.pow(2).mean()}

    plain, with_term = make_trainer(), make_trainer(Term())
    domains = torch.tensor([0, 0, 1, 1, 2, 2])
    x, y = batch()
    a = plain.train_step((x, y), domains=domains)
    b = with_term.train_step((x, y), domains=domains)
    assert seen == [(torch.Size([6, 16]), torch.Size([6, 3]), [0, 0, 1, 1, 2, 2], 0)]
    # the term is in the reported loss and in the gradients; it is logged under its name
    assert float(b["loss"]) == float(a["loss"] + b["term/l2"])
    assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), with_term.model.parameters()))


def test_loss_terms_get_no_domains_for_a_pass_on_part_of_the_batch() -> None:
    seen = []

    class Term:
        @hookimpl
        def dgq_loss_terms(self, domains):
            seen.append(domains)

    class HalfBatch:  # e.g. FQAT's Hessian sub-batches: a pass on part of the batch
        @hookimpl
        def dgq_compute_gradients(self, model, batch, loss_fn):
            x, y = batch
            loss = loss_fn(model(x[:3]), y[:3])
            loss.backward()
            return {"loss": loss.detach()}

    make_trainer(Term(), HalfBatch()).train_step(batch(), domains=torch.zeros(6, dtype=torch.long))
    assert seen == [None]


def test_hook_dgq_step_start_receives_domains() -> None:
    seen = []

    class Start:
        @hookimpl
        def dgq_step_start(self, domains):
            seen.append(domains)

    trainer = make_trainer(Start())
    trainer.train_step(batch(), domains=torch.tensor([1, 2, 3, 4, 5, 6]))
    trainer.train_step(batch())
    assert seen[0].tolist() == [1, 2, 3, 4, 5, 6] and seen[1] is None


def test_hook_dgq_evaluated() -> None:
    seen = []

    class Reader:
        @hookimpl
        def dgq_evaluated(self, step, record):
            seen.append((step, record["id_val/loss"]))

    trainer = make_trainer(Reader())
    trainer.train_step(batch())
    trainer.evaluated({"id_val/loss": 0.5})
    assert seen == [(1, 0.5)]


def test_hook_dgq_final_model() -> None:
    class Zero:
        @hookimpl
        def dgq_final_model(self, model, train_batches):
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            return {"zero/batches": len(list(train_batches(3)))}

    assert make_trainer().final_model(lambda n: iter([])) is None  # no plugin: the trained model stays
    trainer = make_trainer(Zero())
    assert trainer.final_model(lambda n: (torch.zeros(2, 3, 8, 8) for _ in range(n))) == {"zero/batches": 3}
    assert all(float(p.detach().abs().sum()) == 0 for p in trainer.model.parameters())
