"""Qwen2-VL and Qwen2.5-VL video: keep-all bit-exactness, the hand-built pruned sequence, batches of mixed
prompts, temporal scopes, KV-cache decoding, and the video budgets' errors."""

import pytest
import torch
from conftest import inputs_for
from conftest import qwen_prompt as prompt
from test_qwen_vl import hand_built_logits, hand_built_sequence

import vtprune
from vtprune.integrations.tiny_models import random_images, tiny_qwen_vl

V = "<|vision_start|><|video_pad|><|vision_end|>"
I = "<|vision_start|><|image_pad|><|vision_end|>"  # noqa: E741


def clip(frames: int, size=(112, 112), seed=0) -> list:
    return random_images(frames, size=size, seed=seed)


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    return tiny_qwen_vl(request.param)


@pytest.fixture(scope="module")
def video_only(qwen):
    return inputs_for(qwen[1], [prompt(f"{V}What happens?")], videos=[clip(4)])


@pytest.fixture(scope="module")
def mixed(qwen):
    """Row 0: a video then an image; row 1: an image; row 2: text only; row 3: two videos (one of 3 groups)."""
    prompts = [prompt(f"{V}{I}Same scene?"), prompt(f"{I}What is it?"), prompt("no pictures here, only words"), prompt(f"{V}and {V}compare")]
    images = random_images(2, size=(112, 84), seed=7)
    videos = [clip(4, seed=1), clip(4, seed=2), clip(6, size=(112, 84), seed=3)]
    return inputs_for(qwen[1], prompts, images=images, videos=videos)


def test_grids(video_only, mixed):
    assert video_only["video_grid_thw"].tolist() == [[2, 8, 8]]  # 2 temporal groups of 4 x 4 merged tokens
    assert mixed["video_grid_thw"].tolist() == [[2, 8, 8], [2, 8, 8], [3, 6, 8]]
    assert mixed["image_grid_thw"].tolist() == [[1, 6, 8], [1, 6, 8]]


@pytest.mark.parametrize("scope", ["video", "frame"])
@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "random", "pool"])
def test_keep_all_is_bit_exact(qwen, video_only, mixed, name, scope):
    model, _ = qwen
    for inputs in (video_only, mixed):
        with torch.no_grad():
            reference = model(**inputs).logits
            ref_generate = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(model, name, ratio=1.0, video_scope=scope) as handle, torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_generate)
    # The mixed batch's units in prompt order: row 0 video + image, row 1 image, row 3 two videos.
    assert [(s.extra["modality"], s.extra["row"], s.tokens_out) for s in handle.stats] == [
        ("video", 0, 32), ("image", 0, 12), ("image", 1, 12), ("video", 3, 32), ("video", 3, 36)
    ]
    assert handle.stats[4].extra["grid_thw"] == (3, 3, 4)


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("scope", ["video", "frame"])
@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"])
def test_pruned_forward_equals_hand_built_sequence(qwen, mixed, name, scope, positions):
    model, _ = qwen
    budget = dict(video_ratio=0.25) if name == "pool" else dict(video_keep=12 if scope == "video" else 6)
    with vtprune.apply(model, name, keep=6, positions=positions, video_scope=scope, **budget) as handle, torch.no_grad():
        logits = model(**mixed).logits
        expected, attention = hand_built_logits(model, mixed, handle, positions)
    outs = [s.tokens_out for s in handle.stats]
    if name == "pool":  # a quarter of every clip (or of every group), pool cells tiling each grid
        assert outs == [8, 6, 6, 8, 9]
    else:
        # frame: video_keep=6 split evenly over each clip's temporal groups (3 + 3, and 2 + 2 + 2)
        assert outs == ([12, 6, 6, 12, 12] if scope == "video" else [6, 6, 6, 6, 6])
    real = attention.bool()
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)


