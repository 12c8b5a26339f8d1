"""A plugin that lets one process's weights drift (``-p ddp_drift`` under torchrun), for the state check."""

from __future__ import annotations

import os

import torch
from torch import nn

from dg_quant.hookimpl import hookimpl


@hookimpl
def dgq_after_step(model: nn.Module) -> None:
    if os.environ.get("RANK") == "1":
        with torch.no_grad():
            next(model.parameters()).add_(1e-6)
