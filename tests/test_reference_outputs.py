"""Refactors keep results bit-identical: tiny runs against fingerprints of the code before them.

``tests/data/reference_outputs.json`` and ``tests/data/old_run_qtdog/`` were written by
``python -m tests.reference_runs tests/data`` on the code before the run-context refactor (see
``tests/reference_runs.py``): weights, optimizer and plugin state, records, settings, PTQ and
export outputs of QT-DoG, FQAT (EWGS Hessian), INQ, OBC-at-the-end, ERM + ``dgq_ptq`` and
``dgq_export`` runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.reference_runs import COMMON, RUNS, fingerprint, reference

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "reference_outputs.json").read_text())


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    return reference(work), work


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_outputs_are_those_of_the_code_before(produced, name):
    outputs, _work = produced
    assert outputs[name] == EXPECTED[name]


def test_a_checkpoint_written_before_resumes_to_the_same_end(produced, tmp_path):
    """``last.pt`` of a QT-DoG run killed after step 3 by the old code: resumed now, the run ends
    exactly as the uninterrupted reference run."""
    _outputs, work = produced
    log_dir = tmp_path / "old"
    shutil.copytree(DATA / "old_run_qtdog", log_dir)
    from dg_quant.adapters.wilds.cli import main

    argv = [*COMMON, *RUNS["qtdog"], "--root_dir", str(work / "data"), "--log_dir", str(log_dir), "--resume"]
    assert main(argv) == 0
    assert fingerprint(log_dir) == EXPECTED["qtdog"]
