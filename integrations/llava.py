"""LLaVA-1.5 (`LlavaForConditionalGeneration`, transformers 5.x).

Hook point: after the CLIP vision tower. The features of `vision_feature_layer` (default -2, CLS dropped) are
reduced per image; selected tokens are gathered from the projection of all tokens (the projector runs on the
whole batch exactly as in the unpatched model, so keeping every token is bit-exact); merged vision-space
tokens are projected after merging. Positions default to ``compact`` (all LLaVA ports and papers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.capture import capture_layers
from vtprune.errors import UnsupportedModelError
from vtprune.integration import EncodedImages, VLMEncoderMerging, VLMIntegration, reduce_images
from vtprune.tokens import EncoderInfo

from vtprune.merging.dtome import groups
from vtprune.merging.vtu import build_virtual_map
from vtprune.sequence import find_image_slots
from vtprune.tokens import ImageStats

from .common.clip_attention import ClipAttentionProbe
from .common.encoder_merging import ClipStyleBlocks, run_merging_blocks
from .common.virtual_unmerging import VirtualUnmerging


@dataclass
class EncoderRun:
    """One pass of the vision tower: features of the feature layer and captured block inputs."""

    info: EncoderInfo
    features: torch.Tensor  # [I, N, D] patch features (CLS dropped)
    cls_features: torch.Tensor | None  # [I, D]
    block_inputs: dict[int, torch.Tensor]
    projections: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Block index -> its ``(q_proj, k_proj)`` outputs as the tower computed them (the probe need not redo them)."""

    def probe(self, blocks, visual: slice) -> ClipAttentionProbe:
        """The attention probe over this run's images (crops, frames) for the tower's `blocks`."""
        return ClipAttentionProbe(blocks, self.block_inputs, visual=visual, projections=self.projections)


CLS_ENCODERS = ("clip_vision_model",)


def hidden_state_to_block(index: int, depth: int) -> int:
    """`hidden_states[index]` of a transformers encoder is the output of block ``index - 1`` (entry 0 is the
    embedding output), so negative indices map directly: -2 is the output of block ``depth - 2``."""
    normalized = index % (depth + 1)
    if normalized == 0:
        raise UnsupportedModelError("vision_feature_layer 0 (the patch embeddings) is not supported by vtprune")
    return normalized - 1


class LlavaCore(VLMIntegration):
    """What the LLaVA families share: a CLIP / SigLIP tower run once with the blocks a pruner reads captured,
    the placeholders, token embeddings and 1-D positions of a Llama / Qwen2 language model. No in-encoder
    merging: a family opts into that with `LlavaMerging`."""

    default_positions = "compact"

    # ------------------------------------------------------------------ model facts
    @property
    def _tower(self):
        return self.model.model.vision_tower

    @property
    def _blocks(self):
        return self._tower.encoder.layers

    @property
    def _patch_slice(self) -> slice:
        """The patch tokens of the feature layer's sequence: ``1:`` for the "default" strategy (CLS dropped)."""
        return slice(1, None)

    def _feature_blocks(self, feature_layer) -> list[int]:
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        return [hidden_state_to_block(layer, len(self._blocks)) for layer in layers]

    def encoder_info(self, feature_layer=None) -> EncoderInfo:
        feature_layer = self.model.config.vision_feature_layer if feature_layer is None else feature_layer
        return EncoderInfo(
            depth=len(self._blocks),
            feature_layer=self._feature_blocks(feature_layer)[-1],
            has_cls=self.model.config.vision_config.model_type in CLS_ENCODERS,
        )

    def _grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def run_encoder(self, pixel_values: torch.Tensor, feature_layer, attention_layers: set[int]) -> EncoderRun:
        """Run the vision tower once, capturing the feature layer and, for `attention_layers`, the block inputs
        and the q / k projections the blocks compute (so the probe does not compute them again)."""
        info = self.encoder_info(feature_layer)
        feature_blocks = self._feature_blocks(feature_layer)
        layers = sorted(attention_layers)
        projection_modules = [m for i in layers for m in (self._blocks[i].self_attn.q_proj, self._blocks[i].self_attn.k_proj)]
        with capture_layers(self._blocks, inputs=attention_layers, outputs=set(feature_blocks)) as captured, capture_layers(
            projection_modules, outputs=set(range(len(projection_modules)))
        ) as (_, projected):
            self._tower(pixel_values)
        block_inputs, block_outputs = captured
        projections = {layer: (projected[2 * n], projected[2 * n + 1]) for n, layer in enumerate(layers)}
        hidden = [block_outputs[b] for b in feature_blocks]
        patches = self._patch_slice
        # Sliced exactly as the unpatched get_image_features does, so the projector sees identical tensors.
        features = torch.cat([h[:, patches] for h in hidden], dim=-1) if len(hidden) > 1 else hidden[0][:, patches]
        cls_features = None
        if info.has_cls:
            cls_features = torch.cat([h[:, 0] for h in hidden], dim=-1) if len(hidden) > 1 else hidden[0][:, 0]
        return EncoderRun(info=info, features=features, cls_features=cls_features, block_inputs=block_inputs, projections=projections)

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.model.config.image_token_id

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def original_position_ids(self, inputs: dict, for_generate: bool) -> torch.Tensor:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if for_generate and mask is not None:
            # What generate() derives from the attention mask.
            return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        # What the Llama decoder uses when no position ids are given: 0..L-1, padding included.
        batch, length = input_ids.shape
        return torch.arange(length, device=input_ids.device).expand(batch, length)


