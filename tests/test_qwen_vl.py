"""Qwen2-VL and Qwen2.5-VL: equivalence with the unpatched model and with hand-built pruned sequences."""

import pytest
import torch
from conftest import make_inputs

import vtprune
from vtprune.integrations.tiny_models import random_images, tiny_qwen_vl

V = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt(text, images=1):
    return f"<|im_start|>user\n{V * images}{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [prompt("What is it?"), prompt("no image, only a rather long question", 0), prompt("Compare them.", 2)]
SIZES = [(224, 168), (300, 200), (180, 260), (252, 252)]


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    model, processor = tiny_qwen_vl(request.param)
    return model, processor


@pytest.fixture(scope="module")
def qwen_images():
    return [random_images(1, size=size, seed=i)[0] for i, size in enumerate(SIZES)]


@pytest.fixture
def batch(qwen, qwen_images):
    return make_inputs(qwen[1], PROMPTS, qwen_images[:3])


def test_grids_differ_per_image(batch):
    assert batch["image_grid_thw"].tolist() == [[1, 12, 16], [1, 14, 22], [1, 18, 12]]


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "random", "pool"])
def test_keep_all_is_bit_exact(qwen, batch, name):
    model, _ = qwen
    with torch.no_grad():
        reference = model(**batch).logits
        ref_generate = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with vtprune.apply(model, name, ratio=1.0) as handle, torch.no_grad():
        assert handle.positions == "preserve"
        assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), ref_generate)
        assert [s.tokens_out for s in handle.stats] == [48, 77, 54]


def hand_built_sequence(model, inputs, handle, positions_mode):
    """The pruned sequence built from the unpatched model's own image and video features and M-RoPE ids:
    ``(embeds [B, L, D], attention [B, L], position_ids [3, B, L])``, left padded.

    Placeholder runs are matched to ``handle.stats`` in prompt order; each stat must name the modality of its run,
    and its features come from the unpatched model's image or video features in processor order."""
    with torch.no_grad():
        features = {}
        if inputs.get("pixel_values") is not None:
            features["image"] = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        if inputs.get("pixel_values_videos") is not None:
            features["video"] = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        names = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
        positions, _ = model.model.get_rope_index(inputs["input_ids"], **{n: inputs[n] for n in names if inputs.get(n) is not None})
        embed = model.get_input_embeddings()
        placeholder = {model.config.image_token_id: "image", model.config.video_token_id: "video"}
        rows, unit, seen = [], 0, {"image": 0, "video": 0}
        for b in range(inputs["input_ids"].shape[0]):
            ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
            vectors, places, j = [], [], 0
            while j < ids.numel():
                if mask[j] == 0:
                    j += 1
                    continue
                kind = placeholder.get(int(ids[j]))
                if kind is not None:
                    stat = handle.stats[unit]
                    assert stat.extra["modality"] == kind
                    own = features[kind][seen[kind]]
                    assert own.shape[0] == stat.tokens_in
                    for slot, rep in enumerate(stat.order.tolist()):
                        members = (stat.assignment == slot).nonzero().flatten()
                        if members.numel() <= 1:
                            vectors.append(own[rep])
                        elif handle.pruner.name == "pool":
                            vectors.append(own[members].mean(0))
                        else:  # VisionZip contextual token: target + mean of the other members
                            others = members[members != rep]
                            vectors.append(own[rep] + own[others].mean(0))
                        places.append(positions[:, b, j + rep])
                    j += stat.tokens_in
                    unit += 1
                    seen[kind] += 1
                else:
                    vectors.append(embed(ids[j]))
                    places.append(positions[:, b, j])
                    j += 1
            places = torch.stack(places, dim=1)
            if positions_mode == "compact":
                places = torch.arange(places.shape[1]).expand(3, -1)
            rows.append((torch.stack(vectors), places))
        assert unit == len(handle.stats)
        length = max(r[0].shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0][0].shape[1])
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        position_ids = torch.zeros(3, len(rows), length, dtype=torch.long)
        for b, (vectors, places) in enumerate(rows):
            n = vectors.shape[0]
            embeds[b, length - n :] = vectors
            attention[b, length - n :] = 1
            position_ids[:, b, length - n :] = places
        return embeds, attention, position_ids


