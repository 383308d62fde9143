"""LLaVA-OneVision: images (anyres, the anyres_max resizing) and video, against the unpatched model and against
hand-built pruned sequences; batches of mixed prompts; budgets and their errors."""

import numpy as np
import pytest
import torch
from conftest import mask_positions

import vtprune
from vtprune import BudgetError, ConfigError, UnsupportedModelError
from vtprune.integrations.tiny_models import random_images, tiny_llava_onevision

SELECTORS = ["fastervlm", "divprune", "hiprune", "random", "pool"]
PRUNERS = ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"]
DETERMINISTIC = ["fastervlm", "divprune", "hiprune", "visionzip", "pool"]
FRAMES = 4  # each frame: 7 x 7 patches pooled to 4 x 4 = 16 tokens; a video: 4 * 16 + 1 newline = 65 tokens
RESIZED = (400, 300)  # (width, height): 3x3 crops; the 15 x 21 unpadded grid is resized (anyres_max_4) to 11 x 16
PLAIN = (196, 98)  # a 1x2 layout, nothing resized: 49 + 7 x 15 = 154 tokens


@pytest.fixture(scope="session")
def onevision():
    return tiny_llava_onevision(seed=0, vision_layers=4)


@pytest.fixture(scope="session")
def media():
    frames = np.stack([np.array(image) for image in random_images(FRAMES, size=(120, 100), seed=3)])
    return {
        "resized": random_images(1, size=RESIZED, seed=1)[0],
        "plain": random_images(1, size=PLAIN, seed=2)[0],
        "video": frames,
        "reversed": frames[::-1].copy(),
        "still": np.stack([frames[0]] * FRAMES),
    }


def prompt(processor, *items, text="What happens here?"):
    content = [{"type": item} for item in items] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make(processor, rows, padding_side="left"):
    """`rows`: per prompt a list of (kind, media) with kind "image" or "video"; [] is a text-only row."""
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(processor, *[kind for kind, _ in row], text="A text-only question, rather long." if not row else "What happens here?") for row in rows]
    images = [m for row in rows for kind, m in row if kind == "image"]
    videos = [m for row in rows for kind, m in row if kind == "video"]
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return dict(processor(**kwargs))


@pytest.fixture(scope="session")
def mixed(onevision, media):
    """Left-padded: a video, a resized image, an image and a video, a text-only row."""
    _, processor = onevision
    rows = [[("video", media["video"])], [("image", media["resized"])], [("image", media["plain"]), ("video", media["reversed"])], []]
    return make(processor, rows)


@pytest.fixture(scope="session")
def reference(onevision, mixed):
    model = onevision[0]
    with torch.no_grad():
        return model(**mixed).logits, model.generate(**mixed, max_new_tokens=4, do_sample=False)


def keep_all(scope):
    return dict(keep=49) if scope == "per_crop" else dict(ratio=1.0)


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("scope", ["per_crop", "global"])
def test_keep_all_is_bit_exact_on_a_mixed_batch(onevision, mixed, reference, name, scope):
    model, _ = onevision
    logits, generated = reference
    with vtprune.apply(model, name, budget_scope=scope, video_ratio=1.0, **keep_all(scope)) as handle, torch.no_grad():
        assert torch.equal(model(**mixed).logits, logits)
        stats = [(s.extra["modality"], s.tokens_in, s.tokens_out) for s in handle.stats]
        assert stats == [("video", 65, 65), ("image", 236, 236), ("image", 154, 154), ("video", 65, 65)]
        assert handle.stats[1].extra["resized"] == (11, 16) and handle.stats[2].extra["resized"] is None
        assert all(torch.equal(s.order, torch.arange(s.tokens_in)) for s in handle.stats)
        assert torch.equal(model.generate(**mixed, max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("video_scope", ["video", "frame"])
def test_keep_all_is_bit_exact_on_a_video_prompt(onevision, media, video_scope):
    model, processor = onevision
    inputs = make(processor, [[("video", media["video"])]])
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(model, "divprune", ratio=1.0, video_scope=video_scope):
            assert torch.equal(model(**inputs).logits, logits)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), generated)


