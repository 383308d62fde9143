"""Gemma 3 (`Gemma3ForConditionalGeneration`, transformers 5.x): images, pan-and-scan crops included.

What the unpatched model does: each ``pixel_values`` row (an image, or one pan-and-scan crop of it) goes through
the SigLIP tower (no CLS; the released 896 px images are 64 x 64 patches); the projector average-pools the last
hidden state (after ``post_layernorm``) over non-overlapping ``k x k`` blocks of the patch grid (``k =
patches_per_side / sqrt(mm_tokens_per_image)``: 4, so 256 tokens), applies an RMS norm and one linear map. The
processor writes every row as ``<start_of_image>``, ``mm_tokens_per_image`` soft tokens, ``<end_of_image>``, and
``token_type_ids`` (1 on the soft tokens) make the language model attend bidirectionally inside each image.

vtprune prunes where the LLM's tokens are, after the pooling:

- Each row's ``mm_tokens_per_image`` pooled tokens (a ``sqrt x sqrt`` grid) are the pruner's tokens; the budget
  applies to every row (an image and each of its crops alike). Their features are the pooled vision features,
  the projector's input after its `AvgPool2d`; merged tokens (VisionZip's contextual tokens, pool) are merged
  there and go through the projector's norm and linear map. Selected tokens are the unpatched projector's own
  outputs, so keeping every token is bit-exact.
- Attention statistics are computed per patch from the captured block (its q / k projections as the tower
  computed them) and pooled onto the tokens as the features are: the mean over each token's ``k x k`` patches
  of the attention they receive, of their keys. SigLIP has no CLS token, so the CLS-attention pruners
  (FasterVLM, VisionZip's dominant tokens) use their documented fallback, the mean attention each token receives
  (``cls_fallback="global"``; ``"error"`` refuses).
- The kept tokens of an image stay one block between its ``<start_of_image>`` and ``<end_of_image>``, and
  ``token_type_ids`` are shortened with the sequence, so the bidirectional image mask covers exactly the kept
  tokens of each image (passed with ``inputs_embeds``, Gemma 3 rebuilds its masks from them).

Positions default to ``compact`` (1-D positions; ``preserve`` keeps each token's original position). DyMU is
refused: the projector pools the full patch grid, which tokens merged inside the tower no longer form.

transformers 5.25's `Gemma3ForConditionalGeneration.prepare_inputs_for_generation` does not name
``inputs_embeds``, so `generate` refuses them; while patched, the instance gets a pass-through that names it
(removed with the patch), which is what lets the pruned sequence reach `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.capture import capture_layers
from vtprune.integration import EncodedImages, reduce_images
from vtprune.tokens import EncoderInfo

from .common.clip_attention import ClipAttentionProbe
from .common.pooled_attention import PooledProbe, grid_pool
from .llava import LlavaCore


@dataclass
class PooledEncoderRun:
    """One pass of the tower and projector over a batch of images (crops)."""

    tokens: torch.Tensor  # [I, T, D_llm]: the unpatched projector's output, what the LLM receives
    pooled: torch.Tensor  # [I, T, C]: the pooled vision features, the projector's input after its pooling
    block_inputs: dict[int, torch.Tensor]
    projections: dict[int, tuple[torch.Tensor, torch.Tensor]]


class Gemma3Integration(LlavaCore):
    """Gemma 3 images and pan-and-scan crops; see the module docstring."""

    encoder_merging_unsupported = (
        "its projector average-pools the full patch grid of every image, which tokens merged inside the vision "
        "tower no longer form. Use a post-encoder pruner on Gemma 3 (fastervlm, hiprune, divprune, visionzip, "
        "random, pool)"
    )
    model_classes = ("Gemma3ForConditionalGeneration",)
    visual_kwargs = ("pixel_values",)
    token_kwargs = {"labels": -100, "token_type_ids": 0}

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import Gemma3ForConditionalGeneration

        return isinstance(model, Gemma3ForConditionalGeneration)

    # ------------------------------------------------------------------ model facts
    @property
    def _projector(self):
        return self.model.model.multi_modal_projector

    def _patch_grid(self) -> tuple[int, int]:
        side = self._projector.patches_per_image
        return side, side

    def _grid(self) -> tuple[int, int]:
        side = self._projector.tokens_per_side
        return side, side

    def encoder_info(self) -> EncoderInfo:
        depth = len(self._blocks)
        return EncoderInfo(depth=depth, feature_layer=depth - 1, has_cls=False)

    def validate(self) -> None:
        self.check_budget(self._grid())
        self.pruner.attention_layers(self.encoder_info())

    def install(self, handle) -> None:
        super().install(handle)
        original = self.model.prepare_inputs_for_generation

        def prepare_inputs_for_generation(input_ids, inputs_embeds=None, **kwargs):
            return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)

        handle.set_attribute("prepare_inputs_for_generation", prepare_inputs_for_generation)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.model.config.image_token_id >= self.model.model.vocab_size:
            # As the unpatched forward: an out-of-vocabulary soft token is embedded as id 0 (then replaced).
            input_ids = input_ids.masked_fill(input_ids == self.model.config.image_token_id, 0)
        return self.model.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ per call
    def _project_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The projector after its pooling (RMS norm, linear map), per token."""
        projector = self._projector
        return torch.matmul(projector.mm_soft_emb_norm(pooled), projector.mm_input_projection_weight).type_as(pooled)

    def run_encoder(self, pixel_values: torch.Tensor, attention_layers: set[int]) -> PooledEncoderRun:
        """The unpatched path from pixels to LLM tokens (`get_image_features`), capturing the inputs and q / k
        projections of `attention_layers` and the projector's pooled features (what the pruner reads)."""
        layers = sorted(attention_layers)
        projection_modules = [m for i in layers for m in (self._blocks[i].self_attn.q_proj, self._blocks[i].self_attn.k_proj)]
        with capture_layers(self._blocks, inputs=set(layers)) as (block_inputs, _), capture_layers(
            projection_modules, outputs=set(range(len(projection_modules)))
        ) as (_, projected), capture_layers([self._projector.avg_pool], outputs={0}) as (_, pooled):
            # The unpatched path itself: its projected tokens are what a kept token gets, bit for bit.
            output = self.model.model.get_image_features(pixel_values, return_dict=True)
        return PooledEncoderRun(
            tokens=output.pooler_output,
            pooled=pooled[0].flatten(2).transpose(1, 2),  # [I, C, rows, cols] as the projector pooled them -> [I, T, C]
            block_inputs=block_inputs,
            projections={layer: (projected[2 * n], projected[2 * n + 1]) for n, layer in enumerate(layers)},
        )

    def encode(self, inputs: dict) -> EncodedImages:
        run = self.run_encoder(inputs["pixel_values"], self.pruner.attention_layers(self.encoder_info()))
        return self.reduce(run)

    def reduce(self, run: PooledEncoderRun) -> EncodedImages:
        images = run.pooled.shape[0]
        probe = PooledProbe(
            ClipAttentionProbe(self._blocks, run.block_inputs, visual=slice(0, None), projections=run.projections),
            grid_pool(self._patch_grid(), self._projector.kernel_size, reduce="mean"),
        )
        return reduce_images(
            self.pruner,
            [run.pooled[i] for i in range(images)],
            [self._grid()] * images,
            self.encoder_info(),
            project=self._project_pooled,
            probe=probe,
            projected=lambda: list(run.tokens),
            gather_projected=True,  # the unpatched path projected every token already: gather, never project again
        )
