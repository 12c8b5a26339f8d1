"""The end of a DomainBed run: the plugins' ``dgq_train_end``, which DomainBed's ``train.py`` lacks.

The launcher runs ``train.py`` in its own process, so when the script returns its globals still
hold the trained ``algorithm``, whose plugins keep their per-run state (FQAT's disorder windows,
INQ's partitions). ``finish_training`` runs ``Trainer.end`` on it (or, when the script left
no algorithm behind, on one rebuilt from ``model.pkl``), then:

- if a hook changed the model (post-training quantization), ``model.pkl`` becomes the changed
  model and ``model_fp.pkl`` keeps the one ``train.py`` saved;
- ``dgq_final.json`` gets the hooks' numbers, ``evaluation_extras()`` (compression ratio, packed
  MB) and, for a changed model, every split's accuracy re-measured as ``train.py`` measures it;
  that evaluation is also appended to ``results.jsonl`` as a DomainBed record (``dgq_phase``:
  ``train_end``), which is what ``collect_results`` reports for ``OBC``;
- a final model (SWAD's average) is the algorithm's own doing, after its last update
  (``evaluation``): ``train.py`` already scored and saved it; its summary joins ``dgq_final.json``.

A ``model.pkl`` already finished (rewritten by it, or ``dgq_final.json`` at least as new) is left
alone, so a model is never post-training quantized twice. PTQ plugins
get ``calibration`` (``dgq_train_end``) over the training environments' in-splits only; the dataset is
built when a plugin first asks for images.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dg_quant.adapters.domainbed.algorithms import DGQuantAlgorithm
from dg_quant.adapters.domainbed.compose import ComposedAlgorithm
from dg_quant.adapters.domainbed.rundata import RunData
from dg_quant.adapters.domainbed.weights import random_init_backbones
from dg_quant.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    load_torch_file,
    verify_torch_file,
)
from dg_quant.speed import model_device

FINAL_FILE = "dgq_final.json"
MODEL_FILE = "model.pkl"
FP_MODEL_FILE = "model_fp.pkl"


RESULTS_FILE = "results.jsonl"
TRAIN_END_PHASE = "train_end"  # dgq_phase of the record the end of training appends

FINISHED_KEY = "dgq_finished"  # in a model.pkl that end-of-training hooks rewrote

# Algorithms with dg-quant plugins: its own (QTDoG, OBC, ...) and DomainBed's with a method attached.
HOSTED = (DGQuantAlgorithm, ComposedAlgorithm)


def _verified(path: Path) -> bool:
    """``verify_torch_file`` (a damaged file is a CheckpointError), for use inside a condition."""
    verify_torch_file(path)
    return True


def is_finished(output_dir: Path) -> bool:
    """True when ``model.pkl`` is one this module rewrote (even if the process died before
    ``dgq_final.json``), or ``dgq_final.json`` exists and ``model.pkl`` was not saved after it."""
    final, model = output_dir / FINAL_FILE, output_dir / MODEL_FILE
    if (
        model.exists()
        and _verified(model)
        and torch.load(model, map_location="cpu", weights_only=False, mmap=True).get(FINISHED_KEY)
    ):
        return True
    if not final.exists():
        return False
    return not model.exists() or final.stat().st_mtime_ns >= model.stat().st_mtime_ns


class DomainBedCalibration:
    """The ``calibration`` of a DomainBed run's ``dgq_train_end``: training environments only, seeded.

    The images are the training environments' in-splits, split exactly as ``train.py`` splits
    them (so neither the test environments nor the validation out-splits are seen), with the
    dataset's own transform without augmentation (every calibration pass sees the same pixels).
    The dataset is built on the first call only.
    """

    def __init__(
        self, args: Mapping[str, Any], hparams: Mapping[str, Any], device: torch.device, package: str = "domainbed"
    ) -> None:
        self.args, self.device = args, device
        self.data = RunData(args, hparams, package)
        self._loaders: dict[tuple[int, int], DataLoader] = {}

    def training_images(self) -> Dataset:
        """The training environments' in-splits, concatenated (built once)."""
        return self.data.training(augment=False)

    def _loader(self, num_samples: int, batch_size: int) -> DataLoader:
        key = (num_samples, batch_size)
        if key not in self._loaders:
            train = self.training_images()
            generator = torch.Generator().manual_seed(int(self.args.get("seed", 0)))
            chosen = torch.randperm(len(train), generator=generator)[:num_samples].tolist()
            self._loaders[key] = DataLoader(
                Subset(train, chosen),
                batch_size=batch_size,
                shuffle=False,
                num_workers=self.data.workers,
                persistent_workers=self.data.workers > 0,
            )
        return self._loaders[key]

    def __call__(self, num_samples: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
        """Up to ``num_samples`` inputs on the model's device, the same ones in the same order each call."""
        for x, *_ in self._loader(num_samples, batch_size):
            yield x.to(self.device)


def load_algorithm(path: Path, algorithms: ModuleType, device: torch.device) -> nn.Module:
    """Rebuild a saved algorithm with DomainBed's reload recipe (its plugins start with fresh state).

    The backbone is built without downloading its ImageNet weights: the saved ones replace them.
    """
    saved = load_torch_file(path)  # this run's own train.py wrote it; checksums verified
    cls = algorithms.get_algorithm_class(saved["args"]["algorithm"])
    with random_init_backbones():
        algorithm = cls(
            saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"], saved["model_hparams"]
        )
    algorithm.load_state_dict(saved["model_dict"])
    return algorithm.to(device)


def _accuracies(
    algorithm: nn.Module, namespace: Mapping[str, Any], misc: ModuleType, device: torch.device
) -> dict[str, float]:
    """Every split's accuracy with ``train.py``'s own loaders (none when the script has other names)."""
    names, loaders = namespace.get("eval_loader_names"), namespace.get("eval_loaders")
    if not names or not loaders:
        return {}
    weights = namespace.get("eval_weights") or [None] * len(loaders)
    return {
        f"{name}_acc": float(misc.accuracy(algorithm, loader, w, device))
        for name, loader, w in zip(names, loaders, weights)
    }


def _write_back(output_dir: Path, algorithm: nn.Module) -> None:
    """``model.pkl`` := the changed model, after ``model_fp.pkl`` := what ``train.py`` saved."""
    model_path = output_dir / MODEL_FILE
    atomic_write_bytes(output_dir / FP_MODEL_FILE, model_path.read_bytes())
    saved = load_torch_file(model_path)
    atomic_torch_save(model_path, {**saved, "model_dict": algorithm.state_dict(), FINISHED_KEY: True})


@contextlib.contextmanager
def _progress_lines() -> Iterator[None]:
    """Show the post-training quantization's per-layer progress on stdout (train.py's out.txt)."""
    logger = logging.getLogger("dg_quant.quant.obc")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("dg-quant: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line each, whatever handlers the root logger has
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _append_record(path: Path, accuracies: Mapping[str, float], quantized: bool) -> bool:
    """Append the changed model's evaluation to ``results.jsonl`` in DomainBed's record format.

    A copy of the last record (same args, hparams and step, so ``collect_results`` groups it
    with the run) with every split's accuracy of the changed model, ``quantized`` and
    ``dgq_phase``. The launcher's ``collect_results`` selects a quantized run's quantized
    records only, so for ``OBC`` this record is the one its tables report.
    """
    if not path.is_file():
        return False
    text = path.read_bytes()
    lines = text.splitlines()
    if not lines:
        return False
    record = {**json.loads(lines[-1]), **accuracies, "quantized": float(quantized), "dgq_phase": TRAIN_END_PHASE}
    if not text.endswith(b"\n"):
        text += b"\n"
    atomic_write_bytes(path, text + (json.dumps(record, sort_keys=True) + "\n").encode())
    return True


def finish_training(namespace: Mapping[str, Any], package: str = "domainbed") -> dict[str, Any] | None:
    """Run the end of training for the run whose ``train.py`` globals are ``namespace``.

    Returns what was written to ``dgq_final.json``, or None when there was nothing to do (not a
    dg-quant algorithm, already finished, or no trained model to finish).
    """
    args = namespace.get("args")
    if args is None:
        return None
    args = dict(vars(args)) if not isinstance(args, Mapping) else dict(args)
    algorithms = importlib.import_module(f"{package}.algorithms")
    if not issubclass(algorithms.get_algorithm_class(args["algorithm"]), HOSTED):
        return None  # ERM and DomainBed's other algorithms: nothing of ours to run
    output_dir = Path(args["output_dir"])
    if is_finished(output_dir):
        print(f"dg-quant: {output_dir / FINAL_FILE} is up to date; end of training not run again")
        return None
    algorithm = namespace.get("algorithm")
    if not isinstance(algorithm, HOSTED):
        if not (output_dir / MODEL_FILE).exists():
            print(
                f"dg-quant: no trained algorithm and no {MODEL_FILE} in {output_dir}; end of training skipped",
                file=sys.stderr,
            )
            return None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        algorithm = load_algorithm(output_dir / MODEL_FILE, algorithms, device)
        namespace = {}  # the loaders of the script's globals do not describe this model

    device = model_device(algorithm.dgq_model)
    calibration = DomainBedCalibration(args, algorithm.hparams, device, package)
    print(f"dg-quant: end of training of {args['algorithm']} ({', '.join(algorithm.PLUGINS)})", flush=True)
    with _progress_lines():
        end = algorithm.trainer.end(str(output_dir), calibration=calibration)
    numbers, changed = end.numbers, end.model_changed
    final: dict[str, Any] = {
        "algorithm": args["algorithm"],
        "plugins": list(algorithm.PLUGINS),
        "dataset": args.get("dataset"),
        "test_envs": args.get("test_envs"),
        "steps": algorithm.trainer.step,
        "model_changed": changed,
        # SWAD's average replaced the trained model after the last update (train.py scored and saved it)
        **({"final_model": True, **algorithm.final_summary} if algorithm.final_summary else {}),
        **numbers,
        **algorithm.evaluation_extras(),
    }
    if changed:
        misc = importlib.import_module(f"{package}.lib.misc")
        print("dg-quant: the model changed; scoring it on every split as train.py does", flush=True)
        accuracies = _accuracies(algorithm, namespace, misc, device)
        final.update(accuracies)
        if (output_dir / MODEL_FILE).exists():  # absent with --skip_model_save
            _write_back(output_dir, algorithm)
            final["fp_model"] = FP_MODEL_FILE
        if accuracies and _append_record(output_dir / RESULTS_FILE, accuracies, final["quantized"]):
            final["results_record"] = TRAIN_END_PHASE
    atomic_write_json(output_dir / FINAL_FILE, final)
    print(
        f"dg-quant: end of training done; wrote {output_dir / FINAL_FILE}"
        + (
            f" (model changed: {MODEL_FILE} updated, {FP_MODEL_FILE} keeps the trained one)"
            if final.get("fp_model")
            else ""
        )
    )
    return final
