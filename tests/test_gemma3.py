"""Gemma 3: selection after the projector's pooling, pooled attention statistics, the bidirectional image mask on
the pruned sequence; against the unpatched model and hand-built pruned sequences; batches; budgets and errors."""

import pytest
import torch
from conftest import eager_attentions, mask_positions

import vtprune
from vtprune import BudgetError, ConfigError, MissingCLSError, UnsupportedModelError
from vtprune.integrations.common.pooled_attention import grid_pool
from vtprune.integrations.tiny_models import random_images, tiny_gemma3

SELECTORS = ["fastervlm", "divprune", "hiprune", "random", "pool"]
PRUNERS = ["fastervlm", "divprune", "hiprune", "visionzip", "pool", "random"]
DETERMINISTIC = ["fastervlm", "divprune", "hiprune", "visionzip", "pool"]
TOKENS = 64  # 32 x 32 patches pooled 4 x 4: an 8 x 8 grid per image


@pytest.fixture(scope="session")
def gemma():
    return tiny_gemma3(seed=0)


@pytest.fixture(scope="session")
def photos():
    return random_images(4, size=(400, 300), seed=1)


def prompt(processor, images, text="What is in the picture?"):
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make(processor, rows, padding_side="left", **kwargs):
    """`rows`: per prompt its list of images; [] is a text-only row."""
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(processor, len(row), text="What is in the picture?" if row else "A text-only question, rather long.") for row in rows]
    if any(rows):
        kwargs["images"] = [row for row in rows]
    return dict(processor(text=texts, return_tensors="pt", padding=True, **kwargs))


@pytest.fixture(scope="session")
def mixed(gemma, photos):
    """Left-padded: an image, a text-only row, two images."""
    return make(gemma[1], [[photos[0]], [], [photos[1], photos[2]]])


@pytest.fixture(scope="session")
def reference(gemma, mixed):
    model = gemma[0]
    with torch.no_grad():
        return model(**mixed).logits, model.generate(**mixed, max_new_tokens=4, do_sample=False)


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("name", SELECTORS)
def test_keep_all_is_bit_exact_on_a_mixed_batch(gemma, mixed, reference, name):
    model, _ = gemma
    logits, generated = reference
    with vtprune.apply(model, name, ratio=1.0) as handle, torch.no_grad():
        assert torch.equal(model(**mixed).logits, logits)
        assert [(s.tokens_in, s.tokens_out, s.extra["row"]) for s in handle.stats] == [(64, 64, 0), (64, 64, 2), (64, 64, 2)]
        assert all(torch.equal(s.order, torch.arange(TOKENS)) for s in handle.stats)
        assert torch.equal(model.generate(**mixed, max_new_tokens=4, do_sample=False), generated)


def test_keep_all_with_pan_and_scan_crops(gemma, photos):
    model, processor = gemma
    inputs = make(processor, [[photos[3]], [photos[0]]], do_pan_and_scan=True, pan_and_scan_min_crop_size=32)
    crops = inputs["pixel_values"].shape[0]
    assert crops > 2  # the wide photos are cut into crops, each its own run of soft tokens
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(model, "divprune", keep=TOKENS) as handle:
            assert torch.equal(model(**inputs).logits, logits)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
        with vtprune.apply(model, "divprune", keep=16) as handle:
            model(**inputs)
    assert [s.tokens_out for s in handle.stats] == [16] * crops  # the budget applies to every crop


# ---------------------------------------------------------------------------------------------- hand-built sequence
def unpatched_pieces(model, inputs):
    """Per pixel_values row: the unpatched LLM tokens and the pooled vision features (the projector's pool)."""
    with torch.no_grad():
        output = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
        hidden = output.last_hidden_state
        images, patches, channels = hidden.shape
        side = int(patches**0.5)
        kernel = model.model.multi_modal_projector.kernel_size
        pooled = torch.nn.functional.avg_pool2d(hidden.transpose(1, 2).reshape(images, channels, side, side), kernel)
        return list(output.pooler_output), list(pooled.flatten(2).transpose(1, 2))


def project(model, pooled):
    projector = model.model.multi_modal_projector
    return projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight


