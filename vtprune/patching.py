"""Instance-level patching of a VLM's `forward` and `generate`, and the handle that undoes it.

Only the given model object is touched (never its class): `forward` and `generate` become instance attributes
wrapping the originals, plus one `_vtprune_handle` attribute. `remove()` deletes exactly those, so the model is
restored bit for bit. Hooks needed to read encoder layers live only for the duration of one encoder call.

On a call that carries images, the wrapper runs the vision encoder, reduces each image with the pruner, builds
the pruned LLM input (`vtprune.sequence.compress`) and calls the original method with `inputs_embeds`:
- `forward` returns outputs for the pruned sequence (`handle.last_sequence.source` maps its columns back);
- `generate` returns the original prompt ids followed by the new tokens, exactly like the unpatched model.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .pruners.base import Pruner
from .sequence import PrunedSequence, compress, find_image_slots
from .tokens import ImageStats

if TYPE_CHECKING:  # the integration base installs these patches; they only call its methods
    from .integration import Integration, VLMIntegration

HANDLE_ATTRIBUTE = "_vtprune_handle"


@dataclass
class _DecodeSession:
    """Bookkeeping that lets a hand-written decode loop (forward with a cache) follow a pruned prefill."""

    original_length: int
    pruned_mask: torch.Tensor
    pruned_length: int
    position_shift: torch.Tensor | None  # [B]: next position minus cache length, when vtprune built the positions


def past_cache(inputs: dict):
    """The KV cache of a forward call: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is
    still accepted), so either may carry it."""
    cache = inputs.get("cache")
    return cache if cache is not None else inputs.get("past_key_values")


def _bind(method, args: tuple, kwargs: dict) -> dict:
    signature = inspect.signature(method)
    bound = signature.bind_partial(*args, **kwargs)
    inputs = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs


def _wrapper(original, replacement):
    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return replacement(*args, **kwargs)

    return wrapped


class PruneHandle:
    """What `vtprune.apply` returns: the patch on one model, its statistics, and `remove()`.

    Attributes:
        stats: per image of the last call with images, an `ImageStats` (tokens in/out, kept indices, order,
            assignment to merge groups; ``extra["row"]`` is the batch row the image belongs to).
        selection_time: seconds the last call spent reducing tokens (attention recomputation, selection,
            projection of the kept tokens).
        last_sequence: the pruned LLM input of the last call with images (VLMs only).
    """

    def __init__(self, model: torch.nn.Module, integration: Integration, pruner: Pruner, positions: str | None) -> None:
        self.model = model
        self.integration = integration
        self.pruner = pruner
        self.positions = positions
        self.stats: list[ImageStats] = []
        self.selection_time: float = 0.0
        self.last_sequence: PrunedSequence | None = None
        self._saved: dict[str, tuple[bool, Any]] = {}
        self._on_remove: list = []

    def set_attribute(self, name: str, value: Any) -> None:
        """Set an instance attribute of the model, remembering what to restore."""
        if name not in self._saved:
            self._saved[name] = (name in self.model.__dict__, self.model.__dict__.get(name))
        setattr(self.model, name, value)

    def on_remove(self, callback) -> None:
        """Register a callback run by `remove` (for state an integration keeps outside the model's attributes)."""
        self._on_remove.append(callback)

    def _install(self) -> None:
        try:
            self.integration.install(self)
            self.set_attribute(HANDLE_ATTRIBUTE, self)
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        return self.model.__dict__.get(HANDLE_ATTRIBUTE) is self

    def remove(self) -> None:
        """Restore the model exactly as it was before `apply`. Safe to call twice."""
        for name, (had, value) in reversed(list(self._saved.items())):
            if had:
                self.model.__dict__[name] = value
            else:
                self.model.__dict__.pop(name, None)
        self._saved.clear()
        callbacks, self._on_remove = self._on_remove, []
        for callback in reversed(callbacks):
            callback()

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle({type(self.model).__name__}, {self.pruner!r}, positions={self.positions!r}, {state})"


class VLMSplice:
    """The patch of a placeholder VLM's `forward` and `generate` (see the module docstring)."""

    def __init__(self, handle: PruneHandle, integration: VLMIntegration) -> None:
        self.handle = handle
        self.integration = integration
        self.positions = handle.positions
        self.model = handle.model
        self._session: _DecodeSession | None = None
        self._original_forward = self.model.forward
        self._original_generate = getattr(self.model, "generate", None)

    def install(self) -> None:
        # Keep the original signatures visible: generate() inspects forward's parameters.
        self.handle.set_attribute("forward", _wrapper(self._original_forward, self._forward))
        if self._original_generate is not None:
            self.handle.set_attribute("generate", _wrapper(self._original_generate, self._generate))
        self.handle.on_remove(self._end_session)

    def _end_session(self) -> None:
        self._session = None

    # ------------------------------------------------------------------ the pruned prefill
    def _prepare(self, inputs: dict, for_generate: bool) -> PrunedSequence:
        integration = self.integration
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("vtprune needs input_ids to locate the image placeholders; pass input_ids, not inputs_embeds")
        if inputs.get("inputs_embeds") is not None:
            raise ValueError("pass either input_ids with images or inputs_embeds, not both")
        if inputs.get("attention_mask") is None and for_generate:
            inputs["attention_mask"] = self._infer_generate_mask(input_ids)
        # In-encoder merging methods (vtprune.merging) change the encoder run itself: the integration's own path.
        encoded = integration.encode_merged(inputs) if self.handle.pruner.kind == "encoder_merging" else integration.encode(inputs)
        slots = find_image_slots(integration.placeholder_mask(input_ids), encoded.tokens_in, encoded.segments)
        position_ids = integration.position_ids_for(inputs, for_generate, self.positions)
        pad_id = integration.pad_token_id
        sequence = compress(
            input_ids,
            integration.embed_tokens(input_ids),
            inputs.get("attention_mask"),
            slots,
            encoded.embeds,
            encoded.order,
            positions=self.positions,
            position_ids=position_ids,
            pad_token_id=pad_id,
            pad_embedding=integration.embed_tokens(torch.tensor([pad_id], device=input_ids.device))[0],
            extras={name: (inputs.get(name), fill) for name, fill in integration.token_kwargs.items()},
        )
        for stat, slot in zip(encoded.stats, slots):
            stat.extra["row"] = slot.row
        self.handle.stats = encoded.stats
        self.handle.selection_time = encoded.selection_seconds
        self.handle.last_sequence = sequence
        integration.after_prefill(sequence, for_generate)

        for name in integration.visual_kwargs + integration.encoder_kwargs:
            inputs.pop(name, None)
        inputs["input_ids"] = None
        inputs["inputs_embeds"] = sequence.inputs_embeds
        if inputs.get("attention_mask") is not None or not bool(sequence.attention_mask.all()):
            inputs["attention_mask"] = sequence.attention_mask
        inputs["position_ids"] = sequence.position_ids
        inputs.update(sequence.extras)
        return sequence

    def _infer_generate_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Same rule as transformers' generate: padding is inferred only when pad differs from eos.
        config = self.model.generation_config
        pad, eos = config.pad_token_id, config.eos_token_id
        eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
        if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
            return input_ids.ne(pad).long()
        return torch.ones_like(input_ids)

    # ------------------------------------------------------------------ forward
    def _forward(self, *args, **kwargs):
        inputs = _bind(self._original_forward, args, kwargs)
        if not self.integration.has_visual_input(inputs):
            self._follow_session(inputs)
            return self._original_forward(**inputs)
        cache = past_cache(inputs)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "vtprune prunes images at prefill; a call with images and a non-empty cache is not supported"
            )
        user_positions = inputs.get("position_ids")
        sequence = self._prepare(inputs, for_generate=False)
        self._session = None
        if inputs.get("use_cache", True) is not False:
            shift = None
            if user_positions is None and sequence.position_ids is not None:
                # Decoding continues after the largest position of each row (M-RoPE: over all components).
                pruned_length = sequence.inputs_embeds.shape[1]
                rows = sequence.position_ids.reshape(-1, *sequence.position_ids.shape[-2:]).amax(dim=(0, 2))
                shift = rows + 1 - pruned_length
            self._session = _DecodeSession(
                original_length=sequence.original_length,
                pruned_mask=sequence.attention_mask,
                pruned_length=sequence.inputs_embeds.shape[1],
                position_shift=shift,
            )
        return self._original_forward(**inputs)

    def _follow_session(self, inputs: dict) -> None:
        """Translate a decode step written against the unpruned length to the pruned cache."""
        session, cache = self._session, past_cache(inputs)
        if session is None:
            return
        if cache is None or cache.get_seq_length() == 0:
            self._session = None
            return
        mask = inputs.get("attention_mask")
        new = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if mask is None or mask.ndim != 2 or new is None:
            return
        cached, step = cache.get_seq_length(), new.shape[1]
        beyond = mask.shape[1] - session.original_length
        if beyond < step or cached != session.pruned_length + beyond - step:
            return
        inputs["attention_mask"] = torch.cat([session.pruned_mask.to(mask.dtype), mask[:, session.original_length :]], dim=1)
        if session.position_shift is not None and inputs.get("position_ids") is None:
            steps = torch.arange(cached, cached + step, device=new.device)
            inputs["position_ids"] = steps[None, :] + session.position_shift.to(new.device)[:, None]

    # ------------------------------------------------------------------ generate
    def _generate(self, *args, **kwargs):
        inputs = _bind(self._original_generate, args, kwargs)
        if "inputs" in inputs:
            if inputs.get("input_ids") is not None and inputs["inputs"] is not None:
                raise ValueError("pass the prompt ids as `inputs` or `input_ids`, not both")
            inputs["input_ids"] = inputs.pop("inputs")
        if not self.integration.has_visual_input(inputs):
            return self._original_generate(*args, **kwargs)
        original_ids = inputs["input_ids"]
        self._session = None
        with torch.no_grad():
            sequence = self._prepare(inputs, for_generate=True)
        inputs["input_ids"] = sequence.input_ids
        if inputs.get("position_ids") is None:
            inputs.pop("position_ids", None)  # let generate number the pruned prompt (compact)
        inputs.pop("labels", None)
        output = self._original_generate(**inputs)
        sequences = output if torch.is_tensor(output) else output.sequences
        copies = sequences.shape[0] // original_ids.shape[0]
        prompt = original_ids.repeat_interleave(copies, dim=0).to(sequences.device)
        restored = torch.cat([prompt, sequences[:, sequence.input_ids.shape[1] :]], dim=1)
        if torch.is_tensor(output):
            return restored
        output.sequences = restored
        return output
