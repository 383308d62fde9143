"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`, anyres, transformers 5.x).

What the unpatched model does with one image: the processor cuts it into a base crop (the whole image resized
to 336 x 336) and ``nh x nw`` sub-crops of the best `image_grid_pinpoints` resolution; every crop goes through
the CLIP tower (features of `vision_feature_layer`, CLS dropped: a 24 x 24 grid each) and the projector. Then
`pack_image_features` lays the sub-crops out as one ``24 nh x 24 nw`` grid, *unpads* it (cuts the rows or
columns that only show the letterbox padding of the resized image), appends one ``image_newline`` after every
row of that grid, and puts the base crop's 576 tokens first (no newline after the base crop). That packed
sequence of ``N = 576 + rows * (cols + 1)`` tokens is what the processor writes placeholders for.

vtprune rebuilds that packed sequence with an index map (for each packed token: its crop and patch, or
"newline"), and reduces the image crop by crop. Each *unit* the pruner sees is one crop restricted to its
tokens that survive unpadding:

- the base crop: its full 24 x 24 grid;
- a sub-crop: the surviving part, which is always a rectangle; the pruner gets exactly those tokens with the
  rectangle as its `grid` (so HiPrune's neighbours and pool's cells are right), the crop's own CLS feature,
  and attention recomputed on the crop's full encoder sequence (the tower saw the padding) and restricted to
  the surviving columns. Tokens cut by unpadding are never candidates: the unpatched LLM never sees them
  either. A sub-crop with no surviving token is skipped.

Budget scopes (``vtprune.apply(model, ..., budget_scope=...)``), default ``"per_crop"``:

- ``"per_crop"`` (FasterVLM / VisionZip convention): `keep` (or `ratio`) applies to the base crop and to every
  sub-crop separately, each scored with its own attention; the newline tokens are always kept on top. A
  sub-crop that has fewer surviving tokens than `keep` keeps all of them (a ratio is applied to its surviving
  count), so ``keep=576`` keeps everything; a `keep` above the 576 tokens of a full crop is a `BudgetError`
  at apply time. Per image: ``sum_c min(keep, n_c) + rows`` tokens reach the LLM (``handle.stats[i].extra``
  has the per-crop counts). Example, a 400 x 300 image with the 1x2 layout: crops of 576, 384, 384 tokens
  and 24 newlines (N = 1368); ``keep=64`` gives 64 + 64 + 64 + 24 = 216 tokens.
- ``"global"`` (HiPrune / DivPrune convention): `keep` is the total number of visual tokens the LLM receives
  for that image, newlines included (a `ratio` resolves against N). The newlines are reserved first; the
  remaining ``keep - rows`` tokens are split equally over the crops (base crop first, remainder to the
  earliest crops; a crop with fewer tokens than its share keeps all of them and the excess goes to the
  others), and each crop is pruned with its share. ``keep`` must lie in ``[rows + 1, N]`` for each image: a
  `BudgetError` otherwise (at apply time when no image size could satisfy it, else at the call). A crop
  whose share is 0 (tiny budgets) contributes no token. The same 400 x 300 image with ``keep=64``: 24
  newlines + 14 + 13 + 13 = 64. Note: DivPrune's own LLaVA-NeXT port selects over the whole packed sequence;
  vtprune keeps every pruner crop-local (pruners need a grid and per-crop attention), so DivPrune's global
  budget is the same equal split.

Output order (what the LLM sees for one image): the base crop's output tokens in the pruner's own order
(as LLaVA-1.5), then the sub-crop region in packed order: every output token of the sub-crops is placed at
its representative's packed position (for pure selection, exactly the packed order of the kept tokens), each
row's newline after that row's tokens. Merging pruners: a pool cell sits at its centre token, a VisionZip
contextual token at its target; a sub-crop's VisionZip CLS token sits just before the position of that crop's
first surviving (top-left) token. With ``positions="preserve"`` every token takes its representative's original position (CLS
tokens the image's first position, as in `vtprune.sequence`).

