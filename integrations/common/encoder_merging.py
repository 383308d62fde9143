"""In-encoder token merging: run a ViT's blocks with an `EncoderMerger` (DyMU's DToMe), for any such method.

Per block that merges: the block's own attention runs on the current tokens with an additive float mask
(``log(size)`` per key for proportional attention, ``-inf`` on padding; SDPA takes it as ``attn_mask``), the
block's head-averaged keys are captured with a forward hook on the key projection (no second projection), the
residual is added, the merger merges, and the MLP runs on the merged tokens. Blocks before the first merge run
unchanged (their own forward), so a merger that never merges leaves the encoder bit-exact.

Block styles (the integration says which): `ClipStyleBlocks` for transformers' CLIP / SigLIP encoder layers
(``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2``, ``mlp``), and `TimmBlocks` for timm's
pre-norm ``Block`` with plain ``Attention``. Knows nothing about any particular merging method.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from vtprune.errors import UnsupportedModelError
from vtprune.merging.base import EncoderMerger
from vtprune.merging.dtome import MergeState, attention_bias, groups
from vtprune.tokens import ImageStats

ATTENTION_WITH_MASKS = ("sdpa", "eager")


@contextlib.contextmanager
def _capture_output(module: torch.nn.Module, enabled: bool) -> Iterator[dict]:
    captured: dict = {}
    if not enabled:
        yield captured
        return

    def hook(_module, _args, output):
        captured["out"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class ClipStyleBlocks:
    """transformers CLIP / SigLIP vision encoder layers."""

    def __init__(self, blocks, attn_implementation: str | None) -> None:
        if attn_implementation not in ATTENTION_WITH_MASKS:
            raise UnsupportedModelError(
                f"in-encoder merging needs the vision tower on {' or '.join(ATTENTION_WITH_MASKS)} attention "
                f"(proportional attention is an additive mask); it uses {attn_implementation!r}. Use "
                "model.set_attn_implementation({'vision_config': 'sdpa'})"
            )
        for i, block in enumerate(blocks):
            attn = getattr(block, "self_attn", None)
            if not all(hasattr(block, n) for n in ("layer_norm1", "layer_norm2", "mlp")) or attn is None or not hasattr(attn, "k_proj"):
                raise UnsupportedModelError(f"vision block {i} ({type(block).__name__}) is not a CLIP/SigLIP-style layer")
        self.blocks = blocks

    def original(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x, None)

    def attend(self, i: int, x: torch.Tensor, bias: torch.Tensor | None, want_keys: bool):
        block = self.blocks[i]
        attn = block.self_attn
        with _capture_output(attn.k_proj, want_keys) as captured:
            h, _ = attn(hidden_states=block.layer_norm1(x), attention_mask=bias)
        keys = None
        if want_keys:
            k = captured["out"]
            keys = k.view(*k.shape[:2], attn.num_heads, attn.head_dim).mean(dim=2)
        return x + h, keys

    def finish(self, i: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[i]
        return x + block.mlp(block.layer_norm2(x))


class TimmBlocks:
    """timm ViT pre-norm ``Block`` with plain ``Attention`` (keys from ``attn.qkv``, then ``k_norm``)."""

    def __init__(self, blocks) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if type(block).forward is not Block.forward or attn is None or type(attn).forward is not Attention.forward:
                raise UnsupportedModelError(
                    f"in-encoder merging supports timm's pre-norm Block with plain Attention; block {i} is "
                    f"{type(block).__name__} with {type(attn).__name__}"
                )
        self.blocks = blocks

    def original(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x)

    def attend(self, i: int, x: torch.Tensor, bias: torch.Tensor | None, want_keys: bool):
        block = self.blocks[i]
        attn = block.attn
        with _capture_output(attn.qkv, want_keys) as captured:
            h = attn(block.norm1(x), attn_mask=bias)
        keys = None
        if want_keys:
            qkv = captured["out"]
            k = qkv.reshape(*qkv.shape[:2], 3, attn.num_heads, attn.head_dim)[:, :, 1]  # [B, T, H, hd]
            keys = attn.k_norm(k.transpose(1, 2)).mean(dim=1)
        return x + block.drop_path1(block.ls1(h)), keys

    def finish(self, i: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[i]
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def run_merging_blocks(
    runner, x: torch.Tensor, merger: EncoderMerger, blocks: int, protected: int
) -> tuple[MergeState, list[torch.Tensor]]:
    """Run blocks ``0 .. blocks-1`` on ``x`` (``[B, S, D]``, the first block's input) with `merger`.

    Returns the final `MergeState` (its ``x`` is the output of the last block run) and the valid token count per
    image after each block (``[B]`` tensors, for statistics).
    """
    merger.begin(blocks)
    state = MergeState.initial(x, protected=protected)
    history = []
    for i in range(blocks):
        merging = merger.merges_at(i)
        if not state.merged and not merging:
            state = state.with_x(runner.original(i, state.x))
        else:
            hidden, keys = runner.attend(i, state.x, attention_bias(state, state.x.dtype), want_keys=merging)
            state = state.with_x(hidden)
            if merging:
                state = merger.timed_merge(i, state, keys)
            state = state.with_x(runner.finish(i, state.x))
        history.append(state.counts)
    return state, history


def merged_image_stats(state: MergeState, history: list[torch.Tensor], image: int, **extra) -> tuple[torch.Tensor, ImageStats]:
    """Row `image` of a merged batch: the state positions of its output tokens (merge groups in raster order of
    their first member, protected tokens excluded) and its `ImageStats` (``extra["tokens_per_block"]`` from
    `history`, the per-block counts `run_merging_blocks` returns)."""
    skip = state.protected
    count = int(state.valid[image].sum())
    positions, order, assignment = groups(state.where[image], count, skip=skip)
    stats = ImageStats(
        tokens_in=state.where.shape[1] - skip,
        tokens_out=int(order.numel()),
        kept=order.cpu(),
        order=order.cpu(),
        assignment=assignment.cpu(),
        extra={**extra, "tokens_per_block": [int(h[image]) - skip for h in history]},
    )
    return positions, stats
