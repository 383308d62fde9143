"""Virtual token unmerging (DyMU's VTU) in Llama- and Qwen2-style decoder attention, for any encoder-merging method.

The LLM receives the merged (shorter) sequence. Each decoder layer's ``self_attn.forward`` is replaced on the
instance: q/k/v projections run on the real (merged) tokens; q, k and v are expanded to the virtual full-length
sequence (`vtprune.merging.vtu.VirtualMap`), rotated with the virtual (original) positions through the model's
own rotary embedding, attended causally over the virtual sequence with its padding mask (SDPA, boolean mask),
and the outputs are averaged back onto the real tokens before ``o_proj``. The MLP and all linear layers run on
the real tokens.

Decoding: the virtual-length keys and values live in a side cache held here (one entry per layer); the
model's own cache object only receives a 1-wide placeholder per real token so that its length bookkeeping
(``get_seq_length``, masks, ``generate``) follows the real sequence. New tokens are their own virtual positions,
numbered after the last position of the prompt. Supported: greedy / sampling with one sequence per prompt
(beam search would reorder only the model's cache), `DynamicCache`.

A call is virtual only when the integration announced a map for it (`prepare`) and the map is not the
identity; every other call (text only, nothing merged) runs the original attention, bit for bit.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

from vtprune.errors import UnsupportedModelError
from vtprune.merging.vtu import VirtualMap, expand, scatter_mean, virtual_attention_mask
from vtprune.patching import past_cache

_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "scaling", "num_key_value_groups")


class VirtualUnmerging:
    """Instance patch of every decoder layer's attention of `language_model` (a LlamaModel / Qwen2Model-like
    module with ``layers`` and ``rotary_emb``). Restored by ``handle.remove()``."""

    def __init__(self, handle: Any, language_model: torch.nn.Module) -> None:
        self.handle = handle
        self.lm = language_model
        self.pending: VirtualMap | None = None
        self.active: VirtualMap | None = None
        self.next_position: torch.Tensor | None = None
        self.cache_ref = None
        self.side: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask2d: torch.Tensor | None = None
        self._check()

    def _check(self) -> None:
        lm = self.lm
        if not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
            raise UnsupportedModelError(
                f"virtual unmerging (vtu=True) needs a Llama/Qwen2-style decoder with layers and rotary_emb; "
                f"{type(lm).__name__} has none"
            )
        config = getattr(lm, "config", None)
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise UnsupportedModelError("virtual unmerging (vtu=True) does not support sliding-window attention")
        for i, layer in enumerate(lm.layers):
            attn = getattr(layer, "self_attn", None)
            missing = [name for name in _ATTENTION_PARTS if not hasattr(attn, name)]
            if missing:
                raise UnsupportedModelError(
                    f"virtual unmerging (vtu=True) supports Llama/Qwen2-style attention; decoder layer {i} "
                    f"({type(attn).__name__}) lacks {missing}"
                )
            if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
                raise UnsupportedModelError(f"decoder layer {i} normalises q/k ({type(attn).__name__}); not supported by vtu=True")
            if not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
                raise UnsupportedModelError(f"cannot find the rotary embedding function of {type(attn).__name__}")

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        patched = []
        try:
            for layer in self.lm.layers:
                attn = layer.self_attn
                had = "forward" in attn.__dict__
                previous = attn.__dict__.get("forward")
                original = attn.forward
                attn.forward = self._make_forward(attn, original)
                patched.append((attn, had, previous))
        finally:
            def restore() -> None:
                for attn, had, previous in reversed(patched):
                    if had:
                        attn.__dict__["forward"] = previous
                    else:
                        attn.__dict__.pop("forward", None)
                self.side.clear()
                self.active = self.pending = None

            self.handle.on_remove(restore)
        hook = self.lm.register_forward_pre_hook(self._on_call, with_kwargs=True)
        self.handle.on_remove(hook.remove)

    def prepare(self, vmap: VirtualMap) -> None:
        """Announce the virtual sequence of the next prefill (called by the integration after building it)."""
        self.pending = vmap

    # ------------------------------------------------------------------ per call
    def _on_call(self, module, args, kwargs) -> None:
        cache = past_cache(kwargs)
        mask = kwargs.get("attention_mask")
        self.mask2d = mask if torch.is_tensor(mask) and mask.ndim == 2 else None
        if cache is None or cache.get_seq_length() == 0:  # a prefill: virtual only if announced
            vmap, self.pending = self.pending, None
            tokens = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
            if vmap is not None and tokens is not None and not vmap.is_identity:
                rows, length = tokens.shape[:2]
                if length == vmap.real_length and rows != vmap.index.shape[0] and rows % vmap.index.shape[0] == 0:
                    raise NotImplementedError(
                        "vtu=True supports one sequence per prompt: beam search and num_return_sequences > 1 "
                        "expand the batch after the merge; use vtu=False or num_beams=1"
                    )
            if vmap is not None and (tokens is None or tuple(tokens.shape[:2]) != (vmap.index.shape[0], vmap.real_length)):
                vmap = None  # announced for a call that never reached the decoder (it failed earlier)
            self.active = None if vmap is None or vmap.is_identity else vmap
            self.side = {}
            self.cache_ref = weakref.ref(cache) if cache is not None else None
            if self.active is not None:
                positions = self.active.positions.masked_fill(self.active.mask == 0, -1)
                self.next_position = positions.max(dim=1).values + 1
        elif self.active is not None and (self.cache_ref is None or self.cache_ref() is not cache):
            self.active = None  # a cache this prefill did not fill

    def _make_forward(self, attn: torch.nn.Module, original):
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def forward(hidden_states, *args, **kwargs):
            if self.active is None:
                return original(hidden_states, *args, **kwargs)
            # (position_embeddings, attention_mask, cache) positionally; the cache's keyword is ``cache`` from
            # transformers 5.24 on, ``past_key_values`` before.
            cache = args[2] if len(args) > 2 else past_cache(kwargs)
            return self._virtual_attention(attn, rotate, hidden_states, cache)

        return forward

    def _virtual_attention(self, attn, rotate, hidden_states: torch.Tensor, cache):
        vmap = self.active
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        layer = attn.layer_idx
        cached = cache.get_seq_length(layer) if cache is not None else 0
        if batch != vmap.index.shape[0]:
            raise NotImplementedError(
                "vtu=True supports one sequence per prompt (no beam search / num_return_sequences > 1): the "
                f"batch changed from {vmap.index.shape[0]} to {batch} rows"
            )
        if cached == 0:
            if length != vmap.real_length:
                raise RuntimeError(f"virtual unmerging expected {vmap.real_length} tokens at prefill, got {length}")
            if cache is not None and self.cache_ref is None:
                self.cache_ref = weakref.ref(cache)  # the decoder created the cache inside this call
            q, k, v = expand(q, vmap.index), expand(k, vmap.index), expand(v, vmap.index)
            positions, key_mask, offset = vmap.positions, vmap.mask, 0
        else:
            if layer not in self.side:
                raise RuntimeError("virtual unmerging lost its cache; run the prefill again")
            previous = self.side[layer][0].shape[2]
            decoded = previous - vmap.index.shape[1]
            steps = torch.arange(length, device=hidden_states.device)
            positions = self.next_position.to(hidden_states.device)[:, None] + decoded + steps[None]
            tail = torch.ones(batch, decoded + length, dtype=vmap.mask.dtype, device=vmap.mask.device)
            if self.mask2d is not None and self.mask2d.shape[1] == vmap.real_length + decoded + length:
                tail = self.mask2d[:, vmap.real_length :].to(vmap.mask.dtype)
            key_mask, offset = torch.cat([vmap.mask, tail], dim=1), previous
        cos, sin = self.lm.rotary_emb(hidden_states, positions)
        q, k = rotate(q, k, cos, sin)
        if cache is not None:
            if layer in self.side and cached:
                k = torch.cat([self.side[layer][0], k], dim=2)
                v = torch.cat([self.side[layer][1], v], dim=2)
            self.side[layer] = (k, v)
            # The model's cache follows the real sequence (1-wide placeholders): its length drives generate.
            placeholder = hidden_states.new_zeros(batch, 1, length, 1)
            cache.update(placeholder, placeholder, layer)
        mask = virtual_attention_mask(key_mask, positions, offset)
        groups = attn.num_key_value_groups
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(batch, out.shape[2], -1)
        if cached == 0:
            out = scatter_mean(out, vmap)
        return attn.o_proj(out), None
