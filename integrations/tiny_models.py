"""Tiny vision-language models built offline from configs, for tests and for users testing their own pruners.

Nothing here downloads anything: the tokenizer is a byte-level BPE made in memory (every byte is a token, no
merges), the processor uses transformers' PIL image processors, and the weights are random. Geometry is kept
real where it matters for pruning (CLIP-336/14: a 24 x 24 grid, 576 visual tokens per image), widths are tiny.

Weights are initialised with a larger standard deviation than transformers' default (0.02) so that outputs
depend visibly on every input token: equivalence tests on near-constant logits could not fail.
"""

from __future__ import annotations

import torch

__all__ = ["LLAVA_CHAT_TEMPLATE", "TINY_BUILDERS", "byte_level_tokenizer", "random_images", "tiny_llava", "tiny_llava_next", "tiny_qwen_vl"]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _byte_symbols() -> list[str]:
    # GPT-2's reversible byte -> printable unicode map, so that any text round-trips through the BPE vocabulary.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, codes))
    return [chr(by_byte[b]) for b in range(256)]


def byte_level_tokenizer(
    special_tokens: list[str],
    chat_template: str | None = None,
    pad_token: str = "<pad>",
    eos_token: str = "</s>",
    words: list[str] = (),
):
    """A byte-level BPE tokenizer with the 256 byte symbols plus `special_tokens`, built without any file.

    `words`: pre-tokenised words (in byte symbols, e.g. ``"Ġcircle"``) that get merge rules, so frequent words
    become one token (shorter sequences for a model trained on a known vocabulary); any text still round-trips.
    """
    from transformers import Qwen2Tokenizer

    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    merges: list[tuple[str, str]] = []
    for word in words:
        for end in range(2, len(word) + 1):
            prefix, last = word[: end - 1], word[end - 1]
            if prefix + last not in vocab:
                vocab[prefix + last] = len(vocab)
                merges.append((prefix, last))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=eos_token, eos_token=eos_token, pad_token=pad_token)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in (pad_token, eos_token)]})
    tokenizer.add_special_tokens({"pad_token": pad_token, "eos_token": eos_token})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _init_std(model: torch.nn.Module, std: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 * std)


def _finish(model: torch.nn.Module, tokenizer, attn_implementation: str, seed: int) -> None:
    """Attention backend, visible random weights, eval mode, and the tokenizer's pad/eos for generate."""
    model.set_attn_implementation(attn_implementation)
    _init_std(model, std=0.2, seed=seed)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id


def _llava_parts(image_size, patch_size, vision_layers, vision_width, text_layers, text_width, max_positions):
    """Tokenizer, CLIP vision config and Llama text config shared by the tiny LLaVA-1.5 and LLaVA-NeXT."""
    from transformers import CLIPVisionConfig, LlamaConfig

    tokenizer = byte_level_tokenizer(["<image>"], chat_template=LLAVA_CHAT_TEMPLATE)
    vision_config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        projection_dim=vision_width,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return tokenizer, vision_config, text_config


def tiny_llava(
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    vision_layers: int = 8,
    vision_width: int = 32,
    text_layers: int = 2,
    text_width: int = 64,
    attn_implementation: str = "sdpa",
    vision_feature_select_strategy: str = "default",
):
    """A random-weight `LlavaForConditionalGeneration` with LLaVA-1.5 geometry and a matching `LlavaProcessor`.

    Returns ``(model, processor)``; the model is in eval mode, float32, on the CPU.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer, vision_config, text_config = _llava_parts(
        image_size, patch_size, vision_layers, vision_width, text_layers, text_width, max_positions=4096
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=vision_feature_select_strategy,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _finish(model, tokenizer, attn_implementation, seed)

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def random_images(count: int, size: tuple[int, int] = (400, 300), seed: int = 0):
    """`count` PIL images of smooth random blobs (so attention and similarity have structure to find)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    images = []
    width, height = size
    for _ in range(count):
        coarse = torch.rand(3, 6, 8, generator=generator)
        smooth = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bicubic", align_corners=False)[0]
        noise = torch.rand(3, height, width, generator=generator) * 0.15
        pixels = ((smooth + noise).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        images.append(Image.fromarray(pixels))
    return images


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer_and_text(text_layers: int, text_width: int) -> tuple:
    """The tokenizer, its special token ids and the language-model config fields (positions left to the caller)
    shared by the tiny Qwen-VL families."""
    tokenizer = byte_level_tokenizer(QWEN_SPECIAL_TOKENS, chat_template=QWEN_CHAT_TEMPLATE, pad_token="<pad>", eos_token="<|im_end|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return tokenizer, ids, text


def tiny_qwen_vl(
    version: str = "2",
    seed: int = 0,
    vision_depth: int = 8,
    vision_width: int = 32,
    text_layers: int = 2,
    text_width: int = 64,
    min_pixels: int = 56 * 56,
    max_pixels: int = 448 * 448,
    attn_implementation: str = "sdpa",
):
    """A random-weight Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) with a matching processor, offline.

    Real patch geometry (14-pixel patches, 2x2 merger, temporal patch 2; Qwen2.5-VL: 112-pixel windows, full
    attention in every fourth block as in the released models), tiny widths. Returns ``(model, processor)``.
    """
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids, text = _qwen_tokenizer_and_text(text_layers, text_width)
    head_dim = text_width // text["num_attention_heads"]
    quarter = head_dim // 2 // 4
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter], "rope_theta": 10000.0}
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        pad_token_id=tokenizer.pad_token_id,
    )
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as model_class

        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=text_width, num_heads=4, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as model_class

        vision = dict(
            depth=vision_depth,
            hidden_size=vision_width,
            out_hidden_size=text_width,
            intermediate_size=2 * vision_width,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=[i for i in range(vision_depth) if i % 4 == 3],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    torch.manual_seed(seed)
    model = model_class(config)
    _finish(model, tokenizer, attn_implementation, seed)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    if version == "2.5":  # its processor also returns second_per_grid_ts for videos
        from transformers import Qwen2_5_VLProcessor as Qwen2VLProcessor
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, cap_pixels_per_frame=False),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
__all__ += ["tiny_llava_next", "TINY_GRID_PINPOINTS"]

