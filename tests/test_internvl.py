"""InternVL: tiles and thumbnail, pixel-shuffled tokens, scores pooled from ViT patches, video frames; against the
unpatched model and hand-built pruned sequences; per-tile and global budgets; batches; errors."""

import numpy as np
import pytest
import torch
from conftest import eager_attentions, mask_positions

import vtprune
from vtprune import BudgetError, ConfigError, UnsupportedModelError
from vtprune.integrations.internvl import InternVLIntegration
from vtprune.integrations.tiny_models import random_images, tiny_internvl

SELECTORS = ["fastervlm", "divprune", "hiprune", "random", "pool"]
PRUNERS = ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"]
DETERMINISTIC = ["fastervlm", "divprune", "hiprune", "visionzip", "pool"]
TILE = 16  # 112 px tiles: 8 x 8 patches, pixel-shuffled to 4 x 4 tokens
WIDE, TALL = (300, 200), (120, 330)  # 2 x 2 tiles + thumbnail (5 tiles, 80 tokens); 1 x 3 + thumbnail (4, 64)


@pytest.fixture(scope="session")
def internvl():
    return tiny_internvl(seed=0)


@pytest.fixture(scope="session")
def media():
    frames = np.stack([np.array(image) for image in random_images(4, size=(160, 90), seed=3)])
    return {"wide": random_images(1, size=WIDE, seed=1)[0], "tall": random_images(1, size=TALL, seed=2)[0], "video": frames}


def prompt(processor, items, text):
    content = [{"type": item} for item in items] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make(processor, rows, padding_side="left"):
    """`rows`: per prompt a list of (kind, media) with kind "image" or "video"; [] is a text-only row."""
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(processor, [kind for kind, _ in row], "What happens here?" if row else "A text-only question, rather long.") for row in rows]
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    images = [m for row in rows for kind, m in row if kind == "image"]
    videos = [m for row in rows for kind, m in row if kind == "video"]
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return dict(processor(**kwargs))


ROWS = lambda media: [[("image", media["wide"])], [], [("image", media["tall"]), ("image", media["wide"])], [("video", media["video"])]]  # noqa: E731
RUNS = [(80, 5), (64, 4), (80, 5), (16, 1), (16, 1), (16, 1), (16, 1)]  # (tokens, tiles) per image run: 4 frames last


@pytest.fixture(scope="session")
def mixed(internvl, media):
    """Left-padded: a 5-tile image, a text-only row, a 4-tile and a 5-tile image, a 4-frame video."""
    return make(internvl[1], ROWS(media))


@pytest.fixture(scope="session")
def reference(internvl, mixed):
    model = internvl[0]
    with torch.no_grad():
        return model(**mixed).logits, model.generate(**mixed, max_new_tokens=4, do_sample=False)


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("scope", ["per_crop", "global"])
def test_keep_all_is_bit_exact_on_a_mixed_batch(internvl, mixed, reference, name, scope):
    model, _ = internvl
    logits, generated = reference
    budget = dict(keep=TILE) if scope == "per_crop" else dict(ratio=1.0)
    with vtprune.apply(model, name, budget_scope=scope, **budget) as handle, torch.no_grad():
        assert torch.equal(model(**mixed).logits, logits)
        assert [(s.tokens_in, s.extra["tiles"]) for s in handle.stats] == RUNS
        assert [s.extra["row"] for s in handle.stats] == [0, 2, 2, 3, 3, 3, 3]
        assert all(torch.equal(s.order, torch.arange(s.tokens_in)) for s in handle.stats)
        assert torch.equal(model.generate(**mixed, max_new_tokens=4, do_sample=False), generated)


