"""timm Vision Transformers (`timm.models.vision_transformer.VisionTransformer` and subclasses such as DeiT).

Hook point: after encoder block `after_block` (option of `vtprune.apply`, Python-style index, default ``-2``).
The patch tokens leaving that block are reduced per image by the pruner; the prefix tokens (CLS, distillation
and register tokens) are always kept in front. The remaining blocks, the final norm and the unchanged
`forward_head` run on ``[B, prefix + K, D]`` (the ToMe-style instance patch), so ``model(x)`` still returns
``[B, num_classes]`` and ``model.forward_features(x)`` returns the pruned token sequence.

What the pruner sees, per image:
- ``features`` = ``embeddings``: the ``[N, D]`` patch tokens output by block `after_block` (there is no
  projector, so vision and "LLM" space coincide and the projector is the identity);
- ``grid``: the patch grid; ``encoder.feature_layer`` = `after_block`, so the pruners' default scoring layer
  ("the feature layer", -2 for FasterVLM / VisionZip / HiPrune's deep layer) is the block after which the
  tokens are pruned, as in the papers' LLaVA setting;
- ``cls_feature``: ``None``. The CLS token is a kept prefix token here, not one of the K outputs, so every
  pruner spends all K slots on patch tokens (VisionZip: ``dominant`` patches plus ``contextual`` merged tokens,
  no CLS slot) and the output is always ``prefix + K`` tokens;
- attention statistics (`TimmAttentionProbe`): recomputed from the captured inputs of the blocks the pruner
  lists in `attention_layers`, which must all be ``<= after_block``. The encoder keeps running on timm's own
  (fused / SDPA) attention.

Output token order: the prefix tokens, then the pruner's `Reduction.order` (raster order for selections;
VisionZip: dominant then contextual). The blocks after the hook have no positional input, so only merged or
permuted tokens change results; keeping every token with a selecting pruner is bit-exact.

Limitations while patched (each raises a clear error rather than returning unpruned or wrong results):
`forward_intermediates` / `get_intermediate_layers` (they bypass `forward_features`), `attn_mask` /
`is_causal` arguments, and token dropping that changes the grid (`PatchDropout` in training mode). Models
overriding `forward_features` are refused at apply time. The patched `forward_features` calls the blocks one
by one: hooks on individual blocks fire as usual, hooks on the ``model.blocks`` container do not. Gradient
checkpointing (``set_grad_checkpointing``) is honoured per block; gradients flow through the kept and merged
tokens (the selection itself is not differentiable).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch

from vtprune.attention import QKAttentionProbe, captured
from vtprune.errors import ConfigError, UnsupportedModelError
from vtprune.integration import EncoderMerging, Integration, reduce_images
from vtprune.merging.dtome import MergeState
from vtprune.tokens import EncoderInfo, normalize_layer

from .common.encoder_merging import TimmBlocks, merged_image_stats, run_merging_blocks


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def _attention_input(block: torch.nn.Module):
    """The function mapping a block's input to its attention module's input, or None if unknown.

    Pre-norm `Block`: ``norm1(x)``; post-norm `ResPostBlock`: ``x``. Only blocks whose `forward` is timm's own
    and whose attention is timm's plain `Attention` are accepted, so the recomputation is exact.
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, ResPostBlock

    attn = getattr(block, "attn", None)
    if attn is None or type(attn).forward is not Attention.forward:
        return None
    forward = type(block).forward
    if forward is Block.forward:
        return block.norm1
    if forward is ResPostBlock.forward:
        return lambda x: x
    return None