TINY_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672))
"""Anyres resolutions (height, width) of `tiny_llava_next`: 1x2, 2x1 or 2x2 sub-crops, so tests stay small."""


def tiny_llava_next(
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    grid_pinpoints=TINY_GRID_PINPOINTS,
    vision_layers: int = 6,
    vision_width: int = 32,
    text_layers: int = 2,
    text_width: int = 64,
    attn_implementation: str = "sdpa",
    vision_feature_select_strategy: str = "default",
):
    """A random-weight `LlavaNextForConditionalGeneration` (anyres) and a matching `LlavaNextProcessor`.

    Real LLaVA-NeXT geometry per crop (CLIP-336/14: a 24 x 24 grid, 576 tokens, CLS dropped), a small list of
    `grid_pinpoints` so an image has at most 4 sub-crops, tiny widths. The vision-language glue is the real one:
    base crop first, sub-crops packed into one grid, unpadded to the image's aspect ratio, one ``image_newline``
    per row. Returns ``(model, processor)``; the model is in eval mode, float32, on the CPU.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [list(p) for p in grid_pinpoints]
    tokenizer, vision_config, text_config = _llava_parts(
        image_size, patch_size, vision_layers, vision_width, text_layers, text_width, max_positions=8192
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    _finish(model, tokenizer, attn_implementation, seed)
    with torch.no_grad():  # the newline vector is 1-D, so _init_std leaves it at transformers' small default
        generator = torch.Generator().manual_seed(seed + 1)
        newline = model.model.image_newline
        newline.copy_(torch.randn(newline.shape, generator=generator) * 0.2)

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


TINY_BUILDERS = {
    "llava": lambda seed: tiny_llava(seed=seed),
    "llava_next": lambda seed: tiny_llava_next(seed=seed),
    "qwen2_vl": lambda seed: tiny_qwen_vl("2", seed=seed),
    "qwen2_5_vl": lambda seed: tiny_qwen_vl("2.5", seed=seed),
    "qwen3_vl": lambda seed: tiny_qwen3_vl("3", seed=seed),
    "qwen3_vl_moe": lambda seed: tiny_qwen3_vl("3-moe", seed=seed),
    "qwen3_5": lambda seed: tiny_qwen3_vl("3.5", seed=seed),
    "qwen3_5_moe": lambda seed: tiny_qwen3_vl("3.5-moe", seed=seed),
}
"""Family name (``model.family`` of the tiny model configs, ``tiny:<family>`` of vtprune-calibrate) -> ``seed ->
(model, processor)``."""


# ---------------------------------------------------------------------------------------------- LLaVA-OneVision
__all__ += ["tiny_llava_onevision", "ONEVISION_CHAT_TEMPLATE", "TINY_ONEVISION_PINPOINTS"]

ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_ONEVISION_PINPOINTS = tuple((98 * h, 98 * w) for h in (1, 2, 3) for w in (1, 2, 3))
"""Anyres resolutions (height, width) of `tiny_llava_onevision`: up to 3 x 3 sub-crops of 98 px."""


def _qwen2_text_config(tokenizer, text_layers: int, text_width: int):
    """The small Qwen2 language model of the tiny LLaVA-OneVision and InternVL."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def tiny_llava_onevision(
    seed: int = 0,
    image_size: int = 98,
    patch_size: int = 14,
    grid_pinpoints=TINY_ONEVISION_PINPOINTS,
    vision_aspect_ratio: str = "anyres_max_4",
    vision_layers: int = 6,
    vision_width: int = 32,
    text_layers: int = 2,
    text_width: int = 64,
    attn_implementation: str = "sdpa",
):
    """A random-weight `LlavaOnevisionForConditionalGeneration` and a matching `LlavaOnevisionProcessor`.

    The real glue at a small scale: a SigLIP tower (no CLS, ``vision_feature_select_strategy="full"``) on 98 px
    crops of 7 x 7 patches (odd, as the real 27 x 27, so video pooling rounds up: 4 x 4 per frame), anyres up to
    3 x 3 sub-crops with ``anyres_max_4``, so layouts of more than about 4 crops are resized as the real model
    resizes those above 9, a Qwen2 LLM, and the video path (pooled frames, one newline per video). Returns
    ``(model, processor)``; eval mode, float32, CPU.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    specials = ["<image>", "<video>", "<|im_start|>", "<|im_end|>"]
    tokenizer = byte_level_tokenizer(specials, chat_template=ONEVISION_CHAT_TEMPLATE, pad_token="<pad>", eos_token="<|im_end|>")
    pinpoints = [list(p) for p in grid_pinpoints]
    vision_config = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        vision_use_head=False,
    )
    text_config = _qwen2_text_config(tokenizer, text_layers, text_width)
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    _finish(model, tokenizer, attn_implementation, seed)
    with torch.no_grad():  # the newline vector is 1-D, so _init_std leaves it at transformers' small default
        generator = torch.Generator().manual_seed(seed + 1)
        newline = model.model.image_newline
        newline.copy_(torch.randn(newline.shape, generator=generator) * 0.2)

    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    return model, processor


TINY_BUILDERS["llava_onevision"] = lambda seed: tiny_llava_onevision(seed=seed)


# ---------------------------------------------------------------------------------------------- Qwen3-VL, Qwen3.5
__all__ += ["tiny_qwen3_vl", "QWEN3_VERSIONS"]

QWEN3_VERSIONS = ("3", "3-moe", "3.5", "3.5-moe")
"""`tiny_qwen3_vl` versions: Qwen3-VL dense / MoE (DeepStack) and Qwen3.5 dense / MoE (hybrid attention)."""


def tiny_qwen3_vl(
    version: str = "3",
    seed: int = 0,
    vision_depth: int = 8,
    vision_width: int = 32,
    text_layers: int = 4,
    text_width: int = 64,
    deepstack_visual_indexes: tuple[int, ...] = (1, 3, 5),
    min_pixels: int = 64 * 64,
    max_pixels: int = 512 * 512,
    attn_implementation: str = "sdpa",
):
    """A random-weight Qwen3-VL (``version="3"``, MoE ``"3-moe"``) or Qwen3.5 (``"3.5"``, ``"3.5-moe"``) with a
    matching processor, offline. Returns ``(model, processor)``.

    Real patch geometry (16-pixel patches, 2x2 merger, temporal patch 2, learned position embeddings), tiny widths.
    Qwen3-VL taps `deepstack_visual_indexes` (three levels, as the released models) and uses interleaved M-RoPE;
    Qwen3.5's language model alternates three linear-attention (gated DeltaNet) layers with one full-attention
    layer, as released. The processor writes a ``<t seconds>`` timestamp before each temporal group of a video.
    """
    if version not in QWEN3_VERSIONS:
        raise ValueError(f"version must be one of {QWEN3_VERSIONS}, got {version!r}")
    import transformers
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer, ids, text = _qwen_tokenizer_and_text(text_layers, text_width)
    heads = text["num_attention_heads"]
    moe = version.endswith("-moe")
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=4,
        out_hidden_size=text_width,
        num_position_embeddings=64,  # an 8 x 8 learned grid, interpolated to each image as in the released models
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_width)
    if version.startswith("3.5"):
        head_dim = 32  # partial rotary 0.25: 8 rotary dims, M-RoPE sections of 2, 1, 1 frequency pairs
        text.update(
            head_dim=head_dim,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        )
        if moe:
            text.update(shared_expert_intermediate_size=text_width)
        prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    else:
        head_dim = text_width // heads
        text.update(
            head_dim=head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        )
        vision["deepstack_visual_indexes"] = list(deepstack_visual_indexes)
        prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config_class = getattr(transformers, f"{prefix}Config")
    model_class = getattr(transformers, f"{prefix}ForConditionalGeneration")
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _finish(model, tokenizer, attn_implementation, seed)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, size=size),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, size=size, cap_pixels_per_frame=False, do_sample_frames=False),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- Gemma 3
__all__ += ["tiny_gemma3", "GEMMA3_CHAT_TEMPLATE"]

GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_gemma3(
    seed: int = 0,
    image_size: int = 224,
    patch_size: int = 7,
    tokens_per_image: int = 64,
    vision_layers: int = 4,
    vision_width: int = 32,
    text_layers: int = 2,
    text_width: int = 64,
    attn_implementation: str = "sdpa",
):
    """A random-weight `Gemma3ForConditionalGeneration` and a matching `Gemma3Processor`, offline.

    The real glue at a small scale: a SigLIP tower without CLS (32 x 32 patches at 224 px) whose last hidden
    state the projector average-pools 4 x 4 (as the released 64 x 64 -> 16 x 16) to `tokens_per_image` = 8 x 8
    LLM tokens, each image written as ``<start_of_image>``, its soft tokens, ``<end_of_image>``; a Gemma 3 LLM
    with one sliding-window and one global layer and the bidirectional attention among an image's tokens.
    Pan-and-scan is available through the processor (``do_pan_and_scan=True``). Returns ``(model, processor)``;
    eval mode, float32, CPU.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    boi, eoi, soft = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    specials = [boi, eoi, soft, "<start_of_turn>", "<end_of_turn>"]
    tokenizer = byte_level_tokenizer(specials, chat_template=GEMMA3_CHAT_TEMPLATE, pad_token="<pad>", eos_token="<end_of_turn>")
    tokenizer._set_model_specific_special_tokens({"boi_token": boi, "eoi_token": eoi, "image_token": soft})
    heads, head_dim = 4, 16
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=64,
        layer_types=(["sliding_attention"] * (text_layers - 1) + ["full_attention"]),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    vision_config = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=tokens_per_image,
        image_token_index=tokenizer.convert_tokens_to_ids(soft),
        boi_token_index=tokenizer.convert_tokens_to_ids(boi),
        eoi_token_index=tokenizer.convert_tokens_to_ids(eoi),
        pad_token_id=tokenizer.pad_token_id,
        # Untied: with tied random embeddings the scaled last input token dominates and every greedy step repeats it.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    _finish(model, tokenizer, attn_implementation, seed)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    return model, processor


