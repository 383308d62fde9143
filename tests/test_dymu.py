"""DyMU (arXiv 2504.17040): DToMe inside the vision encoder, threshold calibration, virtual token unmerging (VTU).

What is exact and what is compared:
- infinite thresholds never merge: logits and generated tokens are bit-identical to the unpatched model, with
  vtu=False and vtu=True (the VTU patch then runs the original attention);
- VTU semantics: each decoder layer computes q/k/v on the merged tokens, expands them to the virtual
  full-length sequence (original positions), attends causally over it, and averages each group's outputs
  back. The reference below runs the *unpatched* attention modules on the explicitly expanded sequence (every
  merged token duplicated at all of its original positions) and takes the same per-layer group mean; both must
  agree to float tolerance through the whole model. They are not expected to equal the unmerged model: after
  the first layer, duplicates at different positions would diverge without the group mean;
- a batch whose images merge to different counts equals running each prompt alone (same merge groups, logits
  to float tolerance), for the encoder and the LLM.
"""

import json
import math

import pytest
import torch
from conftest import make_inputs, mask_positions

import vtprune
from vtprune.errors import ConfigError, UnsupportedModelError
from vtprune.merging import (
    MergeState,
    attention_bias,
    bipartite_best,
    build_virtual_map,
    expand,
    groups,
    merge_edges,
    scatter_mean,
    threshold_edges,
)
from vtprune.pruners.dymu import DyMUThresholds, keep_targets, preset_targets
from vtprune.sequence import find_image_slots
from vtprune.integrations.tiny_models import random_images

PROMPTS = [
    "USER: <image>\nWhat colour dominates? ASSISTANT:",
    "USER: a text-only question that is rather long, with no image at all ASSISTANT:",
    "USER: <image><image>\nCompare both. ASSISTANT:",
]
BLOCKS = 7  # tiny LLaVA: 8 CLIP blocks, features of block 6 (vision_feature_layer=-2)


@pytest.fixture(scope="module")
def calibrated(llava):
    """Thresholds per preset, calibrated on images that are never used for evaluation."""
    model, processor = llava
    images = random_images(8, size=(320, 240), seed=11)
    return {
        preset: vtprune.calibrate(model, "dymu", images, processor=processor, preset=preset, batch_size=4, progress=False)
        for preset in ("low", "mid", "high")
    }


@pytest.fixture
def batch(llava, images):
    return make_inputs(llava[1], PROMPTS, images[:3])


# ---------------------------------------------------------------------------------------------- core tensors
def test_merge_is_size_weighted_and_tracks_positions():
    # Two images of 6 tokens (position 0 protected, like CLIP's CLS); keys chosen so that A token 2 matches
    # B token 3 in image 0 only, and every A token matches in image 1 except the protected one.
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    state = MergeState.initial(x, protected=1)
    state.size[0, 3] = 3.0  # token 3 already stands for 3 originals
    keys = torch.tensor(
        [
            [[1, 0], [0, 1], [1, 1], [1, 1], [1, -1], [-1, 0]],
            [[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 1]],
        ],
        dtype=torch.float32,
    )
    edges = bipartite_best(keys, state)
    assert edges.score[0, 0] == -math.inf and edges.score[1, 0] == -math.inf  # CLS never merges
    chosen = threshold_edges(edges, 0.99)
    assert chosen.tolist() == [[False, True, False], [False, True, True]]
    out = merge_edges(state, edges, chosen)
    assert out.counts.tolist() == [5, 4]  # per-image counts differ: padded, not truncated
    assert out.x.shape[1] == 5 and out.valid[1].tolist() == [True, True, True, True, False]
    # image 0: token 2 (size 1) merged into token 3 (size 3) -> size 4, weighted mean
    assert torch.allclose(out.x[0, 2], (x[0, 2] * 1 + x[0, 3] * 3) / 4)
    assert out.size[0].tolist() == [1, 1, 4, 1, 1]
    assert out.origin[0].tolist() == [0, 1, 3, 4, 5]
    assert out.where[0].tolist() == [0, 1, 2, 2, 3, 4]
    # image 1: 2 -> 3 and 4 -> 5
    assert out.where[1].tolist() == [0, 1, 2, 2, 3, 3]
    assert torch.allclose(out.x[1, 3], (x[1, 4] + x[1, 5]) / 2)
    bias = attention_bias(out, torch.float32)[:, 0, 0]
    assert torch.allclose(bias[0], torch.tensor([0, 0, math.log(4), 0, 0]))
    assert bias[1, 4] == -math.inf and bias[1, 3] == pytest.approx(math.log(2))
    positions, order, assignment = groups(out.where[1], int(out.counts[1]), skip=1)
    assert order.tolist() == [0, 1, 3] and assignment.tolist() == [0, 1, 1, 2, 2]
    assert positions.tolist() == [1, 2, 3]


