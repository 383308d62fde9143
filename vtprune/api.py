"""`vtprune.apply` and `vtprune.remove`: patch one loaded model instance, and undo it."""

from __future__ import annotations

from typing import Any

import torch

from .errors import AlreadyPatchedError, ConfigError, UnsupportedModelError
from .integration import encoder_merging_refusal, find_integration
from .patching import HANDLE_ATTRIBUTE, PruneHandle
from .pruners.base import Pruner
from .registry import create_pruner
from .sequence import POSITION_MODES


def apply(
    model: torch.nn.Module,
    pruner: str | Pruner,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    positions: str | None = None,
    **options: Any,
) -> PruneHandle:
    """Prune the visual tokens `model` passes from its vision encoder to its language model.

    Args:
        model: a loaded model of a supported family (e.g. `LlavaForConditionalGeneration`). Only this instance
            is patched; call the processor and ``model(...)`` / ``model.generate(...)`` exactly as before.
        pruner: a registered name (see `vtprune.list_pruners()`) or a pruner object from `create_pruner`.
        keep: visual tokens the LLM receives per image. Exclusive with `ratio`.
        ratio: fraction of each image's visual tokens to keep, in (0, 1].
        positions: ``"compact"`` (kept tokens renumbered contiguously) or ``"preserve"`` (each kept token keeps
            its original position id). Default: the family's convention (LLaVA: compact, as the papers).
        **options: the family's options (LLaVA-NeXT ``budget_scope``, timm ``after_block``) and, when `pruner`
            is a name, the pruner's hyperparameters (e.g. ``contextual=10`` for VisionZip).

    Returns:
        A `PruneHandle`: ``.stats`` after each call, ``.remove()`` (or use it as a context manager).
    """
    if isinstance(model, torch.nn.Module) and model.__dict__.get(HANDLE_ATTRIBUTE) is not None:
        raise AlreadyPatchedError(
            f"this {type(model).__name__} is already patched by vtprune "
            f"({model.__dict__[HANDLE_ATTRIBUTE].pruner!r}); call .remove() or vtprune.remove(model) first"
        )
    integration_cls = find_integration(model)
    integration_options = {name: options.pop(name) for name in list(options) if name in integration_cls.options}
    if isinstance(pruner, Pruner):
        if keep is not None or ratio is not None or options:
            raise ConfigError(
                "a pruner object carries its own budget and hyperparameters; pass keep/ratio/options to "
                "vtprune.create_pruner instead of vtprune.apply"
            )
    elif isinstance(pruner, str):
        pruner = create_pruner(pruner, keep=keep, ratio=ratio, **options)
    else:
        raise ConfigError(f"pruner must be a registered name or a Pruner object, got {type(pruner).__name__}")
    merging = pruner.kind == "encoder_merging"
    if merging:
        reason = encoder_merging_refusal(integration_cls)
        if reason:
            raise UnsupportedModelError(
                f"{pruner.name or type(pruner).__name__} merges tokens inside the vision encoder, which vtprune does "
                f"not support for {type(model).__name__}: {reason}"
            )
        if getattr(pruner, "virtual_unmerging", False) and positions is not None:
            raise ConfigError(
                "positions does not apply with vtu=True: the LLM attends over the virtual full-length sequence at "
                "the original positions; use vtu=False to choose positions for the merged tokens"
            )
    elif not pruner.budget.is_set:
        raise ConfigError(f"pruner {pruner.name!r} has no default budget: pass keep=<tokens per image> or ratio=<(0, 1]>")
    if integration_cls.default_positions is None:
        if positions is not None:
            raise ConfigError(f"positions does not apply to {type(model).__name__} (it has no language model)")
    else:
        positions = integration_cls.default_positions if positions is None else positions
        if positions not in POSITION_MODES:
            raise ConfigError(f"positions must be one of {', '.join(POSITION_MODES)}; got {positions!r}")
    integration = integration_cls(model, pruner, **integration_options)
    if merging:
        integration.validate_merging()
    else:
        integration.validate()
    handle = PruneHandle(model, integration, pruner, positions)
    handle._install()
    return handle


def remove(model: torch.nn.Module) -> None:
    """Undo `vtprune.apply` on `model`."""
    handle = model.__dict__.get(HANDLE_ATTRIBUTE) if isinstance(model, torch.nn.Module) else None
    if handle is None:
        raise ConfigError(f"this {type(model).__name__} is not patched by vtprune")
    handle.remove()
