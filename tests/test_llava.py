"""LLaVA-1.5 integration: equivalence with the unpatched model and with hand-built pruned sequences."""

import pytest
import torch
from conftest import eager_attentions, make_inputs, mask_positions

import vtprune
from vtprune.pruners.base import Pruner

SELECTORS = ["fastervlm", "divprune", "hiprune", "random", "pool"]
DETERMINISTIC = ["fastervlm", "divprune", "hiprune", "visionzip", "pool"]
N = 576

PROMPTS = [
    "USER: <image>\nWhat colour dominates? ASSISTANT:",
    "USER: a text-only question that is rather long, with no image at all ASSISTANT:",
    "USER: <image><image>\nCompare both. ASSISTANT:",
]


@pytest.fixture
def batch(llava, images):
    return make_inputs(llava[1], PROMPTS, images[:3])


def unpatched(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_keep_all_is_bit_exact(llava, batch, name, positions):
    model, _ = llava
    reference = unpatched(model, batch)
    with torch.no_grad():
        ref_generate = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with vtprune.apply(model, name, keep=N, positions=positions) as handle, torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), ref_generate)
        assert [s.tokens_out for s in handle.stats] == [N, N, N]
        assert torch.equal(handle.last_sequence.kept_mask, batch["attention_mask"].bool())


# ---------------------------------------------------------------------------------------------- hand-built sequence
def hand_built_logits(model, inputs, handle, positions_mode, user_positions):
    """Build the pruned sequence from the unpatched model's own pieces and run the unpatched language model."""
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        layer = tower.hidden_states[-2]
        patches, cls = layer[:, 1:], layer[:, 0]
        projector = model.model.multi_modal_projector
        projected = projector(patches)
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
                    for slot, rep in enumerate(stat.order.tolist()):
                        members = (stat.assignment == slot).nonzero().flatten()
                        if rep == -1:  # VisionZip's CLS token
                            vectors.append(projector(cls[image]))
                        elif members.numel() <= 1:  # a selected token
                            vectors.append(projected[image, rep])
                        elif handle.pruner.name == "pool":  # mean in LLM space
                            vectors.append(projected[image, members].mean(0))
                        else:  # VisionZip contextual: target + mean of the other members, then projected
                            others = members[members != rep]
                            vectors.append(projector(patches[image, rep] + patches[image, others].mean(0)))
                        places.append(pos[j + max(rep, 0)])
                    j += N
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
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_pruned_forward_equals_hand_built_sequence(llava, batch, name, positions):
    model, _ = llava
    user_positions = mask_positions(batch["attention_mask"])
    with vtprune.apply(model, name, keep=64, positions=positions) as handle, torch.no_grad():
        logits = model(**batch, position_ids=user_positions).logits
        expected, attention = hand_built_logits(model, batch, handle, positions, user_positions)
    assert logits.shape == expected.shape
    assert [s.tokens_out for s in handle.stats] == [64, 64, 64]
    real = attention.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(handle.last_sequence.attention_mask, attention)


def test_fastervlm_keeps_topk_of_eager_cls_attention(llava, images):
    """Independent of the attention probe: the eager vision tower's own attention map of layer -2."""
    model, processor = llava
    inputs = make_inputs(processor, [PROMPTS[0], PROMPTS[0]], images[:2])
    attentions = eager_attentions(model.model.vision_tower, inputs["pixel_values"])
    scores = attentions[-2][:, :, 0, 1:].mean(dim=1)
    with vtprune.apply(model, "fastervlm", keep=50) as handle, torch.no_grad():
        model(**inputs)
    for i in range(2):
        expected = torch.sort(scores[i].topk(50).indices).values
        assert torch.equal(handle.stats[i].kept, expected)