class LlavaMerging(VLMEncoderMerging):
    """In-encoder merging (DyMU and alike) on a CLIP-style LLaVA tower, with virtual token unmerging in the LLM
    when the method asks for it. Mixed into `LlavaCore` families (LLaVA-1.5, LLaVA-NeXT)."""

    def _merging_blocks(self, feature_layer=None) -> int:
        feature_layer = self.model.config.vision_feature_layer if feature_layer is None else feature_layer
        if not isinstance(feature_layer, int):
            raise UnsupportedModelError(
                f"in-encoder merging needs one vision_feature_layer (got {feature_layer!r}): merged token sets "
                "differ between layers, so features of several layers cannot be concatenated"
            )
        return self._feature_blocks(feature_layer)[-1] + 1

    def validate_merging(self) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported yet; vtprune supports 'default'"
            )
        self.pruner.begin(self._merging_blocks())  # per-block settings of the wrong length fail now
        ClipStyleBlocks(self._blocks, self.model.config.vision_config._attn_implementation)

    def merging_geometry(self) -> tuple[int, int]:
        rows, cols = self._grid()
        return self._merging_blocks(), rows * cols

    def calibration_pixels(self, images, processor) -> torch.Tensor:
        if processor is None:
            raise ValueError("calibrating on images needs processor=<the model's processor or image processor>")
        image_processor = getattr(processor, "image_processor", processor)
        pixel_values = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.model.device, self.model.dtype)

    def run_merging(self, pixel_values: torch.Tensor, merger, feature_layer=None):
        """The CLIP tower (embeddings, pre-norm, blocks up to the feature layer) with `merger` in every block."""
        tower = self._tower
        blocks = self._merging_blocks(feature_layer)
        hidden = tower.embeddings(pixel_values)
        pre_norm = getattr(tower, "pre_layrnorm", None)
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        runner = ClipStyleBlocks(self._blocks, self.model.config.vision_config._attn_implementation)
        protected = 1 if self.encoder_info().has_cls else 0
        return run_merging_blocks(runner, hidden, merger, blocks, protected)

    def merged_units(self, pixel_values: torch.Tensor, feature_layer) -> tuple[list, torch.Tensor, list[torch.Tensor], float]:
        """Encode with the pruner merging in the encoder; per encoder image: ``(positions, order, assignment)``
        (see `vtprune.merging.groups`), the projection of the padded batch, per-block counts and merge time."""
        merger = self.pruner
        state, history = self.run_merging(pixel_values, merger, feature_layer)
        skip = state.protected
        # The projector runs on the whole padded batch at once, as the unpatched model projects its features.
        projected = self.model.model.multi_modal_projector(state.x[:, skip:])
        counts = state.counts.tolist()
        units = [groups(state.where[i], counts[i], skip=skip) for i in range(state.x.shape[0])]
        units = [(positions - skip, order, assignment) for positions, order, assignment in units]
        return units, projected, [h - skip for h in history], merger.merge_seconds

    def encode_merged(self, inputs: dict) -> EncodedImages:
        if inputs.get("image_sizes") is not None:
            raise NotImplementedError("image_sizes (variable-resolution vision towers) is not supported for LLaVA")
        strategy = inputs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(f"vision_feature_select_strategy={strategy!r} is not supported yet")
        feature_layer = inputs.get("vision_feature_layer") or self.model.config.vision_feature_layer
        units, projected, history, seconds = self.merged_units(inputs["pixel_values"], feature_layer)
        tokens = self._grid()[0] * self._grid()[1]
        embeds, orders, stats = [], [], []
        for i, (positions, order, assignment) in enumerate(units):
            embeds.append(projected[i, positions])
            orders.append(order)
            stats.append(
                ImageStats(
                    tokens_in=tokens,
                    tokens_out=int(order.numel()),
                    kept=order.cpu(),
                    order=order.cpu(),
                    assignment=assignment.cpu(),
                    extra={"tokens_per_block": [int(h[i]) for h in history]},
                )
            )
        self._merged_call = (inputs, stats)
        return EncodedImages(embeds=embeds, order=orders, stats=stats, selection_seconds=seconds)

    def install(self, handle) -> None:
        super().install(handle)
        self._vtu = None
        if getattr(self.pruner, "virtual_unmerging", False):
            self._vtu = VirtualUnmerging(handle, self.model.model.language_model)
            self._vtu.install()

    def after_prefill(self, sequence, for_generate: bool) -> None:
        vtu, call = getattr(self, "_vtu", None), getattr(self, "_merged_call", None)
        self._merged_call = None
        if vtu is None or call is None:
            return
        inputs, stats = call
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        positions = inputs.get("position_ids")
        if positions is None:
            positions = self.original_position_ids(inputs, for_generate)
        slots = find_image_slots(self.placeholder_mask(input_ids), [s.tokens_in for s in stats])
        vtu.prepare(
            build_virtual_map(
                sequence.source,
                mask,
                positions,
                [slot.row for slot in slots],
                [slot.positions for slot in slots],
                [s.assignment for s in stats],
            )
        )