def test_virtual_map_expand_and_scatter_mean():
    # One row: [pad, t0, img0, img1, img2, t1] unmerged; images 0 and 2 merged into one token at slot 0.
    source = torch.tensor([[-1, 1, 2, 3, 5]])  # real columns: pad, t0, slot0, slot1, t1
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    positions = mask_positions(mask)
    vmap = build_virtual_map(source, mask, positions, [0], [torch.tensor([2, 3, 4])], [torch.tensor([0, 1, 0])])
    assert vmap.index.tolist() == [[0, 1, 2, 3, 2, 4]] and vmap.mask.tolist() == [[0, 1, 1, 1, 1, 1]]
    real = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1)
    assert expand(real, vmap.index).flatten().tolist() == [0, 1, 2, 3, 2, 4]
    virtual = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0], [50.0]]])
    assert scatter_mean(virtual, vmap).flatten().tolist() == [0.0, 10.0, 30.0, 30.0, 50.0]


def test_presets_and_threshold_files(tmp_path):
    assert preset_targets("low", 576, 24) == [21] * 24  # the paper's CLIP-L/336 schedules
    assert preset_targets("mid", 576, 24) == [16] * 24
    assert preset_targets("high", 576, 24) == [8] * 24
    shallow = preset_targets("low", 576, 5)  # too shallow for a constant schedule: geometric, same total
    assert abs(sum(shallow) - 504) <= 3 and shallow[0] > shallow[-1]
    # A budget: the targets merge exactly N - keep. Constant when feasible, the remainder on the first blocks ...
    assert keep_targets(144, 576, 24) == [18] * 24 and keep_targets(150, 576, 24) == [18] * 18 + [17] * 6
    assert keep_targets(576, 576, 23) == [0] * 23
    # ... else geometric, g = 1 - (9 / 144) ** (1 / 5) = 0.4257 of the tokens left, the last block taking the
    # rounding remainder: round(.4257 * 144) = 61, round(.4257 * 83) = 35, then 20, 12, and 7 to total 135.
    assert keep_targets(9, 144, 5) == [61, 35, 20, 12, 7]
    for keep, tokens, blocks in ((36, 144, 5), (18, 144, 5), (1, 576, 23), (100, 576, 3)):
        assert sum(keep_targets(keep, tokens, blocks)) == tokens - keep
    for bad in (0, 145, 2.5, True):
        with pytest.raises(ConfigError, match=r"keep must be an integer in \[1, 144\]"):
            keep_targets(bad, 144, 5)
    thresholds = DyMUThresholds([0.5, math.inf, 0.25], meta={"preset": "mid"})
    path = thresholds.save(tmp_path / "t.json")
    assert json.loads(path.read_text())["thresholds"] == [0.5, None, 0.25]
    loaded = DyMUThresholds.load(path)
    assert loaded.values == [0.5, math.inf, 0.25] and loaded.meta == {"preset": "mid"}


# ---------------------------------------------------------------------------------------------- LLaVA-1.5
@pytest.mark.parametrize("vtu", [False, True])
def test_infinite_thresholds_are_bit_exact(llava, batch, vtu):
    model, _ = llava
    with torch.no_grad():
        reference = model(**batch).logits
        ref_generate = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with vtprune.apply(model, "dymu", thresholds=math.inf, vtu=vtu) as handle, torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), ref_generate)
        assert [(s.tokens_in, s.tokens_out) for s in handle.stats] == [(576, 576)] * 3
        assert torch.equal(handle.stats[0].assignment, torch.arange(576))


