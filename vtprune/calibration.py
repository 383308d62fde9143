"""`vtprune.calibrate`: training-free threshold finding for in-encoder merging methods (DyMU, arXiv 2504.17040).

    thresholds = vtprune.calibrate(model, "dymu", images, processor=processor, preset="mid")
    thresholds.save("dymu-mid.json")
    vtprune.apply(model, "dymu", thresholds="dymu-mid.json")

The ``vtprune-calibrate`` command (`vtprune.apps.calibrate`) runs it on a folder of images.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import ConfigError, UnsupportedModelError
from .integration import encoder_merging_refusal, find_integration
from .pruners.dymu import PRESETS, DyMUCalibrator, DyMUThresholds, keep_targets, preset_targets

CALIBRATED_METHODS = ("dymu",)


def _batches(images: Iterable[Any], size: int) -> Iterable[list]:
    batch = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def calibrate(
    model: torch.nn.Module,
    method: str,
    images: Iterable[Any],
    *,
    processor: Any = None,
    preset: str | None = "mid",
    targets: Sequence[int] | None = None,
    keep: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> DyMUThresholds:
    """Find DyMU's per-block merge thresholds on `images` (DyMU, arXiv 2504.17040, batch-level threshold finding).

    For every batch and every encoder block that runs, the batch's ``B * r_l`` most similar bipartite edges are
    merged and the similarity of the last merged edge is recorded; the block's threshold is the mean over
    batches. The paper used ~250K images; a few hundred already give stable thresholds for a preset.

    Args:
        model: a model of a family that supports in-encoder merging (LLaVA-1.5, LLaVA-NeXT, timm ViT).
        method: ``"dymu"``.
        images: an iterable of images (PIL images; for timm, ``[C, H, W]`` tensors or images with `processor`).
        processor: the model's processor or image processor (required for VLMs), or for timm a callable mapping
            an image to a ``[C, H, W]`` tensor (e.g. ``timm.data.create_transform(**resolve_data_config(...))``).
        preset: ``"low"``, ``"mid"`` (default) or ``"high"``: the paper's constant schedules (21 / 16 / 8 merges per
            block of CLIP-L/336's 24, i.e. 7/8, 2/3, 1/3 of the tokens) scaled to this encoder's tokens and blocks.
        targets: per-block merge targets ``r_l`` (one per block that runs); replaces `preset`.
        keep: the tokens an average calibration image should end with (`keep_targets`: targets that merge
            ``N - keep`` in total); replaces `preset`. Puts DyMU at a fixed-budget pruner's budget; on new images
            the count still varies per image, and its mean stays near `keep` only if they resemble these.
        batch_size: images per calibration batch (the threshold is found per batch).
        progress: show a progress bar (tqdm).
        **options: the family's options (e.g. none for LLaVA).

    Returns:
        `DyMUThresholds` (``.save(path)`` writes JSON; `vtprune.apply(model, "dymu", thresholds=...)` takes the
        object or the path).
    """
    _check_method(method)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    integration_cls = find_integration(model)
    reason = encoder_merging_refusal(integration_cls)
    if reason:
        raise UnsupportedModelError(
            f"{method} merges tokens inside the vision encoder, which vtprune does not support for "
            f"{type(model).__name__}: {reason}"
        )
    integration = integration_cls(model, DyMUCalibrator([]), **options)  # the merger is passed per run
    blocks, tokens = integration.merging_geometry()
    return calibrate_encoder(
        lambda batch, calibrator: integration.run_merging(integration.calibration_pixels(batch, processor), calibrator),
        _batches(images, batch_size),
        blocks,
        tokens,
        method,
        preset=preset,
        targets=targets,
        keep=keep,
        progress=progress,
        total=len(images) if hasattr(images, "__len__") else None,
        meta={"model": type(model).__name__, "batch_size": batch_size},
    )


def _check_method(method: str) -> None:
    if method not in CALIBRATED_METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; methods with calibration: {', '.join(CALIBRATED_METHODS)}")


def calibrate_encoder(
    run_batch: Callable[[Any, DyMUCalibrator], Any],
    batches: Iterable[Sequence[Any]],
    blocks: int,
    tokens: int,
    method: str = "dymu",
    *,
    preset: str | None = "mid",
    targets: Sequence[int] | None = None,
    keep: int | None = None,
    progress: bool = True,
    total: int | None = None,
    meta: dict | None = None,
) -> DyMUThresholds:
    """The model-agnostic core of `calibrate`, for vision encoders without an integration (e.g. a bare CLIP tower).

    Args:
        run_batch: ``run_batch(batch, calibrator)`` runs the encoder's `blocks` merging blocks on one batch with
            `calibrator` merging in them (e.g. via `vtprune.integrations.common.encoder_merging.run_merging_blocks`).
        batches: the calibration batches (each threshold is found per batch and averaged over them).
        blocks, tokens: merging blocks that run, and tokens per image before merging.
        method, preset, targets, keep, progress: as in `calibrate`.
        total: number of images, for the progress bar.
        meta: extra fields for the thresholds' metadata.
    """
    _check_method(method)
    if targets is not None and keep is not None:
        raise ConfigError("give targets= (merges per block) or keep= (tokens an average image keeps), not both")
    if targets is not None:
        targets = list(targets)
        preset_name = None
    elif keep is not None:
        targets = keep_targets(keep, tokens, blocks)
        preset_name = None
    else:
        if preset is None:
            raise ConfigError(f"give preset= ({', '.join(PRESETS)}) or targets=[one merge count per block]")
        targets = preset_targets(preset, tokens, blocks)
        preset_name = preset
    calibrator = DyMUCalibrator(targets)
    calibrator.begin(blocks)  # wrong-length targets fail before any image is read
    if sum(targets) >= tokens:
        raise ConfigError(f"targets merge {sum(targets)} tokens in total but an image has only {tokens}")

    from tqdm import tqdm

    seen = 0
    bar = tqdm(desc=f"calibrating {method}", unit="img", total=total, disable=not progress)
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(batch, calibrator)
                seen += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()
    if seen == 0:
        raise ConfigError("calibration got no images")
    meta = {
        **(meta or {}),
        "preset": preset_name,
        "targets": targets,
        "keep": keep,
        "tokens": tokens,
        "blocks": blocks,
        "images": seen,
    }
    return calibrator.thresholds(meta)