`ImageStats` for an image: ``tokens_in`` = N (packed, newlines included), ``tokens_out`` = K, and
``kept`` / ``order`` / ``assignment`` index that packed sequence (newlines are their own representatives).
``extra["crop_tokens"]``: ``(tokens_in, tokens_out)`` per crop, base first, then sub-crops in raster order of
the crop grid (``tokens_in`` counts surviving tokens only); ``extra["newlines"]``: the number of newline
tokens; ``extra["source_crop"]``: per output token its crop (0 = base, ``j`` = sub-crop j, -1 = newline).

Exactness: the tower runs on all crops of the batch at once and the projector on all of their features, as
in the unpatched model, so keeping every token (per_crop ``keep=576``, global ``ratio=1.0``) is bit-exact.
Positions default to ``compact`` (the LLaVA ports). Only ``vision_feature_select_strategy="default"`` (CLS
dropped, what every LLaVA-NeXT checkpoint uses) is supported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vtprune.errors import BudgetError, ConfigError, UnsupportedModelError
from vtprune.integration import EncodedImages, _synchronize, reduce_images
from vtprune.tokens import ImageStats

from .common.clip_attention import ClipAttentionProbe
from .llava import EncoderRun, LlavaCore, LlavaMerging

BUDGET_SCOPES = ("per_crop", "global")


@dataclass
class _Region:
    """The sub-crop grid of one image as a model resizes it after unpadding (LLaVA-OneVision's ``anyres_max``):
    its tokens are no longer patches of one crop but bilinear mixes of neighbouring ones."""

    first_crop: int  # the image's first sub-crop in the tower batch
    crop_grid: tuple[int, int]  # sub-crops (rows, cols)
    image_size: tuple[int, int]  # the original (height, width), for unpadding
    size: tuple[int, int]  # the resized grid (rows, cols)

    @property
    def crops(self) -> slice:
        return slice(self.first_crop, self.first_crop + self.crop_grid[0] * self.crop_grid[1])

    def resize(self, per_crop: torch.Tensor, crop_grid_tokens: tuple[int, int]) -> torch.Tensor:
        """``[sub-crops, rows * cols, C]`` per-crop tokens -> ``[h * w, C]`` the resized region in raster order, by
        the very operations the unpatched ``pack_image_features`` applies (so projected tokens are bit-identical)."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        (crop_rows, crop_cols), (rows, cols) = self.crop_grid, crop_grid_tokens
        grid = per_crop.view(crop_rows, crop_cols, rows, cols, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), self.image_size)
        grid = torch.nn.functional.interpolate(grid[None], list(self.size), mode="bilinear")[0]
        return grid.flatten(1, 2).transpose(0, 1)


@dataclass
class _Unit:
    """One pruner call: one crop of one image, restricted to its tokens that survive unpadding."""

    crop: int  # index of the crop in the tower batch
    index: int  # 0 = base crop, j = sub-crop j (raster order of the crop grid)
    patches: torch.Tensor  # [n] patch index inside the crop, or inside `region` (raster order of the unit grid)
    packed: torch.Tensor  # [n] position of each token in the image's packed sequence
    grid: tuple[int, int]
    region: _Region | None = None  # set when the model resizes the sub-crop grid: tokens are region tokens

    @property
    def size(self) -> int:
        return int(self.patches.numel())


@dataclass
class _Layout:
    """One image's packed sequence as the unpatched `pack_image_features` builds it."""

    length: int  # N: packed tokens, newlines included
    newlines: torch.Tensor  # packed positions of the newline tokens
    units: list[_Unit]  # base crop first, then every sub-crop (possibly empty)


def split_equally(total: int, capacities: list[int]) -> list[int]:
    """Split `total` as equally as possible over units of the given capacities (water-filling).

    The remainder of each round goes to the earliest units; a unit never gets more than its capacity, and what
    it cannot take is shared among the others. ``sum(result) == min(total, sum(capacities))``.
    """
    shares = [0] * len(capacities)
    remaining = total
    open_units = [u for u, c in enumerate(capacities) if c > 0]
    while remaining > 0 and open_units:
        share, extra = divmod(remaining, len(open_units))
        for rank, u in enumerate(open_units):
            give = min(capacities[u] - shares[u], share + (1 if rank < extra else 0))
            shares[u] += give
            remaining -= give
        open_units = [u for u in open_units if shares[u] < capacities[u]]
    return shares


