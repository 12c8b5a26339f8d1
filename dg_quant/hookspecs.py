"""The hooks a dg-quant plugin can implement, grouped by phase.

Hosts (``wilds_run``, the DomainBed algorithms) call these with keyword arguments; an
implementation may accept any subset of a hook's arguments. Unless a hook says *first result*,
every implementation runs and results (if any) are collected in a list.

``config`` is always an ``argparse.Namespace``: the host's settings plus every option that the
loaded plugins added (the WILDS host fills it from the command line, the DomainBed host from
``hparams``). It is read-only: nobody writes into it after parsing. A plugin parses its own
options from it once, in ``dgq_configure`` (``dg_quant.options.read_options``), and registers a
per-run object holding them and the hooks that need them (``host.register(obj, name=...)``).

``context`` (``dg_quant.context.RunContext``, frozen) carries what the host worked out while
setting the run up: the run length, steps per epoch, the output folder, the loaded plugins. Every
hook but ``dgq_add_options`` receives it. docs/plugins.md walks through the contract.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dg_quant.context import Calibration, RunContext
    from dg_quant.host import PluginHost

hookspec = pluggy.HookspecMarker("dg_quant")


# -- Set-up ---------------------------------------------------------------------------------


@hookspec(historic=True)
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's command-line options (historic: replayed to late plugins).

    :param parser: the host's parser; add a group named after the plugin.

    .. versionadded:: 0.1
    """


@hookspec(historic=True)
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    """Validate options and set up per-run state (historic: replayed to late plugins).

    A plugin that keeps state across steps registers an object holding it with
    ``host.register(obj, name=...)`` here, rather than keeping module globals. If that object has
    ``state_dict()``/``load_state_dict(state)`` (``dg_quant.host.Stateful``), its state travels in
    the run's checkpoint under that name, so the name must be the same in every run.
    Raise ``dg_quant.errors.ConfigError`` for a bad setting.

    :param config: the run's settings; parse the plugin's options from it here, once.
    :param host: the plugin host, to register per-run plugin objects.
    :param context: the run as the host set it up (length, steps per epoch, output folder).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


@hookspec
def dgq_configure_model(model: nn.Module, config: argparse.Namespace, context: RunContext) -> None:
    """Modify the model in place before the optimizer is built (e.g. attach quantizers).

    :param model: the network: ``featurizer`` followed by ``classifier``.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


