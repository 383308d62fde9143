"""DyMU: dynamic token merging in the vision encoder and virtual token unmerging (arXiv 2504.17040, NeurIPS 2025).

DToMe (in the vision encoder, after the attention of every block): bipartite matching of head-averaged keys
(A = even, B = odd positions, CLS protected), every A-B edge whose cosine similarity exceeds that block's
threshold merges, by size-weighted averaging; sizes feed proportional attention (``+log(size)`` on the keys) in
later blocks. The token count therefore follows image complexity. The thresholds are found without training
(`vtprune.calibrate`): over batches of images, with a per-block target ``r_l``, the batch's ``B * r_l`` most
similar edges merge and the similarity of the last one is that batch's threshold; the block's threshold is the
average over batches.

VTU (in the LLM, ``vtu=True``): linear layers run on the merged tokens; attention sees the virtual full-length
sequence at the original positions. ``vtu=False`` feeds the merged tokens directly (shorter sequence and KV
cache; positions follow ``positions=``, default compact).

Differences from the official code (an open_clip fork, batch size 1, LLaVA only): batches of any size with
per-image token counts (padding and masks, never truncation); proportional attention as an additive SDPA mask;
the merge map is an index per original token (``ImageStats.assignment``) instead of a dense matrix; the LLM
receives merged tokens in raster order of their first member. Thresholds are per encoder block *that runs*
(LLaVA-1.5 with feature layer -2 runs 23 of CLIP-L's 24 blocks); a threshold of ``inf`` (``null`` in JSON)
disables merging in that block.

Presets (the paper's constant per-block schedules for CLIP ViT-L/14-336, 576 tokens, 24 blocks: r = 21 / 16 / 8
per block, 504 / 384 / 192 in total) are stored as the fraction of the tokens merged in total (low 7/8, mid 2/3,
high 1/3) and scaled to an encoder: ``r_l = round(fraction * N / blocks)`` for each running block, or, for
encoders too shallow for a constant schedule, a geometric one with the same total (`preset_targets`). Paper
results on LLaVA-1.5-7B: low 89+-27 tokens, mid 195+-47, high 394+-57.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..merging.base import EncoderMerger
from ..merging.dtome import MergeState, batch_threshold, bipartite_best, merge_edges, threshold_edges
from ..registry import register_pruner

PRESETS: dict[str, float] = {"low": 504 / 576, "mid": 384 / 576, "high": 192 / 576}
"""Fraction of an image's tokens merged away in total per preset (paper: r_total 504 / 384 / 192 of 576)."""


FEASIBLE_SHARE = 0.6
"""A block's target may use at most this share of the A tokens an average image still has: batch-level
thresholds let some images merge more than ``r_l``, and those must still find ``r_l`` edges later on."""