def hand_built_logits(model, inputs, handle, positions_mode):
    """`hand_built_sequence` run through the unpatched language model."""
    embeds, attention, position_ids = hand_built_sequence(model, inputs, handle, positions_mode)
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids
        ).last_hidden_state
        return model.lm_head(hidden), attention


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"])
@pytest.mark.parametrize("positions", ["preserve", "compact"])
def test_pruned_forward_equals_hand_built_sequence(qwen, batch, name, positions):
    model, _ = qwen
    with vtprune.apply(model, name, keep=24, positions=positions) as handle, torch.no_grad():
        logits = model(**batch).logits
        expected, attention = hand_built_logits(model, batch, handle, positions)
    assert [s.tokens_out for s in handle.stats] == [24, 24, 24]
    real = attention.bool()
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)


BATCH_PROMPTS = [prompt("hi", 0), prompt("What is it?"), prompt("Describe both pictures in detail please.", 2), prompt("A long question about one image only.")]
BATCH_IMAGES = [[], [0], [1, 2], [3]]


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "visionzip", "pool"])
@pytest.mark.parametrize("positions", ["preserve", "compact"])
def test_padded_batch_of_different_image_sizes_equals_single_rows(qwen, qwen_images, name, positions):
    model, processor = qwen
    batch = make_inputs(processor, BATCH_PROMPTS, [qwen_images[i] for row in BATCH_IMAGES for i in row])
    with vtprune.apply(model, name, keep=24, positions=positions) as handle, torch.no_grad():
        batched = model(**batch).logits[:, -1]
        first_step = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True).logits[0]
        assert [s.extra["row"] for s in handle.stats] == [1, 2, 2, 3]
        for row, (text, image_ids) in enumerate(zip(BATCH_PROMPTS, BATCH_IMAGES)):
            alone = model(**make_inputs(processor, [text], [qwen_images[i] for i in image_ids])).logits[:, -1]
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(first_step[row : row + 1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positions", ["preserve", "compact"])
def test_manual_decode_loop_matches_generate(qwen, qwen_images, positions):
    model, processor = qwen
    inputs = make_inputs(processor, [prompt("What is it?")], [qwen_images[1]])
    with vtprune.apply(model, "divprune", keep=30, positions=positions), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        mask = inputs["attention_mask"]
        out = model(**inputs, use_cache=True)
        tokens = []
        for _ in range(4):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), generated[:, inputs["input_ids"].shape[1] :])


def test_scores_come_from_the_true_attention_maps(qwen, qwen_images, monkeypatch):
    """Global attention per merged token equals the mean over heads and queries of the weights the vision
    blocks really compute (captured through the eager attention path), averaged over 2x2 groups."""
    import sys

    from vtprune.capture import capture_calls
    from vtprune.integrations.qwen_vl import QwenAttentionProbe

    model, processor = qwen
    visual = model.model.visual
    module = sys.modules[type(visual.blocks[0].attn).__module__]
    inputs = make_inputs(processor, [prompt("x", 2)], qwen_images[:2])
    grid = inputs["image_grid_thw"]
    weights = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        output, attn = original(*args, **kwargs)
        weights.append(attn.detach())
        return output, attn

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    layer = len(visual.blocks) - 1  # a full-attention block in both models
    visual.config._attn_implementation = "eager"
    try:
        with torch.no_grad(), capture_calls(visual.blocks, {layer}) as calls:
            visual(inputs["pixel_values"], grid_thw=grid)
    finally:
        visual.config._attn_implementation = "sdpa"
    # The last block's maps are the last ones recorded, one per image (full attention).
    per_image = weights[-grid.shape[0] :]
    raster = None
    if hasattr(visual, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        raster = torch.argsort(get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)[0])
    probe = QwenAttentionProbe(visual.blocks, calls, grid.prod(-1).tolist(), 4, raster)
    offset = 0
    for image, attn in enumerate(per_image):
        received = attn[0].mean(dim=(0, 1))  # [n_patches], ViT order
        grouped = received.reshape(-1, 4).mean(1)
        groups = grouped.shape[0]
        if raster is not None:
            local = raster[offset : offset + groups] - offset
            grouped = grouped[local]
        torch.testing.assert_close(probe.global_attention(layer, image), grouped, atol=1e-6, rtol=1e-5)
        offset += groups