TINY_BUILDERS["gemma3"] = lambda seed: tiny_gemma3(seed=seed)


# ---------------------------------------------------------------------------------------------- InternVL
__all__ += ["tiny_internvl", "INTERNVL_CHAT_TEMPLATE", "INTERNVL_SPECIAL_TOKENS"]

# The InternVL processor replaces the *context* token string "<IMG_CONTEXT>" (one per image) and "<video>" (one
# per video) in the text (processing_internvl.py:61-66, 141-150), so the template writes those, as the released
# InternVL3-hf template does.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def tiny_internvl(
    seed: int = 0,
    image_size: int = 112,
    patch_size: int = 14,
    vision_layers: int = 4,
    vision_width: int = 32,
    text_layers: int = 2,
    text_width: int = 64,
    max_patches: int = 4,
    attn_implementation: str = "sdpa",
):
    """A random-weight `InternVLForConditionalGeneration` and a matching `InternVLProcessor`, offline.

    The real glue at a small scale: an InternViT tower (CLS token, layer scale, ``vision_feature_select_strategy=
    "default"`` drops CLS) on 112 px tiles of 8 x 8 patches, pixel shuffle 0.5 (2 x 2 patches -> one token, 16
    tokens per tile), dynamic tiling up to `max_patches` tiles plus a thumbnail (last), a Qwen2 LLM, and video
    frames as single tiles. Returns ``(model, processor)``; eval mode, float32, CPU.
    """
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    specials = list(INTERNVL_SPECIAL_TOKENS.values()) + ["<|im_start|>", "<|im_end|>"]
    tokenizer = byte_level_tokenizer(specials, chat_template=INTERNVL_CHAT_TEMPLATE, pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer._set_model_specific_special_tokens(dict(INTERNVL_SPECIAL_TOKENS))  # read by InternVLProcessor.__init__
    tokenizer.padding_side = "left"
    grid = image_size // patch_size
    if grid % 2:
        raise ValueError(f"image_size // patch_size must be even for the 0.5 pixel shuffle, got {grid}")
    image_seq_length = (grid // 2) ** 2
    vision_config = InternVLVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
    )
    text_config = _qwen2_text_config(tokenizer, text_layers, text_width)
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _finish(model, tokenizer, attn_implementation, seed)
    with torch.no_grad():  # 1-D parameters that _init_std leaves at transformers' defaults
        generator = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.vision_tower.encoder.layer:
            # layer scale (init 0.1 everywhere): make every block and channel count visibly
            layer.lambda_1.copy_(torch.randn(layer.lambda_1.shape, generator=generator) * 0.2 + 1.0)
            layer.lambda_2.copy_(torch.randn(layer.lambda_2.shape, generator=generator) * 0.2 + 1.0)

    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


TINY_BUILDERS["internvl"] = lambda seed: tiny_internvl(seed=seed)
