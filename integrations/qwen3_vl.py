"""Qwen3-VL (dense and MoE, DeepStack) and Qwen3.5 (dense and MoE), transformers 5.x:
`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`, `Qwen3_5ForConditionalGeneration`,
`Qwen3_5MoeForConditionalGeneration`.

Their vision towers are Qwen2-VL's design (16-pixel patches, temporal patch 2, a 2x2 `PatchMerger`, no CLS, full
attention in every block, one attention segment per image and per temporal group of a video) with learned
position embeddings added to the patches, so everything `vtprune.integrations.qwen_vl` says about the hook point,
the recomputed attention rows, the budgets (``ratio``, ``video_keep``, ``video_ratio``, ``video_scope``) and
M-RoPE positions holds here. What differs:

DeepStack (Qwen3-VL): the tower also taps blocks ``deepstack_visual_indexes`` (8, 16, 24 in the 8B and 30B-A3B;
5, 11, 17 in the 2B and 4B), each through its own merger into LLM space, and the language model adds level ``i``
to the hidden states of the visual positions after decoder layer ``i``. vtprune reduces every level with the
indices (and, for merging pruners, the merge groups and weights, `vtprune.tokens.Reduction.carry`) of the main
tokens of the same image or video, and hands the language model the ``visual_pos_masks`` of the kept tokens and
the reduced levels in sequence order, so that level ``i`` row ``r`` belongs to the same kept token as the ``r``-th
visual embedding. Qwen3.5 has no DeepStack.

Video prompts: the processor writes ``<t seconds><|vision_start|> frame tokens <|vision_end|>`` for each temporal
group, so a clip's placeholders form one run per group. The kept tokens of a group stay in that group's run,
after its timestamp (a group may keep none under ``video_scope="video"``; its timestamp and vision markers stay),
in their order within the group; with preserved positions each keeps its own interleaved M-RoPE ids.

Scores: no CLS, so the CLS-attention pruners use the global-attention fallback. HiPrune's object layer is the
paper's block 16 of 32 scaled to the tower's depth, as for every family, whether or not it is a DeepStack block:
the rule is about depth (where attention has localised objects), and a DeepStack tap does not change what a block
attends to. In the released towers that is block 12 of 24 (0-based 11, a DeepStack block of the 2B and 4B) and
block 14 of 27 (0-based 13, not a DeepStack block of the 8B and 30B-A3B).

Qwen3.5's language model mixes linear-attention (gated DeltaNet) and full-attention layers; it runs on the pruned
sequence and its hybrid cache like on any prompt (the recurrent layers see the pruned sequence in order).
"""

from __future__ import annotations

import torch

from vtprune.integration import EncodedImages

from .qwen_vl import QwenVLIntegration

QWEN3_CLASSES = (
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
)


class _PendingDeepStack:
    """The DeepStack input of one pruned prefill: ``[B, L']`` kept visual positions and the reduced levels."""

    def __init__(self, mask: torch.Tensor, levels: list[torch.Tensor]) -> None:
        self.mask = mask
        self.levels = levels

    def for_batch(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mask and levels for a language-model input `embeds` ``[B * k, L', D]`` (``generate`` repeats each
        row k times for beams or several return sequences)."""
        batch, length = self.mask.shape
        if embeds.shape[1] != length or embeds.shape[0] % batch:
            raise RuntimeError(
                f"the pruned prefill of {batch} x {length} tokens reached the language model as "
                f"{embeds.shape[0]} x {embeds.shape[1]}; vtprune cannot place its DeepStack features"
            )
        copies = embeds.shape[0] // batch
        if copies == 1:
            return self.mask, self.levels
        per_row = self.mask.sum(dim=1).tolist()
        levels = [
            torch.cat([chunk for chunk in torch.split(level, per_row) for _ in range(copies)]) for level in self.levels
        ]
        return self.mask.repeat_interleave(copies, dim=0), levels


class Qwen3VLIntegration(QwenVLIntegration):
    encoder_merging_unsupported = (
        "its ViT ends in a PatchMerger that concatenates each 2x2 group of four consecutive patches of a fixed grid "
        "(and Qwen3-VL's DeepStack mergers tap intermediate blocks on the same groups), so tokens merged inside the "
        "ViT no longer form those groups; merging after the merger would not shorten the ViT. Use a post-merger "
        "pruner (fastervlm, hiprune, divprune, visionzip, pool, random)"
    )
    model_classes = QWEN3_CLASSES
    encoder_kwargs = ("image_grid_thw", "video_grid_thw")
    video_frame_runs = True

    def __init__(self, model: torch.nn.Module, pruner, **options) -> None:
        super().__init__(model, pruner, **options)
        self._carried: list[list[torch.Tensor]] | None = None
        self._pending: _PendingDeepStack | None = None

    @classmethod
    def matches(cls, model) -> bool:
        import transformers

        classes = tuple(getattr(transformers, name) for name in QWEN3_CLASSES if hasattr(transformers, name))
        return isinstance(model, classes)

    @property
    def has_deepstack(self) -> bool:
        return bool(getattr(self._visual, "deepstack_visual_indexes", None))

    def install(self, handle) -> None:
        super().install(handle)
        if not self.has_deepstack:
            return

        def add_deepstack(module, args, kwargs):
            pending, self._pending = self._pending, None
            embeds = kwargs.get("inputs_embeds")
            if pending is None or embeds is None or kwargs.get("deepstack_visual_embeds") is not None:
                return None
            kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = pending.for_batch(embeds)
            return args, kwargs

        # First of the language model's pre-hooks, so that hooks registered before apply see what it receives.
        hook = self.model.model.language_model.register_forward_pre_hook(add_deepstack, with_kwargs=True, prepend=True)

        def remove() -> None:
            self._pending = None
            hook.remove()

        handle.on_remove(remove)

    def encode(self, inputs: dict) -> EncodedImages:
        self._pending, self._carried = None, None
        encoded = super().encode(inputs)
        if self.has_deepstack:
            if encoded.carried is None:
                raise RuntimeError("the Qwen3-VL vision tower returned no DeepStack features")
            self._carried = encoded.carried
        return encoded

    def after_prefill(self, sequence, for_generate: bool) -> None:
        super().after_prefill(sequence, for_generate)
        carried, self._carried = self._carried, None
        if carried is None:
            return
        mask = self.placeholder_mask(sequence.input_ids) & sequence.attention_mask.bool()
        levels = [torch.cat([visual[level] for visual in carried]) for level in range(len(carried[0]))]
        if levels and levels[0].shape[0] != int(mask.sum()):
            raise RuntimeError(f"{levels[0].shape[0]} DeepStack rows for {int(mask.sum())} kept visual positions")
        self._pending = _PendingDeepStack(mask, levels)
