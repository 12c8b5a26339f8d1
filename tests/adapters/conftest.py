"""Fixtures shared by the DomainBed adapter tests: a fake DomainBed tree on ``sys.path``."""

from __future__ import annotations

import pytest

from tests.adapters.test_domainbed import _forget_domainbed, _write_tree


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    root = tmp_path / "DomainBed"
    _write_tree(root)
    _forget_domainbed()
    monkeypatch.syspath_prepend(str(root))
    yield root
    _forget_domainbed()


@pytest.fixture
def domainbed(fake_root):
    """The fake tree with the dg-quant algorithms registered: ``(algorithms, hparams_registry,
    ALGORITHMS before registering, the names registered)``."""
    import domainbed.algorithms
    import domainbed.hparams_registry

    from dg_quant.adapters.domainbed import register

    before = list(domainbed.algorithms.ALGORITHMS)
    registered = register()
    return domainbed.algorithms, domainbed.hparams_registry, before, registered
