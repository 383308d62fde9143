"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, transformers 5.x): images (anyres) and video.

What the unpatched model does:

- An image goes through LLaVA-NeXT's anyres packing (see `vtprune.integrations.llava_next`): a base crop and
  the sub-crops of the best `image_grid_pinpoints` resolution through the SigLIP tower (``vision_feature_layer``
  -1, ``vision_feature_select_strategy="full"``: SigLIP has no CLS, every token is a patch; a 27 x 27 grid at
  384 px), the projector, the sub-crops laid out as one grid and unpadded, one ``image_newline`` per row, the
  base crop first. Then ``vision_aspect_ratio="anyres_max_K"`` caps the sub-crop grid: when the unpadded grid
  holds more than ``1.1**2 * K`` crops' worth of tokens, it is resized bilinearly to about ``K`` crops' worth
  (the rows and columns divided by ``ratio = sqrt(tokens / (K * 27**2))``) before the newlines are added. In a
  prompt with several images (``batch_num_images`` > 1) each image is its base crop only, plus one newline.
- A video's frames go through the tower and the projector one by one; each frame's 27 x 27 grid is pooled
  bilinearly to ``ceil(27/2) = 14`` x 14 (`apply_pooling`), the frames follow one another, and ONE
  ``image_newline`` ends the whole video: ``frames * 196 + 1`` tokens.

vtprune prunes where the LLM's tokens are:

- Images: per crop and global budgets exactly as LLaVA-NeXT (``budget_scope="per_crop"``, the default, or
  ``"global"``; newlines always kept, base crop first, packed order). When the model resizes the sub-crop grid,
  the units the pruner sees are the resized grid's tokens, split by the crop their centre samples (each crop a
  rectangle of the resized grid, so ``per_crop`` still applies the budget crop by crop); their features are the
  vision features resized by the same operations (`_Region.resize`), and their attention statistics are the
  crops' own statistics resized the same way. The LLM receives the unpatched model's own resized projected
  tokens, so keeping every token stays bit-exact.
- Videos: the pooled tokens. The budget vocabulary of every video family (`integrations.common.video`):
  ``ratio`` applies to every image and every video; ``video_keep=K`` (tokens of one whole video, the trailing
  newline not counted: it is always kept) or ``video_ratio=r`` override it for videos; ``video_scope="video"``
  (default: one selection over the clip, its frames stacked as one ``(frames * 14, 14)`` grid, so frames that
  repeat cost little) or ``"frame"`` (the same share in every frame). The pruner's features are the frame's
  vision features pooled by the model's own `apply_pooling`; attention statistics are computed per frame (the
  tower attends within a frame) and pooled the same way. The LLM gets the kept pooled tokens in the pruner's
  order, then the newline.

Scores: SigLIP has no CLS token, so the CLS-attention pruners (FasterVLM, VisionZip's dominant tokens) use their
documented fallback, the mean attention each token receives (``cls_fallback="global"``; ``"error"`` refuses).
HiPrune's layers scale to the tower's depth as on any CLIP-style tower.

Images and videos run through the tower in separate calls, as the unpatched model runs them; their placeholders
(``<image>`` and ``<video>`` tokens) are matched in prompt order, so images, videos and text-only rows mix in a
batch. Each visual's `ImageStats` has ``extra["modality"]``; an image's stats are LLaVA-NeXT's (packed sequence,
``crop_tokens``, ``newlines``, ``source_crop``, plus ``extra["resized"]``: the resized sub-crop grid or None); a
video's index its ``frames * 196 + 1`` tokens (the newline last), with ``extra["frames"]`` and, for
``video_scope="frame"``, ``extra["frame_tokens_out"]``.

DyMU is refused: it merges tokens inside the tower, but the video path pools each frame's full 27 x 27 grid
bilinearly and ``anyres_max`` resizes the full sub-crop grid, both of which need every patch of the grid.

Positions default to ``compact`` (the LLaVA ports); the Qwen2 LLM has 1-D positions. Only
``vision_feature_select_strategy="full"`` on a tower without CLS (what every OneVision checkpoint uses) is
supported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from vtprune.errors import ConfigError, UnsupportedModelError
from vtprune.integration import EncodedImages, _synchronize, reduce_images
from vtprune.tokens import ImageStats

from .common.clip_attention import ClipAttentionProbe
from .common.video import VIDEO_OPTIONS, VideoBudget, in_prompt_order
from .llava import EncoderRun
from .llava_next import AnyresCore, _CropProbe, _Layout, _Region, _Unit


