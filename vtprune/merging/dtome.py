"""DToMe, the dynamic token merging of DyMU (arXiv 2504.17040), as pure tensor operations. Model-agnostic.

A `MergeState` is a batch of encoder sequences whose tokens may already have been merged: per image a run of
valid tokens at the front (padding after them), each with a size (how many original tokens it stands for) and
its original index; plus, for every original token, the position of the token it now lives in. Per block:

1. `bipartite_best`: the block's head-averaged keys are split alternately into A (even positions) and B (odd
   positions) over each image's valid tokens; each A token finds the B token of highest cosine similarity.
   Protected tokens (CLS, registers: the first `protected` positions) never merge and are never targets.
2. `merge_edges`: the chosen A tokens are merged into their B partners by size-weighted averaging; surviving
   tokens keep their relative order and are compacted to the front again, so images of one batch may end with
   different token counts (padding, never truncation).
3. `attention_bias`: later blocks add ``log(size)`` to the attention logits of every key (proportional
   attention) and ``-inf`` for padding, as one additive float mask that SDPA takes as ``attn_mask``.

Inference merges every edge above the block's threshold (`threshold_edges`); calibration merges the batch's
top ``B * r_l`` edges and records the similarity of the last one (`batch_threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

NEG_INF = float("-inf")


@dataclass
class MergeState:
    """A padded batch of (possibly merged) encoder tokens.

    Attributes:
        x: ``[B, T, D]`` hidden states; rows past an image's valid count are padding (zeros).
        size: ``[B, T]`` float32 number of original tokens each token stands for (1 for padding).
        valid: ``[B, T]`` bool, True for the first ``count[b]`` positions of row b.
        origin: ``[B, T]`` long, the original sequence index of each token (its own index before any merge;
            a merged token keeps the index of the B token it was merged into); -1 for padding.
        where: ``[B, N]`` long, for every original token the current position of the token holding it.
        protected: leading positions that never merge (CLS and other prefix tokens).
        merged: whether any merge happened yet (False: the batch is exactly the unmerged sequence).
    """

    x: torch.Tensor
    size: torch.Tensor
    valid: torch.Tensor
    origin: torch.Tensor
    where: torch.Tensor
    protected: int = 0
    merged: bool = False

    @classmethod
    def initial(cls, x: torch.Tensor, protected: int = 0) -> "MergeState":
        batch, length = x.shape[:2]
        index = torch.arange(length, device=x.device).expand(batch, length)
        return cls(
            x=x,
            size=torch.ones(batch, length, dtype=torch.float32, device=x.device),
            valid=torch.ones(batch, length, dtype=torch.bool, device=x.device),
            origin=index.clone(),
            where=index.clone(),
            protected=protected,
        )

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` valid tokens per image."""
        return self.valid.sum(dim=1)

    def with_x(self, x: torch.Tensor) -> "MergeState":
        return replace(self, x=x)


def attention_bias(state: MergeState, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, 1, 1, T]`` additive attention mask: ``log(size)`` on valid keys, ``-inf`` on padding.

    ``None`` while nothing has been merged, so the unmerged encoder runs exactly as unpatched. Padding query rows
    still see every valid key, so no row of the softmax is empty (no NaN).
    """
    if not state.merged:
        return None
    bias = torch.where(state.valid, state.size.clamp(min=1).log(), torch.full_like(state.size, NEG_INF))
    return bias.to(dtype)[:, None, None, :]


@dataclass
class Edges:
    """Each A token's best B partner: ``score[b, i]`` (cosine similarity, ``-inf`` when A token i cannot merge)
    and ``partner[b, i]`` (index into B). A token i sits at position ``2 i``; B token j at ``2 j + 1``."""

    score: torch.Tensor  # [B, Ta] float32
    partner: torch.Tensor  # [B, Ta] long


def bipartite_best(keys: torch.Tensor, state: MergeState) -> Edges:
    """Best B partner of every A token by cosine similarity of `keys` (``[B, T, d]``, head-averaged)."""
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    a, b = k[:, 0::2], k[:, 1::2]
    similarity = a @ b.transpose(1, 2)  # [B, Ta, Tb]
    valid_a, valid_b = state.valid[:, 0::2].clone(), state.valid[:, 1::2].clone()
    if state.protected:
        # Protected tokens (CLS, registers) neither merge away nor absorb patches.
        valid_a[:, : (state.protected + 1) // 2] = False
        valid_b[:, : state.protected // 2] = False
    similarity.masked_fill_(~valid_b[:, None, :], NEG_INF)
    if similarity.shape[2] == 0:
        empty = torch.full(similarity.shape[:2], NEG_INF, device=k.device)
        return Edges(score=empty, partner=torch.zeros_like(empty, dtype=torch.long))
    score, partner = similarity.max(dim=-1)
    return Edges(score=score.masked_fill(~valid_a, NEG_INF), partner=partner)


def threshold_edges(edges: Edges, threshold: float) -> torch.Tensor:
    """``[B, Ta]`` which A tokens merge at inference: similarity strictly above the layer's threshold."""
    return edges.score > threshold


