"""InternVL (`InternVLForConditionalGeneration`, transformers 5.x: InternVL3 / 3.5 "-hf" checkpoints): images as
tiles plus a thumbnail, and video frames.

What the unpatched model does: the processor cuts an image into up to ``max_patches`` tiles of the tower's size
(the grid closest to the image's aspect ratio, row-major) plus a thumbnail of the whole image (last; none when
there is one tile), and writes ``<img>``, ``image_seq_length`` placeholders per tile, ``</img>``: one run per
image. Every tile goes through InternViT (a CLS token, then 32 x 32 patches at 448 px); the hidden state of
``vision_feature_layer`` drops the CLS (``"default"``), is pixel-shuffled with ``downsample_ratio`` 0.5 (each LLM
token is a 2 x 2 block of patches, its four features concatenated top-left, top-right, bottom-left,
bottom-right: 16 x 16 tokens per tile) and goes through the projector (LayerNorm, MLP), per token. A video's
frames reach the model as one-tile images, one ``<img>...</img>`` run each after a ``FrameN:`` label.

vtprune prunes the LLM's tokens, after the pixel shuffle:

- A tile's 16 x 16 tokens are the pruner's tokens; their features are the pixel-shuffled features (the
  projector's input, captured as the model computed it). Merged tokens (VisionZip's contextual tokens, ``pool``
  with ``space="vision"``) are merged there and projected; selected tokens are the unpatched projector's own
  outputs, so keeping every token is bit-exact.
- Scores that come from ViT patches are pooled onto the shuffled tokens explicitly: a token's CLS attention
  (FasterVLM, VisionZip's dominant tokens: InternViT has a real CLS token, softmax over CLS and patches as in
  the tower) and its received attention (HiPrune) are the **sums** over its four patches; its key (VisionZip's
  similarity) is the mean of its patches' keys. Statistics come from the scored block's q / k (after q_norm /
  k_norm) as the tower computed them, never a full attention map.
- Budgets, ``budget_scope`` (as LLaVA-NeXT's): ``"per_crop"`` (default) gives `keep` (or `ratio`) to every tile
  and to the thumbnail; ``"global"`` makes `keep` the total the LLM receives for the image, split equally over
  its tiles and thumbnail (remainder to the earliest), each tile pruned with its share; a `ratio` resolves
  against the image's tokens. A video's frames are one-tile images to the model (the processor marks nothing
  else), so each frame gets the per-tile budget.
- The kept tokens of an image fill its run tile after tile (the thumbnail last), each tile's in the pruner's
  order. `ImageStats` of an image index its run (tile ``t`` from ``t * image_seq_length``), with
  ``extra["tiles"]`` and ``extra["tile_tokens"]`` (``(tokens_in, tokens_out)`` per tile).

VisionZip gets no CLS token to keep: the model drops it before the pixel shuffle, and its feature has no place
in the shuffled space the projector reads. Positions default to ``compact`` (a Qwen2 / Llama LLM, 1-D positions).
DyMU is refused: the pixel shuffle needs every patch of the grid. Only ``vision_feature_select_strategy=
"default"`` and ``downsample_ratio=0.5`` (every released checkpoint) are supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.attention import QKAttentionProbe, captured
from vtprune.capture import capture_layers
from vtprune.errors import BudgetError, ConfigError, UnsupportedModelError
from vtprune.integration import EncodedImages, reduce_images
from vtprune.tokens import EncoderInfo, ImageStats

from .common.pooled_attention import PooledProbe, grid_pool
from .llava import LlavaCore, hidden_state_to_block
from .llava_next import BUDGET_SCOPES, split_equally


class InternViTProbe(QKAttentionProbe):
    """`AttentionProbe` over a batch of tiles for InternViT blocks (``layernorm_before``, ``attention.{q,k}_proj``,
    ``q_norm`` / ``k_norm``), patches only (the CLS first in the sequence).

    `projections`: block index -> ``(q_norm output, k_norm output)`` as the tower computed them; a block without
    them has its queries and keys recomputed from its captured input."""

    def __init__(self, blocks, block_inputs: dict[int, torch.Tensor], projections: dict | None = None) -> None:
        super().__init__(visual=slice(1, None))
        self.blocks, self.block_inputs, self.projections = blocks, block_inputs, projections or {}

    def _compute_qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[layer]
        attn = block.attention
        if layer in self.projections:
            queries, keys = self.projections[layer]
        else:
            x = block.layernorm_before(captured(self.block_inputs, layer))
            queries, keys = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x))
        tiles, length, _ = queries.shape
        q = queries.view(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2).float() * attn.scale
        k = keys.view(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        return q, k


@dataclass
class TiledEncoderRun:
    """One pass of the tower, pixel shuffle and projector over every tile of a call."""

    info: EncoderInfo
    tokens: torch.Tensor  # [R, T, D_llm]: the unpatched projector's output
    shuffled: torch.Tensor  # [R, T, 4 C]: the pixel-shuffled features, the projector's input
    block_inputs: dict[int, torch.Tensor]
    projections: dict[int, tuple[torch.Tensor, torch.Tensor]]


def _side(value) -> int:
    """An InternVL vision config size: an int or a ``[height, width]`` pair (square tiles)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"non-square InternViT tiles ({value}) are not supported")
        return int(value[0])
    return int(value)


