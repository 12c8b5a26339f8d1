"""Per-dataset defaults for ``wilds_run``; any flag given on the command line wins.

Values follow the WILDS example configs where they exist (HOSTS.md 2.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


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
    groupby_fields: tuple[str, ...] = field(default=("domain",))
    split_scheme: str | None = None
    max_grad_norm: float | None = None


PRESETS: dict[str, Preset] = {
    "rotated_digits": Preset(model="digits_cnn", lr=1e-3, batch_size=64, n_steps=600, eval_every=100),
}

GENERIC = Preset(model="resnet50", n_epochs=1)


def apply_preset(config: object, dataset: str) -> None:
    """Fill every ``None`` attribute of ``config`` that the dataset's preset defines."""
    preset = PRESETS.get(dataset, GENERIC)
    length_given = getattr(config, "n_epochs", None) is not None or getattr(config, "n_steps", None) is not None
    for f in fields(Preset):
        if length_given and f.name in ("n_epochs", "n_steps"):
            continue
        if getattr(config, f.name, None) is None:
            setattr(config, f.name, getattr(preset, f.name))
