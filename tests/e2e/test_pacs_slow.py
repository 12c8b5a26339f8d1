"""Heavier real-PACS variant (``-m slow``): a QT-DoG model that has learnt something, exported.

The default run's PACS runs are four steps long, enough to check every file and command but not
whether the quantized, exported model is any good. Here QT-DoG trains MobileNetV2 from ImageNet
weights at 64 px on 20 images per class and domain for 60 steps (7-bit LSQ from step 30), is
exported, and the exported file's predictions on the held-out sketch domain must beat chance in
balanced accuracy (1/7 for a constant or random predictor, whatever the class frequencies).
"""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from dg_quant.adapters.wilds import export
from dg_quant.adapters.wilds.checkpoints import eval_loader, load_run_model, predict
from dg_quant.quant.export import load_export
from dg_quant.registry import rebuild_adapter
from tests.assets import PACS_TAR
from tests.e2e.conftest import QUIET, extract_pacs_subset, read_json, wilds_run

CHANCE = 1 / 7


@pytest.mark.slow
def test_exported_qtdog_model_beats_chance_on_the_held_out_domain(mobilenet_file, tmp_path):
    if not PACS_TAR.is_file():
        pytest.skip(f"{PACS_TAR} not present")
    root = extract_pacs_subset(PACS_TAR, tmp_path / "pacs", per_class=20)
    run = tmp_path / "qtdog"
    wilds_run(
        [
            "--dataset",
            "pacs",
            "--root_dir",
            str(root),
            "--test_domain",
            "sketch",
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_file,
            "--image_size",
            "64",
            "--n_steps",
            "60",
            "--eval_every",
            "30",
            "--batch_size",
            "32",
            "--lr",
            "1e-3",
            "--plugin",
            "dg_quant.qtdog",
            "--bits",
            "7",
            "--quant_start_step",
            "30",
            "--log_dir",
            str(run),
            *QUIET,
        ]
    )
    final = read_json(run / "final.json")
    assert final["best"]["quantized"] is True and final["compression"]["quantized_layers"] == 52

    out = tmp_path / "qtdog.dgq"
    assert export.main([str(run), "-o", str(out), "--verify"]) == 0
    loaded = load_run_model(run, "best")
    dataset = loaded.load_dataset()
    logits, y, _meta = predict(
        load_export(out, rebuild_adapter), eval_loader(dataset, "test", loaded.model, batch_size=64)
    )
    assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(final["test_at_best"], abs=1e-6)
    balanced = balanced_accuracy_score(y.numpy(), logits.argmax(1).numpy())
    print(
        f"exported 7-bit QT-DoG MobileNetV2, PACS sketch: accuracy {final['test_at_best']:.3f}, "
        f"balanced accuracy {balanced:.3f}, file {out.stat().st_size / 2**20:.2f} MiB"
    )
    assert balanced > CHANCE + 0.05, balanced
    assert torch.isfinite(logits).all()
