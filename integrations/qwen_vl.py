"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, transformers 5.x).

Hook point: after `visual.merger`. The merger concatenates each 2x2 group of patches (four consecutive tokens
in the ViT's order) into one LLM token; pruning before it would break that adjacency. Pruners therefore see
the merged tokens, in raster order of the merged grid: ``features`` and ``embeddings`` are the same LLM-space
tensor (there is no separate projector), so merging pruners average LLM-space tokens.

Scores: these ViTs have no CLS token, so CLS-based methods use their documented global-attention fallback
(``cls_fallback="global"``; ``"error"`` refuses). Attention statistics are computed at patch level for the
block a pruner reads, from that block's fused qkv projection as the ViT computed it (captured with its rotary
embeddings and segment bounds) and its vision RoPE, one softmax per attention segment of the block, one segment
at a time (never a full map), averaged over each 2x2 merge group, and for Qwen2.5-VL
un-permuted from window order to raster order. Keys for similarity (VisionZip) are taken before RoPE, so that
they compare content rather than position. The default score block is the last one (a full-attention block in
both models); HiPrune's object layer defaults to the paper's block 16 of 32, scaled to the depth and moved to
the nearest full-attention block.

Positions: M-RoPE ids of the unpruned sequence are computed as the unpatched model would (``get_rope_index``;
under `generate` the four-row form generate uses) and the kept tokens keep theirs (``positions="preserve"``,
the default, as the Qwen ports do). ``positions="compact"`` renumbers the whole pruned sequence contiguously on
all M-RoPE axes, like text, which discards the 2-D layout of the kept image tokens. Keeping every token is
bit-exact in preserve mode only.

