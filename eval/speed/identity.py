"""The identity check: the oracle ran the very sequence the pruned run gave the LLM. The LLM inputs of both runs
(captured by a hook on the language model) are bit-identical, the text columns are the token embeddings, and for
pure-selection pruners the visual columns are the kept tokens' features recomputed independently of vtprune.
"""

from __future__ import annotations

from typing import Any

import torch


LLM_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "visual_pos_masks", "deepstack_visual_embeds")
"""What the identity check compares of the language model's input (the last two: Qwen3-VL's DeepStack)."""


def _capture_llm_inputs(language_model):
    box: dict[str, Any] = {}

    def hook(module, args, kwargs):
        box.clear()
        box.update({name: kwargs.get(name) for name in LLM_INPUTS})

    return box, language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, dict) or isinstance(b, dict):  # per-layer-type masks (Gemma 3: sliding and global)
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a.shape == b.shape and bool(torch.equal(a, b))


def _is_pure_selection(stat) -> bool:
    assigned = int((stat.assignment >= 0).sum())
    return bool((stat.order >= 0).all()) and assigned == stat.tokens_out


def _identity(case, cache, pruned_inputs: dict, oracle_inputs: dict, sequence, stat, out, oracle_out) -> dict:
    """The benchmark's own check that the oracle ran the very sequence the pruned run gave the LLM."""
    llm_inputs_equal = all(_same(pruned_inputs.get(k), oracle_inputs.get(k)) for k in LLM_INPUTS)
    logits_equal = _same(out.logits, oracle_out.logits)
    embeds = sequence.inputs_embeds[0]
    image_columns = sequence.input_ids[0] == case.image_token_id
    text_ids = sequence.input_ids[0][~image_columns]
    text_match = bool(torch.equal(embeds[~image_columns], case.model.get_input_embeddings()(text_ids)))
    count_match = int(image_columns.sum()) == stat.tokens_out
    kept_match = None
    if _is_pure_selection(stat):
        expected = case.expected_visual(cache, stat.order).to(embeds.dtype)
        tol = 1e-4 if embeds.dtype == torch.float32 else 2e-2
        kept_match = bool(torch.allclose(embeds[image_columns], expected, rtol=tol, atol=tol))
    ok = llm_inputs_equal and text_match and count_match and kept_match is not False
    return {"ok": ok, "llm_inputs_equal": llm_inputs_equal, "logits_equal": logits_equal, "text_match": text_match,
            "visual_count_match": count_match, "kept_visual_match": kept_match}
