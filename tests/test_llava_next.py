"""LLaVA-NeXT (anyres) integration: equivalence with the unpatched model and with hand-built pruned sequences,
both budget scopes, exact token counts, errors."""

import pytest
import torch
from conftest import make_inputs, mask_positions

import vtprune
from vtprune import BudgetError, ConfigError, UnsupportedModelError
from vtprune.integrations.tiny_models import random_images, tiny_llava_next

SELECTORS = ["fastervlm", "divprune", "hiprune", "random", "pool"]
DETERMINISTIC = ["fastervlm", "divprune", "hiprune", "visionzip", "pool"]
SCOPES = ["per_crop", "global"]
# (width, height): 1x2 sub-crops (columns unpadded), 2x1 (rows unpadded), 2x2 (rows unpadded).
SIZES = [(400, 300), (300, 400), (640, 480), (420, 300)]
# Packed tokens (base 576 + unpadded grid + one newline per row), surviving tokens per crop, newlines.
PACKED = {(400, 300): 1368, (300, 400): 1376, (640, 480): 2340, (420, 300): 1416}
CROPS = {(400, 300): [576, 384, 384], (300, 400): [576, 384, 384], (640, 480): [576] + [432] * 4}
NEWLINES = {(400, 300): 24, (300, 400): 32, (640, 480): 36}

PROMPTS = [
    "USER: <image>\nWhat colour dominates? ASSISTANT:",
    "USER: a text-only question that is rather long, with no image at all ASSISTANT:",
    "USER: <image><image>\nCompare both. ASSISTANT:",
]


@pytest.fixture(scope="session")
def llava_next():
    return tiny_llava_next(seed=0, vision_layers=4)


@pytest.fixture(scope="session")
def next_images():
    return {size: random_images(1, size=size, seed=i + 10)[0] for i, size in enumerate(SIZES)}


@pytest.fixture(scope="session")
def batch(llava_next, next_images):
    images = [next_images[(400, 300)], next_images[(300, 400)], next_images[(420, 300)]]
    return make_inputs(llava_next[1], PROMPTS, images)


@pytest.fixture(scope="session")
def small_batch(llava_next, next_images):
    """Left-padded rows with a 1x2 and a 2x1 crop layout and a text-only row (short, for the many keep-all runs)."""
    prompts = [PROMPTS[0], PROMPTS[1], "USER: <image>\nAnd this one? ASSISTANT:"]
    return make_inputs(llava_next[1], prompts, [next_images[(400, 300)], next_images[(300, 400)]])


@pytest.fixture(scope="session")
def reference(llava_next, small_batch):
    model = llava_next[0]
    with torch.no_grad():
        return model(**small_batch).logits, model.generate(**small_batch, max_new_tokens=4, do_sample=False)


def keep_all(scope):
    return dict(keep=576) if scope == "per_crop" else dict(ratio=1.0)


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_keep_all_is_bit_exact(llava_next, small_batch, reference, name, scope, positions):
    model, _ = llava_next
    logits, generated = reference
    with vtprune.apply(model, name, positions=positions, budget_scope=scope, **keep_all(scope)) as handle, torch.no_grad():
        assert torch.equal(model(**small_batch).logits, logits)
        assert [(s.tokens_in, s.tokens_out) for s in handle.stats] == [(1368, 1368), (1376, 1376)]
        assert torch.equal(handle.last_sequence.kept_mask, small_batch["attention_mask"].bool())
        assert torch.equal(handle.stats[0].order, torch.arange(1368))
        assert torch.equal(model.generate(**small_batch, max_new_tokens=4, do_sample=False), generated)


def test_keep_all_with_two_images_in_a_row(llava_next, batch):
    model, _ = llava_next
    with torch.no_grad():
        expected = model(**batch).logits
        with vtprune.apply(model, "fastervlm", keep=576) as handle:
            assert torch.equal(model(**batch).logits, expected)
    assert [(s.tokens_in, s.tokens_out, s.extra["row"]) for s in handle.stats] == [
        (1368, 1368, 0), (1376, 1376, 2), (1416, 1416, 2)
    ]


