"""HiPrune: anchors and their 2-D neighbours from a middle layer, registers from a deep layer."""

from __future__ import annotations

import math

import torch

from ..budget import Budget
from ..errors import ConfigError
from ..registry import register_pruner
from ..tokens import EncoderInfo, Reduction, VisualTokens
from .base import Pruner
from .fastervlm import check_layer

# Offsets (row, col) of the up / down / left / right neighbours.
_NEIGHBOUR_DR = (-1, 1, 0, 0)
_NEIGHBOUR_DC = (0, 0, -1, 1)


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even (round(4.5) == 4); budgets read more naturally rounding up.
    return int(math.floor(x + 0.5))


def default_object_layer(depth: int) -> int:
    """0-based object layer: the paper's layer 9 of 24 (1-based) scaled to an encoder of `depth` blocks."""
    return max(1, _round_half_up(9 * depth / 24)) - 1


def num_anchors(keep: int, alpha: float) -> int:
    """``round(keep * alpha / 5)``: each anchor brings up to 4 buffers, so anchors+buffers ~ alpha * keep."""
    return _round_half_up(keep * alpha / 5)


def grid_neighbours(index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster indices of the up/down/left/right neighbours of each token in `index`, inside the grid."""
    rows, cols = grid
    r = (index // cols)[:, None] + torch.tensor(_NEIGHBOUR_DR, device=index.device)
    c = (index % cols)[:, None] + torch.tensor(_NEIGHBOUR_DC, device=index.device)
    inside = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
    return (r * cols + c)[inside]


@register_pruner("hiprune")
class HiPrune(Pruner):
    """HiPrune, hierarchical attention pruning (arXiv 2508.00553).

    Algorithm (g^l = global attention of block l: mean over heads and query rows of the attention received):
        1. Anchors: ``n_a = round(keep * alpha / 5)`` tokens with the highest g at the object (middle) layer.
        2. Buffers: the up/down/left/right neighbours of each anchor in the patch grid, deduplicated.
        3. Registers: the remaining ``keep - |anchors U buffers|`` tokens by g at the deep layer, over tokens
           not yet chosen; output sorted to raster order (pure selection).

    Defaults: ``alpha=0.1``; ``object_layer=None`` = the encoder's `middle_layer` when the integration names one
    (Qwen: the paper's layer 16 of 32, scaled to the depth, a full-attention block), else layer 9 of 24 (1-based)
    scaled to the encoder depth as ``max(1, round(9 * depth / 24))`` (halves round up) and made 0-based (block 8
    on CLIP ViT-L);
    ``deep_layer=None`` = the feature layer (LLaVA: -2); ``keep=192`` (the paper's LLaVA-1.5 budgets are
    192/128/64). Explicit layers are Python-style 0-based block indices.

    Fixes relative to the official code: buffers are true 2-D neighbours (the official code takes idx +- 1,
    so a left-edge token's "left" buffer is the previous row's last token); chosen tokens are excluded from
    the register top-k with a mask rather than by subtracting 1 from their scores (which can re-pick them
    when scores exceed 1). When anchors and buffers exceed `keep` (only for large alpha), the anchors are
    kept first, then buffers by object-layer score, so the output always has exactly `keep` tokens.
    """

    default_budget = Budget(keep=192)

    def __init__(
        self,
        keep: int | None = None,
        ratio: float | None = None,
        alpha: float = 0.1,
        object_layer: int | None = None,
        deep_layer: int | None = None,
    ) -> None:
        super().__init__(keep=keep, ratio=ratio)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha (anchor+buffer share of the budget) must be a number in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.object_layer = check_layer(object_layer, "object_layer")
        self.deep_layer = check_layer(deep_layer, "deep_layer")

    def layers(self, encoder: EncoderInfo) -> tuple[int, int]:
        """Normalised (object, deep) block indices for `encoder`."""
        if self.object_layer is not None:
            obj = encoder.layer(self.object_layer)
        elif encoder.middle_layer is not None:  # e.g. Qwen2.5-VL: the paper's block 16 of 32, a full-attention block
            obj = encoder.middle_layer
        else:
            obj = default_object_layer(encoder.depth)
        deep = encoder.feature_layer if self.deep_layer is None else encoder.layer(self.deep_layer)
        return obj, deep

    def attention_layers(self, encoder: EncoderInfo) -> set[int]:
        return set(self.layers(encoder))

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        object_layer, deep_layer = self.layers(tokens.encoder)
        n = tokens.num_tokens
        device = tokens.features.device
        chosen = torch.zeros(n, dtype=torch.bool, device=device)

        n_anchors = num_anchors(keep, self.alpha)
        if n_anchors > 0:
            g_object = tokens.global_attention(object_layer).float().to(device)
            anchors = torch.topk(g_object, n_anchors).indices
            chosen[anchors] = True
            buffers = torch.zeros_like(chosen)
            buffers[grid_neighbours(anchors, tokens.grid)] = True
            buffers &= ~chosen
            room = keep - n_anchors
            if int(buffers.sum()) > room:
                best = torch.topk(g_object.masked_fill(~buffers, float("-inf")), room).indices
                buffers = torch.zeros_like(chosen)
                buffers[best] = True
            chosen |= buffers

        n_registers = keep - int(chosen.sum())
        if n_registers > 0:
            g_deep = tokens.global_attention(deep_layer).float().to(device)
            registers = torch.topk(g_deep.masked_fill(chosen, float("-inf")), n_registers).indices
            chosen[registers] = True
        return Reduction.select(torch.nonzero(chosen).squeeze(1))

    def hparams(self) -> dict:
        return {"alpha": self.alpha, "object_layer": self.object_layer, "deep_layer": self.deep_layer}
