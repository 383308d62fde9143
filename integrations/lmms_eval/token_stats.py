"""The visual-token statistics vtprune logs into lmms-eval's outputs: per prefill, per request run, across ranks."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

__all__ = ["PrefillCall", "VisualTokenLog", "gather_across_ranks", "ranks_reporting", "summary"]


def summary(images: list[tuple[int, int, float]]) -> dict[str, float]:
    """``images``: (tokens_in, tokens_out, selection_ms) per image -> the numeric results entry."""
    tokens_in = [float(i) for i, _, _ in images]
    tokens_out = [float(o) for _, o, _ in images]
    return {
        "vtprune_images": float(len(images)),
        "vtprune_visual_tokens_in": statistics.fmean(tokens_in),
        "vtprune_visual_tokens_in_min": min(tokens_in),
        "vtprune_visual_tokens_in_max": max(tokens_in),
        "vtprune_visual_tokens_out": statistics.fmean(tokens_out),
        "vtprune_visual_tokens_out_min": min(tokens_out),
        "vtprune_visual_tokens_out_max": max(tokens_out),
        "vtprune_selection_ms_per_image": statistics.fmean(ms for _, _, ms in images),
    }


@dataclass
class PrefillCall:
    """One prefill with images: per image (row, tokens_in, tokens_out), per row the prefilled prompt length."""

    images: list[tuple[int, int, int]]
    prefill: list[int]
    selection_ms: float


class VisualTokenLog:
    """Watches a model's forward calls and records the visual tokens of every prefill that carries images.

    Pruned: reads ``handle.stats`` each time vtprune replaced it (one new list per call with images).
    Unpruned: counts the image placeholders of the prefill (per image: the family's fixed count, or the row's
    count split evenly among its images).
    """

    def __init__(self, model, handle) -> None:
        self.model = model
        self.handle = handle
        self.calls: list[PrefillCall] = []
        self._seen = handle.stats if handle is not None else None
        self._hook = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def take(self) -> list[PrefillCall]:
        calls, self.calls = self.calls, []
        return calls

    def _after_forward(self, module, args, kwargs, output) -> None:
        try:
            call = self._pruned_call() if self.handle is not None else self._unpruned_call(kwargs)
        except Exception:  # noqa: BLE001  (statistics must never break an evaluation)
            return
        if call is not None:
            self.calls.append(call)

    def _pruned_call(self) -> PrefillCall | None:
        handle = self.handle
        stats = handle.stats
        if stats is self._seen or not stats:
            return None
        self._seen = stats
        images = [(int(s.extra.get("row", 0)), int(s.tokens_in), int(s.tokens_out)) for s in stats]
        sequence = handle.last_sequence
        prefill = sequence.attention_mask.sum(dim=1).tolist() if sequence is not None else []
        return PrefillCall(images, [int(n) for n in prefill], 1000.0 * float(handle.selection_time))

    def _unpruned_call(self, kwargs: dict) -> PrefillCall | None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None or (kwargs.get("pixel_values") is None and not kwargs.get("mm_encoder_outputs")):
            return None
        config = self.model.config
        image_token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        if image_token is None:
            return None
        per_row = (input_ids == image_token).sum(dim=1).tolist()
        start = getattr(config, "vision_start_token_id", None)
        starts = (input_ids == start).sum(dim=1).tolist() if start is not None else None
        fixed = getattr(config, "image_seq_length", None)
        images: list[tuple[int, int, int]] = []
        for row, count in enumerate(per_row):
            if not count:
                continue
            if starts is not None and starts[row]:
                n = starts[row]
            elif fixed and count % fixed == 0:
                n = count // fixed
            else:
                n = 1
            images += [(row, count // n, count // n)] * n
        if not images:
            return None
        mask = kwargs.get("attention_mask")
        prefill = mask.sum(dim=1).tolist() if mask is not None and mask.ndim == 2 else [input_ids.shape[1]] * input_ids.shape[0]
        return PrefillCall(images, [int(n) for n in prefill], 0.0)


def gather_across_ranks(items: list) -> list:
    """All ranks' items (data-parallel runs under accelerate / torchrun); the items themselves otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return list(itertools.chain.from_iterable(part or [] for part in gathered))


def ranks_reporting() -> int:
    """How many processes the gathered statistics cover (the data-parallel world size; 1 otherwise)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
