"""Attention statistics from queries and keys, without holding attention maps. Model-agnostic.

Integrations capture the input of the one or two encoder blocks a pruner reads and recompute that block's
queries and keys (the encoder itself keeps running on SDPA / flash attention, which return no weights). From
those, the CLS row costs O(N d) and the attention each token receives is accumulated over query chunks, so no
heads x N x N map is held for more than one chunk of one image.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 64  # measured: halves the selection peak of global attention vs 256 and is faster on CPU


def received_attention(queries: torch.Tensor, keys: torch.Tensor, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """``[n]`` sum over heads and query rows of ``softmax(q k^T)``, for ``[H, n, hd]`` pre-scaled queries and keys."""
    received = torch.zeros(keys.shape[1], dtype=torch.float32, device=keys.device)
    for start in range(0, queries.shape[1], chunk):
        received += (queries[:, start : start + chunk] @ keys.transpose(1, 2)).softmax(dim=-1).sum(dim=(0, 1))
    return received


class QKAttentionProbe:
    """`AttentionProbe` for encoders whose images share one dense ``[I, S, D]`` batch.

    Subclasses implement `_compute_qk`; this class turns queries and keys into the statistics pruners read,
    cached per layer. `visual` selects the visual tokens in the encoder sequence (e.g. ``1:`` past the CLS).
    """

    def __init__(self, visual: slice) -> None:
        self.visual = visual
        self._qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cls: dict[int, torch.Tensor] = {}
        self._global: dict[tuple[int, int], torch.Tensor] = {}

    def _compute_qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-scaled queries and keys of block `layer` for every image, ``[I, H, S, hd]`` each, float32."""
        raise NotImplementedError

    def _queries_keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._qk:
            with torch.no_grad():
                self._qk[layer] = self._compute_qk(layer)
        return self._qk[layer]

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        if layer not in self._cls:
            q, k = self._queries_keys(layer)
            logits = q[:, :, :1] @ k.transpose(-2, -1)  # [I, H, 1, S]: the CLS row only
            self._cls[layer] = logits.softmax(dim=-1)[:, :, 0, self.visual]
        return self._cls[layer][image]

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        key = (layer, image)
        if key not in self._global:
            q, k = self._queries_keys(layer)
            heads, length = q.shape[1], q.shape[2]
            self._global[key] = (received_attention(q[image], k[image]) / (heads * length))[self.visual]
        return self._global[key]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        _, k = self._queries_keys(layer)
        return k[image].mean(dim=0)[self.visual]


def captured(block_inputs: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
    if layer not in block_inputs:
        raise KeyError(
            f"encoder block {layer} was not captured; the pruner must list it in attention_layers() "
            f"(captured: {sorted(block_inputs)})"
        )
    return block_inputs[layer]