def test_calibrated_presets_reduce_tokens(llava, calibrated, images, tmp_path):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nQ? ASSISTANT:"] * 4, images[2:6])
    counts = {}
    for preset, thresholds in calibrated.items():
        assert len(thresholds) == BLOCKS and thresholds.meta["images"] == 8
        path = thresholds.save(tmp_path / f"{preset}.json")
        with vtprune.apply(model, "dymu", thresholds=str(path)) as handle, torch.no_grad():
            model(**inputs)
            counts[preset] = [s.tokens_out for s in handle.stats]
            for stat in handle.stats:  # merge groups: every original token in exactly one group, raster order
                assert stat.assignment.shape == (576,) and int(stat.assignment.max()) == stat.tokens_out - 1
                first = torch.full((stat.tokens_out,), 576).scatter_reduce(0, stat.assignment, torch.arange(576), "amin")
                assert torch.equal(first, stat.order)
                assert stat.extra["tokens_per_block"][-1] == stat.tokens_out
    overlay = vtprune.visualize(images[2].resize((336, 336)), stat)  # the merge groups, drawn for overlays
    assert overlay.size == (336, 336)
    for i in range(4):
        assert counts["low"][i] < counts["mid"][i] < counts["high"][i] < 576
    # The preset targets hold on average on new images (within a loose band: 4 images, random weights).
    mean = {p: sum(c) / 4 for p, c in counts.items()}
    for preset, fraction in (("low", 1 / 8), ("mid", 1 / 3), ("high", 2 / 3)):
        assert 0.5 * fraction * 576 < mean[preset] < 1.5 * fraction * 576


def _reference_vtu_logits(model, sequence, vmap):
    """Unpatched decoder layers on the explicitly expanded sequence, group-mean after each attention."""
    lm = model.model.language_model
    hidden = sequence.inputs_embeds
    batch, virtual = vmap.index.shape
    cos, sin = lm.rotary_emb(hidden, vmap.positions)
    causal = torch.ones(virtual, virtual, dtype=torch.bool).tril()
    allowed = causal[None] & vmap.mask.bool()[:, None, :]
    allowed |= (~allowed.any(-1))[..., None] & torch.eye(virtual, dtype=torch.bool)[None]
    mask = torch.zeros(batch, 1, virtual, virtual).masked_fill(~allowed[:, None], float("-inf"))
    weight = vmap.mask.float()[..., None]
    counts = torch.zeros(batch, hidden.shape[1]).index_put_(
        (torch.arange(batch)[:, None].expand_as(vmap.index), vmap.index), vmap.mask.float(), accumulate=True
    )
    for layer in lm.layers:
        attn = layer.self_attn
        full = hidden.gather(1, vmap.index[..., None].expand(-1, -1, hidden.shape[-1]))  # exact duplicates
        out, _ = type(attn).forward(attn, layer.input_layernorm(full), position_embeddings=(cos, sin), attention_mask=mask)
        mean = torch.zeros_like(hidden).index_put_(
            (torch.arange(batch)[:, None].expand_as(vmap.index), vmap.index), out * weight, accumulate=True
        ) / counts.clamp(min=1)[..., None]
        hidden = hidden + mean
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(lm.norm(hidden))


def _vtu_against_reference(model, batch, thresholds):
    """VTU logits and the expanded full-length reference on the same merged run, over the attended columns."""
    inputs = dict(batch, position_ids=mask_positions(batch["attention_mask"]))
    with vtprune.apply(model, "dymu", thresholds=thresholds, vtu=True) as handle, torch.no_grad():
        logits = model(**inputs).logits
        sequence, stats = handle.last_sequence, handle.stats
        slots = find_image_slots(batch["input_ids"] == model.config.image_token_id, [s.tokens_in for s in stats])
        vmap = build_virtual_map(
            sequence.source, batch["attention_mask"], inputs["position_ids"], [s.row for s in slots],
            [s.positions for s in slots], [s.assignment for s in stats],
        )
        assert vmap.index.shape[1] > sequence.inputs_embeds.shape[1]  # tokens were merged
        assert max(int(torch.bincount(s.assignment).max()) for s in stats) > 1
        reference = _reference_vtu_logits(model, sequence, vmap)
    attended = sequence.attention_mask.bool()
    return inputs, logits[attended], reference[attended], attended