@dataclass
class _Image:
    modality = "image"
    index: int
    layout: _Layout

    @property
    def tokens(self) -> int:
        return self.layout.length


@dataclass
class _Video:
    modality = "video"
    index: int
    frames: int
    grid: tuple[int, int]  # pooled grid of one frame

    @property
    def frame_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.frames * self.frame_tokens + 1  # the newline after the video


@dataclass
class _FrameUnit:
    """One selection over a video: the frames ``[first, end)`` of the tower batch, pooled."""

    first: int
    end: int
    grid: tuple[int, int]  # (frames * pooled rows, pooled cols)


class _FrameProbe:
    """`AttentionProbe` over video units: each frame's statistic (the tower attends within a frame), pooled as the
    model pools the frame's tokens (`apply_pooling`), the unit's frames one after another."""

    def __init__(self, probe: ClipAttentionProbe, units: list[_FrameUnit], pool) -> None:
        self.probe, self.units, self.pool = probe, units, pool
        self._cache: dict[tuple, torch.Tensor] = {}

    def _pooled(self, what: str, layer: int, image: int, per_frame) -> torch.Tensor:
        key = (what, layer, image)
        if key not in self._cache:
            unit = self.units[image]
            stacked = torch.stack([per_frame(frame) for frame in range(unit.first, unit.end)])
            self._cache[key] = self.pool(stacked).flatten(0, 1)
        return self._cache[key]

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        return self._pooled("cls", layer, image, lambda f: self.probe.cls_attention(layer, f).T).T

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        return self._pooled("global", layer, image, lambda f: self.probe.global_attention(layer, f)[:, None])[:, 0]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        return self._pooled("keys", layer, image, lambda f: self.probe.keys(layer, f))


class _Routed:
    """One `AttentionProbe` over selections served by several probes: selection ``i`` is ``entries[i]`` =
    ``(probe, index in that probe)``."""

    def __init__(self, entries: list[tuple]) -> None:
        self.entries = entries

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        probe, index = self.entries[image]
        return probe.cls_attention(layer, index)

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        probe, index = self.entries[image]
        return probe.global_attention(layer, index)

    def keys(self, layer: int, image: int) -> torch.Tensor:
        probe, index = self.entries[image]
        return probe.keys(layer, index)


def _anyres_max(vision_aspect_ratio: str) -> int:
    prefix = "anyres_max_"
    if not isinstance(vision_aspect_ratio, str) or not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix):].isdigit():
        raise UnsupportedModelError(
            f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported; vtprune supports 'anyres_max_<K>', "
            "what every LLaVA-OneVision checkpoint uses"
        )
    return int(vision_aspect_ratio[len(prefix):])


