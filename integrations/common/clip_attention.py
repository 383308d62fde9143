"""Exact attention statistics for CLIP- and SigLIP-style encoder blocks, recomputed from a block's input.

For the blocks a pruner reads, the block input is captured and ``q k^T * scale`` recomputed with the block's
own ``layer_norm1``, ``q_proj`` and ``k_proj``; `vtprune.attention.QKAttentionProbe` turns that into the CLS
row, the attention each token receives, and head-averaged keys, without holding attention maps.
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
    """

    def __init__(self, blocks, block_inputs: dict[int, torch.Tensor], visual: slice) -> None:
        super().__init__(visual)
        self.blocks = blocks
        self.block_inputs = block_inputs

    def _compute_qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[layer]
        attn = block.self_attn
        x = block.layer_norm1(captured(self.block_inputs, layer))
        images, length, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(images, length, heads, head_dim).transpose(1, 2).float() * attn.scale
        k = attn.k_proj(x).view(images, length, heads, head_dim).transpose(1, 2).float()
        return q, k
