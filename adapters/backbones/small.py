"""Small convolutional backbones for the embedded dataset and for tests."""

from __future__ import annotations

from torch import nn

from dg_quant.model import DGModel
from dg_quant.registry import register_adapter


def _conv_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def conv_featurizer(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Conv-BN-ReLU blocks (stride 2 after the first), then global average pooling."""
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        layers += _conv_block(c, w, 1 if i == 0 else 2)
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register_adapter
def digits_cnn(num_classes: int, in_channels: int = 1, width: int = 32) -> DGModel:
    """Four conv blocks in the spirit of DomainBed's MNIST_CNN, sized for 16x16 digits."""
    widths = (width, 2 * width, 2 * width, 2 * width)
    return DGModel(conv_featurizer(in_channels, widths), nn.Linear(widths[-1], num_classes), widths[-1])


@register_adapter
def test_cnn(num_classes: int, in_channels: int = 3, width: int = 8) -> DGModel:
    """A two-block CNN for fast tests."""
    widths = (width, 2 * width)
    return DGModel(conv_featurizer(in_channels, widths), nn.Linear(widths[-1], num_classes), widths[-1])