def test_keep_all_with_several_images_in_one_prompt(onevision, media):
    """Several images in a prompt: the unpatched model takes each one's base crop and one newline."""
    model, processor = onevision
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, "image", "image"), prompt(processor, "image")]
    inputs = dict(processor(text=texts, images=[[media["resized"], media["plain"]], [media["plain"]]], return_tensors="pt", padding=True))
    assert inputs["batch_num_images"].tolist() == [2, 1]
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtprune.apply(model, "fastervlm", keep=49) as handle:
            assert torch.equal(model(**inputs).logits, expected)
        assert [(s.tokens_in, len(s.extra["crop_tokens"])) for s in handle.stats] == [(50, 1), (50, 1), (154, 3)]
        with vtprune.apply(model, "fastervlm", keep=10) as handle:
            model(**inputs)
        assert [s.tokens_out for s in handle.stats] == [11, 11, 10 + 10 + 10 + 7]  # base, two sub-crops, 7 newlines


# ---------------------------------------------------------------------------------------------- hand-built sequence
def unpatched_pieces(model, inputs):
    """The unpatched model's LLM-space tokens of every image and of every video (processor order)."""
    inner = model.model
    images = []
    if inputs.get("pixel_values") is not None:
        sizes = inputs["image_sizes"]
        images = list(inner.get_image_features(inputs["pixel_values"], sizes, batch_num_images=inputs.get("batch_num_images")).pooler_output)
    videos = []
    if inputs.get("pixel_values_videos") is not None:
        videos = list(inner.get_video_features(inputs["pixel_values_videos"]).pooler_output)
    return images, videos


def vision_packed(model, inputs, integration):
    """Vision-space packed sequences (newlines zero), for VisionZip's contextual merges on plain crops."""
    pixels, crops = integration.crop_batch(inputs)
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    packed, _ = model.model.pack_image_features(
        list(torch.split(hidden, crops)), inputs["image_sizes"], image_newline=torch.zeros(hidden.shape[-1]),
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )
    return packed


