"""Per-dataset defaults for ``wilds_run``; any flag given on the command line wins.

Camelyon17 and Amazon follow the WILDS example configs (``examples/configs/datasets.py`` of the
``wilds`` repository: DenseNet-121 with SGD for Camelyon17, DistilBERT with AdamW and a linear
schedule for Amazon, both with their official split and metric); the DomainBed-layout image datasets
follow DomainBed's defaults for image data (``hparams_registry.py``: ResNet-50, Adam 5e-5, batch 32,
5000 steps, evaluation every 300 steps, 1000 for DomainNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from dg_quant.adapters.wilds.datasets import canonical_name


@dataclass(frozen=True)
class Preset:
    """Training defaults for one dataset."""

    model: str
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 32
    n_epochs: int | None = None
    n_steps: int | None = None
    eval_every: int | None = None
    val_metric: str = "id_val/acc_avg"
    # the official metric, reported at the best-validation and the last checkpoint
    test_metric: str = "test/acc_avg"
    groupby_fields: tuple[str, ...] = field(default=("domain",))
    split_scheme: str | None = None
    max_grad_norm: float | None = None
    scheduler: str = "none"
    # 'domainbed', 'wilds' (resize only), 'model' (the backbone's own, e.g. a tokenizer), 'none'
    transform: str = "model"
    image_size: int | None = None
    max_token_length: int | None = None
    train_loader: str = "standard"
    n_groups_per_batch: int = 2
    # per-group accuracies in results.jsonl (off for Amazon's thousands of users)
    group_logging: bool = True
    # last.pt every N steps besides the evaluations (0: only at evaluations)
    save_every: int = 0


DOMAINBED_IMAGES = Preset(
    model="resnet50",
    optimizer="adam",
    lr=5e-5,
    batch_size=32,
    n_steps=5000,
    eval_every=300,
    transform="domainbed",
    image_size=224,
)

PRESETS: dict[str, Preset] = {
    "rotated_digits": Preset(model="digits_cnn", lr=1e-3, batch_size=64, n_steps=600, eval_every=100),
    "camelyon17": Preset(
        model="densenet121",
        optimizer="sgd",
        lr=1e-3,
        weight_decay=1e-2,
        momentum=0.9,
        batch_size=32,
        n_epochs=10,
        val_metric="val/acc_avg",
        test_metric="test/acc_avg",
        groupby_fields=("hospital",),
        split_scheme="official",
        transform="wilds",
        image_size=96,
        save_every=1000,
    ),
    "amazon": Preset(
        model="distilbert",
        optimizer="adamw",
        lr=1e-5,
        weight_decay=1e-2,
        batch_size=8,
        n_epochs=3,
        val_metric="val/10th_percentile_acc",
        test_metric="test/10th_percentile_acc",
        groupby_fields=("user",),
        split_scheme="official",
        max_grad_norm=1.0,
        scheduler="linear",
        transform="model",
        max_token_length=512,
        group_logging=False,
        save_every=1000,
    ),
    "pacs": DOMAINBED_IMAGES,
    "vlcs": DOMAINBED_IMAGES,
    "office_home": DOMAINBED_IMAGES,
    "terra_incognita": DOMAINBED_IMAGES,
    "domain_net": replace(DOMAINBED_IMAGES, eval_every=1000),
    "image_folder": DOMAINBED_IMAGES,
}

GENERIC = Preset(model="resnet50", n_epochs=1)


def preset_for(dataset: str) -> Preset:
    """The preset of ``dataset`` (folder datasets by their canonical name), else the generic one."""
    return PRESETS.get(canonical_name(dataset) or dataset, GENERIC)


def apply_preset(config: object, dataset: str) -> None:
    """Fill every ``None`` attribute of ``config`` that the dataset's preset defines."""
    preset = preset_for(dataset)
    length_given = getattr(config, "n_epochs", None) is not None or getattr(config, "n_steps", None) is not None
    for f in fields(Preset):
        if length_given and f.name in ("n_epochs", "n_steps"):
            continue
        if getattr(config, f.name, None) is None:
            setattr(config, f.name, getattr(preset, f.name))