# ---------------------------------------------------------------------------------------------- hand-built sequence
def pixel_shuffled(hidden):
    """``[R, 1 + h*w, C]`` tower output -> ``[R, h/2 * w/2, 4C]``: token (r, c) = patches (2r, 2c), (2r, 2c+1),
    (2r+1, 2c), (2r+1, 2c+1), concatenated in that order, tokens in raster order."""
    patches = hidden[:, 1:]
    tiles, count, channels = patches.shape
    side = int(count**0.5)
    grid = patches.reshape(tiles, side // 2, 2, side // 2, 2, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(tiles, (side // 2) ** 2, 4 * channels)


def unpatched_pieces(model, inputs):
    """Per tile: the unpatched LLM tokens and the pixel-shuffled vision features, computed here by the formula."""
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        shuffled = pixel_shuffled(model.model.vision_tower(inputs["pixel_values"]).last_hidden_state)
    torch.testing.assert_close(model.model.multi_modal_projector(shuffled), output.pooler_output, atol=1e-5, rtol=1e-5)
    return output.pooler_output, shuffled


def hand_built(model, inputs, handle, positions_mode, user_positions):
    """The pruned sequence built from the unpatched model's own tokens, left-padded."""
    tokens, shuffled = unpatched_pieces(model, inputs)
    projector, embed = model.model.multi_modal_projector, model.get_input_embeddings()
    rows, image, first_tile = [], 0, 0
    with torch.no_grad():
        for b in range(inputs["input_ids"].shape[0]):
            ids, mask, pos = inputs["input_ids"][b], inputs["attention_mask"][b], user_positions[b]
            vectors, places, j = [], [], 0
            while j < ids.numel():
                if mask[j] == 0:
                    j += 1
                    continue
                if int(ids[j]) == model.config.image_token_id:
                    stat = handle.stats[image]
                    tiles = stat.extra["tiles"]
                    llm = tokens[first_tile : first_tile + tiles].flatten(0, 1)  # the run: tile after tile
                    space = shuffled[first_tile : first_tile + tiles].flatten(0, 1)
                    for slot, rep in enumerate(stat.order.tolist()):
                        members = (stat.assignment == slot).nonzero().flatten()
                        if members.numel() <= 1:
                            vectors.append(llm[rep])
                        elif handle.pruner.name == "pool":  # pool's default space="llm"
                            vectors.append(llm[members].mean(0))
                        else:  # VisionZip contextual: target + mean of the others, in the shuffled space, projected
                            others = members[members != rep]
                            vectors.append(projector(space[rep] + space[others].mean(0)))
                        places.append(pos[j + rep])
                    j += stat.tokens_in
                    image += 1
                    first_tile += tiles
                else:
                    vectors.append(embed(ids[j]))
                    places.append(pos[j])
                    j += 1
            rows.append((torch.stack(vectors), torch.as_tensor(places)))
    length = max(r[0].shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0][0].shape[1])
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (vectors, places) in enumerate(rows):
        n = vectors.shape[0]
        embeds[b, length - n :], attention[b, length - n :], position_ids[b, length - n :] = vectors, 1, places
    if positions_mode == "compact":
        position_ids = mask_positions(attention)
    return embeds, attention, position_ids


def language_model_logits(model, embeds, attention, position_ids):
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids).last_hidden_state
        return model.lm_head(hidden)


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("scope", ["per_crop", "global"])
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_pruned_forward_equals_hand_built_sequence(internvl, mixed, name, scope, positions):
    model, _ = internvl
    user_positions = mask_positions(mixed["attention_mask"])
    keep = 4 if scope == "per_crop" else 12  # pool tiles 4 (2 x 2) and the global shares of 12 (3 or 2; 12 of 1)
    with vtprune.apply(model, name, keep=keep, budget_scope=scope, positions=positions) as handle, torch.no_grad():
        logits = model(**mixed, position_ids=user_positions).logits
        sequence = handle.last_sequence
    tile_counts = [[out for _, out in s.extra["tile_tokens"]] for s in handle.stats]
    if scope == "per_crop":
        assert tile_counts == [[4] * 5, [4] * 4, [4] * 5] + [[4]] * 4
    else:  # split equally, the remainder to the earliest tiles (the thumbnail is last)
        assert tile_counts == [[3, 3, 2, 2, 2], [3, 3, 3, 3], [3, 3, 2, 2, 2]] + [[12]] * 4
    embeds, attention, position_ids = hand_built(model, mixed, handle, positions, user_positions)
    real = attention.bool()
    assert torch.equal(sequence.attention_mask, attention)
    torch.testing.assert_close(sequence.inputs_embeds[real], embeds[real], atol=1e-5, rtol=1e-5)
    if positions == "preserve":
        assert torch.equal(sequence.position_ids[real], position_ids[real])
    expected = language_model_logits(model, embeds, attention, position_ids)
    # The embeddings agree to 1e-5; two LLM layers and the head amplify that float32 noise a little.
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)


