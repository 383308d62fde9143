"""Virtual token unmerging (VTU) of DyMU (arXiv 2504.17040), as pure tensor operations. Model-agnostic.

The LLM receives the merged (shorter) sequence. Inside each attention layer, queries, keys and values computed
on the real tokens are *expanded* to the virtual full-length sequence (every original position gets a copy of
the token that holds it), rotated with the original positions, attended causally over the virtual sequence,
and the outputs are *scatter-averaged* back to the real tokens. Linear layers and the MLP run on the real
tokens only. `VirtualMap` holds, per batch row, which real column each virtual position reads from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class VirtualMap:
    """The virtual full-length sequence of one prefill.

    Attributes:
        index: ``[B, V]`` real column of each virtual position (0 where ``mask`` is 0).
        mask: ``[B, V]`` 1 for attended virtual positions (the original attention mask).
        positions: ``[B, V]`` position ids of the virtual sequence (what the unmerged model would use).
        real_length: L, the length of the real (merged) sequence.
    """

    index: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    real_length: int

    @property
    def is_identity(self) -> bool:
        """True when the virtual sequence is the real one (nothing merged): VTU then changes nothing."""
        batch, length = self.index.shape
        if length != self.real_length:
            return False
        identity = torch.arange(length, device=self.index.device).expand(batch, length)
        return bool(((self.index == identity) | (self.mask == 0)).all())

    def weights(self) -> torch.Tensor:
        """``[B, L]`` number of attended virtual positions each real column stands for."""
        counts = torch.zeros(self.index.shape[0], self.real_length, dtype=torch.float32, device=self.index.device)
        return counts.scatter_add_(1, self.index, self.mask.float())


def build_virtual_map(
    source: torch.Tensor,
    original_mask: torch.Tensor,
    original_positions: torch.Tensor,
    image_rows: Sequence[int],
    image_columns: Sequence[torch.Tensor],
    assignments: Sequence[torch.Tensor],
) -> VirtualMap:
    """The virtual sequence for a merged LLM input built by `vtprune.sequence.compress`.

    Args:
        source: ``[B, L]`` original column of each real column (-1 for new padding), `PrunedSequence.source`.
        original_mask / original_positions: ``[B, V]`` mask and position ids of the unmerged sequence.
        image_rows / image_columns: per image its batch row and the ``[N_i]`` original columns of its
            placeholders (`vtprune.sequence.ImageSlot`).
        assignments: per image ``[N_i]`` output slot of each original visual token; output slot k sits at
            placeholder column ``image_columns[k]`` of the real sequence.
    """
    batch, length = source.shape
    virtual = original_mask.shape[1]
    device = source.device
    real_of = torch.full((batch, virtual), -1, dtype=torch.long, device=device)  # original column -> real column
    rows, cols = (source >= 0).nonzero(as_tuple=True)
    real_of[rows, source[rows, cols]] = cols
    target = torch.arange(virtual, device=device).expand(batch, virtual).clone()
    for row, columns, assignment in zip(image_rows, image_columns, assignments):
        columns = columns.to(device)
        assignment = assignment.to(device)
        if bool((assignment < 0).any()):
            raise ValueError("virtual unmerging needs every visual token in a merge group (assignment -1 found)")
        target[row, columns] = columns[assignment]
    index = real_of.gather(1, target)
    mask = (original_mask.to(device) != 0) & (index >= 0)
    return VirtualMap(
        index=index.clamp(min=0).masked_fill(~mask, 0),
        mask=mask.long(),
        positions=original_positions.to(device).long(),
        real_length=length,
    )


def expand(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d]`` -> ``[B, H, V, d]``: each virtual position takes its real column's vector."""
    batch, heads, _, dim = states.shape
    gather = index[:, None, :, None].expand(batch, heads, index.shape[1], dim)
    return states.gather(2, gather)


def scatter_mean(values: torch.Tensor, vmap: VirtualMap) -> torch.Tensor:
    """``[B, V, D]`` -> ``[B, L, D]``: each real column gets the mean over its attended virtual positions (zeros
    for columns no attended virtual position maps to: padding)."""
    batch, _, dim = values.shape
    weight = vmap.mask.to(values.dtype)[..., None]
    total = values.new_zeros(batch, vmap.real_length, dim)
    total.scatter_add_(1, vmap.index[..., None].expand(-1, -1, dim), values * weight)
    counts = vmap.weights().to(values.dtype).clamp(min=1)[..., None]
    return total / counts


def virtual_attention_mask(key_mask: torch.Tensor, query_positions: torch.Tensor, query_offset: int) -> torch.Tensor:
    """``[B, 1, Q, K]`` boolean mask: causal over the virtual sequence and restricted to attended keys.

    Query q sits at virtual index ``query_offset + q``. A query with no attended key (padding) is allowed to
    see itself, so the softmax has no empty row; its output is never used.
    """
    batch, keys = key_mask.shape
    queries = query_positions.shape[1]
    device = key_mask.device
    key_index = torch.arange(keys, device=device)
    query_index = query_offset + torch.arange(queries, device=device)
    allowed = (key_index[None, :] <= query_index[:, None])[None] & key_mask.bool()[:, None, :]
    empty = ~allowed.any(dim=-1)  # [B, Q]
    if bool(empty.any()):
        own = key_index[None, None, :] == query_index[None, :, None]
        allowed = allowed | (empty[..., None] & own)
    return allowed[:, None]