class LlavaIntegration(LlavaMerging, LlavaCore):
    """LLaVA-1.5: one 336 px image per placeholder run, in-encoder merging (DyMU) included."""

    model_classes = ("LlavaForConditionalGeneration",)
    visual_kwargs = ("pixel_values",)
    encoder_kwargs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaForConditionalGeneration

        return type(model) is LlavaForConditionalGeneration or (
            isinstance(model, LlavaForConditionalGeneration) and hasattr(model.model, "multi_modal_projector")
        )

    def validate(self) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported yet; vtprune supports 'default' "
                "(patch tokens only, CLS dropped), which every LLaVA-1.5 checkpoint uses"
            )
        self.check_budget(self._grid())
        self.pruner.attention_layers(self.encoder_info())  # out-of-range layers fail now, not at the first call

    # ------------------------------------------------------------------ per call
    def encode(self, inputs: dict) -> EncodedImages:
        if inputs.get("image_sizes") is not None:
            raise NotImplementedError("image_sizes (variable-resolution vision towers) is not supported for LLaVA")
        config = self.model.config
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "default":
            raise UnsupportedModelError(f"vision_feature_select_strategy={strategy!r} is not supported yet")
        feature_layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        info = self.encoder_info(feature_layer)
        return self.reduce(self.run_encoder(inputs["pixel_values"], feature_layer, self.pruner.attention_layers(info)))

    def reduce(self, run: EncoderRun) -> EncodedImages:
        """Reduce every image of an encoder run (attention recomputed afresh: nothing is cached across calls)."""
        projector = self.model.model.multi_modal_projector
        images = run.features.shape[0]
        return reduce_images(
            self.pruner,
            [run.features[i] for i in range(images)],
            [self._grid()] * images,
            run.info,
            project=projector,
            probe=run.probe(self._blocks, visual=slice(1, None)),
            cls_features=None if run.cls_features is None else [run.cls_features[i] for i in range(images)],
            projected=lambda: list(projector(run.features)),
        )