def test_attention_probe_matches_eager(llava, images):
    from vtprune.capture import capture_layers
    from vtprune.integrations.common.clip_attention import ClipAttentionProbe

    model, processor = llava
    pixel_values = make_inputs(processor, [PROMPTS[0]] * 2, images[:2])["pixel_values"]
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad(), capture_layers(tower.encoder.layers, inputs={2, 6}) as (block_inputs, _):
            attentions = tower(pixel_values, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    probe = ClipAttentionProbe(tower.encoder.layers, block_inputs, visual=slice(1, None))
    for layer in (2, 6):
        for image in range(2):
            full = attentions[layer][image]
            torch.testing.assert_close(probe.cls_attention(layer, image), full[:, 0, 1:], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(probe.global_attention(layer, image), full.mean(dim=(0, 1))[1:], atol=1e-6, rtol=1e-5)


def test_run_encoder_probe_on_captured_projections_matches_eager(llava, images):
    """The probe of an encoder run reads the q / k projections the tower computed (captured), not a recomputation;
    its CLS row and global attention are the eager tower's maps."""
    from vtprune.integrations.llava import LlavaIntegration

    model, processor = llava
    pixel_values = make_inputs(processor, [PROMPTS[0]] * 2, images[:2])["pixel_values"]
    integration = LlavaIntegration(model, vtprune.create_pruner("fastervlm", keep=8))
    tower = model.model.vision_tower
    with torch.no_grad():
        run = integration.run_encoder(pixel_values, -2, {2, 6})
        tower.set_attn_implementation("eager")
        try:
            attentions = tower(pixel_values, output_attentions=True).attentions
        finally:
            tower.set_attn_implementation("sdpa")
    assert sorted(run.projections) == [2, 6]
    probe = run.probe(tower.encoder.layers, visual=slice(1, None))
    for layer in (2, 6):
        for image in range(2):
            full = attentions[layer][image]
            torch.testing.assert_close(probe.cls_attention(layer, image), full[:, 0, 1:], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(probe.global_attention(layer, image), full.mean(dim=(0, 1))[1:], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- batches
BATCH_PROMPTS = [
    "USER: hello ASSISTANT:",
    "USER: <image>\nWhat is it? ASSISTANT:",
    "USER: <image> and <image>\nDescribe the two pictures in some detail, please. ASSISTANT:",
    "USER: <image>\nA considerably longer question about this one image, to vary the lengths. ASSISTANT:",
]
BATCH_IMAGES = [[], [0], [1, 2], [3]]


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_padded_batch_equals_single_rows(llava, images, name, positions):
    model, processor = llava
    batch_images = [images[i] for row in BATCH_IMAGES for i in row]
    batch = make_inputs(processor, BATCH_PROMPTS, batch_images)
    with vtprune.apply(model, name, keep=48, positions=positions) as handle, torch.no_grad():
        batched = model(**batch, position_ids=mask_positions(batch["attention_mask"])).logits[:, -1]
        first_step = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True).logits[0]
        assert [s.extra["row"] for s in handle.stats] == [1, 2, 2, 3]
        for row, (prompt, image_ids) in enumerate(zip(BATCH_PROMPTS, BATCH_IMAGES)):
            single = make_inputs(processor, [prompt], [images[i] for i in image_ids])
            alone = model(**single).logits[:, -1]
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(first_step[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_right_padding(llava, images):
    model, processor = llava
    batch = make_inputs(processor, BATCH_PROMPTS[:2], [images[0]], padding_side="right")
    with vtprune.apply(model, "fastervlm", keep=32) as handle, torch.no_grad():
        logits = model(**batch).logits
        assert handle.last_sequence.padding_side == "right"
        last = handle.last_sequence.attention_mask.sum(-1) - 1
        for row in range(2):
            single = make_inputs(processor, [BATCH_PROMPTS[row]], [images[0]] if row == 1 else [])
            alone = model(**single).logits[0, -1]
            torch.testing.assert_close(logits[row, last[row]], alone, atol=1e-4, rtol=1e-4)


def test_pruning_changes_the_output_and_shortens_the_sequence(llava, batch):
    model, _ = llava
    reference = unpatched(model, batch)
    with vtprune.apply(model, "fastervlm", keep=16), torch.no_grad():
        logits = model(**batch).logits
    images_per_row = torch.tensor([1, 0, 2])
    pruned_lengths = batch["attention_mask"].sum(-1) - images_per_row * (N - 16)
    assert logits.shape[1] == int(pruned_lengths.max()) < reference.shape[1]
    assert not torch.allclose(logits[:, -1], reference[:, -1], atol=1e-3)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_manual_decode_loop_matches_generate(llava, images, positions):
    """A hand-written decode loop that keeps extending the *unpruned* attention mask gets generate's tokens."""
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:"], [images[0]])
    with vtprune.apply(model, "hiprune", keep=40, positions=positions), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        mask = inputs["attention_mask"]
        out = model(**inputs, use_cache=True)
        tokens = []
        for _ in range(5):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_token)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            out = model(input_ids=next_token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), generated[:, inputs["input_ids"].shape[1] :])


def test_second_generate_on_conversation_history(llava, images):
    model, processor = llava
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    first = make_inputs(processor, [prompt], [images[0]])
    with vtprune.apply(model, "visionzip", keep=64) as handle, torch.no_grad():
        answer = model.generate(**first, max_new_tokens=4, do_sample=False)
        assert answer.shape[1] == first["input_ids"].shape[1] + 4
        assert torch.equal(answer[:, : first["input_ids"].shape[1]], first["input_ids"])
        reply = processor.tokenizer.decode(answer[0, first["input_ids"].shape[1] :], skip_special_tokens=True)
        history = prompt + reply
        second = make_inputs(processor, [history + " USER: <image>\nAnd this one? ASSISTANT:"], [images[0], images[1]])
        again = model.generate(**second, max_new_tokens=4, do_sample=False)
        assert again.shape[1] == second["input_ids"].shape[1] + 4
        assert [s.tokens_out for s in handle.stats] == [64, 64]
    with torch.no_grad():
        reference = model.generate(**second, max_new_tokens=4, do_sample=False)
    with vtprune.apply(model, "fastervlm", keep=N), torch.no_grad():
        assert torch.equal(model.generate(**second, max_new_tokens=4, do_sample=False), reference)


def test_text_only_batch_is_untouched(llava):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: hi ASSISTANT:", "USER: a longer one ASSISTANT:"], [])
    reference = unpatched(model, inputs)
    with vtprune.apply(model, "fastervlm", keep=8) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
        assert handle.stats == []


# ---------------------------------------------------------------------------------------------- remove
class _Exploding(Pruner):
    name = "exploding"

    def reduce(self, tokens, keep):
        raise RuntimeError("boom")


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_remove_restores_exactly_even_after_an_exception(llava, batch):
    model, _ = llava
    reference = unpatched(model, batch)
    before = dict(model.__dict__)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = _hooks(model)  # transformers installs its own output-capture hooks lazily
    handle = vtprune.apply(model, _Exploding(keep=10))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(**batch)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model.generate(**batch, max_new_tokens=2)
    assert _hooks(model) == hooks_before
    handle.remove()
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is before[k] for k in before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(unpatched(model, batch), reference)
    handle.remove()  # idempotent


def test_vtprune_remove_and_context_manager(llava, batch):
    model, _ = llava
    reference = unpatched(model, batch)
    vtprune.apply(model, "pool", keep=36)
    assert not torch.equal(unpatched(model, batch)[:, -1], reference[:, -1])
    vtprune.remove(model)
    assert torch.equal(unpatched(model, batch), reference)
    with vtprune.apply(model, "random", keep=36, seed=3) as handle:
        assert handle.active
    assert not handle.active and "forward" not in model.__dict__


# ---------------------------------------------------------------------------------------------- other call shapes
def test_labels_follow_the_pruned_sequence(llava, batch):
    model, _ = llava
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(ids == model.config.image_token_id, -100).masked_fill(mask == 0, -100)
    with torch.no_grad():
        reference = model(**batch, labels=labels).loss
    with vtprune.apply(model, "fastervlm", keep=N), torch.no_grad():
        assert torch.equal(model(**batch, labels=labels).loss, reference)
    keep = 20
    with vtprune.apply(model, "fastervlm", keep=keep), torch.no_grad():
        out = model(**batch, labels=labels)
    # Built independently: each attended text token keeps its label, each image becomes `keep` unlabelled slots.
    length = out.logits.shape[1]
    expected = torch.full((ids.shape[0], length), -100)
    for row in range(ids.shape[0]):
        row_labels, placeholders = [], 0
        for token, label in zip(ids[row][mask[row].bool()].tolist(), labels[row][mask[row].bool()].tolist()):
            if token == model.config.image_token_id:
                placeholders += 1
                if placeholders % N == 1:
                    row_labels += [-100] * keep
            else:
                row_labels.append(label)
        expected[row, length - len(row_labels) :] = torch.tensor(row_labels)
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), expected[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, loss)


def test_beam_search_returns_prompt_and_new_tokens(llava, batch):
    model, _ = llava
    with vtprune.apply(model, "fastervlm", keep=32), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    length = batch["input_ids"].shape[1]
    assert out.shape == (6, length + 3)
    assert torch.equal(out[:, :length], batch["input_ids"].repeat_interleave(2, dim=0))


def test_bfloat16(images):
    from conftest import make_inputs as build
    from vtprune.integrations.tiny_models import tiny_llava

    model, processor = tiny_llava(seed=1, vision_layers=4)
    model = model.to(torch.bfloat16)
    inputs = build(processor, PROMPTS[:2], images[:1])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "hiprune", keep=N):
            assert torch.equal(model(**inputs).logits, reference)
        with vtprune.apply(model, "visionzip", keep=64) as handle:
            assert model(**inputs).logits.dtype == torch.bfloat16
            assert [s.tokens_out for s in handle.stats] == [64]