def preset_targets(preset: str, tokens: int, blocks: int) -> list[int]:
    """Per-block merge targets ``r_l`` of a preset, scaled to `tokens` visual tokens and `blocks` running blocks.

    The paper's constant schedule, ``r_l = round(fraction * tokens / blocks)`` (CLIP-L/336 with 23 running blocks:
    22 / 17 / 8), when every block can meet it with a margin (`FEASIBLE_SHARE`). Shallow encoders cannot: one
    bipartite step removes at most half of the tokens. They get a geometric schedule with the same total instead,
    each block merging the same share ``g`` of its tokens, ``(1 - g) ** blocks = 1 - fraction``.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown DyMU preset {preset!r}; choose one of {', '.join(PRESETS)} or pass targets=[...]")
    _check_blocks(blocks)
    fraction = PRESETS[preset]
    constant = [int(round(fraction * tokens / blocks))] * blocks
    return constant if _feasible(constant, tokens) else _geometric(fraction, tokens, blocks)


def keep_targets(keep: int, tokens: int, blocks: int) -> list[int]:
    """Per-block merge targets that merge exactly ``tokens - keep`` tokens, so that an average calibration image
    ends with `keep` tokens: DyMU at a fixed-budget pruner's budget, for side-by-side comparisons.

    As `preset_targets`: a constant schedule (the remainder spread over the first blocks) when every block can
    meet it with a margin, else a geometric one whose last block takes the rounding remainder.
    """
    _check_blocks(blocks)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= tokens:
        raise ConfigError(f"keep must be an integer in [1, {tokens}] (the encoder's {tokens} tokens per image), got {keep!r}")
    merged = tokens - keep
    base, extra = divmod(merged, blocks)
    constant = [base + (block < extra) for block in range(blocks)]
    if _feasible(constant, tokens):
        return constant
    targets = _geometric(merged / tokens, tokens, blocks)
    targets[-1] += merged - sum(targets)
    return targets


def _check_blocks(blocks: int) -> None:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"blocks must be a positive integer, got {blocks!r}")


def _feasible(targets: list[int], tokens: int) -> bool:
    remaining = tokens
    for r in targets:
        if r > FEASIBLE_SHARE * (remaining // 2):
            return False
        remaining -= r
    return True


def _geometric(fraction: float, tokens: int, blocks: int) -> list[int]:
    share = 1.0 - (1.0 - fraction) ** (1.0 / blocks)
    targets, remaining = [], tokens
    for _ in range(blocks):
        r = int(round(share * remaining))
        targets.append(r)
        remaining -= r
    return targets


@dataclass
class DyMUThresholds:
    """Per-block merge thresholds (cosine similarity); ``inf`` = no merging in that block.

    `meta` records how they were found (preset, targets, images, geometry). `save` / `load` use JSON, where
    ``inf`` is written as ``null``.
    """

    values: list[float]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cleaned = []
        for i, value in enumerate(self.values):
            value = math.inf if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"threshold {i} must be a number or None (no merging), got {value!r}")
            cleaned.append(float(value))
        self.values = cleaned

    def __len__(self) -> int:
        return len(self.values)

    def to_json(self) -> dict:
        return {
            "method": "dymu",
            "thresholds": [None if math.isinf(v) and v > 0 else v for v in self.values],
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DyMUThresholds":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"DyMU thresholds file {str(path)!r} does not exist; create one with "
                "vtprune.calibrate(model, 'dymu', images, processor=...).save(path) or the vtprune-calibrate command"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"DyMU thresholds file {str(path)!r} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("method") != "dymu" or not isinstance(data.get("thresholds"), list):
            raise ConfigError(
                f"{str(path)!r} is not a DyMU thresholds file (expected a JSON object with \"method\": \"dymu\" and a "
                "\"thresholds\" list)"
            )
        return cls(values=data["thresholds"], meta=dict(data.get("meta") or {}))

    @classmethod
    def coerce(cls, value: Any) -> "DyMUThresholds | float":
        """A thresholds object, a path to a JSON file, one number for every block, or a per-block sequence."""
        if isinstance(value, DyMUThresholds):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, bool):
            raise ConfigError(f"thresholds must be a DyMUThresholds, a JSON path, a number or a list; got {value!r}")
        if isinstance(value, (int, float)):
            if math.isnan(value):
                raise ConfigError("threshold must not be NaN")
            return float(value)
        if isinstance(value, (list, tuple)):
            return cls(values=list(value))
        raise ConfigError(
            f"thresholds must be a DyMUThresholds (from vtprune.calibrate), a path to its JSON file, one number for "
            f"every block, or a list with one number per block; got {type(value).__name__}"
        )


def resolve_thresholds(thresholds: "DyMUThresholds | float", blocks: int) -> list[float]:
    """Per-block thresholds for an encoder that runs `blocks` blocks; a clear error for the wrong length."""
    if isinstance(thresholds, float):
        return [thresholds] * blocks
    if len(thresholds) != blocks:
        where = thresholds.meta.get("model")
        raise ConfigError(
            f"DyMU thresholds have {len(thresholds)} values but this vision encoder runs {blocks} blocks (one "
            f"threshold per block that runs, e.g. 23 for LLaVA-1.5's CLIP-L with vision_feature_layer=-2)"
            + (f"; the thresholds were calibrated on {where}" if where else "")
            + "; calibrate for this model with vtprune.calibrate"
        )
    return list(thresholds.values)


@register_pruner("dymu")
class DyMU(EncoderMerger):
    """DyMU (arXiv 2504.17040): threshold merging inside the vision encoder, optional virtual unmerging.

    Args:
        thresholds: `DyMUThresholds` from `vtprune.calibrate`, a path to their JSON file, one number for every
            block, or a list with one number per running block (``inf`` / None: no merging). Required.
        vtu: virtual token unmerging in the LLM attention (default False: merged tokens go to the LLM directly).
        keep, ratio: not applicable (DyMU's token count follows each image); must stay None.
    """

    def __init__(self, thresholds: Any = None, vtu: bool = False, keep: int | None = None, ratio: float | None = None) -> None:
        super().__init__()
        if keep is not None or ratio is not None:
            raise ConfigError(
                "dymu has no fixed budget (keep/ratio): the token count of each image follows its thresholds; "
                "choose them with vtprune.calibrate(model, 'dymu', images, preset='low'|'mid'|'high'), or with keep=K "
                "for thresholds that keep K tokens on an average calibration image"
            )
        if thresholds is None:
            raise ConfigError(
                "dymu needs thresholds=<DyMUThresholds | path to a thresholds JSON | number | per-block list>; "
                "get them with vtprune.calibrate(model, 'dymu', images, processor=..., preset='mid')"
            )
        if not isinstance(vtu, bool):
            raise ConfigError(f"vtu must be True or False, got {vtu!r}")
        self.thresholds = DyMUThresholds.coerce(thresholds)
        self.virtual_unmerging = vtu
        self._plan: list[float] = []

    def begin(self, blocks: int) -> None:
        super().begin(blocks)
        self._plan = resolve_thresholds(self.thresholds, blocks)

    def merges_at(self, layer: int) -> bool:
        return not math.isinf(self._plan[layer]) or self._plan[layer] < 0

    def merge(self, layer: int, state: MergeState, keys: torch.Tensor) -> MergeState:
        edges = bipartite_best(keys, state)
        return merge_edges(state, edges, threshold_edges(edges, self._plan[layer]))

    def hparams(self) -> dict:
        if isinstance(self.thresholds, float):
            return {"thresholds": self.thresholds, "vtu": self.virtual_unmerging}
        return {"thresholds": f"{len(self.thresholds)} blocks", "vtu": self.virtual_unmerging}

    def __repr__(self) -> str:
        return f"DyMU({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"


class DyMUCalibrator(EncoderMerger):
    """Calibration mode of DyMU: per block, merge the batch's ``B * r_l`` most similar edges and record the
    similarity of the last one; `thresholds` averages those over the batches seen (blocks with ``r_l = 0``
    get ``inf``)."""

    def __init__(self, targets: Sequence[int]) -> None:
        super().__init__()
        for i, r in enumerate(targets):
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise ConfigError(f"DyMU target of block {i} must be a non-negative integer, got {r!r}")
        self.targets = list(targets)
        self.sums = [0.0] * len(self.targets)
        self.batches = [0] * len(self.targets)

    def begin(self, blocks: int) -> None:
        super().begin(blocks)
        if len(self.targets) != blocks:
            raise ConfigError(
                f"DyMU calibration got {len(self.targets)} per-block targets but this vision encoder runs {blocks} "
                "blocks; pass one target per block that runs"
            )

    def merges_at(self, layer: int) -> bool:
        return self.targets[layer] > 0

    def merge(self, layer: int, state: MergeState, keys: torch.Tensor) -> MergeState:
        edges = bipartite_best(keys, state)
        try:
            chosen, value = batch_threshold(edges, self.targets[layer] * state.x.shape[0])
        except ValueError as error:
            raise ConfigError(
                f"DyMU calibration, block {layer}: target r={self.targets[layer]} per image is too high: {error}. "
                "Lower the targets of the later blocks (or use a milder preset)"
            ) from None
        self.sums[layer] += value
        self.batches[layer] += 1
        return merge_edges(state, edges, chosen)

    def thresholds(self, meta: dict | None = None) -> DyMUThresholds:
        values = [s / n if n else math.inf for s, n in zip(self.sums, self.batches)]
        return DyMUThresholds(values=values, meta=dict(meta or {}))