def hand_built(model, inputs, handle, positions_mode, user_positions):
    """The pruned sequence built from the unpatched model's own tokens: embeddings, mask, positions and token
    types, left-padded."""
    config = model.config
    tokens, pooled = unpatched_pieces(model, inputs)
    embed = model.get_input_embeddings()
    rows, image = [], 0
    with torch.no_grad():
        for b in range(inputs["input_ids"].shape[0]):
            ids, mask, pos = inputs["input_ids"][b], inputs["attention_mask"][b], user_positions[b]
            vectors, places, types, j = [], [], [], 0
            while j < ids.numel():
                if mask[j] == 0:
                    j += 1
                    continue
                if int(ids[j]) == config.image_token_id:
                    stat = handle.stats[image]
                    llm, space = tokens[image], pooled[image]
                    for slot, rep in enumerate(stat.order.tolist()):
                        members = (stat.assignment == slot).nonzero().flatten()
                        if members.numel() <= 1:
                            vectors.append(llm[rep])
                        elif handle.pruner.name == "pool":  # pool's default space="llm": the mean of LLM tokens
                            vectors.append(llm[members].mean(0))
                        else:  # VisionZip contextual: target + mean of the other members, projected
                            others = members[members != rep]
                            vectors.append(project(model, space[rep] + space[others].mean(0)))
                        places.append(pos[j + rep])
                        types.append(1)
                    j += stat.tokens_in
                    image += 1
                else:
                    vectors.append(embed(ids[j]))
                    places.append(pos[j])
                    types.append(0)
                    j += 1
            if positions_mode == "compact":
                places = [i for i in range(len(vectors))]
            rows.append((torch.stack(vectors), torch.as_tensor(places), torch.as_tensor(types)))
    length = max(r[0].shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0][0].shape[1])
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    token_types = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (vectors, places, types) in enumerate(rows):
        n = vectors.shape[0]
        embeds[b, length - n :], attention[b, length - n :] = vectors, 1
        position_ids[b, length - n :], token_types[b, length - n :] = places, types
    return embeds, attention, position_ids, token_types


def unpatched_language_model(model, embeds, attention, position_ids, token_types):
    """The unpatched Gemma 3 on embeddings: it builds its sliding / global masks, bidirectional inside each run
    of token type 1, from `token_types`."""
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids, token_type_ids=token_types).logits


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_pruned_forward_equals_hand_built_sequence(gemma, mixed, name, positions):
    model, _ = gemma
    user_positions = mask_positions(mixed["attention_mask"])
    with vtprune.apply(model, name, keep=16, positions=positions) as handle, torch.no_grad():
        logits = model(**mixed, position_ids=user_positions if positions == "preserve" else None).logits
        sequence = handle.last_sequence
    assert [s.tokens_out for s in handle.stats] == [16, 16, 16]
    embeds, attention, position_ids, token_types = hand_built(model, mixed, handle, positions, user_positions)
    real = attention.bool()
    assert torch.equal(sequence.attention_mask, attention)
    assert torch.equal(sequence.extras["token_type_ids"], token_types)  # one run of 1s per image, exactly the kept tokens
    torch.testing.assert_close(sequence.inputs_embeds[real], embeds[real], atol=1e-5, rtol=1e-5)
    if positions == "preserve":
        assert torch.equal(sequence.position_ids[real], position_ids[real])
    else:
        position_ids = mask_positions(attention)
    expected = unpatched_language_model(model, embeds, attention, position_ids, token_types)
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)


def test_the_bidirectional_image_mask_covers_the_kept_tokens(gemma, photos):
    """The pruned run equals the hand-built sequence with its kept image tokens marked as one image, and not
    the same sequence read causally: the kept tokens of an image still see each other both ways."""
    model, processor = gemma
    inputs = make(processor, [[photos[0], photos[1]]])
    with vtprune.apply(model, "divprune", keep=8) as handle, torch.no_grad():
        logits = model(**inputs).logits
    embeds, attention, position_ids, token_types = hand_built(model, inputs, handle, "compact", mask_positions(inputs["attention_mask"]))
    assert token_types.sum() == 16 and torch.equal(handle.last_sequence.extras["token_type_ids"], token_types)
    bidirectional = unpatched_language_model(model, embeds, attention, position_ids, token_types)
    causal = unpatched_language_model(model, embeds, attention, position_ids, torch.zeros_like(token_types))
    torch.testing.assert_close(logits, bidirectional, atol=1e-5, rtol=1e-5)
    first_image = token_types[0].nonzero().flatten()[:8]
    assert (logits[0, first_image] - causal[0, first_image]).abs().max() > 1e-2  # the mask matters here


def test_generate_with_cache_equals_a_greedy_loop_over_the_hand_built_sequence(gemma, photos):
    model, processor = gemma
    inputs = make(processor, [[photos[2]]])
    with vtprune.apply(model, "visionzip", keep=12) as handle, torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        model(**inputs)
    embeds, attention, position_ids, token_types = hand_built(model, inputs, handle, "compact", mask_positions(inputs["attention_mask"]))
    new = []
    with torch.no_grad():
        for _ in range(5):
            token = unpatched_language_model(model, embeds, attention, position_ids, token_types)[:, -1].argmax(-1)
            new.append(int(token))
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
            token_types = torch.cat([token_types, torch.zeros_like(token_types[:, :1])], dim=1)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == new