def test_preserved_positions_are_the_unpatched_ids_of_the_kept_tokens(qwen, mixed):
    """In preserve mode every kept video token carries the unpatched model's (t, h, w) id of its placeholder."""
    model, _ = qwen
    with vtprune.apply(model, "divprune", keep=6, video_keep=10) as handle, torch.no_grad():
        model(**mixed)
        sequence = handle.last_sequence
        _, attention, expected = hand_built_sequence(model, mixed, handle, "preserve")
    real = sequence.attention_mask.bool()
    assert torch.equal(sequence.attention_mask, attention)
    assert torch.equal(sequence.position_ids[-3:][:, real], expected[:, real])
    video_rows = [s for s in handle.stats if s.extra["modality"] == "video"]
    assert all(s.tokens_out == 10 for s in video_rows)
    assert sum(int(s.order.unique().numel()) for s in video_rows) == 30  # distinct tokens, no duplicates


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "visionzip", "pool"])
def test_batch_of_mixed_prompts_equals_each_prompt_alone(qwen, name, padding_side):
    model, processor = qwen
    image, videos = random_images(1, size=(112, 84), seed=7)[0], [clip(4, seed=1), clip(6, size=(112, 84), seed=3)]
    rows = [
        (prompt(f"{I}What is it?"), [image], []),
        (prompt(f"{V}{I}Does the clip show the picture?"), [image], [videos[0]]),
        (prompt("text only, no visual input at all"), [], []),
        (prompt(f"Watch {V}"), [], [videos[1]]),
    ]
    budget = dict(ratio=0.5) if name == "pool" else dict(keep=6, video_keep=12)
    batch = inputs_for(processor, [r[0] for r in rows], [i for r in rows for i in r[1]], [v for r in rows for v in r[2]], padding_side)
    with vtprune.apply(model, name, **budget) as handle, torch.no_grad():
        batched = model(**batch).logits
        lengths = handle.last_sequence.attention_mask.sum(1)  # attended tokens per row of the pruned batch
        assert [s.extra["row"] for s in handle.stats] == [0, 1, 1, 3]
        for row, (text, images, clips) in enumerate(rows):
            alone = model(**inputs_for(processor, [text], images, clips, padding_side)).logits[0, -1]
            last = batched.shape[1] - 1 if padding_side == "left" else int(lengths[row]) - 1
            torch.testing.assert_close(batched[row, last], alone, atol=1e-4, rtol=1e-4)


def test_generate_with_the_cache_equals_greedy_decoding_of_the_hand_built_sequence(qwen, mixed):
    """Pruned generate (preserve) vs a greedy loop over the unpatched language model, starting from the hand-built
    sequence and continuing every M-RoPE axis after the row's largest id: checks the rope deltas after pruning."""
    model, processor = qwen
    inputs = inputs_for(processor, [prompt(f"{V}{I}Same scene?")], random_images(1, size=(112, 84), seed=7), [clip(6, size=(112, 84), seed=3)])
    with vtprune.apply(model, "fastervlm", keep=6, video_keep=9) as handle, torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        embeds, attention, positions = hand_built_sequence(model, inputs, handle, "preserve")
    language_model, embed = model.model.language_model, model.get_input_embeddings()
    with torch.no_grad():
        out = language_model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True)
        tokens, next_position = [], int(positions.max()) + 1
        for step in range(5):
            token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
            tokens.append(token)
            attention = torch.cat([attention, torch.ones_like(token)], dim=1)
            step_positions = torch.full((3, 1, 1), next_position + step)
            out = language_model(inputs_embeds=embed(token), attention_mask=attention, position_ids=step_positions,
                                 past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), generated)