class InternVLIntegration(LlavaCore):
    """InternVL images (tiles and thumbnail) and video frames; see the module docstring."""

    encoder_merging_unsupported = (
        "its pixel shuffle concatenates every 2 x 2 block of the full patch grid into one token, which tokens "
        "merged inside the vision tower no longer form. Use a post-encoder pruner on InternVL (fastervlm, "
        "hiprune, divprune, visionzip, random, pool)"
    )
    model_classes = ("InternVLForConditionalGeneration",)
    options = {"budget_scope": "per_crop"}
    visual_kwargs = ("pixel_values",)
    encoder_kwargs = ("vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model: torch.nn.Module, pruner, **options) -> None:
        super().__init__(model, pruner, **options)
        if self.settings["budget_scope"] not in BUDGET_SCOPES:
            raise ConfigError(
                f"budget_scope must be one of {', '.join(map(repr, BUDGET_SCOPES))}; got {self.settings['budget_scope']!r}"
            )

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import InternVLForConditionalGeneration

        return isinstance(model, InternVLForConditionalGeneration)

    # ------------------------------------------------------------------ model facts
    @property
    def _blocks(self):
        return self._tower.encoder.layer

    def _patch_grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = _side(vision.image_size) // _side(vision.patch_size)
        return side, side

    def _grid(self) -> tuple[int, int]:
        rows, cols = self._patch_grid()
        return rows // 2, cols // 2

    @property
    def _tile_tokens(self) -> int:
        rows, cols = self._grid()
        return rows * cols

    def encoder_info(self, feature_layer=None) -> EncoderInfo:
        feature_layer = self.model.config.vision_feature_layer if feature_layer is None else feature_layer
        if not isinstance(feature_layer, int):
            raise UnsupportedModelError(f"vision_feature_layer={feature_layer!r}: vtprune supports one int layer on InternVL")
        depth = len(self._blocks)
        return EncoderInfo(depth=depth, feature_layer=hidden_state_to_block(feature_layer, depth), has_cls=True)

    def _check_model(self, strategy) -> None:
        if strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported; vtprune supports 'default' (CLS "
                "dropped before the pixel shuffle), what every InternVL checkpoint uses"
            )
        ratio = self.model.config.downsample_ratio
        rows, cols = self._patch_grid()
        if ratio != 0.5 or rows % 2 or cols % 2:
            raise UnsupportedModelError(
                f"downsample_ratio={ratio} on a {rows} x {cols} patch grid is not supported; vtprune supports the "
                "0.5 pixel shuffle (2 x 2 patches per token) of every InternVL checkpoint"
            )

    def validate(self) -> None:
        self._check_model(self.model.config.vision_feature_select_strategy)
        if self.settings["budget_scope"] == "per_crop":
            keep = self.pruner.budget.resolve(self._tile_tokens, where=f"a tile of {type(self.model).__name__}")
            self.pruner.check(keep, self._grid())
        # "global": an image's tokens depend on its tiles, so its budget is checked per image at the call.
        self.pruner.attention_layers(self.encoder_info())

    # ------------------------------------------------------------------ per call
    def run_encoder(self, pixel_values: torch.Tensor, feature_layer, strategy, attention_layers: set[int]) -> TiledEncoderRun:
        """The unpatched path from tiles to LLM tokens (`get_image_features`), capturing the projector's input and,
        for `attention_layers`, the block inputs and the queries and keys as the blocks computed them."""
        info = self.encoder_info(feature_layer)
        layers = sorted(attention_layers)
        norms = [m for i in layers for m in (self._blocks[i].attention.q_norm, self._blocks[i].attention.k_norm)]
        projector = self.model.model.multi_modal_projector
        with capture_layers(self._blocks, inputs=set(layers)) as (block_inputs, _), capture_layers(
            norms, outputs=set(range(len(norms)))
        ) as (_, normed), capture_layers([projector], inputs={0}) as (projector_input, _):
            output = self.model.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                return_dict=True,
            )
        return TiledEncoderRun(
            info=info,
            tokens=output.pooler_output,
            shuffled=projector_input[0],
            block_inputs=block_inputs,
            projections={layer: (normed[2 * n], normed[2 * n + 1]) for n, layer in enumerate(layers)},
        )

    def _tiles_per_image(self, input_ids: torch.Tensor, rows: int) -> list[int]:
        """Tiles of each image, in prompt order: each placeholder run holds `image_seq_length` tokens per tile."""
        per_tile = self._tile_tokens
        placeholders = self.placeholder_mask(input_ids)
        runs = []
        for row in placeholders:
            edges = torch.diff(torch.cat([row.new_zeros(1), row.int(), row.new_zeros(1)]).int())
            starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
            runs += (ends - starts).tolist()
        if any(n % per_tile for n in runs) or sum(runs) != rows * per_tile:
            raise ValueError(
                f"the prompts hold image placeholder runs of {runs} tokens, but pixel_values holds {rows} tiles of "
                f"{per_tile} tokens; pass the processor's full output for these prompts"
            )
        return [n // per_tile for n in runs]

    def _budgets(self, tiles: list[int]) -> list[list[int]]:
        """Tokens kept per tile of each image."""
        per_tile, budget = self._tile_tokens, self.pruner.budget
        if self.settings["budget_scope"] == "per_crop":
            keep = budget.resolve(per_tile, where="each tile")
            return [[keep] * n for n in tiles]
        shares = []
        for i, n in enumerate(tiles):
            total = budget.resolve(n * per_tile, where=f"image {i} ({n} tiles)")
            if total < n:
                raise BudgetError(
                    f"budget_scope='global': keep={total} leaves no token for some of the {n} tiles of image {i}; "
                    f"use keep >= {n} or budget_scope='per_crop'"
                )
            shares.append(split_equally(total, [per_tile] * n))
        return shares

    def encode(self, inputs: dict) -> EncodedImages:
        config = self.model.config
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        feature_layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        self._check_model(strategy)
        run = self.run_encoder(inputs["pixel_values"], feature_layer, strategy, self.pruner.attention_layers(self.encoder_info(feature_layer)))
        return self.reduce(run, self._tiles_per_image(inputs["input_ids"], run.tokens.shape[0]))

    def probe(self, run: TiledEncoderRun) -> PooledProbe:
        """Per tile, the statistics of its shuffled tokens: CLS and received attention summed over each token's
        2 x 2 patches, keys averaged."""
        patch_grid = self._patch_grid()
        return PooledProbe(
            InternViTProbe(self._blocks, run.block_inputs, run.projections),
            grid_pool(patch_grid, 2, reduce="sum"),
            keys_pool=grid_pool(patch_grid, 2, reduce="mean"),
        )

    def reduce(self, run: TiledEncoderRun, tiles: list[int]) -> EncodedImages:
        budgets = self._budgets(tiles)
        rows = run.shuffled.shape[0]
        probe = self.probe(run)
        projector = self.model.model.multi_modal_projector
        per_tile = reduce_images(
            self.pruner,
            [run.shuffled[r] for r in range(rows)],
            [self._grid()] * rows,
            run.info,
            project=projector,
            probe=probe,
            projected=lambda: list(run.tokens),
            gather_projected=True,  # the unpatched path projected every token already: gather, never project again
            budgets=[keep for image in budgets for keep in image],
        )
        embeds, orders, stats, first = [], [], [], 0
        for n in tiles:
            parts = per_tile.stats[first : first + n]
            offsets = [t * self._tile_tokens for t in range(n)]
            joined = ImageStats.join(parts, offsets)
            joined.extra = {"tiles": n, "tile_tokens": [(p.tokens_in, p.tokens_out) for p in parts]}
            embeds.append(torch.cat(per_tile.embeds[first : first + n]))
            orders.append(joined.order.to(run.tokens.device))
            stats.append(joined)
            first += n
        return EncodedImages(embeds=embeds, order=orders, stats=stats, selection_seconds=per_tile.selection_seconds)