# ---------------------------------------------------------------------------------------------- scores
def test_grid_pool_by_hand():
    values = torch.arange(16.0).reshape(16, 1)  # a 4 x 4 grid in raster order
    assert grid_pool((4, 4), 2)(values).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert grid_pool((4, 4), 2, reduce="sum")(values).flatten().tolist() == [10.0, 18.0, 42.0, 50.0]
    with pytest.raises(ValueError, match="does not tile"):
        grid_pool((4, 6), 4)


@pytest.mark.parametrize("keep", [10, 25])
def test_scores_are_the_eager_attention_pooled_like_the_features(gemma, photos, keep):
    """FasterVLM without CLS: each token's score is the mean, over its 4 x 4 patches, of the attention each patch
    receives (heads and query rows averaged) in the last block of the eager tower; the top `keep` of the 64."""
    model, processor = gemma
    inputs = make(processor, [[photos[1]]])
    attentions = eager_attentions(model.model.vision_tower, inputs["pixel_values"])

    def pooled_received(layer):
        received = attentions[layer][0].mean(dim=(0, 1)).reshape(32, 32)  # [patches] mean over heads and queries
        return received.reshape(8, 4, 8, 4).mean(dim=(1, 3)).flatten()  # each token: mean of its 4 x 4 patches

    with vtprune.apply(model, "fastervlm", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    assert torch.equal(handle.stats[0].kept, torch.sort(pooled_received(-1).topk(keep).indices).values)


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_mixed_prompts_equals_each_prompt_alone(gemma, photos, name, padding_side):
    model, processor = gemma
    rows = [[photos[0]], [], [photos[1], photos[2]]]
    batch = make(processor, rows, padding_side=padding_side)
    with vtprune.apply(model, name, keep=12) as handle, torch.no_grad():
        logits = model(**batch).logits
        batched_mask = handle.last_sequence.attention_mask.bool()
        assert [s.extra["row"] for s in handle.stats] == [0, 2, 2]
        # generate continues after the last column, so only a left-padded batch generates row by row
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False) if padding_side == "left" else None
        for b, row in enumerate(rows):
            alone = make(processor, [row], padding_side=padding_side)
            single = model(**alone).logits[0]
            alone_mask = handle.last_sequence.attention_mask[0].bool() if row else alone["attention_mask"][0].bool()
            torch.testing.assert_close(logits[b][batched_mask[b]], single[alone_mask], atol=1e-4, rtol=1e-4)
            if generated is not None:
                new = model.generate(**alone, max_new_tokens=3, do_sample=False)[0, alone["input_ids"].shape[1] :]
                assert generated[b, batch["input_ids"].shape[1] :].tolist() == new.tolist()


# ---------------------------------------------------------------------------------------------- errors
def test_bad_budgets_raise_clear_errors_and_leave_the_model_unchanged(gemma, mixed, reference):
    model, _ = gemma
    at_apply = [
        (dict(pruner="fastervlm", keep=65), BudgetError, "keep=65 exceeds the 64 visual tokens of each image"),
        (dict(pruner="fastervlm", ratio=-0.5), ConfigError, "ratio"),
        (dict(pruner="pool", keep=11), BudgetError, "pool cannot make keep=11 cells from a 8x8 grid"),
        (dict(pruner="fastervlm", keep=8, video_keep=8), ConfigError, "unknown option"),
        (dict(pruner="dymu", thresholds=0.9), UnsupportedModelError, "pools the full patch grid"),
    ]
    for kwargs, error, message in at_apply:
        kwargs = dict(kwargs)
        with pytest.raises(error, match=message):
            vtprune.apply(model, kwargs.pop("pruner"), **kwargs)
        assert "_vtprune_handle" not in model.__dict__ and "prepare_inputs_for_generation" not in model.__dict__
    # Found on the input: the encoder has no CLS token, and this FasterVLM refuses the fallback.
    with vtprune.apply(model, "fastervlm", keep=8, cls_fallback="error"), torch.no_grad():
        with pytest.raises(MissingCLSError, match="no CLS token; pass cls_fallback='global'"):
            model(**mixed)
    assert "prepare_inputs_for_generation" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**mixed).logits, reference[0])


def test_remove_restores_exactly(gemma, mixed, reference):
    model, _ = gemma
    before = dict(model.__dict__)
    handle = vtprune.apply(model, "hiprune", keep=12)
    assert "prepare_inputs_for_generation" in model.__dict__
    with torch.no_grad():
        assert model(**mixed).logits.shape[1] < reference[0].shape[1]
    handle.remove()
    assert model.__dict__.keys() == before.keys() and all(model.__dict__[k] is before[k] for k in before)
    with torch.no_grad():
        assert torch.equal(model(**mixed).logits, reference[0])
        assert torch.equal(model.generate(**mixed, max_new_tokens=4, do_sample=False), reference[1])