def test_repeated_frames(qwen):
    """A clip whose frames are all the same: the whole-clip selection spends no token on a repeat; the per-frame
    scope keeps the same count in every temporal group."""
    model, processor = qwen
    frame = clip(1, seed=5)[0]
    inputs = inputs_for(processor, [prompt(f"{V}still")], videos=[[frame] * 8])  # 4 temporal groups of 16 tokens
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output[0]
    groups = features.reshape(4, 16, -1)
    assert all(torch.equal(groups[0], groups[g]) for g in range(4))  # the precondition: exact repeats
    with vtprune.apply(model, "divprune", keep=4, video_keep=12, video_scope="video") as handle, torch.no_grad():
        model(**inputs)
    kept = features[handle.stats[0].kept]
    assert handle.stats[0].tokens_out == 12
    assert torch.unique(kept, dim=0).shape[0] == 12  # no two kept tokens have equal features
    with vtprune.apply(model, "divprune", keep=4, video_keep=12, video_scope="frame") as handle, torch.no_grad():
        model(**inputs)
    stat = handle.stats[0]
    assert stat.extra["group_tokens_out"] == [3, 3, 3, 3]
    assert torch.bincount(stat.kept // 16, minlength=4).tolist() == [3, 3, 3, 3]


def test_bad_video_budgets_raise_clear_errors_and_leave_the_model_unchanged(qwen, video_only):
    model, _ = qwen
    with torch.no_grad():
        reference = model(**video_only).logits
    before = dict(model.__dict__)
    at_call = [
        (dict(pruner="fastervlm", keep=8), "keep=8 is a per-image budget and says nothing about video 0"),
        (dict(pruner="fastervlm", keep=8, video_keep=33), "video_keep=33 exceeds the 32 visual tokens of video 0"),
        (dict(pruner="fastervlm", keep=8, video_keep=9, video_scope="frame"), "video_keep=9 does not split evenly over the 2 temporal groups"),
        (dict(pruner="fastervlm", keep=8, video_keep=34, video_scope="frame"), "exceeds the 16 visual tokens of each temporal group"),
        (dict(pruner="pool", keep=4, video_keep=11), "pool cannot make keep=11 cells from a 8x4 grid"),
    ]
    for kwargs, message in at_call:
        kwargs = dict(kwargs)
        with vtprune.apply(model, kwargs.pop("pruner"), **kwargs), torch.no_grad():
            with pytest.raises(vtprune.BudgetError, match=message):
                model(**video_only)
            assert model(input_ids=video_only["input_ids"][:, :3]).logits.shape[1] == 3  # still usable after the error
    at_apply = [
        (dict(video_keep=8, video_ratio=0.5), "give either video_keep or video_ratio, not both"),
        (dict(video_ratio=-0.5), "video_ratio must be in \\(0, 1\\]"),
        (dict(video_keep=0), "video_keep must be a positive integer"),
        (dict(video_scope="clip"), "video_scope must be one of 'video', 'frame'; got 'clip'"),
    ]
    for kwargs, message in at_apply:
        with pytest.raises(vtprune.ConfigError, match=message):
            vtprune.apply(model, "fastervlm", keep=8, **kwargs)
    with pytest.raises(vtprune.UnsupportedModelError, match="merges tokens inside the vision encoder"):
        vtprune.apply(model, "dymu", thresholds=0.9)
    assert model.__dict__.keys() == before.keys()
    with torch.no_grad():
        assert torch.equal(model(**video_only).logits, reference)


def test_ratio_applies_to_images_and_videos(qwen, mixed):
    model, _ = qwen
    with vtprune.apply(model, "fastervlm", ratio=0.25) as handle, torch.no_grad():
        model(**mixed)
    assert [s.tokens_out for s in handle.stats] == [8, 3, 3, 8, 9]
    with vtprune.apply(model, "fastervlm", ratio=0.25, video_ratio=0.5) as handle, torch.no_grad():
        model(**mixed)
    assert [s.tokens_out for s in handle.stats] == [16, 3, 3, 16, 18]


def test_image_stats_join_offsets_indices_and_slots():
    from vtprune.tokens import ImageStats, Reduction

    first = ImageStats.from_reduction(Reduction.select(torch.tensor([2, 0])), 4)  # keeps 0, 2 of tokens 0..3
    pooled = Reduction(order=torch.tensor([1]), features=torch.zeros(1, 2), assignment=torch.tensor([0, 0, -1]))
    second = ImageStats.from_reduction(pooled, 3)  # tokens 4..6: 4 and 5 merged into one slot, 6 dropped
    joined = ImageStats.join([first, second], [0, 4])
    assert (joined.tokens_in, joined.tokens_out) == (7, 3)
    assert joined.order.tolist() == [0, 2, 5]
    assert joined.kept.tolist() == [0, 2, 5]
    assert joined.assignment.tolist() == [0, -1, 1, -1, 2, 2, -1]


def test_mismatched_placeholders_name_both_modalities(qwen, mixed):
    model, _ = qwen
    broken = dict(mixed, video_grid_thw=mixed["video_grid_thw"][:2], pixel_values_videos=mixed["pixel_values_videos"][:128 * 2])
    with vtprune.apply(model, "fastervlm", keep=6, video_keep=12), torch.no_grad():
        with pytest.raises(ValueError, match="the prompts hold 24 image and 100 video placeholder tokens, but the pixel inputs give 24 image and 64 video tokens"):
            model(**broken)