def hand_built_logits(model, inputs, handle, positions_mode, user_positions):
    """The pruned sequence built from the unpatched model's own tokens, through the unpatched language model."""
    config = model.config
    integration = handle.integration
    with torch.no_grad():
        images, videos = unpatched_pieces(model, inputs)
        vision = vision_packed(model, inputs, integration) if images else []
        projector = model.model.multi_modal_projector
        embed = model.get_input_embeddings()
        queues = {config.image_token_id: list(zip(images, vision)), config.video_token_id: [(v, None) for v in videos]}
        rows, visual = [], 0
        for b in range(inputs["input_ids"].shape[0]):
            ids, mask, pos = inputs["input_ids"][b], inputs["attention_mask"][b], user_positions[b]
            vectors, places, j = [], [], 0
            while j < ids.numel():
                if mask[j] == 0:
                    j += 1
                    continue
                token = int(ids[j])
                if token in queues:
                    llm, space = queues[token].pop(0)
                    stat = handle.stats[visual]
                    assert stat.tokens_in == llm.shape[0]
                    source = stat.extra.get("source_crop")
                    for slot, rep in enumerate(stat.order.tolist()):
                        members = (stat.assignment == slot).nonzero().flatten()
                        if members.numel() <= 1:  # a selected token or a newline
                            vectors.append(llm[rep])
                        elif handle.pruner.name == "pool":  # mean in LLM space
                            vectors.append(llm[members].mean(0))
                        else:  # VisionZip contextual: target + mean of the other members
                            others = members[members != rep]
                            mixed_after_projector = space is None or (stat.extra["resized"] is not None and int(source[slot]) > 0)
                            if mixed_after_projector:  # pooled / resized tokens are merged in LLM space
                                vectors.append(llm[rep] + llm[others].mean(0))
                            else:
                                vectors.append(projector(space[rep] + space[others].mean(0)))
                        places.append(pos[j + rep])
                    j += stat.tokens_in
                    visual += 1
                else:
                    vectors.append(embed(ids[j]))
                    places.append(pos[j])
                    j += 1
            if positions_mode == "compact":
                places = [pos[int(mask.nonzero()[0])] + i for i in range(len(vectors))]
            rows.append((torch.stack(vectors), torch.stack([torch.as_tensor(p) for p in places])))
        length = max(r[0].shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0][0].shape[1])
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        position_ids = torch.zeros(len(rows), length, dtype=torch.long)
        for b, (vectors, places) in enumerate(rows):
            n = vectors.shape[0]
            embeds[b, length - n :], attention[b, length - n :], position_ids[b, length - n :] = vectors, 1, places
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids).last_hidden_state
        return model.lm_head(hidden), attention, embeds, position_ids


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("scope, video_scope", [("per_crop", "video"), ("global", "frame")])
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_pruned_forward_equals_hand_built_sequence(onevision, mixed, name, scope, video_scope, positions):
    model, _ = onevision
    user_positions = mask_positions(mixed["attention_mask"])
    keep = 12 if scope == "per_crop" else 34  # pool tiles these on every crop (global: the equal shares of 34)
    with vtprune.apply(model, name, keep=keep, video_keep=16, video_scope=video_scope, positions=positions, budget_scope=scope) as handle, torch.no_grad():
        logits = model(**mixed, position_ids=user_positions).logits
        expected, attention, embeds, position_ids = hand_built_logits(model, mixed, handle, positions, user_positions)
        sequence = handle.last_sequence
    counts = [s.tokens_out for s in handle.stats]
    assert counts[0] == counts[3] == 17  # 16 kept + the newline after the video
    if video_scope == "frame":
        assert handle.stats[0].extra["frame_tokens_out"] == [4] * FRAMES
    if scope == "global":
        assert counts[1:3] == [34, 34]
    real = attention.bool()
    assert torch.equal(sequence.attention_mask, attention)
    torch.testing.assert_close(sequence.inputs_embeds[real], embeds[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(sequence.position_ids[real], position_ids[real])
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)


def test_resized_crops_are_scored_by_the_resized_attention(onevision, media):
    """FasterVLM on a resized layout (no CLS: global attention), per crop: each crop's mean received attention
    from the eager tower, laid out, unpadded and resized bilinearly by hand, then top-k inside each crop's
    rectangle of the resized grid."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    model, processor = onevision
    inputs = make(processor, [[("image", media["resized"])]])
    with vtprune.apply(model, "fastervlm", keep=6) as handle, torch.no_grad():
        model(**inputs)
        pixels, _ = handle.integration.crop_batch(inputs)
        layer = next(iter(handle.pruner.attention_layers(handle.integration.encoder_info())))
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attention = tower(pixels, output_attentions=True).attentions[layer]  # [crops, heads, 49, 49]
    finally:
        tower.set_attn_implementation("sdpa")
    received = attention.float().mean(dim=(1, 2))  # per crop: mean over heads and query rows
    grid = received[1:].view(3, 3, 7, 7).permute(0, 2, 1, 3).reshape(21, 21)
    grid = unpad_image(grid[None], inputs["image_sizes"][0].tolist())[0]
    assert tuple(grid.shape) == (15, 21)
    resized = torch.nn.functional.interpolate(grid[None, None], [11, 16], mode="bilinear")[0, 0]
    stat = handle.stats[0]
    assert torch.equal(stat.order[:6], torch.topk(received[0], 6).indices.sort().values)  # the base crop
    packed = 49 + torch.arange(11)[:, None] * 17 + torch.arange(16)[None, :]  # resized token -> packed position
    cell_of = {int(p): i for i, p in enumerate(packed.reshape(-1).tolist())}
    picked = sorted(cell_of[int(p)] for p in stat.order[6:].tolist() if int(p) in cell_of)
    assert stat.extra["newlines"] == 11 and len(stat.order) == 6 + len(picked) + 11
    expected, covered = [], []
    for unit in handle.integration.layout(inputs["image_sizes"][0], 0, 10).units[1:]:
        covered += unit.patches.tolist()
        top = unit.patches[torch.topk(resized.reshape(-1)[unit.patches], min(6, unit.size)).indices]
        expected += top.tolist()
    assert sorted(covered) == list(range(11 * 16))  # the crops' rectangles tile the resized grid
    assert picked == sorted(expected)


# ---------------------------------------------------------------------------------------------- batch == singles
@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_mixed_prompts_equals_each_prompt_alone(onevision, media, name, padding_side):
    model, processor = onevision
    rows = [[("video", media["video"])], [("image", media["plain"]), ("video", media["reversed"])], [("image", media["resized"])], []]
    batch = make(processor, rows, padding_side)
    with vtprune.apply(model, name, keep=12, video_keep=16) as handle, torch.no_grad():
        out = model(**batch).logits
        batched_mask = handle.last_sequence.attention_mask.bool()
        assert [s.extra["row"] for s in handle.stats] == [0, 1, 1, 2]
        for b, row in enumerate(rows):
            single = make(processor, [row], padding_side)
            alone = model(**single).logits[0]
            alone_mask = handle.last_sequence.attention_mask[0].bool() if row else single["attention_mask"][0].bool()
            torch.testing.assert_close(out[b][batched_mask[b]], alone[alone_mask], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- repeated frames
def test_identical_frames(onevision, media):
    model, processor = onevision
    inputs = make(processor, [[("video", media["still"])]])
    with vtprune.apply(model, "divprune", keep=12, video_keep=12) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.last_sequence.inputs_embeds[0][handle.last_sequence.attention_mask[0].bool()]
    stat = handle.stats[0]
    assert stat.tokens_out == 13
    video_start = int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    tokens = kept[video_start : video_start + 12]
    distances = torch.cdist(tokens, tokens) + torch.eye(12) * 1e9
    assert float(distances.min()) > 1e-4  # no two kept tokens are the same pooled feature
    with vtprune.apply(model, "divprune", keep=12, video_keep=12, video_scope="frame") as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats[0].extra["frame_tokens_out"] == [3, 3, 3, 3]


# ---------------------------------------------------------------------------------------------- errors
def test_bad_budgets_raise_clear_errors_and_leave_the_model_unchanged(onevision, media):
    model, processor = onevision
    video = make(processor, [[("video", media["video"])]])
    image = make(processor, [[("image", media["resized"])]])
    with torch.no_grad():
        reference = model(**video).logits
    at_call = [
        (video, dict(pruner="fastervlm", keep=8), "keep=8 is a per-image budget and says nothing about video 0"),
        (video, dict(pruner="fastervlm", keep=8, video_keep=65), "video_keep=65 exceeds the 64 visual tokens of video 0"),
        (video, dict(pruner="fastervlm", keep=8, video_keep=10, video_scope="frame"), "video_keep=10 does not split evenly over the 4 frames"),
        (video, dict(pruner="pool", keep=4, video_keep=17), "pool cannot make keep=17 cells from a 16x4 grid"),
        (image, dict(pruner="fastervlm", keep=300, budget_scope="global"), "keep=300 exceeds the 236 visual tokens of image 0"),
        (image, dict(pruner="fastervlm", keep=11, budget_scope="global"), "the 11 newline tokens are always kept, so keep must be at least 12"),
        (image, dict(pruner="pool", keep=16), r"image 0, crop 2 \(3x6 tokens, budget 16\): pool cannot make keep=16 cells"),
    ]
    for inputs, kwargs, message in at_call:
        kwargs = dict(kwargs)
        with vtprune.apply(model, kwargs.pop("pruner"), **kwargs), torch.no_grad():
            with pytest.raises(BudgetError, match=message):
                model(**inputs)
    at_apply = [
        (dict(keep=50), BudgetError, "keep=50 exceeds the 49 visual tokens of a crop"),
        (dict(keep=8, video_keep=8, video_ratio=0.5), ConfigError, "give either video_keep or video_ratio, not both"),
        (dict(keep=8, video_ratio=1.5), ConfigError, r"video_ratio must be in \(0, 1\]"),
        (dict(keep=8, video_scope="clip"), ConfigError, "video_scope must be one of 'video', 'frame'; got 'clip'"),
        (dict(keep=8, budget_scope="crop"), ConfigError, "budget_scope must be one of 'per_crop', 'global'; got 'crop'"),
    ]
    for kwargs, error, message in at_apply:
        with pytest.raises(error, match=message):
            vtprune.apply(model, "fastervlm", **kwargs)
        assert "_vtprune_handle" not in model.__dict__
    with pytest.raises(UnsupportedModelError, match="pools every frame's full patch grid"):
        vtprune.apply(model, "dymu", thresholds=0.9)
    with torch.no_grad():
        assert torch.equal(model(**video).logits, reference)


def test_unsupported_strategy_and_aspect_ratio(onevision):
    model, _ = onevision
    for attribute, value, message in [
        ("vision_feature_select_strategy", "default", "vision_feature_select_strategy='default' on a siglip_vision_model tower"),
        ("vision_aspect_ratio", "pad", "vision_aspect_ratio='pad' is not supported"),
    ]:
        saved = getattr(model.config, attribute)
        setattr(model.config, attribute, value)
        try:
            with pytest.raises(UnsupportedModelError, match=message):
                vtprune.apply(model, "fastervlm", keep=8)
        finally:
            setattr(model.config, attribute, saved)


def test_remove_restores_exactly(onevision, mixed, reference):
    model, _ = onevision
    before = dict(model.__dict__)
    handle = vtprune.apply(model, "hiprune", keep=12, video_ratio=0.25)
    with torch.no_grad():
        assert model(**mixed).logits.shape[1] < reference[0].shape[1]
    handle.remove()
    assert model.__dict__.keys() == before.keys() and all(model.__dict__[k] is before[k] for k in before)
    with torch.no_grad():
        assert torch.equal(model(**mixed).logits, reference[0])


def test_generate_with_cache_equals_a_greedy_loop_over_the_hand_built_sequence(onevision, media):
    model, processor = onevision
    inputs = make(processor, [[("image", media["plain"]), ("video", media["video"])]])
    positions = mask_positions(inputs["attention_mask"])
    with vtprune.apply(model, "visionzip", keep=12, video_ratio=0.25) as handle, torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        model(**inputs)
        _, _, embeds, position_ids = hand_built_logits(model, inputs, handle, "compact", positions)
    tokens = []
    with torch.no_grad():
        for _ in range(5):
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state
            token = model.lm_head(hidden[:, -1]).argmax(-1)
            tokens.append(int(token))
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == tokens


def test_captured_projections_give_the_recomputed_statistics(onevision, media):
    """run_encoder captures the q / k projections of the blocks a pruner reads; the probe built on them gives
    exactly the statistics of the probe that recomputes them from the captured block inputs (SigLIP frames)."""
    from vtprune.integrations.common.clip_attention import ClipAttentionProbe

    model, processor = onevision
    inputs = make(processor, [[("video", media["video"])]])
    from vtprune.integrations.llava_onevision import LlavaOnevisionIntegration

    integration = LlavaOnevisionIntegration(model, vtprune.create_pruner("hiprune", keep=4))
    layers = integration.pruner.attention_layers(integration.encoder_info())
    with torch.no_grad():
        run = integration.run_encoder(inputs["pixel_values_videos"].flatten(0, 1), -1, layers)
        captured = run.probe(integration._blocks, visual=slice(0, None))
        recomputed = ClipAttentionProbe(integration._blocks, run.block_inputs, visual=slice(0, None))
        assert sorted(run.projections) == sorted(layers)
        for layer in layers:
            for frame in range(FRAMES):
                assert torch.equal(captured.global_attention(layer, frame), recomputed.global_attention(layer, frame))
                assert torch.equal(captured.keys(layer, frame), recomputed.keys(layer, frame))
