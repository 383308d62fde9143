"""The contract between integrations and pruners.

An integration (which knows a model family) hands each pruner one `VisualTokens` per image: the features that
feed the projector, the patch grid, lazily projected LLM-space embeddings, and lazily *recomputed* attention
statistics of the encoder layers the pruner asked for. A pruner (which knows nothing about model classes)
answers with a `Reduction`: which tokens survive, in which order, and, for merging methods, the merged features.

Layer indices are Python-style indices into the encoder's blocks (``-2`` is the second-to-last block); the
"attention of layer l" is the softmax attention computed inside block ``l``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Protocol

import torch

from .errors import ConfigError, MissingCLSError

FeatureSpace = Literal["vision", "llm"]


@dataclass(frozen=True)
class EncoderInfo:
    """What a pruner may know about the vision encoder before it runs."""

    depth: int
    """Number of transformer blocks."""
    feature_layer: int
    """Normalised (non-negative) index of the block whose output feeds the projector."""
    has_cls: bool
    """Whether the encoder has a CLS token (CLIP yes; SigLIP and the Qwen ViTs no)."""
    middle_layer: int | None = None
    """A mid-depth block with full attention the family's papers score at (HiPrune's object layer: block 15 of
    Qwen2.5-VL's 32); None when any block qualifies (methods then scale their paper layer to the depth)."""

    def layer(self, index: int) -> int:
        """Normalise a Python-style block index (``-2`` -> ``depth - 2``), with a clear error when out of range."""
        return normalize_layer(index, self.depth)