def test_vtu_equals_expanded_full_length_computation(llava, batch, calibrated):
    model, _ = llava
    inputs, logits, reference, attended = _vtu_against_reference(model, batch, calibrated["low"])
    with vtprune.apply(model, "dymu", thresholds=calibrated["low"], vtu=False), torch.no_grad():
        direct = model(**inputs).logits
    assert torch.allclose(logits, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits, direct[attended], atol=1e-2)  # VTU is not the direct merged run


def test_vtu_decoding_with_cache_matches_full_forward(llava, batch, calibrated):
    model, _ = llava
    steps = 3
    with vtprune.apply(model, "dymu", thresholds=calibrated["mid"], vtu=True), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        extended = dict(batch)
        extended["input_ids"] = torch.cat([batch["input_ids"], new[:, :-1]], dim=1)
        extended["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new[:, :-1])], dim=1)
        extended["position_ids"] = mask_positions(extended["attention_mask"])
        full = model(**extended).logits  # no cache: the virtual sequence rebuilt with the generated tokens
    for step in range(steps):
        column = full.shape[1] - steps + step
        assert torch.allclose(out.logits[step], full[:, column], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vtu", [False, True])
def test_batch_equals_single_runs(llava, images, batch, calibrated, vtu):
    model, processor = llava
    per_row = [[0], [], [1, 2]]
    inputs = dict(batch, position_ids=mask_positions(batch["attention_mask"]))
    with vtprune.apply(model, "dymu", thresholds=calibrated["mid"], vtu=vtu) as handle, torch.no_grad():
        batched = model(**inputs).logits
        batched_stats = handle.stats
        mask = handle.last_sequence.attention_mask.bool()
        assert len({s.tokens_out for s in batched_stats}) == 3  # the images merge to different counts
        for row, prompt in enumerate(PROMPTS):
            single = make_inputs(processor, [prompt], [images[i] for i in per_row[row]])
            logits = model(**single).logits[0]
            for j, i in enumerate(per_row[row]):
                assert torch.equal(handle.stats[j].assignment, batched_stats[i].assignment)
            assert torch.allclose(batched[row][mask[row]], logits, atol=1e-4, rtol=1e-4)


def test_vtu_refuses_beam_search(llava, batch, calibrated):
    model, _ = llava
    with vtprune.apply(model, "dymu", thresholds=calibrated["mid"], vtu=True), torch.no_grad():
        with pytest.raises(NotImplementedError, match="one sequence per prompt"):
            model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)
    with vtprune.apply(model, "dymu", thresholds=calibrated["mid"], vtu=False), torch.no_grad():
        assert model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False).shape[0] == 3


def test_text_only_call_after_vtu_call_is_unchanged(llava, batch, calibrated):
    model, processor = llava
    text = make_inputs(processor, ["USER: only text here ASSISTANT:"], [])
    with torch.no_grad():
        reference = model(**text).logits
    with vtprune.apply(model, "dymu", thresholds=calibrated["mid"], vtu=True), torch.no_grad():
        model(**batch)
        assert torch.equal(model(**text).logits, reference)


