"""VisionZip: dominant tokens by CLS attention, the rest merged into a few contextual tokens."""

from __future__ import annotations

import math

import torch

from ..budget import Budget
from ..errors import BudgetError, ConfigError
from ..registry import register_pruner
from ..tokens import CLS_INDEX, EncoderInfo, Reduction, VisualTokens
from .base import Pruner
from .fastervlm import ClsFallback, check_cls_fallback, check_layer, cls_scores


def _check_count(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{what} must be a non-negative int number of tokens or None, got {value!r}")
    return value


def default_split(keep: int) -> tuple[int, int]:
    """The paper's dominant/contextual split, ``contextual = round(keep * 10 / 64)`` (64 -> 54 + 10)."""
    contextual = int(math.floor(keep * 10 / 64 + 0.5))
    return keep - contextual, contextual


@register_pruner("visionzip")
class VisionZip(Pruner):
    """VisionZip, dominant + contextual tokens (Yang et al., CVPR 2025, arXiv 2412.04467).

    Algorithm, at encoder block `layer` (features x, per-head CLS attention A, head-averaged keys k):
        1. Dominant: ``s_j = sum_h A_h[cls, j]``; the CLS token plus the top ``dominant - 1`` patches (raster
           order). Without a separate CLS feature, the top ``dominant`` patches.
        2. Contextual, over the R remaining tokens (raster order): L2-normalised keys; targets at positions
           0, step, 2*step, ... (``step = max(1, R // contextual)``, first `contextual`); every other remaining
           token joins its most cosine-similar target; ``c_t = x_t + mean(x of t's members)``.
        3. Output ``[CLS, dominant (raster), contextual (target order)]`` in vision space (before the projector).

    Defaults: ``dominant``/``contextual`` None split `keep` as ``contextual = round(keep * 10 / 64)`` (halves
    round up), giving the paper's 54+10 / 108+20 / 162+30 for 64 / 128 / 192; giving one derives the other
    from `keep`; giving both sets ``keep = dominant + contextual``. ``layer=None`` = the feature layer (LLaVA
    -2); ``keep=64``.

    Faithful to the official code: a contextual token is its target *plus* the mean of its members (not the
    mean of target and members), which roughly doubles its magnitude; a target without members gives
    ``c_t = x_t`` (the official code divides the member sum by ``max(count, 1)``). Encoders without CLS use
    global attention for the dominant scores (``cls_fallback="global"``), as the community SigLIP/Qwen ports do.
    """

    default_budget = Budget(keep=64)

    def __init__(
        self,
        keep: int | None = None,
        ratio: float | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        layer: int | None = None,
        cls_fallback: ClsFallback = "global",
    ) -> None:
        self.dominant = _check_count(dominant, "dominant")
        self.contextual = _check_count(contextual, "contextual")
        if keep is None and ratio is None and dominant is not None and contextual is not None:
            keep = dominant + contextual
        super().__init__(keep=keep, ratio=ratio)
        self.layer = check_layer(layer)
        self.cls_fallback = check_cls_fallback(cls_fallback)
        if self.budget.keep is not None:
            self.split(self.budget.keep)  # fail at construction rather than at the first image

    def split(self, keep: int) -> tuple[int, int]:
        """``(dominant, contextual)`` for a budget of `keep` output tokens."""
        dominant, contextual = self.dominant, self.contextual
        if dominant is None and contextual is None:
            return default_split(keep)
        if dominant is not None and contextual is not None:
            if dominant + contextual != keep:
                raise ConfigError(
                    f"VisionZip needs keep == dominant + contextual, got keep={keep}, dominant={dominant}, "
                    f"contextual={contextual}; give only one of dominant/contextual to derive the other from keep"
                )
            return dominant, contextual
        given, what = (dominant, "dominant") if dominant is not None else (contextual, "contextual")
        if given > keep:
            raise BudgetError(f"VisionZip {what}={given} exceeds the budget keep={keep}")
        return (given, keep - given) if what == "dominant" else (keep - given, given)

    def _layer(self, encoder: EncoderInfo) -> int:
        return encoder.feature_layer if self.layer is None else encoder.layer(self.layer)

    def attention_layers(self, encoder: EncoderInfo) -> set[int]:
        return {self._layer(encoder)}

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        dominant, contextual = self.split(keep)
        layer = self._layer(tokens.encoder)
        x = tokens.features
        n, device = tokens.num_tokens, x.device
        with_cls = tokens.cls_feature is not None and dominant > 0
        n_patches = dominant - int(with_cls)
        if n_patches > n:
            raise BudgetError(f"VisionZip dominant={dominant} needs {n_patches} patches but the image has {n} tokens")
        remaining = n - n_patches
        if contextual > remaining:
            raise BudgetError(
                f"VisionZip contextual={contextual} exceeds the {remaining} tokens left after dominant={dominant} "
                f"(image of {n} tokens); lower contextual or dominant"
            )

        is_dominant = torch.zeros(n, dtype=torch.bool, device=device)
        if n_patches > 0:
            scores = cls_scores(tokens, layer, self.cls_fallback, "sum", "VisionZip").to(device)
            is_dominant[torch.topk(scores, n_patches).indices] = True
        dominant_idx = torch.nonzero(is_dominant).squeeze(1)

        assignment = torch.full((n,), -1, dtype=torch.long, device=device)
        offset = int(with_cls)
        assignment[dominant_idx] = torch.arange(n_patches, device=device) + offset
        weights = torch.ones(n, dtype=torch.float32, device=device)  # dominant tokens and contextual targets: 1
        orders = [dominant_idx]
        feats = [x[dominant_idx]]
        if with_cls:
            orders.insert(0, torch.full((1,), CLS_INDEX, dtype=torch.long, device=device))
            feats.insert(0, tokens.cls_feature.reshape(1, -1).to(device=device, dtype=x.dtype))

        if contextual > 0:
            rest = torch.nonzero(~is_dominant).squeeze(1)
            metric = torch.nn.functional.normalize(tokens.keys(layer).to(device)[rest].float(), dim=-1)
            step = max(1, remaining // contextual)
            target_pos = torch.arange(contextual, device=device) * step
            is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
            is_target[target_pos] = True
            member_pos = torch.nonzero(~is_target).squeeze(1)
            member_slot = (metric[member_pos] @ metric[target_pos].T).argmax(dim=1)

            acc_dtype = torch.promote_types(x.dtype, torch.float32)
            x_rest = x[rest].to(acc_dtype)
            sums = torch.zeros(contextual, x.shape[1], dtype=acc_dtype, device=device)
            sums.index_add_(0, member_slot, x_rest[member_pos])
            counts = torch.bincount(member_slot, minlength=contextual).clamp(min=1)
            merged = x_rest[target_pos] + sums / counts[:, None].to(acc_dtype)

            first_slot = offset + n_patches
            assignment[rest[target_pos]] = first_slot + torch.arange(contextual, device=device)
            assignment[rest[member_pos]] = first_slot + member_slot
            weights[rest[member_pos]] = 1.0 / counts[member_slot].float()
            orders.append(rest[target_pos])
            feats.append(merged.to(x.dtype))

        return Reduction(order=torch.cat(orders), features=torch.cat(feats), space="vision", assignment=assignment, weights=weights)

    def hparams(self) -> dict:
        return {
            "dominant": self.dominant,
            "contextual": self.contextual,
            "layer": self.layer,
            "cls_fallback": self.cls_fallback,
        }
