"""Attention statistics of a tower's patches carried onto the tokens the LLM receives when the model pools or
shuffles patches into fewer tokens (Gemma 3's average pooling, InternVL's 2 x 2 pixel shuffle).

The per-patch statistics come from a patch-level `AttentionProbe`; `grid_pool` says how a token's patches
combine, and `PooledProbe` applies it to the CLS row, the received attention and the keys alike.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch


def grid_pool(side: tuple[int, int], kernel: int, reduce: Literal["mean", "sum"] = "mean") -> Callable[[torch.Tensor], torch.Tensor]:
    """``[rows * cols, C]`` per patch in raster order -> ``[rows/k * cols/k, C]`` per non-overlapping ``k x k``
    block of the patch grid, blocks in raster order: the mean (Gemma 3's `AvgPool2d`) or the sum of its patches."""
    rows, cols = side
    if rows % kernel or cols % kernel:
        raise ValueError(f"a {rows} x {cols} patch grid does not tile into {kernel} x {kernel} blocks")

    def pool(values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[1]
        grid = values.T.reshape(1, channels, rows, cols)
        pooled = torch.nn.functional.avg_pool2d(grid.float(), kernel)[0].flatten(1).T
        return (pooled * kernel * kernel if reduce == "sum" else pooled).to(values.dtype)

    return pool


class PooledProbe:
    """`AttentionProbe` over the pooled tokens of each image: the patch-level `probe`'s statistics, each
    combined by `pool` (``[N_patches, C] -> [N_tokens, C]``) over the patches a token is made of; the keys by
    `keys_pool` when given (a token's key is better the mean of its patches' keys even where scores add up)."""

    def __init__(self, probe, pool: Callable[[torch.Tensor], torch.Tensor], keys_pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.probe, self.pool = probe, pool
        self.keys_pool = keys_pool or pool

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        return self.pool(self.probe.cls_attention(layer, image).T).T

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        return self.pool(self.probe.global_attention(layer, image)[:, None])[:, 0]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        return self.keys_pool(self.probe.keys(layer, image))