class _CropProbe:
    """`AttentionProbe` over units: unit ``u`` is crop ``crops[u]`` of the tower batch, restricted to the
    patches ``patches[u]`` (softmax over the crop's whole encoder sequence, then those columns). A unit of a
    resized region takes the statistic of each of the region's crops, laid out and resized as the model resizes
    the features (`_Region.resize`), at its tokens."""

    def __init__(self, probe: ClipAttentionProbe, units: list[_Unit], crop_grid_tokens: tuple[int, int] | None = None) -> None:
        self.probe = probe
        self.units = units
        self.crop_grid_tokens = crop_grid_tokens
        self._regions: dict[tuple, torch.Tensor] = {}

    def _unit(self, image: int) -> _Unit:
        return self.units[image]

    def _resized(self, what: str, layer: int, region: _Region, per_crop) -> torch.Tensor:
        key = (what, layer, id(region))
        if key not in self._regions:
            crops = range(region.crops.start, region.crops.stop)
            self._regions[key] = region.resize(torch.stack([per_crop(crop) for crop in crops]), self.crop_grid_tokens)
        return self._regions[key]

    def cls_attention(self, layer: int, image: int) -> torch.Tensor:
        unit = self._unit(image)
        if unit.region is not None:
            resized = self._resized("cls", layer, unit.region, lambda c: self.probe.cls_attention(layer, c).T)
            return resized[unit.patches.to(resized.device)].T
        attn = self.probe.cls_attention(layer, unit.crop)
        return attn[:, unit.patches.to(attn.device)]

    def global_attention(self, layer: int, image: int) -> torch.Tensor:
        unit = self._unit(image)
        if unit.region is not None:
            resized = self._resized("global", layer, unit.region, lambda c: self.probe.global_attention(layer, c)[:, None])
            return resized[unit.patches.to(resized.device), 0]
        attn = self.probe.global_attention(layer, unit.crop)
        return attn[unit.patches.to(attn.device)]

    def keys(self, layer: int, image: int) -> torch.Tensor:
        unit = self._unit(image)
        if unit.region is not None:
            resized = self._resized("keys", layer, unit.region, lambda c: self.probe.keys(layer, c))
            return resized[unit.patches.to(resized.device)]
        keys = self.probe.keys(layer, unit.crop)
        return keys[unit.patches.to(keys.device)]