def test_generate_with_cache_equals_a_greedy_loop_over_the_hand_built_sequence(internvl, media):
    model, processor = internvl
    inputs = make(processor, [[("image", media["wide"])]])
    with vtprune.apply(model, "visionzip", keep=6) as handle, torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        model(**inputs)
    embeds, attention, position_ids = hand_built(model, inputs, handle, "compact", mask_positions(inputs["attention_mask"]))
    new = []
    with torch.no_grad():
        for _ in range(5):
            token = language_model_logits(model, embeds, attention, position_ids)[:, -1].argmax(-1)
            new.append(int(token))
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == new


# ---------------------------------------------------------------------------------------------- scores
def blocks_of_four(per_patch):
    """``[..., 64]`` per patch of an 8 x 8 grid -> ``[..., 16]``: each shuffled token the sum of its 2 x 2 patches."""
    return per_patch.reshape(*per_patch.shape[:-1], 4, 2, 4, 2).sum(dim=(-3, -1)).flatten(-2)


def test_scores_are_the_sums_over_each_tokens_four_patches(internvl, media):
    """The probe's statistics of a shuffled token, by hand from the eager tower's attention maps: the CLS row
    (per head) and the mean attention received, each summed over the token's 2 x 2 patches."""
    model, processor = internvl
    inputs = make(processor, [[("image", media["wide"])]])
    integration = InternVLIntegration(model, vtprune.create_pruner("hiprune", keep=4))
    layers = integration.pruner.attention_layers(integration.encoder_info())
    with torch.no_grad():
        run = integration.run_encoder(inputs["pixel_values"], -1, "default", layers)
        probe = integration.probe(run)
        attentions = eager_attentions(model.model.vision_tower, inputs["pixel_values"])
        for layer in layers:
            maps = attentions[layer]  # [tiles, heads, 65, 65], the CLS first
            for tile in range(maps.shape[0]):
                cls_row = blocks_of_four(maps[tile, :, 0, 1:])
                received = blocks_of_four(maps[tile].mean(dim=(0, 1))[1:])
                torch.testing.assert_close(probe.cls_attention(layer, tile), cls_row, atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(probe.global_attention(layer, tile), received, atol=1e-6, rtol=1e-5)


def test_fastervlm_keeps_the_top_summed_cls_attention_of_every_tile(internvl, media):
    model, processor = internvl
    inputs = make(processor, [[("image", media["tall"])]])
    maps = eager_attentions(model.model.vision_tower, inputs["pixel_values"])[-1]  # the feature block: vision_feature_layer -1
    with vtprune.apply(model, "fastervlm", keep=5) as handle, torch.no_grad():
        model(**inputs)
    scores = blocks_of_four(maps[:, :, 0, 1:].mean(dim=1))  # [tiles, 16]: mean over heads, summed over 2 x 2
    expected = torch.cat([torch.sort(scores[t].topk(5).indices).values + t * TILE for t in range(scores.shape[0])])
    assert torch.equal(handle.stats[0].kept, expected)


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_mixed_prompts_equals_each_prompt_alone(internvl, media, name, padding_side):
    model, processor = internvl
    rows = ROWS(media)
    batch = make(processor, rows, padding_side)
    with vtprune.apply(model, name, keep=12, budget_scope="global") as handle, torch.no_grad():
        logits = model(**batch).logits
        batched_mask = handle.last_sequence.attention_mask.bool()
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False) if padding_side == "left" else None
        for b, row in enumerate(rows):
            alone = make(processor, [row], padding_side)
            single = model(**alone).logits[0]
            alone_mask = handle.last_sequence.attention_mask[0].bool() if row else alone["attention_mask"][0].bool()
            torch.testing.assert_close(logits[b][batched_mask[b]], single[alone_mask], atol=1e-4, rtol=1e-4)
            if generated is not None:
                new = model.generate(**alone, max_new_tokens=3, do_sample=False)[0, alone["input_ids"].shape[1] :]
                assert generated[b, batch["input_ids"].shape[1] :].tolist() == new.tolist()