class LlavaOnevisionIntegration(AnyresCore):
    """LLaVA-OneVision images (anyres, ``anyres_max`` resizing) and videos; see the module docstring."""

    encoder_merging_unsupported = (
        "its video path pools every frame's full patch grid bilinearly and its anyres_max step resizes the full "
        "sub-crop grid, so tokens merged inside the vision tower no longer form the grids those steps need. Use a "
        "post-encoder pruner on LLaVA-OneVision (fastervlm, hiprune, divprune, visionzip, random, pool)"
    )
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    options = {"budget_scope": "per_crop", **VIDEO_OPTIONS}
    visual_kwargs = ("pixel_values", "pixel_values_videos")
    encoder_kwargs = (
        "image_sizes",
        "image_sizes_videos",
        "batch_num_images",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
    )

    def __init__(self, model: torch.nn.Module, pruner, **options) -> None:
        super().__init__(model, pruner, **options)
        self.video_budget = VideoBudget(self.settings, pruner.budget)

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaOnevisionForConditionalGeneration

        return isinstance(model, LlavaOnevisionForConditionalGeneration)

    # ------------------------------------------------------------------ model facts
    @property
    def _patch_slice(self) -> slice:
        return slice(0, None)  # "full": SigLIP has no CLS, every token of the sequence is a patch

    def _check_strategy(self, strategy) -> None:
        if strategy != "full" or self.encoder_info().has_cls:
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} on a {self.model.config.vision_config.model_type} "
                "tower is not supported; vtprune supports 'full' on a tower without CLS token (SigLIP), which every "
                "LLaVA-OneVision checkpoint uses"
            )

    @property
    def _max_crops(self) -> int:
        return _anyres_max(self.model.config.vision_aspect_ratio)

    def _pooled_grid(self) -> tuple[int, int]:
        rows, cols = self._grid()
        return math.ceil(rows / 2), math.ceil(cols / 2)

    def validate(self) -> None:
        self._max_crops  # an unknown vision_aspect_ratio fails now
        super().validate()

    def crops_per_image(self, inputs: dict) -> list[int]:
        # In a prompt with several images the unpatched model takes each image's base crop only.
        crops = super().crops_per_image(inputs)
        counts = inputs.get("batch_num_images")
        if counts is None:
            return crops
        single = [int(n) == 1 for n in counts for _ in range(int(n))]
        if len(single) != len(crops):
            raise ValueError(f"batch_num_images {list(map(int, counts))} does not add up to the {len(crops)} images given")
        return [c if alone else 1 for c, alone in zip(crops, single)]

    def layout(self, image_size, first_crop: int, crops: int) -> _Layout:
        """LLaVA-NeXT's packed layout, and where ``anyres_max`` resizes the sub-crop grid, units on the resized
        grid: each resized token belongs to the crop its centre samples."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        if crops == 1:
            return super().layout(image_size, first_crop, crops)
        rows, cols = self._grid()
        crop_rows, crop_cols = get_anyres_image_grid_shape(image_size, self._pinpoints, self.model.config.vision_config.image_size)
        if crop_rows * crop_cols != crops - 1:
            raise ValueError(f"image of size {image_size} has {crops - 1} sub-crops but a {crop_rows}x{crop_cols} layout")
        height, width = crop_rows * rows, crop_cols * cols
        kept = unpad_image(torch.arange(height * width).view(1, height, width), image_size)[0]
        in_rows, in_cols = kept.shape
        ratio = math.sqrt(in_rows * in_cols / (self._max_crops * rows**2))  # as the unpatched model computes it
        if ratio <= 1.1:
            return super().layout(image_size, first_crop, crops)
        out_rows, out_cols = int(in_rows // ratio), int(in_cols // ratio)

        def source_crop(count_out: int, count_in: int, big_index: torch.Tensor, side: int) -> torch.Tensor:
            centre = ((torch.arange(count_out) + 0.5) * count_in / count_out).long().clamp(max=count_in - 1)
            return big_index[centre] // side

        crop_row = source_crop(out_rows, in_rows, kept[:, 0] // width, rows)
        crop_col = source_crop(out_cols, in_cols, kept[0, :] % width, cols)
        region = _Region(first_crop=first_crop + 1, crop_grid=(crop_rows, crop_cols), image_size=tuple(int(v) for v in (image_size.tolist() if hasattr(image_size, 'tolist') else image_size)), size=(out_rows, out_cols))
        base = _Unit(crop=first_crop, index=0, patches=torch.arange(rows * cols), packed=torch.arange(rows * cols), grid=(rows, cols))
        units = [base]
        for j in range(1, crops):
            ys = (crop_row == (j - 1) // crop_cols).nonzero().squeeze(1)
            xs = (crop_col == (j - 1) % crop_cols).nonzero().squeeze(1)
            units.append(
                _Unit(
                    crop=first_crop + j,
                    index=j,
                    patches=(ys[:, None] * out_cols + xs[None, :]).reshape(-1),
                    packed=(rows * cols + ys[:, None] * (out_cols + 1) + xs[None, :]).reshape(-1),
                    grid=(int(ys.numel()), int(xs.numel())),
                    region=region,
                )
            )
        newlines = rows * cols + torch.arange(out_rows) * (out_cols + 1) + out_cols
        return _Layout(length=rows * cols + out_rows * (out_cols + 1), newlines=newlines, units=units)

    # ------------------------------------------------------------------ per call
    def encode(self, inputs: dict) -> EncodedImages:
        config = self.model.config
        self._check_strategy(inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy)
        feature_layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        layers = self.pruner.attention_layers(self.encoder_info(feature_layer))
        pending: dict[str, list] = {}
        if inputs.get("pixel_values") is not None:
            pixel_values, crops_per_image = self.crop_batch(inputs)
            first, images = 0, []
            for i, crops in enumerate(crops_per_image):
                images.append(_Image(i, self.layout(inputs["image_sizes"][i], first, crops)))
                first += crops
            pending["image"] = images
        if inputs.get("pixel_values_videos") is not None:
            videos = inputs["pixel_values_videos"]
            if videos.dim() != 5:
                raise ValueError(f"pixel_values_videos of shape {tuple(videos.shape)}; expected [videos, frames, C, H, W]")
            pending["video"] = [_Video(v, videos.shape[1], self._pooled_grid()) for v in range(videos.shape[0])]
        token_ids = {"image": config.image_token_id, "video": config.video_token_id}
        visuals = in_prompt_order(inputs["input_ids"], self.placeholder_mask(inputs["input_ids"]), token_ids, pending)
        budgets = [self._visual_budgets(visual) for visual in visuals]  # every budget is checked before the tower
        runs = {}
        if "image" in pending:
            runs["image"] = self.run_encoder(pixel_values, feature_layer, layers)
        if "video" in pending:
            runs["video"] = self.run_encoder(videos.flatten(0, 1), feature_layer, layers)
        return self.reduce_visuals(runs, visuals, budgets)

    def _visual_budgets(self, visual) -> list[int]:
        if visual.modality == "image":
            budgets = self._budgets(visual.index, visual.layout)
            for unit, keep in zip(visual.layout.units, budgets):
                if keep == 0:
                    continue
                try:
                    self.pruner.check(keep, unit.grid)
                except ConfigError as error:
                    raise type(error)(
                        f"image {visual.index}, crop {unit.index} ({unit.grid[0]}x{unit.grid[1]} tokens, budget {keep}): {error}"
                    ) from error
            return budgets
        rows, cols = visual.grid
        where = f"video {visual.index} ({visual.frames} frames of {rows}x{cols} pooled tokens)"
        budgets = self.video_budget.split(visual.frames, visual.frame_tokens, where)
        grid = (visual.frames * rows, cols) if len(budgets) == 1 else (rows, cols)
        for keep in set(budgets):
            self.pruner.check(keep, grid)
        return budgets

    def reduce_visuals(self, runs: dict[str, EncoderRun], visuals: list, budgets: list[list[int]]) -> EncodedImages:
        """Reduce the images and videos of a call (`runs` by modality), in prompt order (`visuals`).

        Two groups of selections: crops the LLM sees as projected patches (the pruner gets vision features and
        the model's projector, as on LLaVA-NeXT), and tokens the model mixes after its projector (video frames
        pooled, sub-crop grids resized): for those the pruner gets the LLM's own tokens as features (as on Qwen,
        no separate projector), so that what it keeps or merges is exactly what the LLM receives.
        """
        inner = self.model.model
        projector = inner.multi_modal_projector
        device = next(iter(runs.values())).features.device
        _synchronize(device)
        started = time.perf_counter()
        cache: dict[str, torch.Tensor] = {}

        def projection(modality: str) -> torch.Tensor:
            if modality not in cache:  # the whole tower batch at once, as the unpatched model projects it
                projected = projector(runs[modality].features)
                cache[modality] = inner.apply_pooling(projected) if modality == "video" else projected
            return cache[modality]

        probes = {m: run.probe(self._blocks, visual=self._patch_slice) for m, run in runs.items()}
        image_units = [unit for visual, keeps in zip(visuals, budgets) if visual.modality == "image"
                       for unit, keep in zip(visual.layout.units, keeps) if keep > 0]
        image_probe = _CropProbe(probes["image"], image_units, self._grid()) if image_units else None
        image_index = {id(unit): k for k, unit in enumerate(image_units)}
        video_units: list[_FrameUnit] = []
        gather = self.unit_gatherer()
        # Per selection: (visual position, unit, group, features thunk, keep, probe, index in that probe).
        vision, mixed = [], []
        for position, (visual, keeps) in enumerate(zip(visuals, budgets)):
            if visual.modality == "image":
                for unit, keep in zip(visual.layout.units, keeps):
                    if keep == 0:
                        continue
                    entry = (position, unit, keep, image_probe, image_index[id(unit)])
                    (vision if unit.region is None else mixed).append(entry)
                continue
            per_selection = visual.frames // len(keeps)
            rows, cols = visual.grid
            for part, keep in enumerate(keeps):
                first = visual.index * visual.frames + part * per_selection
                video_units.append(_FrameUnit(first, first + per_selection, (per_selection * rows, cols)))
                mixed.append((position, video_units[-1], keep, None, len(video_units) - 1))
        video_probe = _FrameProbe(probes["video"], video_units, inner.apply_pooling) if video_units else None
        mixed = [(p, u, k, video_probe if probe is None else probe, i) for p, u, k, probe, i in mixed]

        def llm_tokens(unit) -> torch.Tensor:
            if isinstance(unit, _FrameUnit):
                return projection("video")[unit.first : unit.end].flatten(0, 1)
            return gather(unit, projection("image"))

        info = next(iter(runs.values())).info
        results: dict[int, tuple] = {}
        for group, entries in (("vision", vision), ("llm", mixed)):
            if not entries:
                continue
            if group == "vision":
                features = [gather(unit, runs["image"].features) for _, unit, _, _, _ in entries]
                project, projected = projector, lambda entries=entries: [gather(u, projection("image")) for _, u, _, _, _ in entries]
            else:
                features = [llm_tokens(unit) for _, unit, _, _, _ in entries]
                project, projected = (lambda tokens: tokens), (lambda features=features: features)
            reduced = reduce_images(
                self.pruner,
                features,
                [unit.grid for _, unit, _, _, _ in entries],
                info,
                project=project,
                probe=_Routed([(probe, index) for _, _, _, probe, index in entries]),
                projected=projected,
                budgets=[keep for _, _, keep, _, _ in entries],
            )
            for k, entry in enumerate(entries):
                results[id(entry[1])] = (entry[0], reduced.embeds[k], reduced.order[k], reduced.stats[k])
        # One EncodedImages over every selection, and each visual's (unit, index into it).
        flat = list(results.values())
        reduced = EncodedImages(embeds=[r[1] for r in flat], order=[r[2] for r in flat], stats=[r[3] for r in flat])
        index_of = {key: k for k, key in enumerate(results)}
        per_visual: list[list[tuple]] = [[] for _ in visuals]
        for position, unit, _, _, _ in sorted(vision + mixed, key=lambda e: index_of[id(e[1])]):
            per_visual[position].append((unit, index_of[id(unit)]))
        for position in range(len(visuals)):  # a video's selections in frame order
            per_visual[position].sort(key=lambda pair: getattr(pair[0], "first", 0))

        newline = inner.image_newline
        embeds, orders, stats = [], [], []
        for position, (visual, keeps) in enumerate(zip(visuals, budgets)):
            if visual.modality == "image":
                embed, order, stat = self._assemble(visual.layout, per_visual[position], reduced, newline, keeps)
                stat.extra.update(modality="image", resized=self._resized_size(visual.layout))
            else:
                embed, order, stat = self._video_output(visual, [result for _, result in per_visual[position]], reduced, newline)
            embeds.append(embed)
            orders.append(order.to(embed.device))
            stats.append(stat)
        _synchronize(device)
        return EncodedImages(embeds=embeds, order=orders, stats=stats, selection_seconds=time.perf_counter() - started)

    @staticmethod
    def _resized_size(layout: _Layout) -> tuple[int, int] | None:
        regions = [unit.region for unit in layout.units if unit.region is not None]
        return regions[0].size if regions else None

    @staticmethod
    def _video_output(video: _Video, results: list[int], reduced: EncodedImages, newline: torch.Tensor):
        """A video's output: every selection's tokens (frame by frame for ``video_scope="frame"``), then the
        newline, which is the video's last token."""
        size = video.frames * video.frame_tokens // len(results)
        parts = [reduced.stats[r] for r in results]
        joined = ImageStats.join(parts, [i * size for i in range(len(results))])
        body = torch.cat([reduced.embeds[r] for r in results]) if len(results) > 1 else reduced.embeds[results[0]]
        embed = torch.cat([body, newline.to(device=body.device, dtype=body.dtype)[None]])
        last = video.tokens - 1
        order = torch.cat([joined.order, torch.tensor([last])])
        assignment = torch.cat([joined.assignment, torch.tensor([joined.tokens_out])])
        extra = {"modality": "video", "frames": video.frames, "newlines": 1}
        if len(results) > 1:
            extra["frame_tokens_out"] = [p.tokens_out for p in parts]
        stat = ImageStats(
            tokens_in=video.tokens,
            tokens_out=joined.tokens_out + 1,
            kept=torch.unique(order[order >= 0]),
            order=order,
            assignment=assignment,
            extra=extra,
        )
        return embed, order, stat

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        return (input_ids == config.image_token_id) | (input_ids == config.video_token_id)