# ---------------------------------------------------------------------------------------------- hand-built sequence
def packed_features(model, inputs):
    """Per image, the unpatched model's packed sequence in LLM space and in vision space (newline = 0), and
    each image's first crop in the tower batch and the CLS features of all crops."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    sizes = inputs["image_sizes"]
    llm = model.model.get_image_features(inputs["pixel_values"], sizes).pooler_output
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in sizes]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops)])
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    vision, _ = model.model.pack_image_features(
        list(torch.split(hidden[:, 1:], crops)), sizes, "default", image_newline=torch.zeros(hidden.shape[-1])
    )
    first = torch.cumsum(torch.tensor([0] + crops[:-1]), 0).tolist()
    return llm, vision, first, hidden[:, 0]


def hand_built_logits(model, inputs, handle, positions_mode, user_positions):
    """Build the pruned sequence from the unpatched model's own pieces and run the unpatched language model."""
    with torch.no_grad():
        llm, vision, first_crop, cls = packed_features(model, inputs)
        projector = model.model.multi_modal_projector
        embed = model.get_input_embeddings()
        image_token = model.config.image_token_id
        rows = []
        image = 0
        for b in range(inputs["input_ids"].shape[0]):
            ids, mask, pos = inputs["input_ids"][b], inputs["attention_mask"][b], user_positions[b]
            vectors, places = [], []
            j = 0
            while j < ids.numel():
                if mask[j] == 0:
                    j += 1
                    continue
                if ids[j] == image_token:
                    stat = handle.stats[image]
                    assert stat.tokens_in == llm[image].shape[0]
                    for slot, rep in enumerate(stat.order.tolist()):
                        members = (stat.assignment == slot).nonzero().flatten()
                        if rep == -1:  # VisionZip's CLS token of the crop this output came from
                            crop = first_crop[image] + int(stat.extra["source_crop"][slot])
                            vectors.append(projector(cls[crop]))
                        elif members.numel() <= 1:  # a selected token or a newline
                            vectors.append(llm[image][rep])
                        elif handle.pruner.name == "pool":  # mean in LLM space
                            vectors.append(llm[image][members].mean(0))
                        else:  # VisionZip contextual: target + mean of the other members, then projected
                            others = members[members != rep]
                            vectors.append(projector(vision[image][rep] + vision[image][others].mean(0)))
                        places.append(pos[j + max(rep, 0)])
                    j += stat.tokens_in
                    image += 1
                else:
                    vectors.append(embed(ids[j]))
                    places.append(pos[j])
                    j += 1
            if positions_mode == "compact":
                places = [pos[int(mask.nonzero()[0])] + i for i in range(len(vectors))]
            rows.append((torch.stack(vectors), torch.stack([torch.as_tensor(p) for p in places])))
        length = max(r[0].shape[0] for r in rows)
        width = rows[0][0].shape[1]
        embeds = torch.zeros(len(rows), length, width)
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        position_ids = torch.zeros(len(rows), length, dtype=torch.long)
        for b, (vectors, places) in enumerate(rows):
            n = vectors.shape[0]
            embeds[b, length - n :] = vectors
            attention[b, length - n :] = 1
            position_ids[b, length - n :] = places
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids
        ).last_hidden_state
        return model.lm_head(hidden), attention


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_pruned_forward_equals_hand_built_sequence(llava_next, batch, name, scope, positions):
    model, _ = llava_next
    user_positions = mask_positions(batch["attention_mask"])
    with vtprune.apply(model, name, keep=64, positions=positions, budget_scope=scope) as handle, torch.no_grad():
        logits = model(**batch, position_ids=user_positions).logits
        expected, attention = hand_built_logits(model, batch, handle, positions, user_positions)
    assert logits.shape == expected.shape
    # per_crop: 3 crops x 64 + one newline per row; global: 64 in all, newlines included.
    assert [s.tokens_out for s in handle.stats] == ([216, 224, 216] if scope == "per_crop" else [64, 64, 64])
    real = attention.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(handle.last_sequence.attention_mask, attention)


