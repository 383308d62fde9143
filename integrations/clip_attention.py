"""Exact, cheap attention statistics for CLIP- and SigLIP-style encoder blocks, recomputed from a block's input.

The encoder keeps running on SDPA / flash attention (which return no weights). For the one or two blocks a
pruner reads, the block input is captured and ``softmax(q k^T * scale)`` recomputed with the block's own
``layer_norm1``, ``q_proj`` and ``k_proj``: the CLS row costs O(N d); the column mean is accumulated over
query chunks, so no heads x N x N map is ever held for more than one chunk of one image.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 256


class ClipAttentionProbe:
    """`AttentionProbe` over a batch of images for blocks with ``layer_norm1`` and ``self_attn.{q,k}_proj``.

    Args:
        blocks: the encoder's blocks (``encoder.layers``).
        block_inputs: normalised block index -> ``[I, S, D]`` captured input hidden states.
        visual: slice of the encoder sequence holding the visual tokens (``1:`` when the CLS is dropped).
    """

    def __init__(self, blocks, block_inputs: dict[int, torch.Tensor], visual: slice) -> None:
        self.blocks = blocks
        self.block_inputs = block_inputs
        self.visual = visual
        self._qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cls: dict[int, torch.Tensor] = {}
        self._global: dict[tuple[int, int], torch.Tensor] = {}

    def _block_input(self, layer: int) -> torch.Tensor:
        if layer not in self.block_inputs:
            raise KeyError(
                f"encoder block {layer} was not captured; the pruner must list it in attention_layers() "
                f"(captured: {sorted(self.block_inputs)})"
            )
        return self.block_inputs[layer]

    def _queries_keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (pre-scaled) and keys, ``[I, H, S, hd]`` each, float32."""
        if layer not in self._qk:
            block = self.blocks[layer]
            attn = block.self_attn
            with torch.no_grad():
                x = block.layer_norm1(self._block_input(layer))
                images, length, _ = x.shape
                heads, head_dim = attn.num_heads, attn.head_dim
                q = attn.q_proj(x).view(images, length, heads, head_dim).transpose(1, 2).float() * attn.scale
                k = attn.k_proj(x).view(images, length, heads, head_dim).transpose(1, 2).float()
            self._qk[layer] = (q, k)
        return self._qk[layer]

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        if layer not in self._cls:
            q, k = self._queries_keys(layer)
            logits = torch.einsum("ihd,ihsd->ihs", q[:, :, 0], k)
            self._cls[layer] = logits.softmax(dim=-1)[:, :, self.visual]
        return self._cls[layer][image]

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        key = (layer, image)
        if key not in self._global:
            q, k = self._queries_keys(layer)
            q, k = q[image], k[image]  # [H, S, hd]
            heads, length, _ = q.shape
            received = torch.zeros(length, dtype=torch.float32, device=q.device)
            for start in range(0, length, QUERY_CHUNK):
                probs = (q[:, start : start + QUERY_CHUNK] @ k.transpose(1, 2)).softmax(dim=-1)
                received += probs.sum(dim=(0, 1))
            self._global[key] = (received / (heads * length))[self.visual]
        return self._global[key]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        _, k = self._queries_keys(layer)
        return k[image].mean(dim=0)[self.visual]
