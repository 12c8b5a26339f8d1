"""MixStyle's maths against statistics computed by hand, its partners, and where it attaches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dg_quant import create_adapter
from dg_quant.errors import ConfigError
from dg_quant.methods.mixstyle import MixStyle, attach_mixstyle, mix_styles, mixing_partners, stage_ends


def test_mixed_statistics_are_the_convex_combination() -> None:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1
    partners = torch.tensor([2, 3, 0, 1])
    lam = torch.tensor([0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    out = mix_styles(x, partners, lam, eps=0.0)
    for i in range(4):
        j = int(partners[i])
        for c in range(3):
            xi, xj = x[i, c].flatten(), x[j, c].flatten()
            mu = lam[i] * xi.mean() + (1 - lam[i]) * xj.mean()
            sd = lam[i] * xi.std() + (1 - lam[i]) * xj.std()  # unbiased, as torch.var in the layer
            assert float(out[i, c].mean()) == pytest.approx(float(mu), abs=1e-9)
            assert float(out[i, c].std()) == pytest.approx(float(sd), rel=1e-9)
    assert torch.allclose(out[3], x[3])  # lambda 1 keeps the sample's own style


def test_statistics_are_detached() -> None:
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    out = mix_styles(x, torch.tensor([1, 0, 3, 2]), torch.full((4,), 0.5))
    out.sum().backward()
    # gradient flows only through the normalised x: d/dx of (x - mu)/sig * s is s/sig per element
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_crossdomain_partners_come_from_another_domain() -> None:
    domains = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    for _ in range(20):
        partners = mixing_partners(domains, 8, "crossdomain")
        assert (domains[partners] != domains).all()
    assert sorted(mixing_partners(domains, 8, "random").tolist()) == list(range(8))  # a permutation
    single = mixing_partners(torch.zeros(5, dtype=torch.long), 5, "crossdomain")
    assert single.shape == (5,)  # one domain: random partners


def test_layer_is_identity_in_eval_and_with_p_zero() -> None:
    model = create_adapter("test_resnet", num_classes=3)
    plain = copy.deepcopy(model)
    sites = attach_mixstyle(model, [1, 2], lambda: MixStyle(p=0.0, alpha=0.1))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), plain(x))  # training mode, p = 0
    for site in sites:
        site.p = 1.0
    assert not torch.allclose(model(x), plain(x))
    model.load_state_dict(plain.state_dict())  # same BN statistics, same names
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize(("backbone", "n_stages"), [("test_resnet", 4), ("test_mobilenet", 4)])
def test_stage_ends_of_cnn_backbones(backbone: str, n_stages: int) -> None:
    model = create_adapter(backbone, num_classes=3)
    ends = stage_ends(model)
    assert len(ends) >= n_stages - 1
    sizes = []
    hooks = [e.register_forward_hook(lambda _m, _i, o: sizes.append(o.shape[-1])) for e in ends[:3]]
    model.eval()
    model(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert sizes == [16, 8, 4]  # stages 1-3 end at 1/4, 1/8, 1/16 of the input, as ResNet's layer1-3


def test_mobilenet_v2_stage_blocks() -> None:
    model = create_adapter("test_mobilenet", num_classes=3)
    features = model.featurizer.features
    assert stage_ends(model)[:3] == [features[3], features[6], features[13]]


def test_state_dict_keys_unchanged() -> None:
    model = create_adapter("test_mobilenet", num_classes=3)
    keys = list(model.state_dict())
    attach_mixstyle(model, [1, 2, 3], MixStyle)
    assert list(model.state_dict()) == keys


def test_refused_where_it_cannot_attach() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.featurizer = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="cannot attach to Linear") as info:
        attach_mixstyle(Flat(), [1], MixStyle)
    assert "\n" not in str(info.value)


def test_stages_of_a_resnet_inside_a_wrapper() -> None:
    """DomainBed's networks.ResNet keeps torchvision's model as ``.network``: its layer1.. are found."""
    import torchvision

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = torchvision.models.resnet18(num_classes=3)

    wrapper = Wrapper()
    assert stage_ends(wrapper)[:3] == [wrapper.network.layer1, wrapper.network.layer2, wrapper.network.layer3]