class AnyresCore(LlavaCore):
    """The anyres packing of LLaVA-NeXT and LLaVA-OneVision (see the module docstring): crops, unpadding,
    newlines, per-crop and global budgets, the packed output order. No in-encoder merging."""

    options = {"budget_scope": "per_crop"}

    def __init__(self, model: torch.nn.Module, pruner, **options) -> None:
        super().__init__(model, pruner, **options)
        scope = self.settings["budget_scope"]
        if scope not in BUDGET_SCOPES:
            raise ConfigError(f"budget_scope must be one of {', '.join(map(repr, BUDGET_SCOPES))}; got {scope!r}")
        self.scope = scope

    # ------------------------------------------------------------------ model facts
    @property
    def _pinpoints(self) -> list:
        return self.model.config.image_grid_pinpoints

    def _max_packed_tokens(self) -> int:
        """The largest packed sequence any image can produce (a pinpoint's full grid, nothing unpadded)."""
        rows, cols = self._grid()
        crop = self.model.config.vision_config.image_size
        best = 0
        for height, width in self._pinpoints:
            grid_rows, grid_cols = rows * (height // crop), cols * (width // crop)
            best = max(best, grid_rows * (grid_cols + 1))
        return rows * cols + best

    def _check_strategy(self, strategy) -> None:
        if strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported yet; vtprune supports 'default' "
                "(patch tokens only, CLS dropped), which every LLaVA-NeXT checkpoint uses"
            )

    def validate(self) -> None:
        self._check_strategy(self.model.config.vision_feature_select_strategy)
        if not self._pinpoints:
            raise UnsupportedModelError(f"this {type(self.model).__name__} config has no image_grid_pinpoints (anyres is required)")
        if self.scope == "per_crop" and self.pruner.budget.is_set:
            # keep > 576 (a full crop) fails for every image: fail now.
            grid = self._grid()
            where = f"a crop of {type(self.model).__name__} (budget_scope='per_crop': keep applies to every crop)"
            self.pruner.check(self.pruner.budget.resolve(grid[0] * grid[1], where=where), grid)
        else:
            keep, most = self.pruner.budget.keep, self._max_packed_tokens()
            if keep is not None and keep > most:
                raise BudgetError(
                    f"budget_scope='global': keep={keep} exceeds the {most} visual tokens (newlines included) "
                    f"the largest image layout of this model produces; use a smaller keep or a ratio in (0, 1]"
                )
        self.pruner.attention_layers(self.encoder_info())  # out-of-range layers fail now, not at the first call

    # ------------------------------------------------------------------ per call
    def encode(self, inputs: dict) -> EncodedImages:
        config = self.model.config
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(f"vision_feature_select_strategy={strategy!r} is not supported yet")
        pixel_values, crops_per_image = self.crop_batch(inputs)
        feature_layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        info = self.encoder_info(feature_layer)
        run = self.run_encoder(pixel_values, feature_layer, self.pruner.attention_layers(info))
        return self.reduce_anyres(run, inputs["image_sizes"], crops_per_image)

    def crop_batch(self, inputs: dict) -> tuple[torch.Tensor, list[int]]:
        """The tower batch of a call, ``[crops, C, H, W]`` with every image's crops in order (as the unpatched
        get_image_features stacks them), and the number of crops of each image.

        `encode` is ``crop_batch`` + `run_encoder` + `reduce_anyres`; callers that cache the tower pass (the
        speed benchmark) run the three steps themselves.
        """
        crops_per_image = self.crops_per_image(inputs)
        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() == 5:  # [images, max crops, C, H, W], padded: as the unpatched get_image_features
            pixel_values = torch.cat([pv[:count] for pv, count in zip(pixel_values, crops_per_image)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected 4 or 5 dimensions")
        if pixel_values.shape[0] != sum(crops_per_image):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but image_sizes implies {sum(crops_per_image)}"
            )
        return pixel_values, crops_per_image

    def crops_per_image(self, inputs: dict) -> list[int]:
        """Crops the tower sees for each image of a call: the base crop and the sub-crops of its layout."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"{type(self.model).__name__} needs image_sizes with pixel_values; pass the processor's output unchanged")
        crop_size = self.model.config.vision_config.image_size
        return [image_size_to_num_patches(size, grid_pinpoints=self._pinpoints, patch_size=crop_size) for size in image_sizes]

    def layout(self, image_size, first_crop: int, crops: int) -> _Layout:
        """The packed sequence of one image whose crops start at `first_crop` of the tower batch."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        rows, cols = self._grid()
        base = _Unit(
            crop=first_crop, index=0, patches=torch.arange(rows * cols), packed=torch.arange(rows * cols), grid=(rows, cols)
        )
        if crops == 1:  # no sub-crop: the unpatched model appends one newline after the base crop
            return _Layout(length=rows * cols + 1, newlines=torch.tensor([rows * cols]), units=[base])
        crop_rows, crop_cols = get_anyres_image_grid_shape(
            image_size, self._pinpoints, self.model.config.vision_config.image_size
        )
        if crop_rows * crop_cols != crops - 1:
            raise ValueError(f"image of size {image_size} has {crops - 1} sub-crops but a {crop_rows}x{crop_cols} layout")
        height, width = crop_rows * rows, crop_cols * cols
        # The same unpadding as the unpatched model, applied to the big grid's raster indices.
        kept = unpad_image(torch.arange(height * width).view(1, height, width), image_size)[0]
        out_rows, out_cols = kept.shape
        y = torch.arange(out_rows)[:, None].expand(out_rows, out_cols).reshape(-1)
        x = torch.arange(out_cols)[None, :].expand(out_rows, out_cols).reshape(-1)
        big = kept.reshape(-1)
        big_r, big_c = big // width, big % width
        crop_of = (big_r // rows) * crop_cols + big_c // cols + 1
        patch_of = (big_r % rows) * cols + big_c % cols
        packed_of = rows * cols + y * (out_cols + 1) + x
        units = [base]
        for j in range(1, crops):
            mask = crop_of == j
            unit_rows, unit_cols = int(torch.unique(y[mask]).numel()), int(torch.unique(x[mask]).numel())
            if unit_rows * unit_cols != int(mask.sum()):
                raise RuntimeError(f"sub-crop {j} does not survive unpadding as a rectangle")
            units.append(
                _Unit(
                    crop=first_crop + j, index=j, patches=patch_of[mask], packed=packed_of[mask], grid=(unit_rows, unit_cols)
                )
            )
        newlines = rows * cols + torch.arange(out_rows) * (out_cols + 1) + out_cols
        return _Layout(length=rows * cols + out_rows * (out_cols + 1), newlines=newlines, units=units)

    def _budgets(self, image: int, layout: _Layout) -> list[int]:
        budget = self.pruner.budget
        sizes = [unit.size for unit in layout.units]
        if self.scope == "per_crop":
            # The base crop is always a full grid: keep > 576 raises here as it does at apply time.
            out = [budget.resolve(sizes[0], where=f"the base crop of image {image}")]
            for n in sizes[1:]:
                if n == 0:
                    out.append(0)
                elif budget.keep is not None:
                    out.append(min(budget.keep, n))  # a sub-crop cut by unpadding keeps all it has
                else:
                    out.append(budget.resolve(n))
            return out
        rows = int(layout.newlines.numel())
        where = f"image {image} ({layout.length} tokens: {rows} newlines and {sum(sizes)} patch tokens)"
        total = budget.resolve(layout.length, where=where)
        if total < rows + 1:
            raise BudgetError(
                f"budget_scope='global': keep={total} leaves no visual token for {where}; the {rows} newline "
                f"tokens are always kept, so keep must be at least {rows + 1} for this image"
            )
        return split_equally(total - rows, sizes)

    def reduce_anyres(self, run: EncoderRun, image_sizes, crops_per_image: list[int]) -> EncodedImages:
        """Reduce every image of an encoder run over all crops of the batch (nothing is cached across calls)."""
        projector = self.model.model.multi_modal_projector
        device = run.features.device
        _synchronize(device)
        started = time.perf_counter()

        layouts, budgets = [], []
        first = 0
        for i, crops in enumerate(crops_per_image):
            layouts.append(self.layout(image_sizes[i], first, crops))
            budgets.append(self._budgets(i, layouts[-1]))
            first += crops
        units = [(i, u, unit) for i, layout in enumerate(layouts) for u, unit in enumerate(layout.units) if budgets[i][u] > 0]
        for i, u, unit in units:
            try:
                self.pruner.check(budgets[i][u], unit.grid)
            except ConfigError as error:
                raise type(error)(
                    f"image {i}, crop {unit.index} ({unit.grid[0]}x{unit.grid[1]} tokens after unpadding, "
                    f"budget {budgets[i][u]}): {error}"
                ) from error

        cache: dict[str, torch.Tensor] = {}

        def batch_projection() -> torch.Tensor:
            if "p" not in cache:  # all crops at once, exactly as the unpatched model projects them
                cache["p"] = projector(run.features)
            return cache["p"]

        gather = self.unit_gatherer()
        unit_list = [unit for _, _, unit in units]
        reduced = reduce_images(
            self.pruner,
            [gather(unit, run.features) for unit in unit_list],
            [unit.grid for unit in unit_list],
            run.info,
            project=projector,
            probe=_CropProbe(run.probe(self._blocks, visual=self._patch_slice), unit_list, self._grid()),
            cls_features=None if run.cls_features is None else [run.cls_features[unit.crop] for unit in unit_list],
            projected=lambda: [gather(unit, batch_projection()) for unit in unit_list],
            budgets=[budgets[i][u] for i, u, _ in units],
        )

        newline = self.model.model.image_newline
        per_image: list[list[tuple[_Unit, int]]] = [[] for _ in layouts]
        for position, (i, _, unit) in enumerate(units):
            per_image[i].append((unit, position))
        embeds, orders, stats = [], [], []
        for i, layout in enumerate(layouts):
            embed, order, stat = self._assemble(layout, per_image[i], reduced, newline, budgets[i])
            embeds.append(embed)
            orders.append(order)
            stats.append(stat)
        _synchronize(device)
        return EncodedImages(embeds=embeds, order=orders, stats=stats, selection_seconds=time.perf_counter() - started)

    def unit_gatherer(self):
        """``gather(unit, per_crop)``: a unit's tokens of a per-crop tensor ``[crops, rows * cols, C]`` (a resized
        region is resized once per tensor)."""
        resized: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def gather(unit: _Unit, tensor: torch.Tensor) -> torch.Tensor:
            if unit.region is None:
                return tensor[unit.crop][unit.patches.to(tensor.device)]
            key = (id(unit.region), id(tensor))
            if key not in resized:
                resized[key] = (tensor, unit.region.resize(tensor[unit.region.crops], self._grid()))
            return resized[key][1][unit.patches.to(tensor.device)]

        return gather

    def _assemble(self, layout: _Layout, results, reduced: EncodedImages, newline: torch.Tensor, budgets: list[int]):
        """One image's output: base crop in the pruner's order, then the sub-crop region in packed order."""
        head_embeds, head_order, head_crop, head_owner = [], [], [], []
        tail_embeds, tail_order, tail_key, tail_crop, tail_owner = [], [], [], [], []
        dtype = None
        for unit, position in results:
            local = reduced.order[position].cpu()
            packed = torch.where(local >= 0, unit.packed[local.clamp(min=0)], torch.full_like(local, -1))
            emb = reduced.embeds[position]
            dtype = emb.dtype
            owner = torch.stack([torch.full_like(local, position), torch.arange(local.numel())], dim=1)
            if unit.index == 0:
                head_embeds.append(emb)
                head_order.append(packed)
                head_crop.append(torch.zeros_like(local))
                head_owner.append(owner)
            else:
                # A sub-crop's CLS token goes right before the crop's first surviving token.
                key = torch.where(local >= 0, 2 * packed, 2 * unit.packed[0] - 1)
                tail_embeds.append(emb)
                tail_order.append(packed)
                tail_key.append(key)
                tail_crop.append(torch.full_like(local, unit.index))
                tail_owner.append(owner)
        rows = layout.newlines.numel()
        if dtype is None:
            dtype = newline.dtype
        device = reduced.embeds[0].device if reduced.embeds else newline.device
        tail_embeds.append(newline.to(device=device, dtype=dtype)[None].expand(rows, -1))
        tail_order.append(layout.newlines)
        tail_key.append(2 * layout.newlines)
        tail_crop.append(torch.full((rows,), -1, dtype=torch.long))
        tail_owner.append(torch.full((rows, 2), -1, dtype=torch.long))

        permutation = torch.sort(torch.cat(tail_key), stable=True).indices
        order = torch.cat(head_order + [torch.cat(tail_order)[permutation]])
        embed = torch.cat(head_embeds + [torch.cat(tail_embeds)[permutation.to(device)]])
        source_crop = torch.cat(head_crop + [torch.cat(tail_crop)[permutation]])
        owner = torch.cat(head_owner + [torch.cat(tail_owner)[permutation]])

        # assignment over the packed sequence: the output slot each packed token went to (-1 = dropped).
        assignment = torch.full((layout.length,), -1, dtype=torch.long)
        newline_slots = (owner[:, 0] == -1).nonzero().squeeze(1)
        assignment[order[newline_slots]] = newline_slots
        crop_tokens = []
        by_unit = {unit.index: (unit, position) for unit, position in results}
        for u, unit in enumerate(layout.units):
            if unit.index not in by_unit:
                crop_tokens.append((unit.size, 0))
                continue
            _, position = by_unit[unit.index]
            slots = (owner[:, 0] == position).nonzero().squeeze(1)
            local_to_slot = torch.empty(slots.numel(), dtype=torch.long)
            local_to_slot[owner[slots, 1]] = slots
            local_assignment = reduced.stats[position].assignment
            hit = local_assignment >= 0
            assignment[unit.packed[hit]] = local_to_slot[local_assignment[hit]]
            crop_tokens.append((unit.size, budgets[u]))
        stat = ImageStats(
            tokens_in=layout.length,
            tokens_out=int(order.numel()),
            kept=torch.unique(order[order >= 0]),
            order=order,
            assignment=assignment,
            extra={"crop_tokens": crop_tokens, "newlines": rows, "source_crop": source_crop, "budget_scope": self.scope},
        )
        return embed, order, stat



class LlavaNextIntegration(LlavaMerging, AnyresCore):
    """LLaVA-NeXT anyres; see the module docstring for budget scopes, unpadding and output order.

    Shares LLaVA-1.5's encoder run (CLIP tower with captured blocks), placeholders, embeddings and positions,
    and its in-encoder merging (DyMU), crop by crop.
    """

    model_classes = ("LlavaNextForConditionalGeneration",)
    visual_kwargs = ("pixel_values",)
    encoder_kwargs = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaNextForConditionalGeneration

        return isinstance(model, LlavaNextForConditionalGeneration)

    # ------------------------------------------------------------------ in-encoder merging (DyMU and alike)
    def _crops(self, pixel_values: torch.Tensor, image_sizes) -> tuple[torch.Tensor, list[int]]:
        return self.crop_batch({"pixel_values": pixel_values, "image_sizes": image_sizes})

    def calibration_pixels(self, images, processor) -> torch.Tensor:
        """Every anyres crop of every image (base and sub-crops): DyMU merges each crop separately."""
        if processor is None:
            raise ValueError("calibrating on images needs processor=<the model's processor or image processor>")
        image_processor = getattr(processor, "image_processor", processor)
        out = image_processor(images=list(images), return_tensors="pt")
        pixel_values, _ = self._crops(out["pixel_values"], out["image_sizes"])
        return pixel_values.to(self.model.device, self.model.dtype)

    def encode_merged(self, inputs: dict) -> EncodedImages:
        """Merge inside the tower, crop by crop; then pack as the unpatched model (unpadding, newlines).

        Each crop's merge groups are restricted to the crop's tokens that survive unpadding; a merged token whose
        members were all cut is dropped (the unpatched LLM never sees those tokens either). In the packed output a
        merged token sits at the packed position of its first surviving member (see the module docstring).
        """
        config = self.model.config
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(f"vision_feature_select_strategy={strategy!r} is not supported yet")
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values; pass the processor's output unchanged")
        pixel_values, crops_per_image = self._crops(inputs["pixel_values"], image_sizes)
        feature_layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        crop_units, projected, history, seconds = self.merged_units(pixel_values, feature_layer)

        layouts, first = [], 0
        for i, crops in enumerate(crops_per_image):
            layouts.append(self.layout(image_sizes[i], first, crops))
            first += crops
        embeds, orders, unit_stats, owners = [], [], [], []
        for i, layout in enumerate(layouts):
            for unit in layout.units:
                if unit.size == 0:
                    continue
                positions, _, crop_assignment = crop_units[unit.crop]
                local = crop_assignment[unit.patches.to(crop_assignment.device)]
                present, slot_of = torch.unique(local, return_inverse=True)
                count = unit.size
                first_member = torch.full((present.numel(),), count, dtype=torch.long, device=local.device)
                first_member = first_member.scatter_reduce(0, slot_of, torch.arange(count, device=local.device), reduce="amin")
                order, permutation = torch.sort(first_member)
                rank = torch.empty_like(permutation)
                rank[permutation] = torch.arange(permutation.numel(), device=local.device)
                embeds.append(projected[unit.crop, positions[present[permutation]]])
                orders.append(order)
                unit_stats.append(
                    ImageStats(tokens_in=count, tokens_out=int(order.numel()), kept=order.cpu(), order=order.cpu(),
                               assignment=rank[slot_of].cpu())
                )
                owners.append((i, unit))
        reduced = EncodedImages(embeds=embeds, order=orders, stats=unit_stats, selection_seconds=seconds)

        newline = self.model.model.image_newline
        out_embeds, out_orders, stats = [], [], []
        for i, layout in enumerate(layouts):
            results = [(unit, position) for position, (owner, unit) in enumerate(owners) if owner == i]
            out_counts = {id(unit): unit_stats[position].tokens_out for unit, position in results}
            budgets = [out_counts.get(id(unit), 0) for unit in layout.units]
            embed, order, stat = self._assemble(layout, results, reduced, newline, budgets)
            stat.extra.pop("budget_scope", None)
            stat.extra["crop_tokens_per_block"] = [[int(h[unit.crop]) for h in history] for unit in layout.units]
            out_embeds.append(embed)
            out_orders.append(order)
            stats.append(stat)
        self._merged_call = (inputs, stats)
        return EncodedImages(embeds=out_embeds, order=out_orders, stats=stats, selection_seconds=seconds)