def _empty_with_layout_of(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of `shape` whose dimensions are laid out in memory in the same order as `x`'s.

    timm ViTs without prefix tokens carry the patch embedding's transposed layout (``[B, N, D]`` with strides
    ``(N*D, 1, N)``) through every block; the rebuilt sequence keeps it, so the blocks after the hook run the
    same kernels as unpatched (keeping every token stays bit-exact).
    """
    dims = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    empty = x.new_empty([shape[d] for d in dims])
    return empty.permute([dims.index(d) for d in range(x.ndim)])


class TimmAttentionProbe(QKAttentionProbe):
    """`AttentionProbe` for timm ViT blocks, from captured block inputs (no attention map is ever stored).

    Recomputes timm's eager attention of block ``l``: ``qkv(norm1(x))`` split into heads, ``q_norm`` /
    ``k_norm``, ``softmax((q * scale) @ k^T)``; in float32 (for a float32 model the same operations as timm's
    non-fused path). The softmax runs over every key of the sequence (prefix tokens included), then the
    columns of the patch tokens are returned. The CLS row costs O(S d) per head; the column mean (global
    attention, mean over heads and all S query rows) is accumulated over query chunks of one image.

    Args:
        blocks: the model's ``blocks``.
        block_inputs: normalised block index -> ``[B, S, D]`` input of that block.
        num_prefix_tokens: leading prefix tokens (CLS first, then registers); the rest are patch tokens.
    """

    def __init__(self, blocks, block_inputs: dict[int, torch.Tensor], num_prefix_tokens: int) -> None:
        super().__init__(visual=slice(num_prefix_tokens, None))
        self.blocks = blocks
        self.block_inputs = block_inputs

    def _compute_qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[layer]
        attn = block.attn
        pre = _attention_input(block)
        if pre is None:
            raise UnsupportedModelError(f"cannot recompute the attention of {type(block).__name__} block {layer}")
        x = pre(captured(self.block_inputs, layer))
        images, length, _ = x.shape
        qkv = attn.qkv(x).reshape(images, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        return attn.q_norm(q).float() * attn.scale, attn.k_norm(k).float()


class TimmViTIntegration(Integration, EncoderMerging):
    """Prunes the patch tokens of a timm `VisionTransformer` after block ``after_block`` (see module docstring)."""

    model_classes = ("timm VisionTransformer",)
    default_positions = None
    options: ClassVar[dict[str, Any]] = {"after_block": -2}

    @classmethod
    def matches(cls, model: Any) -> bool:
        try:
            return isinstance(model, _vit_class())
        except ImportError:  # timm not installed
            return False

    # ------------------------------------------------------------------ model facts
    @property
    def _blocks(self):
        return self.model.blocks

    @property
    def after_block(self) -> int:
        value = self.settings["after_block"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"after_block must be an int block index (e.g. -2), got {value!r}")
        depth = len(self._blocks)
        if not -depth <= value < depth:
            raise ConfigError(
                f"after_block={value} is out of range for a ViT with {depth} blocks (valid: {-depth}..{depth - 1})"
            )
        return normalize_layer(value, depth)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    def encoder_info(self) -> EncoderInfo:
        return EncoderInfo(
            depth=len(self._blocks), feature_layer=self.after_block, has_cls=self.model.cls_token is not None
        )

    def validate(self) -> None:
        model = self.model
        vit = _vit_class()
        if type(model).forward_features is not vit.forward_features:
            raise UnsupportedModelError(
                f"{type(model).__name__} overrides VisionTransformer.forward_features; vtprune patches timm's own "
                "forward_features and would change what this model computes"
            )
        if len(self._blocks) == 0:
            raise UnsupportedModelError("this VisionTransformer has no blocks")
        info = self.encoder_info()  # validates after_block
        layers = self.pruner.attention_layers(info)  # out-of-range layers fail here
        late = sorted(layer for layer in layers if layer > info.feature_layer)
        if late:
            raise ConfigError(
                f"pruner {self.pruner.name!r} reads the attention of block(s) {late}, after after_block="
                f"{self.settings['after_block']} (block {info.feature_layer}): tokens are pruned before those "
                f"blocks run. Use after_block >= {max(late)} or give the pruner an earlier layer"
            )
        for layer in sorted(layers):
            if _attention_input(self._blocks[layer]) is None:
                raise UnsupportedModelError(
                    f"block {layer} ({type(self._blocks[layer]).__name__} with "
                    f"{type(getattr(self._blocks[layer], 'attn', None)).__name__}) is not a timm Block / "
                    "ResPostBlock with plain Attention, so its attention cannot be recomputed for the pruner"
                )
        if model.dynamic_img_size:
            return  # the grid depends on the input size: budgets are checked per call
        grid = getattr(model.patch_embed, "grid_size", None)
        if grid is None:
            raise UnsupportedModelError(
                "this VisionTransformer has no fixed patch grid (patch_embed.grid_size is None) and no "
                "dynamic_img_size; vtprune needs the grid of the patch tokens"
            )
        self.check_budget((int(grid[0]), int(grid[1])))

    # ------------------------------------------------------------------ in-encoder merging (DyMU and alike)
    MERGING_POOLS = ("token", "avg", "")

    def validate_merging(self) -> None:
        model = self.model
        if type(model).forward_features is not _vit_class().forward_features:
            raise UnsupportedModelError(
                f"{type(model).__name__} overrides VisionTransformer.forward_features; vtprune patches timm's own"
            )
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in self.MERGING_POOLS:
            raise UnsupportedModelError(
                f"in-encoder merging supports global_pool 'token', 'avg' (size-weighted over the merged tokens) or "
                f"'' (none); this ViT uses {'attention pooling' if getattr(model, 'attn_pool', None) is not None else repr(model.global_pool)}"
            )
        TimmBlocks(self._blocks)
        self.pruner.begin(len(self._blocks))  # per-block settings of the wrong length fail now

    def merging_geometry(self) -> tuple[int, int]:
        grid = self.model.patch_embed.grid_size
        return len(self._blocks), int(grid[0]) * int(grid[1])

    def calibration_pixels(self, images, processor) -> torch.Tensor:
        tensors = []
        for image in images:
            if torch.is_tensor(image) and processor is None:
                tensors.append(image)
            elif processor is None:
                raise ValueError(
                    "calibrating a timm ViT on images needs processor=<callable image -> [C, H, W] tensor>, e.g. "
                    "timm.data.create_transform(**timm.data.resolve_data_config({}, model=model)); or pass tensors"
                )
            else:
                tensors.append(processor(image))
        parameter = next(self.model.parameters())
        return torch.stack(tensors).to(parameter.device, parameter.dtype)

    def run_merging(self, pixel_values: torch.Tensor, merger):
        model = self.model
        x = model.patch_embed(pixel_values)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        return run_merging_blocks(TimmBlocks(self._blocks), x, merger, len(self._blocks), self.num_prefix_tokens)

    def _install_merging(self, handle: Any) -> None:
        """forward_features runs every block with the merger and returns ``[B, prefix + T, D]`` padded to the
        batch's largest token count (``handle.stats[i].tokens_out`` patch tokens of row i are valid, in front);
        forward_head pools 'avg' as the size-weighted mean over each image's merged tokens (= the mean over its
        original tokens' representatives), 'token' from the CLS as usual."""
        model = self.model
        original_features, original_head = model.forward_features, model.forward_head
        last: dict = {}

        @functools.wraps(original_features)
        def forward_features(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
            if attn_mask is not None or is_causal:
                raise NotImplementedError("vtprune: attn_mask / is_causal are not supported while the ViT is merged")
            state, history = self.run_merging(x, self.pruner)
            prefix = state.protected
            counts = state.counts.tolist()
            stats = []
            # Rows are laid out in output order (prefix, then merged tokens by first member), as stats describe.
            layout = torch.arange(state.x.shape[1], device=state.x.device).repeat(state.x.shape[0], 1)
            for i in range(state.x.shape[0]):
                positions, image_stats = merged_image_stats(state, history, i, row=i)
                layout[i, prefix : counts[i]] = positions
                stats.append(image_stats)
            handle.stats = stats
            handle.selection_time = self.pruner.merge_seconds
            if state.merged:  # unmerged: keep the tensor (and its memory layout) exactly as the blocks left it
                index = layout[..., None].expand(-1, -1, state.x.shape[2])
                state = MergeState(
                    x=state.x.gather(1, index), size=state.size.gather(1, layout), valid=state.valid,
                    origin=state.origin.gather(1, layout), where=state.where, protected=prefix, merged=True,
                )  # `where` is not permuted: only stats and pooling read the state from here on
            out = model.norm(state.x)
            last["state"], last["out"] = state, out
            return out

        @functools.wraps(original_head)
        def forward_head(x: torch.Tensor, pre_logits: bool = False):
            state = last.get("state")
            if model.global_pool != "avg" or state is None or not state.merged:
                return original_head(x, pre_logits=pre_logits)
            if last.get("out") is not x:
                raise NotImplementedError("vtprune: forward_head with 'avg' pooling takes the output of the last forward_features")
            start = 0 if model.pool_include_prefix else model.num_prefix_tokens
            weight = (state.size * state.valid)[:, start:, None].to(x.dtype)
            pooled = (x[:, start:] * weight).sum(dim=1) / weight.sum(dim=1)
            pooled = model.head_drop(model.fc_norm(pooled))
            return pooled if pre_logits else model.head(pooled)

        handle.set_attribute("forward_features", forward_features)
        handle.set_attribute("forward_head", forward_head)
        for name in ("forward_intermediates", "get_intermediate_layers"):
            if hasattr(model, name):
                handle.set_attribute(name, self._refuse(name, "merging", "unmerged"))

    def _refuse(self, name: str, patch: str, result: str):
        """`name` of the model, replaced by a clear error: it would bypass the patch and return `result` features."""
        method = getattr(self.model, name)

        @functools.wraps(method)
        def refused(*args, **kwargs):
            raise NotImplementedError(
                f"vtprune: {name} bypasses the token {patch} patch (it would return {result} features); "
                "call handle.remove() first, or use forward_features"
            )

        return refused

    # ------------------------------------------------------------------ the patch
    def install(self, handle: Any) -> None:
        if self.pruner.kind == "encoder_merging":
            return self._install_merging(handle)
        model = self.model
        original = model.forward_features

        @functools.wraps(original)
        def forward_features(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
            if attn_mask is not None or is_causal:
                raise NotImplementedError("vtprune: attn_mask / is_causal are not supported while the ViT is pruned")
            return self._forward_features(handle, x)

        handle.set_attribute("forward_features", forward_features)
        for name in ("forward_intermediates", "get_intermediate_layers"):
            if hasattr(model, name):
                handle.set_attribute(name, self._refuse(name, "pruning", "unpruned"))

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid of the patch embedding output `x` (NHWC when dynamic_img_size)."""
        if self.model.dynamic_img_size:
            return int(x.shape[1]), int(x.shape[2])
        grid = self.model.patch_embed.grid_size
        return int(grid[0]), int(grid[1])

    def _run_block(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _forward_features(self, handle: Any, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        info = self.encoder_info()
        after = info.feature_layer
        attention_layers = self.pruner.attention_layers(info)
        prefix = self.num_prefix_tokens

        x = model.patch_embed(x)
        grid = self._grid(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        if x.shape[1] != prefix + grid[0] * grid[1]:
            raise NotImplementedError(
                f"vtprune: the ViT sequence has {x.shape[1]} tokens, not {prefix} prefix + {grid[0]}x{grid[1]} "
                "patches (patch dropout in training mode?); pruning needs the full patch grid"
            )

        blocks = self._blocks
        block_inputs: dict[int, torch.Tensor] = {}
        for i in range(after + 1):
            if i in attention_layers:
                block_inputs[i] = x
            x = self._run_block(blocks[i], x)

        patches = x[:, prefix:]
        images = x.shape[0]
        features = [patches[i] for i in range(images)]
        encoded = reduce_images(
            self.pruner,
            features,
            [grid] * images,
            info,
            project=lambda t: t,  # no projector: vision space is the output space
            probe=TimmAttentionProbe(blocks, block_inputs, prefix),
            cls_features=None,
            projected=lambda: features,
        )
        block_inputs.clear()
        for i, stat in enumerate(encoded.stats):
            stat.extra["row"] = i
        handle.stats = encoded.stats
        handle.selection_time = encoded.selection_seconds

        if images:
            reduced = torch.stack([e.to(dtype=x.dtype) for e in encoded.embeds])
        else:  # an empty batch stays empty, with the shape a non-empty one would have
            reduced = x.new_empty((0, self.pruner.budget.resolve(grid[0] * grid[1]), x.shape[2]))
        pruned = _empty_with_layout_of(x, (images, prefix + reduced.shape[1], x.shape[2]))
        pruned[:, :prefix] = x[:, :prefix]
        pruned[:, prefix:] = reduced
        x = pruned
        for i in range(after + 1, len(blocks)):
            x = self._run_block(blocks[i], x)
        return model.norm(x)
