"""MixStyle (Zhou et al., ICLR 2021): mix instance-level feature statistics across samples.

After an early residual stage, each sample's channel means and standard deviations are replaced
by a convex combination with another sample's, ``lambda ~ Beta(alpha, alpha)`` per sample, with
probability ``p`` per forward pass and only in training mode. The statistics are detached, as in
the paper's code. ``random`` mixing pairs samples by a random permutation (the paper's default,
no domain labels); ``crossdomain`` pairs each sample with a random sample of *another* domain of
the batch (the paper's domain-label variant pairs two half-batches of two domains; this draws
the partner among all other domains, so it works for any number of domains per batch).

``attach_mixstyle`` inserts it after ResNet's ``layer1..`` or after the blocks of a ``features``
sequence (MobileNetV2, DenseNet) that end at the same resolutions (1/4, 1/8, 1/16 of the input),
through forward hooks, so parameters and checkpoints keep their names. The released QT-DoG code
mixes after ResNet stages 1-3 (``mixstyle_L234_p0d5_a0d1``), p 0.5, alpha 0.1: the defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dg_quant.errors import ConfigError

MIX_MODES = ("random", "crossdomain")
PROBE_SIZE = 64


def mixing_partners(domains: torch.Tensor | None, batch_size: int, mode: str) -> torch.Tensor:
    """Index of each sample's partner: a permutation (``random``) or a sample of another domain.

    A sample with no other domain in the batch (or no labels) gets a random partner.
    """
    if mode == "random" or domains is None or len(domains) != batch_size:
        return torch.randperm(batch_size)
    domains = domains.cpu()
    weights = (domains[None, :] != domains[:, None]).float()
    lonely = weights.sum(1) == 0
    weights[lonely] = 1.0
    return torch.multinomial(weights, 1).squeeze(1)


def mix_styles(x: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` normalised per sample and channel, re-styled with the mixed statistics (``lam``: [B])."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    mu, sig = mu.detach(), sig.detach()
    lam = lam.view(-1, 1, 1, 1).to(x.device, x.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[partners]
    sig_mix = lam * sig + (1 - lam) * sig[partners]
    return (x - mu) / sig * sig_mix + mu_mix


class MixStyle:
    """One MixStyle site; ``hook`` is registered as a forward hook of the stage it follows.

    Not an ``nn.Module`` child of the network (a child of a ``Sequential`` stage would run twice),
    so it follows the *stage's* training flag. ``domains`` holds the current batch's domain labels.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, mode: str = "random", eps: float = 1e-6) -> None:
        if not 0 <= p <= 1:
            raise ConfigError(f"--mixstyle_p must be in [0, 1]; got {p}")
        if not alpha > 0:
            raise ConfigError(f"--mixstyle_alpha must be > 0; got {alpha}")
        if mode not in MIX_MODES:
            raise ConfigError(f"--mixstyle_mix must be one of {', '.join(MIX_MODES)}; got {mode!r}")
        self.p, self.alpha, self.mode, self.eps = p, alpha, mode, eps
        self.domains: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or len(x) < 2 or float(torch.rand(())) >= self.p:
            return x
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((len(x),))
        return mix_styles(x, mixing_partners(self.domains, len(x), self.mode).to(x.device), lam, self.eps)

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self(output) if module.training else output


def _stage_modules(featurizer: nn.Module) -> list[nn.Module] | None:
    """ResNet's ``layer1``, ``layer2``, ... (torchvision and timm), or None; also of a ResNet held
    inside a wrapper (DomainBed's ``networks.ResNet`` keeps torchvision's model as ``.network``)."""
    holder = next((m for m in featurizer.modules() if isinstance(getattr(m, "layer1", None), nn.Module)), None)
    if holder is None:
        return None
    stages = []
    while hasattr(holder, f"layer{len(stages) + 1}"):
        stages.append(getattr(holder, f"layer{len(stages) + 1}"))
    return stages


def _block_sequence(featurizer: nn.Module) -> nn.Sequential | None:
    features = getattr(featurizer, "features", None)
    if isinstance(features, nn.Sequential):
        return features
    return featurizer if isinstance(featurizer, nn.Sequential) else None


@torch.no_grad()
def _stage_ends_by_resolution(featurizer: nn.Module, blocks: nn.Sequential) -> list[nn.Module]:
    """The last block at each output resolution, largest first: where a stage ends.

    After a downsampling stem (MobileNetV2's stride-2 convolution, DenseNet's pooling) stage 1 is
    the first at 1/4 of the input, as ResNet's ``layer1``; without one (the small test CNNs) it is
    the first resolution. Outputs of spatial size 1 (global pooling) are no stage.
    """
    conv = next((m for m in featurizer.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return []
    sizes: dict[int, int] = {}

    def record(index: int, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1:
            sizes[index] = output.shape[-1]

    handles = [b.register_forward_hook(lambda _m, _i, out, i=i: record(i, out)) for i, b in enumerate(blocks)]
    was_training = featurizer.training
    featurizer.eval()
    try:
        device = next(featurizer.parameters()).device
        featurizer(torch.zeros(1, conv.in_channels, PROBE_SIZE, PROBE_SIZE, device=device))
    finally:
        featurizer.train(was_training)
        for h in handles:
            h.remove()
    levels = sorted(set(sizes.values()), reverse=True)
    if levels and levels[0] < PROBE_SIZE:
        levels = [size for size in levels if size <= PROBE_SIZE // 4]
    return [blocks[max(i for i, s in sizes.items() if s == size)] for size in levels]


def stage_ends(model: nn.Module) -> list[nn.Module]:
    """Modules after which stage 1, 2, ... of a CNN backbone ends (empty if none are found)."""
    featurizer = getattr(model, "featurizer", model)
    stages = _stage_modules(featurizer)
    if stages:
        return stages
    blocks = _block_sequence(featurizer)
    return _stage_ends_by_resolution(featurizer, blocks) if blocks is not None else []


def attach_mixstyle(model: nn.Module, stages: Sequence[int], make: Any) -> list[MixStyle]:
    """Hook ``make()`` (a ``MixStyle``) after each 1-based ``stages`` entry; returns the sites.

    Raises a one-line ``ConfigError`` for a backbone without such stages (ViTs, text encoders).
    """
    ends = stage_ends(model)
    if not ends or max(stages) > len(ends):
        name = type(getattr(model, "featurizer", model)).__name__
        found = f"only {len(ends)} stage(s)" if ends else "no convolutional stages"
        raise ConfigError(
            f"dg_quant.mixstyle cannot attach to {name}: found {found}, needs stage(s) "
            f"{', '.join(map(str, stages))} (ResNet layer1.. or a MobileNetV2-style `features` sequence); "
            "use a CNN backbone, fewer --mixstyle_layers, or drop --plugin dg_quant.mixstyle"
        )
    sites = []
    for stage in stages:
        site = make()
        ends[stage - 1].register_forward_hook(site.hook)
        sites.append(site)
    return sites