# ---------------------------------------------------------------------------------------------- token counts
@pytest.mark.parametrize(
    "name, size",
    [(name, (400, 300)) for name in ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"]]
    + [(name, size) for name in ["fastervlm", "visionzip"] for size in [(300, 400), (640, 480)]],
)
def test_documented_token_counts(llava_next, next_images, size, name):
    model, processor = llava_next
    inputs = make_inputs(processor, [PROMPTS[0]], [next_images[size]])
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text = inputs["input_ids"].shape[1] - placeholders
    crops, newlines = CROPS[size], NEWLINES[size]
    assert placeholders == PACKED[size] == sum(crops) + newlines
    with torch.no_grad():
        with vtprune.apply(model, name, keep=64) as handle:  # per_crop is the default
            assert handle.integration.scope == "per_crop"
            model(**inputs)
            (stat,) = handle.stats
            assert stat.extra["crop_tokens"] == [(n, 64) for n in crops]
            assert stat.tokens_out == 64 * len(crops) + newlines
            assert int((stat.extra["source_crop"] == -1).sum()) == newlines
        with vtprune.apply(model, name, keep=64, budget_scope="global") as handle:
            model(**inputs)
            (stat,) = handle.stats
            assert stat.tokens_out == 64
            assert handle.last_sequence.inputs_embeds.shape[1] == text + 64  # what the LLM receives, exactly
            shares = [k for _, k in stat.extra["crop_tokens"]]
            assert sum(shares) + newlines == 64 and max(shares) - min(shares) <= 1
    if name == "fastervlm" and size == (400, 300):
        with vtprune.apply(model, name, ratio=0.25) as handle, torch.no_grad():
            model(**inputs)
        assert handle.stats[0].extra["crop_tokens"] == [(576, 144), (384, 96), (384, 96)]
        assert handle.stats[0].tokens_out == 144 + 96 + 96 + 24


def test_global_split_gives_excess_to_crops_with_room():
    from vtprune.integrations.llava_next import split_equally

    assert split_equally(40, [576, 384, 384]) == [14, 13, 13]  # remainder to the earliest crops
    assert split_equally(1000, [576, 200, 300]) == [500, 200, 300]  # small crops keep all; the rest goes on
    assert split_equally(2, [576, 0, 384, 384]) == [1, 0, 1, 0]  # empty crops get nothing
    assert split_equally(5000, [576, 384]) == [576, 384]


def test_per_crop_fastervlm_is_topk_of_each_crops_surviving_tokens(llava_next, next_images):
    """Independent of the integration's index map: the eager tower's CLS attention of every crop, packed by
    the unpatched model's own `pack_image_features`, then top-k per crop among the surviving tokens."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, processor = llava_next
    images = [next_images[(400, 300)], next_images[(640, 480)]]
    inputs = make_inputs(processor, [PROMPTS[2]], images)
    config = model.config
    sizes = inputs["image_sizes"]
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in sizes]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops)])
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = tower(pixels, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    scores = attentions[-2][:, :, 0, 1:].mean(dim=1)  # [crops, 576]
    crop_id = torch.cat([torch.arange(n, dtype=torch.float32) for n in crops])[:, None].expand(-1, 576)
    channels = list(torch.split(torch.stack([scores, crop_id], dim=-1), crops))
    packed, _ = model.model.pack_image_features(channels, sizes, "default", image_newline=torch.tensor([0.0, -1.0]))
    keep = 50
    with vtprune.apply(model, "fastervlm", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    for i, sequence in enumerate(packed):
        expected = [torch.nonzero(sequence[:, 1] == -1).flatten()]  # newlines: always kept
        for crop in range(crops[i]):
            members = torch.nonzero(sequence[:, 1] == crop).flatten()
            top = sequence[members, 0].topk(min(keep, members.numel())).indices
            expected.append(members[top])
        assert torch.equal(handle.stats[i].kept, torch.sort(torch.cat(expected)).values)
        assert torch.equal(handle.stats[i].order, handle.stats[i].kept)  # selection: packed order


def test_sub_crops_cut_away_by_unpadding_are_skipped():
    """A 3x1 layout for a very wide image: unpadding keeps 2 rows of the middle sub-crop and nothing of the others."""
    model, processor = tiny_llava_next(seed=1, vision_layers=2, grid_pinpoints=((1008, 336),))
    inputs = make_inputs(processor, [PROMPTS[0]], random_images(1, size=(1000, 100)))
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtprune.apply(model, "hiprune", keep=576) as handle:
            assert torch.equal(model(**inputs).logits, expected)
        assert handle.stats[0].extra["crop_tokens"] == [(576, 576), (0, 0), (48, 48), (0, 0)]
        assert handle.stats[0].tokens_in == 576 + 2 * 25
        with vtprune.apply(model, "visionzip", keep=30) as handle:
            model(**inputs)
    (stat,) = handle.stats
    assert stat.tokens_out == 30 + 30 + 2
    # The sub-crop's CLS token sits just before the crop's first surviving token; newlines end the two rows.
    assert stat.order[30].item() == -1 and stat.order[31:].min().item() >= 576
    assert stat.order[-1].item() == 576 + 2 * 25 - 1


# ---------------------------------------------------------------------------------------------- batches
BATCH_PROMPTS = [
    "USER: hello ASSISTANT:",
    "USER: <image>\nWhat is it? ASSISTANT:",
    "USER: <image> and <image>\nDescribe the two pictures in some detail, please. ASSISTANT:",
    "USER: <image>\nA considerably longer question about this one image, to vary the lengths. ASSISTANT:",
]
BATCH_IMAGES = [[], [(400, 300)], [(300, 400), (640, 480)], [(420, 300)]]


@pytest.mark.parametrize(
    "name, scope, positions",
    [(name, scope, "compact") for name in DETERMINISTIC for scope in SCOPES]
    + [("fastervlm", "per_crop", "preserve"), ("visionzip", "global", "preserve"), ("pool", "per_crop", "preserve")],
)
def test_padded_batch_equals_single_rows(llava_next, next_images, name, scope, positions):
    model, processor = llava_next
    batch_images = [next_images[size] for row in BATCH_IMAGES for size in row]
    batch = make_inputs(processor, BATCH_PROMPTS, batch_images)
    with vtprune.apply(model, name, keep=48, positions=positions, budget_scope=scope) as handle, torch.no_grad():
        batched = model(**batch, position_ids=mask_positions(batch["attention_mask"])).logits[:, -1]
        assert [s.extra["row"] for s in handle.stats] == [1, 2, 2, 3]
        assert [len(s.extra["crop_tokens"]) for s in handle.stats] == [3, 3, 5, 3]
        first_step = model.generate(
            **batch, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        ).logits[0]
        for row, (prompt, sizes) in enumerate(zip(BATCH_PROMPTS, BATCH_IMAGES)):
            single = make_inputs(processor, [prompt], [next_images[s] for s in sizes])
            alone = model(**single).logits[:, -1]
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(first_step[row : row + 1], alone, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- generation, remove
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_generate_and_manual_decode_loop(llava_next, next_images, positions):
    model, processor = llava_next
    inputs = make_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:"], [next_images[(300, 400)]])
    with vtprune.apply(model, "visionzip", keep=32, positions=positions), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        mask = inputs["attention_mask"]
        out = model(**inputs, use_cache=True)
        tokens = []
        for _ in range(5):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_token)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            out = model(input_ids=next_token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), generated[:, inputs["input_ids"].shape[1] :])


def test_remove_restores_exactly(llava_next, small_batch, reference):
    model, _ = llava_next
    before = dict(model.__dict__)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = vtprune.apply(model, "hiprune", keep=48, budget_scope="global", alpha=0.5)
    with torch.no_grad():
        pruned = model(**small_batch).logits
    assert pruned.shape[1] < reference[0].shape[1]
    handle.remove()
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is before[k] for k in before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**small_batch).logits, reference[0])
    handle.remove()  # idempotent


def test_text_only_batch_is_untouched(llava_next):
    model, processor = llava_next
    inputs = make_inputs(processor, ["USER: hi ASSISTANT:", "USER: a longer one ASSISTANT:"], [])
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtprune.apply(model, "fastervlm", keep=8) as handle:
            assert torch.equal(model(**inputs).logits, expected)
            assert handle.stats == []


# ---------------------------------------------------------------------------------------------- errors
def test_bad_budget_scope(llava_next):
    model, _ = llava_next
    with pytest.raises(ConfigError, match=r"budget_scope must be one of 'per_crop', 'global'; got 'crop'"):
        vtprune.apply(model, "fastervlm", keep=8, budget_scope="crop")
    assert "_vtprune_handle" not in model.__dict__


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep=577), "keep=577 exceeds the 576 visual tokens"),
        (dict(keep=3000, budget_scope="global"), "keep=3000 exceeds the 2928 visual tokens"),
    ],
)
def test_impossible_budget_fails_at_apply(llava_next, kwargs, message):
    model, _ = llava_next
    with pytest.raises(BudgetError, match=message):
        vtprune.apply(model, "fastervlm", **kwargs)
    assert "_vtprune_handle" not in model.__dict__


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("fastervlm", dict(keep=2000, budget_scope="global"), r"keep=2000 exceeds the 1368 visual tokens of image 0"),
        ("fastervlm", dict(keep=20, budget_scope="global"), r"the 24 newline tokens are always kept, so keep must be at least 25"),
        ("pool", dict(keep=340), r"image 0, crop 1 \(24x16 tokens after unpadding, budget 340\): pool cannot make"),
    ],
)
def test_budget_an_image_cannot_give_fails_at_the_call(llava_next, next_images, name, kwargs, message):
    model, processor = llava_next
    inputs = make_inputs(processor, [PROMPTS[0]], [next_images[(400, 300)]])
    with vtprune.apply(model, name, **kwargs), torch.no_grad():
        with pytest.raises(BudgetError, match=message):
            model(**inputs)


def test_unsupported_strategy(llava_next, next_images):
    model, processor = llava_next
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(UnsupportedModelError, match="vision_feature_select_strategy='full'"):
            vtprune.apply(model, "fastervlm", keep=8)
    finally:
        model.config.vision_feature_select_strategy = "default"
    inputs = make_inputs(processor, [PROMPTS[0]], [next_images[(400, 300)]])
    with vtprune.apply(model, "fastervlm", keep=8), torch.no_grad():
        with pytest.raises(UnsupportedModelError, match="not supported"):
            model(**inputs, vision_feature_select_strategy="full")