def normalize_layer(index: int, depth: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError(f"layer index must be an int, got {index!r}")
    if not -depth <= index < depth:
        raise ConfigError(f"layer {index} is out of range for an encoder with {depth} blocks (valid: {-depth}..{depth - 1})")
    return index % depth


class AttentionProbe(Protocol):
    """Recomputes attention statistics of single encoder layers for the images of one batch.

    Implemented by integrations from captured layer inputs, so that the encoder itself keeps running on SDPA /
    flash attention and no full attention map is kept.
    """

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        """Per-head attention of the CLS query over the image's visual tokens, shape ``[heads, N]``.

        Softmax is taken over all keys of the encoder sequence (CLS included), then the visual tokens' columns
        are returned, as ``A[:, 0, 1:]`` in the official LLaVA ports.
        """

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        """Mean attention each visual token receives, averaged over heads and all query rows, shape ``[N]``."""

    def keys(self, layer: int, image: int) -> torch.Tensor:
        """The layer's keys averaged over heads, for the image's visual tokens, shape ``[N, head_dim]``."""


class VisualTokens:
    """One image's visual tokens as a pruner sees them.

    Args:
        features: ``[N, D]`` features in vision space (what the projector consumes), raster order.
        grid: ``(rows, cols)`` of the patch grid, ``rows * cols == N``.
        encoder: facts about the encoder (depth, feature layer, CLS).
        probe: source of recomputed attention statistics; ``None`` when the encoder offers none.
        image: index of this image within the probe's batch.
        cls_feature: ``[D]`` the CLS token's feature at the feature layer, if the encoder has one and it is not
            already among the visual tokens.
        embeddings: ``[N, D_llm]`` projected embeddings, or a zero-argument callable computing them on demand.
    """

    def __init__(
        self,
        features: torch.Tensor,
        grid: tuple[int, int],
        encoder: EncoderInfo,
        probe: AttentionProbe | None = None,
        image: int = 0,
        cls_feature: torch.Tensor | None = None,
        embeddings: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
        if grid[0] * grid[1] != features.shape[0]:
            raise ValueError(f"grid {grid} does not match {features.shape[0]} tokens")
        self.features = features
        self.grid = (int(grid[0]), int(grid[1]))
        self.encoder = encoder
        self.probe = probe
        self.image = image
        self.cls_feature = cls_feature
        self._embeddings = embeddings

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def has_cls(self) -> bool:
        return self.encoder.has_cls

    @property
    def embeddings(self) -> torch.Tensor:
        """Projected (LLM-space) embeddings of all N tokens."""
        if self._embeddings is None:
            raise RuntimeError("this integration provides no projected embeddings")
        if callable(self._embeddings):
            self._embeddings = self._embeddings()
        return self._embeddings

    def _require_probe(self) -> AttentionProbe:
        if self.probe is None:
            raise RuntimeError("this integration provides no attention statistics")
        return self.probe

    def cls_attention(self, layer: int) -> torch.Tensor:
        """``[heads, N]`` CLS-row attention of block `layer`; raises `MissingCLSError` on encoders without CLS."""
        if not self.encoder.has_cls:
            raise MissingCLSError("this vision encoder has no CLS token, so CLS attention is undefined")
        return self._require_probe().cls_attention(self.encoder.layer(layer), self.image)

    def global_attention(self, layer: int) -> torch.Tensor:
        """``[N]`` mean attention received per token (over heads and all queries) in block `layer`."""
        return self._require_probe().global_attention(self.encoder.layer(layer), self.image)

    def keys(self, layer: int) -> torch.Tensor:
        """``[N, head_dim]`` head-averaged keys of block `layer`."""
        return self._require_probe().keys(self.encoder.layer(layer), self.image)


class TensorProbe:
    """An `AttentionProbe` serving precomputed tensors: for unit tests and for users testing their own pruners.

    Each mapping goes from a normalised layer index to a tensor with a leading image dimension.
    """

    def __init__(
        self,
        cls_attention: Mapping[int, torch.Tensor] | None = None,
        global_attention: Mapping[int, torch.Tensor] | None = None,
        keys: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self._cls = dict(cls_attention or {})
        self._global = dict(global_attention or {})
        self._keys = dict(keys or {})

    @staticmethod
    def _get(table: dict, what: str, layer: int, image: int) -> torch.Tensor:
        if layer not in table:
            raise KeyError(f"no {what} for layer {layer}; available: {sorted(table)}")
        return table[layer][image]

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        return self._get(self._cls, "CLS attention", layer, image)

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        return self._get(self._global, "global attention", layer, image)

    def keys(self, layer: int, image: int) -> torch.Tensor:
        return self._get(self._keys, "keys", layer, image)


CLS_INDEX = -1
"""Value used in `Reduction.order` for the encoder's CLS token (not one of the N visual tokens)."""


@dataclass
class Reduction:
    """A pruner's answer for one image.

    Attributes:
        order: ``[K]`` for each output token, the original visual-token index that represents it (its position
            in preserve mode), in the order the LLM will see them; ``CLS_INDEX`` (-1) for the CLS token.
        features: ``[K, D]`` output features when the pruner merges tokens, in `space`; ``None`` means the
            integration gathers the original tokens listed in `order` (pure selection).
        space: ``"vision"`` (before the projector) or ``"llm"`` (after it) for `features`.
        assignment: ``[N]`` output slot each original token contributes to, ``-1`` when dropped; ``None`` for
            pure selection (derived from `order`).
        weights: ``[N]`` for a merge, the weight of each original token in the output it is assigned to, so that
            output ``j`` is ``sum(weights[i] * x[i] for i assigned to j)`` (a mean: ``1 / group size``); what lets
            `carry` reduce other per-token values the same way. ``None`` for pure selection.
    """

    order: torch.Tensor
    features: torch.Tensor | None = None
    space: FeatureSpace = "vision"
    assignment: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @classmethod
    def select(cls, indices: torch.Tensor) -> "Reduction":
        """Keep exactly these tokens, in raster order."""
        return cls(order=torch.sort(indices.reshape(-1).long()).values)

    @property
    def num_out(self) -> int:
        return int(self.order.numel())

    @property
    def kept(self) -> torch.Tensor:
        """Sorted indices of the surviving (representative) visual tokens; excludes the CLS token."""
        reps = self.order[self.order >= 0]
        return torch.unique(reps)

    def carry(self, values: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` per-token values that travel with the visual tokens (e.g. Qwen3-VL's DeepStack features)
        -> ``[K, D]`` reduced exactly as the tokens were: gathered at `order` for a selection; for a merge, each
        output's `weights`-weighted sum of the tokens assigned to it."""
        if bool((self.order < 0).any()):
            raise ValueError("the CLS token has no per-token values to carry")
        if self.features is None:
            return values[self.order.to(values.device)]
        if self.assignment is None or self.weights is None:
            raise ValueError(
                "this merge does not say how it combined the tokens (Reduction.weights), so values that travel "
                "with the tokens cannot be reduced alike; use a selection pruner or give the merge weights"
            )
        assignment, weights = self.assignment.to(values.device), self.weights.to(values.device)
        member = assignment >= 0
        acc_dtype = torch.promote_types(values.dtype, torch.float32)
        out = torch.zeros(self.num_out, values.shape[1], dtype=acc_dtype, device=values.device)
        out.index_add_(0, assignment[member], values[member].to(acc_dtype) * weights[member, None].to(acc_dtype))
        return out.to(values.dtype)

    def full_assignment(self, num_tokens: int) -> torch.Tensor:
        if self.assignment is not None:
            return self.assignment
        assignment = torch.full((num_tokens,), -1, dtype=torch.long, device=self.order.device)
        valid = self.order >= 0
        slots = torch.arange(self.num_out, device=self.order.device)
        assignment[self.order[valid]] = slots[valid]
        return assignment


@dataclass
class ImageStats:
    """What happened to one image in the last forward.

    ``kept`` holds the sorted indices of the surviving tokens (for merging methods: the representatives);
    ``order`` the representative of each output token in LLM order (-1 = CLS); ``assignment`` the output slot
    each of the ``tokens_in`` original tokens went to (-1 = dropped), i.e. the merge groups.
    """

    tokens_in: int
    tokens_out: int
    kept: torch.Tensor
    order: torch.Tensor
    assignment: torch.Tensor
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_reduction(cls, reduction: Reduction, tokens_in: int, **extra) -> "ImageStats":
        return cls(
            tokens_in=tokens_in,
            tokens_out=reduction.num_out,
            kept=reduction.kept.cpu(),
            order=reduction.order.cpu(),
            assignment=reduction.full_assignment(tokens_in).cpu(),
            extra=dict(extra),
        )

    @classmethod
    def join(cls, parts: list["ImageStats"], offsets: list[int]) -> "ImageStats":
        """One `ImageStats` for token ranges reduced separately (e.g. the temporal groups of a video): part ``i``
        covers the tokens from ``offsets[i]``; its output tokens follow those of the parts before it."""
        if len(parts) == 1 and offsets == [0]:
            return cls(parts[0].tokens_in, parts[0].tokens_out, parts[0].kept, parts[0].order, parts[0].assignment, dict(parts[0].extra))
        orders, assignments, slots = [], [], 0
        for part, offset in zip(parts, offsets):
            orders.append(torch.where(part.order >= 0, part.order + offset, part.order))
            assignments.append(torch.where(part.assignment >= 0, part.assignment + slots, part.assignment))
            slots += part.tokens_out
        order = torch.cat(orders)
        return cls(
            tokens_in=sum(part.tokens_in for part in parts),
            tokens_out=slots,
            kept=torch.unique(order[order >= 0]),
            order=order,
            assignment=torch.cat(assignments),
            extra={},
        )