# ---------------------------------------------------------------------------------------------- errors
def test_bad_budgets_raise_clear_errors_and_leave_the_model_unchanged(internvl, mixed, reference):
    model, _ = internvl
    at_apply = [
        (dict(pruner="fastervlm", keep=17), BudgetError, "keep=17 exceeds the 16 visual tokens of a tile"),
        (dict(pruner="fastervlm", ratio=1.5), ConfigError, r"ratio must be in \(0, 1\]"),
        (dict(pruner="pool", keep=5), BudgetError, "pool cannot make keep=5 cells from a 4x4 grid"),
        (dict(pruner="fastervlm", keep=8, budget_scope="tile"), ConfigError, "budget_scope must be one of 'per_crop', 'global'; got 'tile'"),
        (dict(pruner="fastervlm", keep=8, video_keep=8), ConfigError, "unknown option"),
        (dict(pruner="dymu", thresholds=0.9), UnsupportedModelError, "pixel shuffle concatenates every 2 x 2 block"),
    ]
    for kwargs, error, message in at_apply:
        kwargs = dict(kwargs)
        with pytest.raises(error, match=message):
            vtprune.apply(model, kwargs.pop("pruner"), **kwargs)
        assert "_vtprune_handle" not in model.__dict__
    at_call = [
        (dict(keep=81), "keep=81 exceeds the 80 visual tokens of image 0 \\(5 tiles\\)"),
        (dict(keep=4), "keep=4 leaves no token for some of the 5 tiles of image 0"),
    ]
    for kwargs, message in at_call:
        with vtprune.apply(model, "fastervlm", budget_scope="global", **kwargs), torch.no_grad():
            with pytest.raises(BudgetError, match=message):
                model(**mixed)
    with torch.no_grad():
        assert torch.equal(model(**mixed).logits, reference[0])


def test_unsupported_strategy_and_shuffle(internvl):
    model, _ = internvl
    for attribute, value, message in [
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy='full' is not supported"),
        ("downsample_ratio", 0.25, "downsample_ratio=0.25 on a 8 x 8 patch grid is not supported"),
    ]:
        saved = getattr(model.config, attribute)
        setattr(model.config, attribute, value)
        try:
            with pytest.raises(UnsupportedModelError, match=message):
                vtprune.apply(model, "fastervlm", keep=8)
        finally:
            setattr(model.config, attribute, saved)


def test_remove_restores_exactly(internvl, mixed, reference):
    model, _ = internvl
    before = dict(model.__dict__)
    handle = vtprune.apply(model, "hiprune", keep=4)
    with torch.no_grad():
        assert model(**mixed).logits.shape[1] < reference[0].shape[1]
    handle.remove()
    assert model.__dict__.keys() == before.keys() and all(model.__dict__[k] is before[k] for k in before)
    with torch.no_grad():
        assert torch.equal(model(**mixed).logits, reference[0])