def test_captured_projections_give_the_recomputed_statistics(qwen, qwen_images):
    """run_encoder captures each scored block's fused qkv output; the probe built on it gives the statistics of
    the probe that recomputes q and k from the block's captured input, for a batch of two images and a video."""
    import numpy as np

    from vtprune.integrations.qwen_vl import QwenAttentionProbe, QwenVLIntegration

    model, processor = qwen
    integration = QwenVLIntegration(model, vtprune.create_pruner("hiprune", keep=4))
    layers = integration.pruner.attention_layers(integration.encoder_info())
    frames = np.stack([np.array(image.resize((112, 84))) for image in qwen_images[:4]])
    images = make_inputs(processor, [prompt("x", 2)], qwen_images[:2])
    video = dict(processor(text=["<|vision_start|><|video_pad|><|vision_end|>x"], videos=[frames], return_tensors="pt"))
    for pixels, grid in ((images["pixel_values"], images["image_grid_thw"]), (video["pixel_values_videos"], video["video_grid_thw"])):
        with torch.no_grad():
            run = integration.run_encoder(pixels, grid, layers)
        assert sorted(run.projections) == sorted(layers)
        captured = integration._probe(run)
        recomputed = QwenAttentionProbe(model.model.visual.blocks, run.calls, grid.prod(-1).tolist(), 4, run.raster_order)
        for layer in layers:
            for image in range(grid.shape[0]):
                torch.testing.assert_close(captured.global_attention(layer, image), recomputed.global_attention(layer, image), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(captured.keys(layer, image), recomputed.keys(layer, image), atol=1e-5, rtol=1e-5)


def test_window_order_is_undone_like_the_merger(qwen, qwen_images):
    """Qwen2.5-VL: the group order the probe uses to go back to raster order is the one the model applies to
    the merger output."""
    model, processor = qwen
    visual = model.model.visual
    if not hasattr(visual, "fullatt_block_indexes"):
        pytest.skip("Qwen2-VL has no window attention")
    from vtprune.capture import capture_layers
    from transformers.vision_utils import get_vision_window_index

    inputs = make_inputs(processor, [prompt("x", 2)], qwen_images[1:3])
    grid = inputs["image_grid_thw"]
    last = len(visual.blocks) - 1
    with torch.no_grad(), capture_layers(visual.blocks, outputs={last}) as (_, outputs):
        merged = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        window_order = visual.merger(outputs[last])
    raster = torch.argsort(get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)[0])
    assert not torch.equal(raster, torch.arange(raster.numel()))
    assert torch.equal(window_order[raster], merged)


def test_default_layers(qwen):
    from vtprune.integrations.qwen_vl import QwenVLIntegration

    model, _ = qwen
    info = QwenVLIntegration(model, vtprune.create_pruner("hiprune", keep=8)).encoder_info()
    assert (info.depth, info.feature_layer, info.has_cls, info.middle_layer) == (8, 7, False, 3)
    assert vtprune.create_pruner("hiprune", keep=8).layers(info) == (3, 7)


def test_errors(qwen, batch, qwen_images):
    model, processor = qwen
    with vtprune.apply(model, "fastervlm", keep=60), pytest.raises(vtprune.BudgetError, match="keep=60 exceeds the 48 visual tokens of image 0"):
        with torch.no_grad():
            model(**batch)
    with vtprune.apply(model, "fastervlm", keep=8, cls_fallback="error"), pytest.raises(vtprune.MissingCLSError, match="cls_fallback='global'"):
        with torch.no_grad():
            model(**batch)
    video = torch.rand(4, 3, 56, 56)
    inputs = dict(processor(text=["<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>x<|im_end|>\n"], videos=[video], return_tensors="pt"))
    # A per-image keep says nothing about a video's budget (tests/test_qwen_video.py has the video budgets).
    with vtprune.apply(model, "fastervlm", keep=8), pytest.raises(vtprune.BudgetError, match="keep=8 is a per-image budget"):
        with torch.no_grad():
            model(**inputs)


def test_remove_restores_exactly(qwen, batch):
    model, _ = qwen
    with torch.no_grad():
        reference = model(**batch).logits
    before = dict(model.__dict__)
    rope_deltas = model.model.rope_deltas
    handle = vtprune.apply(model, "visionzip", keep=16)
    with torch.no_grad():
        pruned = model(**batch).logits
    handle.remove()
    assert model.__dict__.keys() == before.keys()
    assert model.model.rope_deltas is rope_deltas
    assert pruned.shape[1] < reference.shape[1]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