@hookspec
def dgq_configure_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, config: argparse.Namespace, context: RunContext
) -> None:
    """Adjust the freshly built optimizer (add parameter groups, change learning rates).

    :param optimizer: the optimizer over ``model.parameters()``.
    :param model: the configured model.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


# -- Training step --------------------------------------------------------------------------


@hookspec
def dgq_step_start(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: argparse.Namespace,
    context: RunContext,
    domains: torch.Tensor | None,
) -> None:
    """Called before each step's gradients (e.g. switch quantization on at a given step).

    :param model: the model being trained.
    :param optimizer: its optimizer.
    :param step: 0-based index of the step about to run.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).
    :param domains: the batch's domain label per sample (``[B]`` integers: WILDS' grouper groups,
        DomainBed's environment index), or None when the host does not know them (e.g. MixStyle's
        cross-domain pairing reads them here, before the forward passes).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` and ``domains`` added.
    """


@hookspec
def dgq_loss_terms(
    model: nn.Module,
    features: torch.Tensor | None,
    logits: torch.Tensor,
    y: torch.Tensor,
    domains: torch.Tensor | None,
    step: int,
    config: argparse.Namespace,
    context: RunContext,
) -> dict[str, torch.Tensor] | None:
    """Add terms to the training loss (e.g. CORAL's penalty), at every forward pass that is scored.

    The host's ``loss_fn`` returns the task loss plus every term returned here, so the terms
    reach the gradient whoever computes it: the default backward, or a plugin that owns the step
    (SAGM and SAM evaluate the loss, and so the terms, at the clean and at the perturbed point).
    Each term is logged under its name in the step's metrics (its value in the first pass).

    :param model: the model being trained.
    :param features: the classifier's input for the same samples (``[B, d]``), or None when the
        model has no ``classifier``.
    :param logits: the model's output.
    :param y: the labels.
    :param domains: each sample's domain label, or None when unknown or when the pass scores a
        part of the batch (e.g. FQAT's Hessian sub-batches).
    :param step: 0-based step index.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).
    :return: ``{name: scalar tensor}`` added to the loss, or None.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def dgq_compute_gradients(
    model: nn.Module,
    batch: tuple[Any, torch.Tensor],
    loss_fn: Any,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: argparse.Namespace,
    context: RunContext,
) -> dict[str, Any] | None:
    """Fill ``.grad`` of the parameters for one step (*first result* wins).

    The host's default runs one forward/backward (ERM). A plugin with a different step, such as
    SAGM's two passes, returns its metrics here and so replaces the default. Gradients are
    already zeroed.

    :param model: the model in train mode.
    :param batch: ``(x, y)`` already on the model's device.
    :param loss_fn: ``loss_fn(logits, y) -> scalar tensor``.
    :param optimizer: the optimizer (not to be stepped here).
    :param step: 0-based step index.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).
    :return: metrics of the step (tensors or floats; at least ``loss``), or None to pass.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


@hookspec
def dgq_after_backward(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, config: argparse.Namespace, context: RunContext
) -> None:
    """Called after gradients are computed and before the optimizer step (route or mask them).

    :param model: the model.
    :param optimizer: its optimizer.
    :param step: 0-based step index.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


@hookspec
def dgq_after_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    metrics: dict[str, Any],
    config: argparse.Namespace,
    context: RunContext,
) -> None:
    """Called after the optimizer step (clamp step sizes, restore frozen weights, log).

    :param model: the model.
    :param optimizer: its optimizer.
    :param step: 0-based index of the step that just ran.
    :param metrics: the step's metrics; a plugin may add entries.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


# -- Evaluation and end ---------------------------------------------------------------------


@hookspec
def dgq_evaluate(model: nn.Module, step: int, config: argparse.Namespace, context: RunContext) -> dict[str, Any] | None:
    """Contribute numbers to an evaluation record (e.g. compression ratio, frozen layers).

    :param model: the model in eval mode.
    :param step: number of steps done.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).
    :return: flat ``{name: number}`` merged into the record, or None.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` added.
    """


@hookspec
def dgq_evaluated(
    model: nn.Module, step: int, record: dict[str, Any], config: argparse.Namespace, context: RunContext
) -> None:
    """Called with each finished evaluation record of the model being trained (not of the final model).

    SWAD reads the in-domain validation loss here (``<split>/loss``) to find its loss valley.

    :param model: the model that was evaluated (in eval mode).
    :param step: number of steps done.
    :param record: the evaluation record (``<split>/<metric>`` keys, ``<split>/loss`` included
        where the host computes it); read only.
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def dgq_final_model(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Any]],
    config: argparse.Namespace,
    context: RunContext,
) -> dict[str, Any] | None:
    """Replace the trained weights, in place, by the model that stands for the run (*first result*).

    A weight averager (SWAD, SWA) loads its averaged parameters into ``model`` and recomputes its
    BatchNorm statistics here. The host then evaluates that model as the run's final record, makes
    it the selected model (best-model selection and the exported files use it) and runs
    ``dgq_train_end`` on it. Called once, after the last step and before ``dgq_train_end``.

    :param model: the trained model, to be changed in place (same architecture and quantizers).
    :param train_batches: ``train_batches(n)`` yields up to ``n`` batches of training inputs on
        the model's device (the inputs only, as ``torch.optim.swa_utils.update_bn`` takes them).
    :param config: the run's settings.
    :param context: the run as the host set it up (length, steps per epoch, output folder).
    :return: flat ``{name: number}`` describing the replacement (merged into the final results),
        or None when the plugin leaves the trained model as it is.

    .. versionadded:: 0.2
    """


@hookspec
def dgq_train_end(
    model: nn.Module,
    config: argparse.Namespace,
    log_dir: str | None,
    context: RunContext,
    calibration: Calibration | None,
) -> dict[str, Any] | None:
    """Called once after the last step (post-training quantization, export, summaries).

    :param model: the trained model.
    :param config: the run's settings.
    :param log_dir: the run's output folder, or None when the host writes nothing.
    :param context: the run as the host set it up (length, steps per epoch, output folder).
    :param calibration: ``calibration(num_samples, batch_size)`` yields input batches of the
        training split (source domains only, no augmentation, the same ones at every call) for
        post-training calibration; None when the host has no data to give.
    :return: flat ``{name: number}`` merged into the final results, or None.

    Hosts call it through ``dg_quant.loop.end_training``: the model's state is compared before
    and after, so a hook that changes the model (post-training quantization) has the host score
    and save the changed model.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``context`` and ``calibration`` added (calibration data was ``config.calibration_batches``).
    """