def test_remove_restores_after_exception(llava, batch, calibrated):
    model, _ = llava
    with torch.no_grad():
        reference = model(**batch).logits
    lm = model.model.language_model
    hooks_before = dict(lm._forward_pre_hooks)
    handle = vtprune.apply(model, "dymu", thresholds=calibrated["mid"], vtu=True)
    broken = dict(batch, pixel_values=batch["pixel_values"][:, :, :100])  # wrong image size: fails in the encoder
    with pytest.raises(Exception):
        with torch.no_grad():
            model(**broken)
    handle.remove()
    assert all("forward" not in layer.self_attn.__dict__ for layer in lm.layers)
    assert dict(lm._forward_pre_hooks) == hooks_before and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(llava, tmp_path):
    model, processor = llava
    with pytest.raises(ConfigError, match=f"have 3 values but this vision encoder runs {BLOCKS} blocks"):
        vtprune.apply(model, "dymu", thresholds=[0.9, 0.9, 0.9])
    with pytest.raises(FileNotFoundError, match="does not exist.*vtprune.calibrate"):
        vtprune.apply(model, "dymu", thresholds=str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text('{"keep": 3}')
    with pytest.raises(ConfigError, match="not a DyMU thresholds file"):
        vtprune.apply(model, "dymu", thresholds=tmp_path / "other.json")
    with pytest.raises(ConfigError, match="needs thresholds"):
        vtprune.apply(model, "dymu")
    with pytest.raises(ConfigError, match="no fixed budget"):
        vtprune.apply(model, "dymu", thresholds=0.9, keep=64)
    with pytest.raises(ConfigError, match="vtu must be True or False"):
        vtprune.apply(model, "dymu", thresholds=0.9, vtu="yes")
    with pytest.raises(ConfigError, match="positions does not apply with vtu=True"):
        vtprune.apply(model, "dymu", thresholds=0.9, vtu=True, positions="compact")
    with pytest.raises(ConfigError, match="unknown DyMU preset 'medium'; choose one of low, mid, high"):
        vtprune.calibrate(model, "dymu", [], processor=processor, preset="medium")
    with pytest.raises(ConfigError, match=f"got 2 per-block targets but this vision encoder runs {BLOCKS}"):
        vtprune.calibrate(model, "dymu", [], processor=processor, targets=[1, 2])
    with pytest.raises(ConfigError, match="give targets= .* or keep= .*, not both"):
        vtprune.calibrate(model, "dymu", [], processor=processor, targets=[1] * BLOCKS, keep=100)
    with pytest.raises(ConfigError, match=r"keep must be an integer in \[1, 576\]"):
        vtprune.calibrate(model, "dymu", [], processor=processor, keep=600)
    with pytest.raises(ConfigError, match="unknown calibration method 'tome'"):
        vtprune.calibrate(model, "tome", [], processor=processor)
    assert model.__dict__.get("_vtprune_handle") is None


def test_qwen_is_unsupported_with_a_reason():
    from vtprune.integrations.tiny_models import tiny_qwen_vl

    model, processor = tiny_qwen_vl("2", text_layers=1, vision_depth=2)
    with pytest.raises(UnsupportedModelError, match="PatchMerger.*2x2"):
        vtprune.apply(model, "dymu", thresholds=0.9)
    with pytest.raises(UnsupportedModelError, match="PatchMerger"):
        vtprune.calibrate(model, "dymu", [], processor=processor)


def test_calibrate_command(tmp_path):
    from vtprune.apps.calibrate import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(random_images(4, size=(200, 160), seed=3)):
        image.save(folder / f"{i}.png")
    out = tmp_path / "th.json"
    assert main([str(folder), "--model", "tiny:llava", "--preset", "high", "--out", str(out), "--batch-size", "2"]) == 0
    loaded = DyMUThresholds.load(out)
    assert len(loaded) == BLOCKS and loaded.meta["preset"] == "high" and loaded.meta["images"] == 4
    assert main([str(folder), "--model", "tiny:llava", "--keep", "100", "--out", str(out), "--batch-size", "2"]) == 0
    loaded = DyMUThresholds.load(out)
    assert loaded.meta["keep"] == 100 and loaded.meta["preset"] is None and sum(loaded.meta["targets"]) == 576 - 100
    assert main([str(folder), "--model", "tiny:llava", "--keep", "577", "--out", str(out)]) == 2
    assert main([str(tmp_path / "nope"), "--model", "tiny:llava", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
@pytest.fixture(scope="module")
def llava_next():
    from vtprune.integrations.tiny_models import tiny_llava_next

    return tiny_llava_next(seed=0, vision_layers=4, text_layers=1)


@pytest.fixture(scope="module")
def next_batch(llava_next):
    images = random_images(2, size=(400, 300), seed=1) + random_images(1, size=(300, 500), seed=2)
    return make_inputs(llava_next[1], PROMPTS, images)


@pytest.fixture(scope="module")
def next_reference(llava_next, next_batch):
    model, _ = llava_next
    with torch.no_grad():
        return model(**next_batch).logits, model.generate(**next_batch, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("vtu", [False, True])
def test_next_infinite_thresholds_are_bit_exact(llava_next, next_batch, next_reference, vtu):
    model, _ = llava_next
    reference, ref_generate = next_reference
    with vtprune.apply(model, "dymu", thresholds=math.inf, vtu=vtu) as handle, torch.no_grad():
        assert torch.equal(model(**next_batch).logits, reference)
        assert torch.equal(model.generate(**next_batch, max_new_tokens=3, do_sample=False), ref_generate)
        assert [s.tokens_out for s in handle.stats] == [s.tokens_in for s in handle.stats] == [1368, 1368, 1576]


@pytest.fixture(scope="module")
def next_thresholds(llava_next):
    model, processor = llava_next
    return vtprune.calibrate(model, "dymu", random_images(2, seed=7), processor=processor, preset="mid", batch_size=2,
                             progress=False)


def test_next_merges_each_crop_and_packs(llava_next, next_batch, next_thresholds):
    model, processor = llava_next
    thresholds = next_thresholds
    assert len(thresholds) == 3 and thresholds.meta["images"] == 2  # 4 CLIP blocks, features of block 2
    with vtprune.apply(model, "dymu", thresholds=thresholds, vtu=True) as handle, torch.no_grad():
        out = model.generate(**next_batch, max_new_tokens=2, do_sample=False)
        assert out.shape == (3, next_batch["input_ids"].shape[1] + 2)
        for stat in handle.stats:
            assert stat.tokens_out < stat.tokens_in
            newlines = stat.extra["newlines"]
            assert stat.tokens_out == sum(out_ for _, out_ in stat.extra["crop_tokens"]) + newlines
            # every packed token (newlines included) belongs to exactly one output token
            assert int(stat.assignment.min()) == 0 and int(stat.assignment.max()) == stat.tokens_out - 1
            assert torch.equal(torch.unique(stat.assignment), torch.arange(stat.tokens_out))
        assert handle.last_sequence.attention_mask.shape[1] < next_batch["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------- timm ViTs
def _vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=4, img_size=112, **kwargs).eval()


@pytest.mark.parametrize("kwargs", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}],
                         ids=["cls", "no-cls-avg", "registers"])
def test_timm_merging(kwargs):
    model = _vit(**kwargs)
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    x[1] = x[1] * 0.05 + 1.0  # a nearly flat image merges much more than noise
    with torch.no_grad():
        reference = model(x)
        with vtprune.apply(model, "dymu", thresholds=math.inf) as handle:
            assert torch.equal(model(x), reference)
            assert [s.tokens_out for s in handle.stats] == [49, 49, 49]
        thresholds = vtprune.calibrate(model, "dymu", list(torch.randn(8, 3, 112, 112)), preset="mid", batch_size=4,
                                       progress=False)
        with vtprune.apply(model, "dymu", thresholds=thresholds) as handle:
            batched = model(x)
            counts = [s.tokens_out for s in handle.stats]
            features = model.forward_features(x)
            assert features.shape[1] == model.num_prefix_tokens + max(counts)
            singles = [model(x[i : i + 1]) for i in range(3)]
            assert [s.tokens_out for s in handle.stats] == [counts[2]]
        assert counts[1] < min(counts[0], counts[2]) and max(counts) < 49
        assert torch.allclose(batched, torch.cat(singles), atol=1e-5)
        assert torch.equal(model(x), reference)  # removed


def test_timm_avg_pool_is_size_weighted():
    model = _vit(class_token=False, global_pool="avg")
    x = torch.full((1, 3, 112, 112), 0.5)  # a constant image: all patch tokens alike except for positions
    with torch.no_grad(), vtprune.apply(model, "dymu", thresholds=-1.0) as handle:  # merge every edge
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        stat = handle.stats[0]
        sizes = torch.bincount(stat.assignment).float()
        expected = model.fc_norm((features[0, : stat.tokens_out] * sizes[:, None]).sum(0) / sizes.sum())
        assert stat.tokens_out < 49 and torch.allclose(pooled[0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- harness
def test_harness_runs_dymu_from_a_thresholds_file(llava, calibrated, tmp_path):
    from vtprune.eval.synthetic import generate
    from vtprune.apps.harness import evaluate

    model, processor = llava
    path = calibrated["low"].save(tmp_path / "low.json")
    result = evaluate(model, processor, generate(2, seed=5), "dymu", options={"thresholds": str(path), "vtu": True},
                      batch_size=2, max_new_tokens=2, timing_repeats=1, warmup=0, loyalty=False)
    assert result["pruner"] == "dymu" and result["hparams"]["vtu"] is True
    assert result["visual_tokens_in"]["mean"] == 576 and result["visual_tokens_out"]["max"] < 576
    assert model.__dict__.get("_vtprune_handle") is None


def test_siglip_style_encoder_without_cls():
    """SigLIP's encoder layers run through the same CLIP-style runner, with nothing protected."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vtprune.integrations.common.encoder_merging import ClipStyleBlocks, run_merging_blocks
    from vtprune.pruners.dymu import DyMU

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=112, patch_size=14)
    torch.manual_seed(0)
    model = SiglipVisionModel(config).eval()
    model.set_attn_implementation("sdpa")
    tower = getattr(model, "vision_model", model)  # transformers 5 flattens the vision model
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    pixels[1] = 0.3  # a flat image
    with torch.no_grad():
        hidden = tower.embeddings(pixels)
        reference = tower.encoder(hidden).last_hidden_state
        runner = ClipStyleBlocks(tower.encoder.layers, "sdpa")
        state, _ = run_merging_blocks(runner, hidden, DyMU(thresholds=math.inf), 3, protected=0)
        assert torch.equal(state.x, reference)
        state, history = run_merging_blocks(runner, hidden, DyMU(thresholds=0.9), 3, protected=0)
        counts = state.counts.tolist()
        assert counts[1] < counts[0] <= 64 and int(history[0][1]) < 64
        assert torch.equal(torch.unique(state.where[1]), torch.arange(counts[1]))  # every token in a group


def test_next_vtu_equals_expanded_full_length_computation(llava_next, next_batch, next_thresholds):
    """The same VTU reference as for LLaVA-1.5, over LLaVA-NeXT's packed sequence (newlines, unpadded crops)."""
    _, logits, reference, _ = _vtu_against_reference(llava_next[0], next_batch, next_thresholds)
    assert torch.allclose(logits, reference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Qwen2-style LLM
@pytest.fixture(scope="module")
def llava_qwen2():
    """The tiny LLaVA with a Qwen2 decoder (biased q/k/v projections) instead of Llama: VTU's other family."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    from vtprune.integrations.tiny_models import _finish, tiny_llava

    llama, processor = tiny_llava(seed=4)
    text = llama.config.text_config
    qwen2 = Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, max_position_embeddings=text.max_position_embeddings,
        pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id, bos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=llama.config.vision_config, text_config=qwen2, image_token_id=llama.config.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=llama.config.pad_token_id,
    )
    torch.manual_seed(4)
    model = LlavaForConditionalGeneration(config)
    _finish(model, processor.tokenizer, "sdpa", seed=4)
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    return model, processor


def test_vtu_on_a_qwen2_decoder(llava_qwen2, images):
    model, processor = llava_qwen2
    batch = make_inputs(processor, PROMPTS, images[:3])
    with torch.no_grad():
        reference = model(**batch).logits
    with vtprune.apply(model, "dymu", thresholds=math.inf, vtu=True), torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)

    thresholds = vtprune.calibrate(model, "dymu", random_images(8, size=(320, 240), seed=11), processor=processor,
                                   preset="low", batch_size=4, progress=False)
    _, logits, reference, _ = _vtu_against_reference(model, batch, thresholds)
    assert torch.allclose(logits, reference, atol=1e-4, rtol=1e-4)
