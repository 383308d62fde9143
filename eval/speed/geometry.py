"""The benchmarked model families at their published geometry (random weights): the `Case` base, one subclass per
family (`LlavaCase`, `QwenCase`, `LlavaNextCase`, `QwenVideoCase`, `OnevisionVideoCase`, `Qwen3VLCase`,
`Gemma3Case`, `InternVLCase`), `CASES`, `DEFAULT_FAMILIES`, and the FLOPs of a geometry
(`vtprune.flops.prefill_flops`, `FLOPS_CONVENTION`). To add a family, subclass `Case` here and list it in `CASES`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vtprune.eval.speed.measure import clock
from vtprune.flops import prefill_flops

FLOPS_CONVENTION = "per decoder layer 4*n*d^2 + 2*n^2*d + 2*n*d*m (FastV / DivPrune), times the full depth"


class Case:
    """One model family at real geometry. Subclasses know the model; the benchmark loop knows nothing of it.

    To add a family, implement the methods below and list the class in `CASES`.
    """

    name = ""
    label = ""
    budgets: tuple[int, ...] = ()
    full_layers = 0
    image_token_id = 0
    apply_options: ClassVar[dict[str, Any]] = {}
    """Family options every `vtprune.apply` of the benchmark passes (LLaVA-NeXT: its budget scope)."""

    def budget_options(self, keep: int) -> dict[str, Any]:
        """The `vtprune.apply` budget for a row of `keep` visual tokens (images: ``keep``; videos: ``video_keep``)."""
        return {"keep": keep}

    def __init__(self, llm_layers: int, text_tokens: int, tiny: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.llm_layers = llm_layers or self.full_layers  # 0: full depth
        self.text_tokens = text_tokens
        self.tiny = tiny
        self.device = device
        self.dtype = dtype
        self.model: Any = None
        self.geometry: dict = {}
        self.hidden = self.ffn = self.kv_heads = self.head_dim = 0

    # ------------------------------------------------------------------ per family
    def integration_class(self):
        raise NotImplementedError

    def tokens_per_image(self) -> int:
        raise NotImplementedError

    def build(self) -> torch.nn.Module:
        """Build `self.model` (random weights, eval mode, SDPA) on `self.device` in `self.dtype`."""
        raise NotImplementedError

    def inputs(self) -> dict:
        """The keyword arguments of one call with one image, as the family's processor would give them."""
        raise NotImplementedError

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> "RunCache":
        """One vision-tower pass through the integration's own encoder step, capturing what pruners read."""
        raise NotImplementedError

    def time_vision(self, inputs: dict, attention_layers: set[int], repeats: int) -> tuple["RunCache", list[float]]:
        """Run the vision tower `repeats` times; return the last pass and the times."""
        integration = self.integration_class()(self.model, _any_pruner(), **self.apply_options)
        times, cache = [], None
        for _ in range(repeats):
            start = clock(self.device)
            cache = self.encode_once(integration, inputs, attention_layers)
            times.append(clock(self.device) - start)
        return cache, times

    def install_cache(self, handle, cache: "RunCache") -> None:
        """Make the patched model reuse the cached tower pass: the integration's own encode() still runs (and
        everything after it), only its `run_encoder` returns the cached pass."""
        handle.integration.run_encoder = lambda *args, **kwargs: cache.run

    def unpruned_llm_inputs(self, inputs: dict, cache) -> dict:
        """What the unpatched model computes after its tower: the LLM's ``inputs_embeds`` (and positions)."""
        raise NotImplementedError

    def _splice(self, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `ids` with `visual` scattered into the image placeholders, as the unpatched model."""
        embeds = self.model.get_input_embeddings()(ids)
        mask = (ids == self.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, visual.to(embeds.dtype))

    def expected_visual(self, cache, order: torch.Tensor) -> torch.Tensor:
        """LLM-space embeddings of the visual tokens `order`, recomputed independently of vtprune."""
        raise NotImplementedError

    def oracle_kwargs(self, sequence, pruned_inputs: dict) -> dict:
        """The unpatched forward's arguments for exactly the pruned sequence of a pruned run (`pruned_inputs`: what
        that run handed the language model): its embeddings, mask and positions."""
        return {
            "inputs_embeds": sequence.inputs_embeds,
            "attention_mask": sequence.attention_mask,
            "position_ids": sequence.position_ids,
            **{k: v for k, v in sequence.extras.items() if v is not None},
        }

    def score_heads_and_length(self) -> tuple[int, int]:
        """Heads (times the images or crops the tower runs at once) and sequence length of the encoder block
        pruners score at (for the attention-map size)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers

    @property
    def language_model(self):
        return self.model.model.language_model

    def kv_bytes_per_layer(self, n: int) -> int:
        return 2 * n * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def flops(self, n: int) -> float:
        return prefill_flops(n, self.hidden, self.ffn, self.full_layers)

    def _construct(self, model_class, config) -> torch.nn.Module:
        """Build on the device in the benchmark dtype, initialising every weight once (N(0, 0.02), norms 1,
        biases 0): transformers' constructor would initialise twice, ~30 s for 1 B parameters on 2 cores."""
        from transformers.initialization import no_init_weights

        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), no_init_weights():
                model = model_class(config)
        finally:
            torch.set_default_dtype(previous)
        generator = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif param.ndim == 1 and "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        if getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.get_input_embeddings().weight
        model.set_attn_implementation("sdpa")
        return model.eval()

    @staticmethod
    def _text_ids(count: int, high: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(10, high, (count,), generator=generator)


class RunCache:
    """The cached tower pass: what the integration's `run_encoder` returned (LLaVA: an `EncoderRun` with
    features, CLS and captured block inputs; Qwen: a `QwenEncoderRun` with the merged tokens)."""

    def __init__(self, run) -> None:
        self.run = run


class LlavaCase(Case):
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (reduced depth)."""

    name = "llava-1.5-7b"
    label = "LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B width)"
    budgets = (192, 128, 64)
    full_layers = 32
    image_token_id = 32000  # llava-hf: <image> = 32000, vocab 32064

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tiny = self.tiny
        width, heads, layers, hidden, ffn, text_heads = (
            (32, 4, 4, 64, 128, 4) if tiny else (1024, 16, 24, 4096, 11008, 32)
        )
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, text_heads, hidden // text_heads
        self.geometry = {
            "vision": {"model": "CLIP ViT", "image_size": 336, "patch_size": 14, "hidden": width,
                       "intermediate": 4 * width, "layers": layers, "heads": heads},
            "projector": f"{width} -> {hidden} -> {hidden} (GELU)",
            "llm": {"model": "Llama (Vicuna-7B geometry)", "hidden": hidden, "intermediate": ffn, "heads": text_heads,
                    "kv_heads": text_heads, "vocab": 32064, "layers_run": self.llm_layers,
                    "layers_full": self.full_layers},
        }

    def integration_class(self):
        from vtprune.integrations.llava import LlavaIntegration

        return LlavaIntegration

    def tokens_per_image(self) -> int:
        return 576

    def _tower_and_llm_configs(self):
        """The CLIP ViT-L/14-336 tower and the Vicuna-7B-width Llama configs (shared with LLaVA-NeXT)."""
        from transformers import CLIPVisionConfig, LlamaConfig

        v, t = self.geometry["vision"], self.geometry["llm"]
        vision = CLIPVisionConfig(
            image_size=336, patch_size=14, hidden_size=v["hidden"], intermediate_size=v["intermediate"],
            num_hidden_layers=v["layers"], num_attention_heads=v["heads"], projection_dim=768,
        )
        text = LlamaConfig(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            max_position_embeddings=4096, pad_token_id=0,
        )
        return vision, text

    def build(self):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        vision, text = self._tower_and_llm_configs()
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=self.image_token_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", pad_token_id=0,
        )
        self.model = self._construct(LlavaForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        before = min(5, self.text_tokens)  # "USER: <image>\n{question} ASSISTANT:"
        ids = torch.cat([
            self._text_ids(before, 30000, g),
            torch.full((self.tokens_per_image(),), self.image_token_id),
            self._text_ids(self.text_tokens - before, 30000, g),
        ])[None]
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "pixel_values": torch.randn(*self._pixel_shape(), generator=g).to(self.device, self.dtype),
        }

    def _pixel_shape(self) -> tuple[int, ...]:
        return (1, 3, 336, 336)

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values"], -2, attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        embeds = self._splice(inputs["input_ids"], self.model.model.multi_modal_projector(cache.run.features))
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(cache.run.features[0][order.to(self.device)])

    def score_heads_and_length(self) -> tuple[int, int]:
        v = self.geometry["vision"]
        return v["heads"], 577


class QwenCase(Case):
    """Qwen2-VL-2B: Qwen2-VL ViT at 448 x 448 + Qwen2-1.5B (reduced depth)."""

    name = "qwen2-vl-2b"
    label = "Qwen2-VL-2B (Qwen2-VL ViT at 448x448, Qwen2-1.5B)"
    budgets = (192, 128, 64)
    full_layers = 28
    image_token_id = 151655

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tiny = self.tiny
        if tiny:
            vision = {"depth": 4, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2}
            hidden, ffn, heads, kv, mrope = 64, 128, 4, 2, [4, 2, 2]
        else:
            vision = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}
            hidden, ffn, heads, kv, mrope = 1536, 8960, 12, 2, [16, 24, 24]
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, kv, hidden // heads
        self.image_size = 448
        self.geometry = {
            "vision": {"model": "Qwen2-VL ViT", **vision, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "image_size": self.image_size, "out_hidden": hidden},
            "llm": {"model": "Qwen2 (Qwen2-1.5B geometry)", "hidden": hidden, "intermediate": ffn, "heads": heads,
                    "kv_heads": kv, "vocab": 151936, "mrope_section": mrope, "layers_run": self.llm_layers,
                    "layers_full": self.full_layers, "tie_word_embeddings": True},
        }

    def integration_class(self):
        from vtprune.integrations.qwen_vl import QwenVLIntegration

        return QwenVLIntegration

    @property
    def _side(self) -> int:
        return self.image_size // 14

    def tokens_per_image(self) -> int:
        return (self._side // 2) ** 2

    def build(self):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        v, t = self.geometry["vision"], self.geometry["llm"]
        text = dict(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            max_position_embeddings=32768, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": t["mrope_section"], "rope_theta": 1000000.0},
        )
        vision = dict(
            depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=t["hidden"], num_heads=v["num_heads"],
            mlp_ratio=v["mlp_ratio"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        self.model = self._construct(Qwen2VLForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        side, tokens = self._side, self.tokens_per_image()
        before = min(4, self.text_tokens)  # "<|im_start|>user\n<|vision_start|>...<|vision_end|>{question}..."
        vision_start, vision_end = 151652, 151653
        ids = torch.cat([
            self._text_ids(before, 150000, g),
            torch.tensor([vision_start]),
            torch.full((tokens,), self.image_token_id),
            torch.tensor([vision_end]),
            self._text_ids(max(0, self.text_tokens - before - 2), 150000, g),
        ])[None]
        grid = torch.tensor([[1, side, side]])
        patches = side * side
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "mm_token_type_ids": (ids == self.image_token_id).int().to(self.device),
            "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=g).to(self.device, self.dtype),
            "image_grid_thw": grid.to(self.device),
        }

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values"], inputs["image_grid_thw"], attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        ids = inputs["input_ids"]
        embeds = self._splice(ids, cache.run.merged)
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "position_ids": positions}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return cache.run.merged[order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        v = self.geometry["vision"]
        return v["num_heads"], self._side * self._side


class QwenVideoCase(QwenCase):
    """Qwen2-VL-2B on a video: 16 frames at 448 x 448 (8 temporal groups of 16 x 16 merged tokens: 2048), one
    selection over the whole clip (``video_scope="video"``)."""

    name = "qwen2-vl-2b-video"
    label = "Qwen2-VL-2B video (16 frames at 448x448: 8 temporal groups, Qwen2-1.5B)"
    budgets = (512, 205)  # 25 % and 10 % of the clip's 2048 tokens
    image_token_id = 151656  # <|video_pad|>: the placeholder this case splices
    frames = 16

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.geometry["vision"]["frames"] = self.frames

    @property
    def _groups(self) -> int:
        return self.frames // 2  # temporal patch 2

    def budget_options(self, keep: int) -> dict[str, Any]:
        return {"keep": 1, "video_keep": keep}  # keep (images) is unused: the call has only the video

    def tokens_per_image(self) -> int:
        return self._groups * (self._side // 2) ** 2

    def inputs(self) -> dict:
        ids = super().inputs()["input_ids"]  # the image prompt with this case's placeholder and token count
        g = torch.Generator().manual_seed(2)
        patches = self._groups * self._side * self._side
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (2 * (ids == self.image_token_id)).int(),
            "pixel_values_videos": torch.randn(patches, 3 * 2 * 14 * 14, generator=g).to(self.device, self.dtype),
            "video_grid_thw": torch.tensor([[self._groups, self._side, self._side]]).to(self.device),
        }

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values_videos"], inputs["video_grid_thw"], attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        ids = inputs["input_ids"]
        embeds = self._splice(ids, cache.run.merged)
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "position_ids": positions}

    def score_heads_and_length(self) -> tuple[int, int]:
        heads, per_group = super().score_heads_and_length()  # the ViT attends within each temporal group
        return heads * self._groups, per_group


class LlavaNextRunCache(RunCache):
    """The cached tower pass over every crop (`LlavaIntegration.run_encoder` on `crop_batch`'s batch), the crop
    counts and image sizes, and the unpatched packed visual sequence for the identity check (filled on first
    use, outside every timed region)."""

    def __init__(self, run, crops_per_image: list[int], image_sizes: torch.Tensor) -> None:
        super().__init__(run)
        self.crops_per_image = crops_per_image
        self.image_sizes = image_sizes
        self.packed: torch.Tensor | None = None


class LlavaNextCase(LlavaCase):
    """LLaVA-NeXT-7B (llava-v1.6-vicuna-7b geometry): CLIP ViT-L/14-336 anyres + Vicuna-7B (reduced depth).

    Tower, projector and LLM as `LlavaCase`; the llava-v1.6 `image_grid_pinpoints`. One 672 x 672 image: the
    2x2 pinpoint, so a base crop and four sub-crops, 5 x 576 = 2880 patch tokens; a square image on a square
    grid loses nothing to unpadding, and the unpatched model appends one newline per row of the 48 x 48
    sub-crop grid: it packs 576 + 48 x 49 = 2928 visual tokens (`tokens_per_image`, taken from the model's own
    `pack_image_features`). No image gets closer to 2880 packed: unpadding cuts rows or columns in pairs, so the
    nearest layouts are 2928 (nothing cut) and 2832 / 2830 (two columns / rows cut).

    ``budget_scope="global"``: `keep` is the total the LLM receives for the image, the 48 newlines included
    (keep=640 is 48 newlines + 592 patch tokens split equally over the five crops), which is what a budget of
    "640 / 320 / 160 of 2880" compares against. ``"per_crop"`` would apply `keep` to each of the five crops
    (5 x keep + 48 tokens). Pool cannot tile every equal share on a 24 x 24 crop (118 = 2 x 59): such rows
    are reported under ``skipped`` with the `BudgetError`, not measured.
    """

    name = "llava-next-7b"
    label = "LLaVA-NeXT-7B (CLIP ViT-L/14-336 anyres, Vicuna-7B width)"
    budgets = (640, 320, 160)
    full_layers = 32
    image_token_id = 32000  # llava-hf llava-v1.6-vicuna: <image> = 32000, vocab 32064
    apply_options: ClassVar[dict[str, Any]] = {"budget_scope": "global"}
    grid_pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    """llava-v1.6 resolutions, (height, width)."""
    image_size = (672, 672)
    """(height, width) of the benchmark image, as the processor reports it in ``image_sizes``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.geometry["anyres"] = {
            "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints], "image_size": list(self.image_size),
            "budget_scope": self.apply_options["budget_scope"],
        }
        self._packed_tokens: int | None = None
        self._crops = 0

    def integration_class(self):
        from vtprune.integrations.llava_next import LlavaNextIntegration

        return LlavaNextIntegration

    def tokens_per_image(self) -> int:
        if self._packed_tokens is None:
            raise RuntimeError("tokens_per_image() is known once build() has run")
        return self._packed_tokens

    def build(self):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vision, text = self._tower_and_llm_configs()
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=self.image_token_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=[list(p) for p in self.grid_pinpoints],
            image_seq_length=576, pad_token_id=0,
        )
        self.model = self._construct(LlavaNextForConditionalGeneration, config)
        self._crops = image_size_to_num_patches(list(self.image_size), config.image_grid_pinpoints, 336)
        # The length the unpatched model packs (unpadding, newlines), from its own code on placeholder features.
        placeholder = [torch.zeros(self._crops, 576, 1)]
        packed, _ = self.model.model.pack_image_features(
            placeholder, torch.tensor([self.image_size]), "default", image_newline=torch.zeros(1)
        )
        self._packed_tokens = int(packed[0].shape[0])
        self.geometry["anyres"].update(crops=self._crops, patch_tokens=self._crops * 576, packed_tokens=self._packed_tokens)
        return self.model

    def inputs(self) -> dict:
        return {**super().inputs(), "image_sizes": torch.tensor([self.image_size]).to(self.device)}

    def _pixel_shape(self) -> tuple[int, ...]:
        return (1, self._crops, 3, 336, 336)

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> LlavaNextRunCache:
        # Timed as the unpatched model pays it: crop batching, then the tower over every crop. The patched
        # model still runs its own crop_batch and reduce_anyres around the cached pass.
        pixel_values, crops_per_image = integration.crop_batch(inputs)
        run = integration.run_encoder(pixel_values, -2, attention_layers)
        return LlavaNextRunCache(run=run, crops_per_image=crops_per_image, image_sizes=inputs["image_sizes"])

    def _unpatched_packed(self, cache: LlavaNextRunCache) -> torch.Tensor:
        """What the unpatched get_image_features does after its tower: the projector on every crop at once,
        then the model's own pack_image_features (sub-crop grid, unpadding, newlines, base crop first)."""
        inner = self.model.model
        features = torch.split(inner.multi_modal_projector(cache.run.features), cache.crops_per_image, dim=0)
        packed, _ = inner.pack_image_features(features, cache.image_sizes, "default", image_newline=inner.image_newline)
        return torch.cat(packed, dim=0)

    def unpruned_llm_inputs(self, inputs: dict, cache: LlavaNextRunCache) -> dict:
        ids = inputs["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        packed = self._unpatched_packed(cache).to(embeds.dtype)
        mask = self.model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=packed)
        return {"inputs_embeds": embeds.masked_scatter(mask, packed), "attention_mask": inputs["attention_mask"]}

    def expected_visual(self, cache: LlavaNextRunCache, order: torch.Tensor) -> torch.Tensor:
        # For a pure selection, stats.order indexes the packed sequence (newline slots included), so the visual
        # columns are rows of what the unpatched model would have spliced in.
        if cache.packed is None:
            cache.packed = self._unpatched_packed(cache)
        return cache.packed[order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        # The tower runs all crops as one batch, so one map of the score block covers every crop.
        return self.geometry["vision"]["heads"] * self._crops, 577


class OnevisionVideoCase(Case):
    """LLaVA-OneVision-0.5B (llava-onevision-qwen2-0.5b-ov geometry) on a video: SigLIP so400m (26 blocks, width
    1152, 384 px, 27 x 27 patches) + Qwen2-0.5B (reduced depth, full depth 24). 8 frames: each frame's 729 tokens
    projected and pooled to 14 x 14 = 196, then one newline after the video: 8 x 196 + 1 = 1569 tokens. One
    selection over the whole clip (``video_scope="video"``); budgets 392 / 156 (25 % / 10 % of the 1568 pooled
    tokens) as ``video_keep``, the newline kept on top."""

    name = "llava-onevision-0.5b-video"
    label = "LLaVA-OneVision-0.5B video (8 frames at 384x384: SigLIP so400m, Qwen2-0.5B)"
    budgets = (392, 156)  # 25 % and 10 %: 156 = 12 x 13, so pool tiles it on the 112 x 14 clip
    full_layers = 24
    image_token_id = 151647  # <video>: the placeholder this case splices (llava-hf: <image> = 151646)
    frames = 8

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        width, inter, layers, heads = (32, 64, 4, 4) if self.tiny else (1152, 4304, 26, 16)
        hidden, ffn, text_heads, kv = (64, 128, 4, 2) if self.tiny else (896, 4864, 14, 2)
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, kv, hidden // text_heads
        self.geometry = {
            "vision": {"model": "SigLIP (so400m geometry)", "image_size": 384, "patch_size": 14, "hidden": width,
                       "intermediate": inter, "layers": layers, "heads": heads, "frames": self.frames,
                       "pooled_grid": [14, 14]},
            "projector": f"{width} -> {hidden} -> {hidden} (GELU)",
            "llm": {"model": "Qwen2 (Qwen2-0.5B geometry)", "hidden": hidden, "intermediate": ffn, "heads": text_heads,
                    "kv_heads": kv, "vocab": 152000, "layers_run": self.llm_layers, "layers_full": self.full_layers,
                    "tie_word_embeddings": True},
        }

    def integration_class(self):
        from vtprune.integrations.llava_onevision import LlavaOnevisionIntegration

        return LlavaOnevisionIntegration

    def budget_options(self, keep: int) -> dict[str, Any]:
        return {"keep": 1, "video_keep": keep}  # keep (images) is unused: the call has only the video

    def tokens_per_image(self) -> int:
        return self.frames * 14 * 14 + 1

    def build(self):
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

        v, t = self.geometry["vision"], self.geometry["llm"]
        vision = SiglipVisionConfig(
            image_size=384, patch_size=14, hidden_size=v["hidden"], intermediate_size=v["intermediate"],
            num_hidden_layers=v["layers"], num_attention_heads=v["heads"], vision_use_head=False,
        )
        text = Qwen2Config(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            max_position_embeddings=32768, tie_word_embeddings=True,
        )
        config = LlavaOnevisionConfig(
            vision_config=vision, text_config=text, image_token_id=151646, video_token_id=self.image_token_id,
            vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True,
        )
        self.model = self._construct(LlavaOnevisionForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        before = min(4, self.text_tokens)  # "<|im_start|>user\n<video>\n{question}<|im_end|>..."
        ids = torch.cat([
            self._text_ids(before, 150000, g),
            torch.full((self.tokens_per_image(),), self.image_token_id),
            self._text_ids(self.text_tokens - before, 150000, g),
        ])[None]
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "pixel_values_videos": torch.randn(1, self.frames, 3, 384, 384, generator=g).to(self.device, self.dtype),
        }

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values_videos"].flatten(0, 1), -1, attention_layers))

    def _unpatched_video(self, cache: RunCache) -> torch.Tensor:
        """What the unpatched get_video_features does after its tower: projector, per-frame pooling, the newline."""
        inner = self.model.model
        pooled = inner.apply_pooling(inner.multi_modal_projector(cache.run.features)).flatten(0, 1)
        return torch.cat([pooled, inner.image_newline[None].to(pooled.dtype)])

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        return {"inputs_embeds": self._splice(inputs["input_ids"], self._unpatched_video(cache)), "attention_mask": inputs["attention_mask"]}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return self._unpatched_video(cache)[order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        return self.geometry["vision"]["heads"] * self.frames, 729  # the tower attends within each frame


class Qwen3VLCase(QwenCase):
    """Qwen3-VL-2B: its ViT (16-pixel patches, learned position grid, DeepStack taps 5 / 11 / 17) at 512 x 512 and
    its Qwen3-1.7B-class LLM (interleaved M-RoPE), reduced depth. The unpatched model, the oracle and the pruned run
    all add the three DeepStack levels (of all 256 tokens, or of the kept ones) to the first decoder layers."""

    name = "qwen3-vl-2b"
    label = "Qwen3-VL-2B (Qwen3-VL ViT at 512x512, DeepStack, Qwen3 LLM)"
    full_layers = 28

    def __init__(self, *args, **kwargs) -> None:
        Case.__init__(self, *args, **kwargs)
        if self.tiny:
            vision = {"depth": 4, "hidden": 32, "intermediate": 64, "num_heads": 4, "deepstack_visual_indexes": [1, 2]}
            hidden, ffn, heads, kv, head_dim, mrope = 64, 128, 4, 2, 16, [4, 2, 2]
        else:
            vision = {"depth": 24, "hidden": 1024, "intermediate": 4096, "num_heads": 16, "deepstack_visual_indexes": [5, 11, 17]}
            hidden, ffn, heads, kv, head_dim, mrope = 2048, 6144, 16, 8, 128, [24, 20, 20]
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, kv, head_dim
        self.image_size = 512
        self.geometry = {
            "vision": {"model": "Qwen3-VL ViT", **vision, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 2304, "image_size": self.image_size, "out_hidden": hidden},
            "llm": {"model": "Qwen3 (Qwen3-VL-2B geometry)", "hidden": hidden, "intermediate": ffn, "heads": heads,
                    "kv_heads": kv, "head_dim": head_dim, "vocab": 151936, "mrope_section": mrope, "mrope_interleaved": True,
                    "layers_run": self.llm_layers, "layers_full": self.full_layers, "tie_word_embeddings": True},
        }

    def integration_class(self):
        from vtprune.integrations.qwen3_vl import Qwen3VLIntegration

        return Qwen3VLIntegration

    @property
    def _side(self) -> int:
        return self.image_size // 16

    def build(self):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        v, t = self.geometry["vision"], self.geometry["llm"]
        text = dict(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            head_dim=t["head_dim"], max_position_embeddings=32768, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": t["mrope_section"], "mrope_interleaved": True, "rope_theta": 5000000.0},
        )
        vision = dict(
            depth=v["depth"], hidden_size=v["hidden"], intermediate_size=v["intermediate"], num_heads=v["num_heads"],
            out_hidden_size=t["hidden"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=v["num_position_embeddings"], deepstack_visual_indexes=v["deepstack_visual_indexes"],
        )
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        self.model = self._construct(Qwen3VLForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        inputs = super().inputs()
        g = torch.Generator().manual_seed(2)
        patches = self._side * self._side
        inputs["pixel_values"] = torch.randn(patches, 3 * 2 * 16 * 16, generator=g).to(self.device, self.dtype)
        return inputs

    @staticmethod
    def _encoder_outputs(visual: torch.Tensor, levels: list[torch.Tensor]) -> dict:
        """`mm_encoder_outputs` for the unpatched forward: the model splices `visual` and builds DeepStack itself."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=[visual], deepstack_features=[[level] for level in levels])}

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        ids = inputs["input_ids"]
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return {"input_ids": ids, "attention_mask": inputs["attention_mask"], "position_ids": positions,
                "mm_encoder_outputs": self._encoder_outputs(cache.run.merged, cache.run.deepstack)}

    def oracle_kwargs(self, sequence, pruned_inputs: dict) -> dict:
        visual = sequence.input_ids == self.image_token_id
        return {"input_ids": sequence.input_ids, "attention_mask": sequence.attention_mask, "position_ids": sequence.position_ids,
                "mm_encoder_outputs": self._encoder_outputs(sequence.inputs_embeds[visual], pruned_inputs["deepstack_visual_embeds"])}


class Gemma3Case(Case):
    """Gemma-3-4B: its SigLIP tower (27 blocks, width 1152, 16 heads, patch 14) at 896 x 896 (4096 patches,
    average-pooled 4 x 4 by the projector to 256 LLM tokens) and its Gemma 3 LLM (hidden 2560, 8 heads, 4 KV
    heads, head dim 256, five sliding-window layers per global one), reduced depth. Every run passes
    ``token_type_ids``, so the image's tokens (all 256, or the kept ones) attend to each other both ways."""

    name = "gemma-3-4b"
    label = "Gemma-3-4B (SigLIP-so400m at 896x896 pooled to 256 tokens, Gemma 3 LLM)"
    budgets = (192, 128, 64)
    full_layers = 34
    image_token_id = 262144  # google/gemma-3-*-it: <image_soft_token>; <start_of_image> 255999, <end_of_image> 256000

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.tiny:
            vision = {"layers": 4, "hidden": 32, "intermediate": 64, "heads": 4, "image_size": 448}  # pooled 2 x 2
            hidden, ffn, heads, kv, head_dim, tokens = 64, 128, 4, 2, 16, 256
        else:
            vision = {"layers": 27, "hidden": 1152, "intermediate": 4304, "heads": 16, "image_size": 896}
            hidden, ffn, heads, kv, head_dim, tokens = 2560, 10240, 8, 4, 256, 256
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, kv, head_dim
        self.tokens = tokens
        self.geometry = {
            "vision": {"model": "SigLIP (no CLS)", **vision, "patch_size": 14, "mm_tokens_per_image": tokens},
            "projector": f"avg-pool {vision['image_size'] // 14 // int(tokens ** 0.5)} x same, RMS norm, {vision['hidden']} -> {hidden}",
            "llm": {"model": "Gemma 3 (Gemma-3-4B geometry)", "hidden": hidden, "intermediate": ffn, "heads": heads,
                    "kv_heads": kv, "head_dim": head_dim, "vocab": 262208, "sliding_window": 1024,
                    "layers_run": self.llm_layers, "layers_full": self.full_layers, "tie_word_embeddings": True},
        }

    def integration_class(self):
        from vtprune.integrations.gemma3 import Gemma3Integration

        return Gemma3Integration

    def tokens_per_image(self) -> int:
        return self.tokens

    def build(self):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

        v, t = self.geometry["vision"], self.geometry["llm"]
        text = Gemma3TextConfig(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            head_dim=t["head_dim"], query_pre_attn_scalar=t["head_dim"], sliding_window=t["sliding_window"],
            max_position_embeddings=131072, pad_token_id=0,
        )
        vision = SiglipVisionConfig(
            image_size=v["image_size"], patch_size=14, hidden_size=v["hidden"], intermediate_size=v["intermediate"],
            num_hidden_layers=v["layers"], num_attention_heads=v["heads"], vision_use_head=False,
        )
        config = Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=self.tokens, image_token_index=self.image_token_id,
            boi_token_index=255999, eoi_token_index=256000, tie_word_embeddings=True,
        )
        self.model = self._construct(Gemma3ForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        before = min(4, self.text_tokens)  # "<bos><start_of_turn>user\n\n\n<start_of_image>...<end_of_image>\n\n{question}"
        ids = torch.cat([
            self._text_ids(before, 250000, g),
            torch.tensor([255999]),
            torch.full((self.tokens,), self.image_token_id),
            torch.tensor([256000]),
            self._text_ids(max(0, self.text_tokens - before - 2), 250000, g),
        ])[None]
        size = self.geometry["vision"]["image_size"]
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "token_type_ids": (ids == self.image_token_id).long().to(self.device),
            "pixel_values": torch.randn(1, 3, size, size, generator=g).to(self.device, self.dtype),
        }

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values"], attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        embeds = self._splice(inputs["input_ids"], cache.run.tokens)
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "token_type_ids": inputs["token_type_ids"]}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return cache.run.tokens[0][order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        v = self.geometry["vision"]
        return v["heads"], (v["image_size"] // 14) ** 2


class InternVLCase(Case):
    """InternVL3-2B: InternViT-300M (24 blocks, width 1024, 16 heads, a CLS token) on 448 px tiles, pixel shuffle
    0.5 (256 tokens a tile), and its Qwen2.5-1.5B LLM, reduced depth. One 896 x 896 image: 2 x 2 tiles plus the
    thumbnail, 5 x 256 = 1280 visual tokens. ``budget_scope="global"``: `keep` is the image's total, split equally
    over its five tiles (640 / 320 / 160: 128 / 64 / 32 a tile)."""

    name = "internvl3-2b"
    label = "InternVL3-2B (InternViT-300M, 2x2 tiles + thumbnail at 448 px, pixel shuffle, Qwen2.5-1.5B)"
    budgets = (640, 320, 160)
    full_layers = 28
    image_token_id = 151667  # OpenGVLab/InternVL3-*-hf: <IMG_CONTEXT>; <img> 151665, </img> 151666
    apply_options: ClassVar[dict[str, Any]] = {"budget_scope": "global"}
    tiles = 5

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.tiny:
            vision = {"layers": 4, "hidden": 32, "intermediate": 64, "heads": 4}
            hidden, ffn, heads, kv = 64, 128, 4, 2
        else:
            vision = {"layers": 24, "hidden": 1024, "intermediate": 4096, "heads": 16}
            hidden, ffn, heads, kv = 1536, 8960, 12, 2
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, kv, hidden // heads
        self.geometry = {
            "vision": {"model": "InternViT (CLS, layer scale)", **vision, "image_size": 448, "patch_size": 14,
                       "tiles": self.tiles, "tokens_per_tile": 256},
            "projector": f"pixel shuffle 0.5, LayerNorm, {4 * vision['hidden']} -> {hidden} -> {hidden} (GELU)",
            "llm": {"model": "Qwen2 (Qwen2.5-1.5B geometry)", "hidden": hidden, "intermediate": ffn, "heads": heads,
                    "kv_heads": kv, "vocab": 151674, "layers_run": self.llm_layers, "layers_full": self.full_layers,
                    "tie_word_embeddings": True},
            "tiling": {"image_size": [896, 896], "tiles": "2 x 2 + thumbnail", "budget_scope": self.apply_options["budget_scope"]},
        }

    def integration_class(self):
        from vtprune.integrations.internvl import InternVLIntegration

        return InternVLIntegration

    def tokens_per_image(self) -> int:
        return self.tiles * 256

    def build(self):
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

        v, t = self.geometry["vision"], self.geometry["llm"]
        vision = InternVLVisionConfig(
            image_size=448, patch_size=14, hidden_size=v["hidden"], intermediate_size=v["intermediate"],
            num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
        )
        text = Qwen2Config(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            max_position_embeddings=32768, tie_word_embeddings=True, pad_token_id=0,
        )
        config = InternVLConfig(
            vision_config=vision, text_config=text, image_token_id=self.image_token_id, downsample_ratio=0.5,
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
        )
        self.model = self._construct(InternVLForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        before = min(4, self.text_tokens)  # "<|im_start|>user\n<img><IMG_CONTEXT>...</img>\n{question}..."
        ids = torch.cat([
            self._text_ids(before, 150000, g),
            torch.tensor([151665]),
            torch.full((self.tokens_per_image(),), self.image_token_id),
            torch.tensor([151666]),
            self._text_ids(max(0, self.text_tokens - before - 2), 150000, g),
        ])[None]
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "pixel_values": torch.randn(self.tiles, 3, 448, 448, generator=g).to(self.device, self.dtype),
        }

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values"], -1, "default", attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        return {"inputs_embeds": self._splice(inputs["input_ids"], cache.run.tokens.flatten(0, 1)), "attention_mask": inputs["attention_mask"]}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return cache.run.tokens.flatten(0, 1)[order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        return self.geometry["vision"]["heads"] * self.tiles, 1025  # the tower attends within each tile, CLS included


CASES: dict[str, type[Case]] = {
    "llava-1.5-7b": LlavaCase, "qwen2-vl-2b": QwenCase, "llava-next-7b": LlavaNextCase, "qwen2-vl-2b-video": QwenVideoCase,
    "llava-onevision-0.5b-video": OnevisionVideoCase, "qwen3-vl-2b": Qwen3VLCase, "gemma-3-4b": Gemma3Case,
    "internvl3-2b": InternVLCase,
}
"""Benchmarked families."""

DEFAULT_FAMILIES = ("llava-1.5-7b", "qwen2-vl-2b")
"""What runs without ``--families``: llava-next-7b is opt-in (its 2928-token prefills at 7B width take about as
long as the two others together on 2 CPU cores; see the package docstring)."""


def _any_pruner():
    import vtprune

    return vtprune.create_pruner("random", keep=1)
