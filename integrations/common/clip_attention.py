"""Exact attention statistics for CLIP- and SigLIP-style encoder blocks, from what a block computed.

For the blocks a pruner reads, the outputs of the block's own ``q_proj`` and ``k_proj`` are captured as the
tower computes them (or recomputed from a captured block input with ``layer_norm1``, ``q_proj`` and ``k_proj``);
`vtprune.attention.QKAttentionProbe` turns them into the CLS row, the attention each token receives, and
head-averaged keys, without holding attention maps.
"""

from __future__ import annotations

import torch

from vtprune.attention import QKAttentionProbe, captured


class ClipAttentionProbe(QKAttentionProbe):
    """`AttentionProbe` over a batch of images for blocks with ``layer_norm1`` and ``self_attn.{q,k}_proj``.

    Args:
        blocks: the encoder's blocks (``encoder.layers``).
        block_inputs: normalised block index -> ``[I, S, D]`` captured input hidden states.
        visual: slice of the encoder sequence holding the visual tokens (``1:`` when the CLS is dropped).
        projections: normalised block index -> ``(q_proj output, k_proj output)`` as the tower computed them
            (captured); a block without them has its queries and keys recomputed from its captured input.
    """

    def __init__(
        self, blocks, block_inputs: dict[int, torch.Tensor], visual: slice,
        projections: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__(visual)
        self.blocks = blocks
        self.block_inputs = block_inputs
        self.projections = projections or {}

    def _compute_qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[layer]
        attn = block.self_attn
        if layer in self.projections:
            queries, keys = self.projections[layer]
        else:
            x = block.layer_norm1(captured(self.block_inputs, layer))
            queries, keys = attn.q_proj(x), attn.k_proj(x)
        images, length, _ = queries.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q = queries.view(images, length, heads, head_dim).transpose(1, 2).float() * attn.scale
        k = keys.view(images, length, heads, head_dim).transpose(1, 2).float()
        return q, k
