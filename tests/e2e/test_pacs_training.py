"""Real PACS, ImageNet MobileNetV2: what each method's training run writes (ERM, QT-DoG, FQAT, INQ).

The runs come from ``pacs_runs`` (this folder's conftest), one per method for the whole session.
Layer and parameter counts are checked against torchvision's own MobileNetV2, built here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from dg_quant.selection import selection_key
from tests.e2e.conftest import PACS_METHODS, read_json, read_records

SOURCES = {"art_painting", "cartoon", "photo"}
RUN_FILES = ("config.json", "results.jsonl", "final.json", "last.pt", "model.pt", "best_model.pt")


def mobilenet_convs() -> dict[str, int]:
    """``featurizer.<conv>.weight`` -> parameter count, for torchvision's MobileNetV2."""
    net = mobilenet_v2(num_classes=7)
    return {f"featurizer.{n}.weight": m.weight.numel() for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}


def mobilenet_params() -> int:
    return sum(p.numel() for p in mobilenet_v2(num_classes=7).parameters())


@pytest.mark.parametrize("method", PACS_METHODS)
def test_run_folder_records_every_evaluation_and_the_selection(pacs_runs, method):
    run = pacs_runs(method)
    assert all((run / name).is_file() for name in RUN_FILES)
    final, records = read_json(run / "final.json"), read_records(run)
    assert final["dataset"] == "pacs" and final["model"] == "mobilenet_v2" and final["steps"] == 4
    assert final["plugins"] == ([] if method == "erm" else [f"dg_quant.{method}"])
    assert [r["step"] for r in records if r.get("phase") != "train_end"] == [2, 4]
    for record in records:  # DomainBed's splits: sources in id_val, the held-out domain in val and test
        assert {k.split(":", 1)[1] for k in record if k.startswith("id_val/acc_domain:")} == SOURCES
        assert {k.split(":", 1)[1] for k in record if k.startswith("test/acc_domain:")} == {"sketch"}
        assert math.isfinite(record["train/loss"]) and 0.0 <= record["test/acc_avg"] <= 1.0
    # the best record is the first with the highest training-domain validation accuracy, among the
    # quantized records when there are any (a quantization method's selected model is quantized)
    best = max(records, key=lambda r: selection_key(r, "id_val/acc_avg"))
    assert best["quantized"] == any(r["quantized"] for r in records)
    assert final["best_step"] == best["step"] and final["test_at_best"] == best["test/acc_avg"]
    assert final["test_at_last"] == records[-1]["test/acc_avg"] == final["last"]["test/acc_avg"]
    # the held-out domain is never trained on: sketch has 7 classes x PER_CLASS images, 20% in val
    counts = records[-1]
    assert counts["test/count_domain:sketch"] + counts["val/count_domain:sketch"] == 28
    assert counts["val/count_domain:sketch"] == int(0.2 * 28)  # DomainBed's holdout, rounded down
    # the files hold what a reload needs: backbone, classes and the run's settings
    model_file = torch.load(run / "model.pt", weights_only=False)
    assert (model_file["backbone"], model_file["num_classes"], model_file["step"]) == ("mobilenet_v2", 7, 4)
    assert model_file["config"]["image_size"] == 32 and model_file["config"]["test_domain"] == "sketch"


def test_erm_stays_full_precision(pacs_runs):
    final = read_json(pacs_runs("erm") / "final.json")
    assert final["compression"]["quantized_layers"] == 0 and final["compression"]["compression_ratio"] == 1.0
    assert not any(r["quantized"] for r in read_records(pacs_runs("erm")))


def test_qtdog_switches_on_at_its_step_and_quantizes_every_conv(pacs_runs):
    run = pacs_runs("qtdog")
    records = read_records(run)
    assert [r["quantized"] for r in records] == [False, True]  # ERM until step 2, then 7-bit LSQ
    assert records[0]["compression_ratio"] == 1.0
    compression = read_json(run / "final.json")["compression"]
    convs = mobilenet_convs()
    assert {layer["name"]: layer["numel"] for layer in compression["layers"]} == convs
    assert {layer["bits"] for layer in compression["layers"]} == {7}
    assert compression["quantized_param_fraction"] == pytest.approx(sum(convs.values()) / mobilenet_params())
    # 7-bit codes plus per-channel steps: below the 32/7 bound, well above the FP classifier's drag
    assert 3.5 < compression["compression_ratio"] < 32 / 7
    # the saved weights are the LSQ parametrization's: FP originals plus one step per output channel
    state = torch.load(run / "model.pt", weights_only=False)["model"]
    for name in convs:
        stem = name.removesuffix(".weight")
        original = state[f"{stem}.parametrizations.weight.original"]
        assert state[f"{stem}.parametrizations.weight.0.step"].numel() == original.shape[0]


def test_fqat_quantizes_weights_at_4_bits_but_keeps_the_first_conv_fp(pacs_runs):
    run = pacs_runs("fqat")
    final = read_json(run / "final.json")
    convs = mobilenet_convs()
    first = next(iter(convs))
    layers = {layer["name"]: layer["bits"] for layer in final["compression"]["layers"]}
    assert set(layers) == set(convs) - {first} and set(layers.values()) == {4}
    assert all(r["quantized"] for r in read_records(run))  # QAT from the first step
    assert final["fqat/scale_factors"] > len(layers)  # weight and activation steps
    assert 0.0 <= final["fqat/frozen_fraction"] <= 1.0
    # one disorder row per scale factor per 2-step window; the paper's rule: frozen iff disorder < tau
    rows = [json.loads(line) for line in (run / "fqat_disorder.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {2, 4}
    assert len(rows) == 2 * final["fqat/scale_factors"]
    assert {r["kind"] for r in rows} == {"weight", "activation"}
    tau = read_json(run / "config.json")["freeze_tau"]
    assert all(r["frozen"] == (r["disorder"] < tau) for r in rows if r["disorder"] is not None)
    assert "train/sagm/perturbed_loss" in final["last"]


def test_inq_ends_with_every_conv_weight_on_a_power_of_two(pacs_runs):
    run = pacs_runs("inq")
    final = read_json(run / "final.json")
    fractions = [r["inq/frozen_fraction"] for r in read_records(run)]
    assert 0.5 <= fractions[0] < 1.0 and fractions[-1] == 1.0  # partitions spread over the run
    state = torch.load(run / "model.pt", weights_only=False)["model"]
    bits = 5
    for name in mobilenet_convs():
        stem = name.removesuffix(".weight")
        weight = state[name]
        assert bool(state[f"{stem}.inq_frozen"].all()), f"{name} has free weights after the last partition"
        magnitudes = weight.abs()[weight != 0].double()
        assert torch.equal(torch.log2(magnitudes), torch.log2(magnitudes).round()), name
        assert len(torch.unique(magnitudes)) <= 2 ** (bits - 1) // 2  # 2^(b-1)+1 levels with 0 and signs
    assert {layer["bits"] for layer in final["compression"]["layers"]} == {bits}