Video (``pixel_values_videos``, ``video_grid_thw``; Qwen2.5-VL's ``second_per_grid_ts`` only moves positions):
every pruner prunes the merged video tokens, with one budget vocabulary for images and videos. ``ratio`` applies
to every image and every video; ``video_keep=K`` (tokens the LLM receives for one whole video) or
``video_ratio=r`` override it for videos. A per-image ``keep`` says nothing about a clip of thousands of tokens,
so a video under a ``keep`` budget without ``video_keep`` / ``video_ratio`` is refused with a `BudgetError`.
``video_scope="video"`` (the default) makes one selection over the whole clip, its temporal groups stacked top
to bottom as one ``(T*h, w)`` grid, so frames that repeat cost little; ``"frame"`` gives every temporal group
the same share (``video_keep`` must then be a multiple of the T groups). Attention statistics come per temporal
group, as the ViT attends (one segment per group), recomputed from the captured block inputs like images'.
Images and videos run through the ViT in separate calls, as the unpatched model runs them, and their placeholders
are matched in the order they appear in each prompt. Each video's `ImageStats` indexes the clip's merged tokens
in raster order (group by group), with ``extra["modality"] == "video"`` and ``extra["grid_thw"]`` (merged grid).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from vtprune.attention import received_attention
from vtprune.capture import capture_calls, capture_layers
from vtprune.errors import MissingCLSError
from vtprune.integration import EncodedImages, VLMIntegration, reduce_images
from vtprune.tokens import EncoderInfo, ImageStats

from .common.video import VIDEO_OPTIONS, VideoBudget, in_prompt_order

@dataclass
class QwenEncoderRun:
    """One pass of the ViT and merger: merged tokens (raster order), grids, and the captured block calls."""

    merged: torch.Tensor  # [G_total, D_llm]
    grid: torch.Tensor  # [I, 3]
    calls: dict
    raster_order: torch.Tensor | None  # Qwen2.5-VL: argsort(window_index)
    projections: dict | None = None  # block index -> that block's fused qkv projection output [S, 3 D]
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: per DeepStack level [G_total, D_llm], same order


class QwenAttentionProbe:
    """`AttentionProbe` for Qwen2-VL / Qwen2.5-VL vision blocks, over the images of one encoder call.

    Args:
        blocks: ``visual.blocks``.
        calls: block index -> captured ``(args, kwargs)`` of that block's call (cu_seqlens, rotary embeddings).
        patch_counts: patches per image, in order (images are contiguous in the ViT sequence).
        group: patches per merged token (``spatial_merge_size ** 2``).
        raster_order: for Qwen2.5-VL, ``argsort(window_index)``: the window-order position of each merged
            token in raster order; None for Qwen2-VL (already raster).
        projections: block index -> the output of that block's fused ``attn.qkv`` projection as the ViT computed
            it (captured); a block without one has its queries and keys recomputed from the captured input.

    Statistics are computed one attention segment at a time (an image, a temporal group of a video, or a
    window), so that no more than one segment's queries, keys and attention chunk are held at once.
    """

    def __init__(
        self, blocks, calls: dict, patch_counts: list[int], group: int, raster_order: torch.Tensor | None,
        projections: dict | None = None,
    ):
        self.blocks = blocks
        self.calls = calls
        self.projections = projections or {}
        self.group = group
        self.raster_order = raster_order
        self.patch_counts = patch_counts
        bounds = torch.tensor([0] + patch_counts).cumsum(0).tolist()
        self.patch_ranges = list(zip(bounds[:-1], bounds[1:]))
        self.group_ranges = [(a // group, b // group) for a, b in self.patch_ranges]
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _queries_keys_rows(self, layer: int) -> torch.Tensor:
        """``[S, 2 D]``: the q and k columns of block `layer`'s fused projection, captured or recomputed."""
        attn = self.blocks[layer].attn
        rows = 2 * attn.qkv.out_features // 3  # the fused projection's columns are q, k, v
        if layer in self.projections:
            return self.projections[layer][:, :rows]
        args, kwargs = self.calls[layer]
        hidden = args[0] if args else kwargs["hidden_states"]
        bias = None if attn.qkv.bias is None else attn.qkv.bias[:rows]
        # Only the q and k rows of the fused projection: v would be a third of the work, unused.
        return torch.nn.functional.linear(self.blocks[layer].norm1(hidden), attn.qkv.weight[:rows], bias)

    def _statistics(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per merged token in raster order: mean attention received, and head-averaged keys before RoPE."""
        if layer not in self._stats:
            if layer not in self.calls:
                raise KeyError(f"vision block {layer} was not captured (captured: {sorted(self.calls)})")
            _, kwargs = self.calls[layer]
            attn = self.blocks[layer].attn
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
            with torch.no_grad():
                qk = self._queries_keys_rows(layer)
                length, heads = qk.shape[0], attn.num_heads
                queries, keys = qk.unflatten(1, (2, heads, -1)).unbind(1)  # [S, H, hd] each, views
                cos, sin = kwargs["position_embeddings"]
                received = torch.zeros(length, dtype=torch.float32, device=qk.device)
                mean_keys = torch.empty(length, keys.shape[-1], dtype=torch.float32, device=qk.device)
                segments = kwargs["cu_seqlens"].tolist()
                # One softmax per attention segment of this block: whole images (temporal groups of a video) in
                # full-attention blocks, windows in Qwen2.5-VL's windowed blocks, exactly as the block attends.
                for start, end in zip(segments[:-1], segments[1:]):
                    q, k = queries[start:end], keys[start:end]
                    q_rot, k_rot = rope(q, k, cos[start:end], sin[start:end])
                    q_rot = (q_rot.float() * attn.scaling).transpose(0, 1)
                    received[start:end] = received_attention(q_rot, k_rot.float().transpose(0, 1))
                    mean_keys[start:end] = k.float().mean(dim=1)  # keys before RoPE: content, not position
                for start, end in self.patch_ranges:  # mean over heads and over all query rows of the image
                    received[start:end] /= heads * (end - start)
            self._stats[layer] = (self._to_raster_groups(received), self._to_raster_groups(mean_keys))
        return self._stats[layer]

    def _to_raster_groups(self, per_patch: torch.Tensor) -> torch.Tensor:
        """``[S, ...]`` per patch in the ViT's order -> ``[G, ...]`` per merged token in raster order."""
        grouped = per_patch.reshape(-1, self.group, *per_patch.shape[1:]).mean(dim=1)
        return grouped if self.raster_order is None else grouped[self.raster_order.to(grouped.device)]

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        raise MissingCLSError("Qwen vision encoders have no CLS token")

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        start, end = self.group_ranges[image]
        return self._statistics(layer)[0][start:end]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        start, end = self.group_ranges[image]
        return self._statistics(layer)[1][start:end]


class _UnitProbe:
    """An `AttentionProbe` over selection units: unit ``i`` is a token range of one image or video of an encoder
    run (a whole image, a whole clip, or one temporal group of a clip)."""

    def __init__(self, units: list[tuple[QwenAttentionProbe, int, int, int]]) -> None:
        self.units = units  # (probe of the run, image/video index in that run, first token, end token)

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        raise MissingCLSError("Qwen vision encoders have no CLS token")

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        probe, index, start, end = self.units[image]
        return probe.global_attention(layer, index)[start:end]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        probe, index, start, end = self.units[image]
        return probe.keys(layer, index)[start:end]


@dataclass
class _Visual:
    """One image or video of a call, in the order its placeholders appear."""

    modality: str  # "image" | "video"
    index: int  # among the call's images / videos
    grid: tuple[int, int, int]  # merged (t, h, w)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _group_by_run(embed: torch.Tensor, stats: ImageStats, levels: list[torch.Tensor], run: int):
    """Reorder one clip's output tokens run by run (temporal group by group), keeping their order within a run:
    a selection over the whole clip may list a later group's token first (VisionZip's contextual tokens)."""
    group = stats.order.clamp(min=0) // run
    permutation = torch.sort(group, stable=True).indices
    if bool((permutation == torch.arange(permutation.numel())).all()):
        return embed, stats, levels
    new_slot = torch.empty_like(permutation)
    new_slot[permutation] = torch.arange(permutation.numel())
    assignment = torch.where(stats.assignment >= 0, new_slot[stats.assignment.clamp(min=0)], stats.assignment)
    regrouped = ImageStats(stats.tokens_in, stats.tokens_out, stats.kept, stats.order[permutation], assignment, dict(stats.extra))
    on = permutation.to(embed.device)
    return embed[on], regrouped, [level[on.to(level.device)] for level in levels]


class QwenVLIntegration(VLMIntegration):
    encoder_merging_unsupported = (
        "its ViT ends in a PatchMerger that concatenates each 2x2 group of four consecutive patches of a fixed grid "
        "(Qwen2.5-VL also attends in fixed windows), so tokens merged inside the ViT no longer form those groups; "
        "merging after the merger would not shorten the ViT. Use a post-merger pruner on Qwen (fastervlm, "
        "hiprune, divprune, visionzip, pool)"
    )
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    default_positions = "preserve"
    visual_kwargs = ("pixel_values", "pixel_values_videos")
    encoder_kwargs = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    token_kwargs = {"labels": -100, "mm_token_type_ids": 0}
    options = dict(VIDEO_OPTIONS)
    video_frame_runs: bool = False
    """Whether the processor writes each temporal group of a video as its own placeholder run (Qwen3-VL, Qwen3.5:
    a timestamp before each); the kept tokens of a group then stay in its run."""

    def __init__(self, model: torch.nn.Module, pruner, **options) -> None:
        super().__init__(model, pruner, **options)
        self.video_budget = VideoBudget(self.settings, pruner.budget)

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

        return isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration))

    @property
    def _visual(self):
        return self.model.model.visual

    @property
    def _windowed(self) -> bool:
        return hasattr(self._visual, "fullatt_block_indexes")

    def _full_attention_blocks(self) -> list[int]:
        depth = len(self._visual.blocks)
        return sorted(self._visual.fullatt_block_indexes) if self._windowed else list(range(depth))

    def encoder_info(self) -> EncoderInfo:
        depth = len(self._visual.blocks)
        target = max(1, round(16 * depth / 32)) - 1  # HiPrune's object layer 16 of 32 (1-based)
        middle = min(self._full_attention_blocks(), key=lambda block: (abs(block - target), block))
        return EncoderInfo(depth=depth, feature_layer=depth - 1, has_cls=False, middle_layer=middle)

    def validate(self) -> None:
        self.pruner.attention_layers(self.encoder_info())  # out-of-range layers fail at apply time

    def install(self, handle) -> None:
        super().install(handle)
        inner, saved = self.model.model, self.model.model.rope_deltas
        handle.on_remove(lambda: setattr(inner, "rope_deltas", saved))

    def encode(self, inputs: dict) -> EncodedImages:
        merge = self._visual.spatial_merge_size
        grids = {}
        for modality, pixels, grid_name in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
            if inputs.get(pixels) is None:
                continue
            grid = inputs.get(grid_name)
            if grid is None:
                raise ValueError(f"{pixels} need {grid_name}, as the Qwen processor returns them")
            grids[modality] = grid
        if "image" in grids and bool((grids["image"][:, 0] != 1).any()):
            raise NotImplementedError("images with more than one temporal patch are not supported; pass them as videos")
        visuals = self._in_prompt_order(inputs["input_ids"], grids, merge)
        budgets = self._budgets(visuals)  # every budget is checked before the ViT runs
        layers = self.pruner.attention_layers(self.encoder_info())
        runs = {modality: self.run_encoder(inputs[pixels], grids[modality], layers)
                for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")) if modality in grids}
        return self.reduce_visuals(runs, visuals, budgets)

    def _in_prompt_order(self, input_ids: torch.Tensor, grids: dict, merge: int) -> list[_Visual]:
        """The call's images and videos in the order their placeholder runs appear (row by row)."""
        pending = {
            modality: [_Visual(modality, i, (t, h // merge, w // merge)) for i, (t, h, w) in enumerate(grid.tolist())]
            for modality, grid in grids.items()
        }
        token_ids = {"image": self.model.config.image_token_id, "video": self.model.config.video_token_id}
        return in_prompt_order(input_ids, self.placeholder_mask(input_ids), token_ids, pending)

    def _budgets(self, visuals: list[_Visual]) -> list[list[int]]:
        """Per visual, the tokens kept per selection: one selection per image and per clip (``video_scope="video"``)
        or one per temporal group (``"frame"``)."""
        budgets = []
        for visual in visuals:
            if visual.modality == "image":
                budgets.append([self.pruner.budget.resolve(visual.tokens, where=f"image {visual.index}")])
                self.pruner.check(budgets[-1][0], visual.grid[1:])
                continue
            t, h, w = visual.grid
            where = f"video {visual.index} ({t} temporal groups of {h}x{w} tokens)"
            budgets.append(self.video_budget.split(t, h * w, where, unit="temporal group"))
            grid = (t * h, w) if len(budgets[-1]) == 1 else (h, w)
            for keep in set(budgets[-1]):
                self.pruner.check(keep, grid)
        return budgets

    def run_encoder(self, pixel_values: torch.Tensor, grid: torch.Tensor, attention_layers: set[int]) -> QwenEncoderRun:
        """Run the ViT and merger once, capturing the calls of `attention_layers` and their fused qkv projections
        (so the probe need not recompute them: a third of a block's work, on thousands of patches for a video)."""
        visual = self._visual
        merge = visual.spatial_merge_size
        layers = sorted(attention_layers)
        with capture_calls(visual.blocks, attention_layers) as calls, capture_layers(
            [visual.blocks[i].attn.qkv for i in layers], outputs=set(range(len(layers)))
        ) as (_, projected):
            output = visual(pixel_values.type(visual.dtype), grid_thw=grid)
        raster_order = None
        if self._windowed:
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
            )
            raster_order = torch.argsort(window_index)
        projections = {layers[i]: qkv for i, qkv in projected.items()}
        return QwenEncoderRun(
            merged=output.pooler_output, grid=grid, calls=dict(calls), raster_order=raster_order, projections=projections,
            deepstack=list(getattr(output, "deepstack_features", None) or []),
        )

    def _probe(self, run: QwenEncoderRun) -> QwenAttentionProbe:
        visual = self._visual
        return QwenAttentionProbe(
            visual.blocks, run.calls, run.grid.prod(-1).tolist(), group=visual.spatial_merge_size**2,
            raster_order=run.raster_order, projections=run.projections,
        )

    def reduce(self, run: QwenEncoderRun) -> EncodedImages:
        """Reduce every image of an encoder run with the pruner's own budget (attention recomputed afresh)."""
        merge = self._visual.spatial_merge_size
        visuals = [_Visual("image", i, (t, h // merge, w // merge)) for i, (t, h, w) in enumerate(run.grid.tolist())]
        budgets = [[self.pruner.budget.resolve(v.tokens, where=f"image {v.index}")] for v in visuals]
        return self.reduce_visuals({"image": run}, visuals, budgets)

    def reduce_visuals(self, runs: dict[str, QwenEncoderRun], visuals: list[_Visual], budgets: list[list[int]]) -> EncodedImages:
        """Reduce the images and videos of encoder runs (`runs` by modality), one selection per budget entry;
        DeepStack levels (Qwen3-VL) are reduced with the same indices and merge groups as the tokens."""
        merge = self._visual.spatial_merge_size
        sizes = {m: (run.grid.prod(-1) // merge**2).tolist() for m, run in runs.items()}
        features_of = {m: list(torch.split(run.merged, sizes[m])) for m, run in runs.items()}
        levels_of = {m: [list(torch.split(level, sizes[m])) for level in run.deepstack or []] for m, run in runs.items()}
        with_levels = any(levels_of.values())
        probes = {m: self._probe(run) for m, run in runs.items()}
        features, grids, units, flat_budgets, carried = [], [], [], [], []
        for visual, keeps in zip(visuals, budgets):
            t, h, w = visual.grid
            whole = features_of[visual.modality][visual.index]
            size = whole.shape[0] // len(keeps)
            for part, keep in enumerate(keeps):
                features.append(whole[part * size : (part + 1) * size])
                grids.append((t * h, w) if len(keeps) == 1 else (h, w))
                units.append((probes[visual.modality], visual.index, part * size, (part + 1) * size))
                flat_budgets.append(keep)
                carried.append([level[visual.index][part * size : (part + 1) * size] for level in levels_of[visual.modality]])
        reduced = reduce_images(
            self.pruner,
            features,
            grids,
            self.encoder_info(),
            project=lambda tokens: tokens,
            probe=_UnitProbe(units),
            projected=lambda: features,
            budgets=flat_budgets,
            carried=carried if with_levels else None,
        )
        embeds, orders, stats, levels, segments, start = [], [], [], [], [], 0
        for visual, keeps in zip(visuals, budgets):
            parts = range(start, start + len(keeps))
            start += len(keeps)
            size = visual.tokens // len(keeps)
            offsets = [part * size for part in range(len(keeps))]
            embed = torch.cat([reduced.embeds[i] for i in parts]) if len(keeps) > 1 else reduced.embeds[parts[0]]
            joined = ImageStats.join([reduced.stats[i] for i in parts], offsets)
            level = [torch.cat([reduced.carried[i][j] for i in parts]) for j in range(len(carried[parts[0]]))] if with_levels else []
            runs_of_visual = None
            if visual.modality == "video" and self.video_frame_runs:
                t, h, w = visual.grid
                runs_of_visual = [h * w] * t
                if len(keeps) == 1:  # one selection over the clip: bring each group's kept tokens together
                    embed, joined, level = _group_by_run(embed, joined, level, h * w)
            joined.extra.update(modality=visual.modality, grid_thw=visual.grid)
            if len(keeps) > 1:
                joined.extra["group_tokens_out"] = [reduced.stats[i].tokens_out for i in parts]
            embeds.append(embed)
            orders.append(joined.order.to(embed.device))
            stats.append(joined)
            levels.append(level)
            segments.append(runs_of_visual)
        return EncodedImages(
            embeds=embeds, order=orders, stats=stats, selection_seconds=reduced.selection_seconds,
            carried=levels if with_levels else None,
            segments=segments if any(run is not None for run in segments) else None,
        )

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        return (input_ids == config.image_token_id) | (input_ids == config.video_token_id)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def original_position_ids(self, inputs: dict, for_generate: bool) -> torch.Tensor:
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(
                "Qwen M-RoPE positions need mm_token_type_ids; pass the processor's full output to the model"
            )
        names = ("attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        kwargs = {name: inputs[name] for name in names if inputs.get(name) is not None}
        if for_generate:
            # The [4, B, L] ids generate itself would start from (text row + three M-RoPE rows).
            return self.model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)
        positions, _ = self.model.model.get_rope_index(inputs["input_ids"], **kwargs)
        return positions

    def position_ids_for(self, inputs: dict, for_generate: bool, positions: str) -> torch.Tensor | None:
        # Qwen needs explicit M-RoPE ids in both modes; compress() renumbers them for compact.
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        return self.original_position_ids(inputs, for_generate=for_generate)

    def after_prefill(self, sequence, for_generate: bool) -> None:
        # The model caches rope_deltas (next position minus attended length) for decoding without explicit
        # position ids; describe the pruned cache, not the unpruned prompt.
        if sequence.position_ids is None:
            return
        rows = sequence.position_ids.reshape(-1, *sequence.position_ids.shape[-2:]).amax(dim=(0, 2))
        attended = sequence.attention_mask.sum(dim=1)
        self.model.model.rope_deltas = (rows + 1 - attended).unsqueeze(1)