def batch_threshold(edges: Edges, target: int) -> tuple[torch.Tensor, float]:
    """Calibration step of DyMU: merge the ``target`` most similar edges of the whole batch (``B * r_l``).

    Returns the ``[B, Ta]`` merge choice and the similarity of the ``target``-th edge (the batch's threshold).
    Ties at that similarity all merge. Raises `ValueError` when the batch has fewer mergeable edges than
    ``target`` (the per-layer target is too high for the tokens left).
    """
    flat = edges.score[torch.isfinite(edges.score)]
    if target <= 0:
        return torch.zeros_like(edges.score, dtype=torch.bool), float("inf")
    if target > flat.numel():
        raise ValueError(f"{target} merges requested but only {flat.numel()} tokens of the batch can still merge")
    value = float(flat.topk(target).values[-1])
    return edges.score >= value, value


def merge_edges(state: MergeState, edges: Edges, chosen: torch.Tensor) -> MergeState:
    """Merge every chosen A token into its B partner (size-weighted average) and compact the survivors.

    Survivors keep their relative order, so the protected prefix stays in front and the alternating A/B split of
    the next block runs over the compacted sequence.
    """
    if not bool(chosen.any()):
        return state
    x, size, valid = state.x, state.size, state.valid
    batch, length, width = x.shape
    device = x.device
    rows, a_index = chosen.nonzero(as_tuple=True)
    src = 2 * a_index
    dst = 2 * edges.partner[rows, a_index] + 1

    weighted = x.float() * size[..., None]
    total = size.clone()
    weighted.index_put_((rows, dst), weighted[rows, src], accumulate=True)
    total.index_put_((rows, dst), size[rows, src], accumulate=True)
    merged_x = weighted / total[..., None]

    survive = valid.clone()
    survive[rows, src] = False
    counts = survive.sum(dim=1)
    new_length = int(counts.max())
    new_position = survive.long().cumsum(dim=1) - 1  # valid for survivors
    remap = new_position.clone()
    remap[rows, src] = new_position[rows, dst]
    remap = remap.masked_fill(~valid, 0)

    keep_rows, keep_cols = survive.nonzero(as_tuple=True)
    dest = new_position[keep_rows, keep_cols]
    out_x = x.new_zeros(batch, new_length, width)
    out_x[keep_rows, dest] = merged_x[keep_rows, keep_cols].to(x.dtype)
    out_size = torch.ones(batch, new_length, dtype=torch.float32, device=device)
    out_size[keep_rows, dest] = total[keep_rows, keep_cols]
    out_valid = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
    out_valid[keep_rows, dest] = True
    out_origin = torch.full((batch, new_length), -1, dtype=torch.long, device=device)
    out_origin[keep_rows, dest] = state.origin[keep_rows, keep_cols]
    return MergeState(
        x=out_x,
        size=out_size,
        valid=out_valid,
        origin=out_origin,
        where=remap.gather(1, state.where),
        protected=state.protected,
        merged=True,
    )


def groups(where: torch.Tensor, count: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's merge groups in output order.

    Args:
        where: ``[N_seq]`` current position of each original token (from `MergeState.where`).
        count: valid tokens of the image.
        skip: leading (protected) positions that are not visual tokens of the output (e.g. 1 for CLIP's CLS).

    Returns:
        ``(positions, order, assignment)``: ``positions[k]`` the state position of output token k;
        ``order[k]`` its representative (the smallest original visual-token index of its group, so outputs are in
        raster order of their first member); ``assignment[j]`` the output slot of original visual token j.
    """
    visual = where[skip:] - skip  # positions among the visual tokens
    slots = count - skip
    first = torch.full((slots,), visual.numel(), dtype=torch.long, device=where.device)
    first = first.scatter_reduce(0, visual, torch.arange(visual.numel(), device=where.device), reduce="amin")
    order, permutation = torch.sort(first)
    rank = torch.empty_like(permutation)
    rank[permutation] = torch.arange(slots, device=where.device)
    return permutation + skip, order, rank[visual]
