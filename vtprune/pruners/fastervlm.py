"""FasterVLM: keep the visual tokens the [CLS] token attends to most."""

from __future__ import annotations

from typing import Literal

import torch

from ..budget import Budget
from ..errors import ConfigError, MissingCLSError
from ..registry import register_pruner
from ..tokens import EncoderInfo, Reduction, VisualTokens
from .base import Pruner

ClsFallback = Literal["global", "error"]
CLS_FALLBACKS = ("global", "error")


def check_cls_fallback(value: str) -> str:
    """Validate a ``cls_fallback`` option (shared by the CLS-attention methods)."""
    if value not in CLS_FALLBACKS:
        raise ConfigError(f"cls_fallback must be one of {CLS_FALLBACKS}, got {value!r}")
    return value


def check_layer(value: int | None, what: str = "layer") -> int | None:
    """Validate an optional Python-style block index; its range is checked once the encoder is known."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{what} must be an int block index (e.g. -2) or None, got {value!r}")
    return value


def cls_scores(
    tokens: VisualTokens, layer: int, cls_fallback: str, heads: Literal["mean", "sum"], method: str
) -> torch.Tensor:
    """``[N]`` float32 importance of each visual token: CLS-row attention reduced over heads.

    On encoders without a CLS token (SigLIP, Qwen ViTs) the mean attention each token receives stands in for
    it, as the community ports of these methods do; ``cls_fallback="error"`` refuses instead.
    """
    if tokens.has_cls:
        attn = tokens.cls_attention(layer).float()
        return attn.mean(0) if heads == "mean" else attn.sum(0)
    if cls_fallback == "error":
        raise MissingCLSError(
            f"{method} scores tokens by CLS attention, but this vision encoder has no CLS token; pass "
            f"cls_fallback='global' to score them by global attention (mean attention received) instead"
        )
    return tokens.global_attention(layer).float()


@register_pruner("fastervlm")
class FasterVLM(Pruner):
    """FasterVLM, [CLS]-attention-guided pruning (Zhang et al., arXiv 2412.01818).

    Algorithm:
        1. Take the attention of the CLS query over the patch keys in encoder block `layer` ``[H, N]``.
        2. Score ``s_j = mean_h A_h[cls, j]``.
        3. Keep ``topk(s, keep)`` in raster order (pure selection).

    Defaults: ``layer=None``, the block whose output is the features (LLaVA: -2; the paper insists the
    attention come from the same layer as the features), ``ratio=0.25`` (the paper's 75% reduction,
    144 of 576 tokens on LLaVA-1.5).

    Official code: runs CLIP with ``output_attentions=True`` (every layer's full map, eager attention); we
    recompute only the CLS row of one block, which gives the same scores. Encoders without CLS fall back to
    global attention (``cls_fallback="global"``), following the community ports to SigLIP / Qwen.
    """

    default_budget = Budget(ratio=0.25)

    def __init__(
        self,
        keep: int | None = None,
        ratio: float | None = None,
        layer: int | None = None,
        cls_fallback: ClsFallback = "global",
    ) -> None:
        super().__init__(keep=keep, ratio=ratio)
        self.layer = check_layer(layer)
        self.cls_fallback = check_cls_fallback(cls_fallback)

    def _layer(self, encoder: EncoderInfo) -> int:
        return encoder.feature_layer if self.layer is None else encoder.layer(self.layer)

    def attention_layers(self, encoder: EncoderInfo) -> set[int]:
        return {self._layer(encoder)}

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        scores = cls_scores(tokens, self._layer(tokens.encoder), self.cls_fallback, "mean", "FasterVLM")
        return Reduction.select(torch.topk(scores, keep).indices)

    def hparams(self) -> dict:
        return {"layer": self.layer, "cls_fallback": self.cls_fallback}
