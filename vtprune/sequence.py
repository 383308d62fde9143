"""Shortening an LLM input sequence once each image's visual tokens have been reduced. Model-agnostic.

Each image occupies a run of placeholder positions in one row of `input_ids`. After reduction it keeps the
first ``K`` of them, filled with the reduced embeddings; the other placeholders are dropped. Rows are then
re-padded on the batch's padding side, and columns that would hold padding in every row disappear, so a
mixed batch is as short as its longest pruned row.

Positions follow one of two conventions (see reference 0.4):
- ``compact``: the LLM sees the pruned sequence as if it were the prompt (contiguous positions);
- ``preserve``: every kept token keeps the position it had in the unpruned sequence (merged tokens take
  their representative's position, a CLS token the image's first position); decoding continues after the
  original length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

POSITION_MODES = ("compact", "preserve")


@dataclass
class ImageSlot:
    """Where one image sits in the batch: its row and the sequence indices of its N placeholders.

    ``segments``: when the image's placeholders form several runs separated by text (Qwen3-VL writes a timestamp
    before each frame of a video), the run sizes; each kept token then fills its own run, so a frame's tokens
    stay after that frame's timestamp. None: one run, the kept tokens fill its first placeholders.
    """

    row: int
    positions: torch.Tensor  # [N] long, increasing
    segments: list[int] | None = None

    def output_columns(self, order: torch.Tensor) -> torch.Tensor:
        """``[K]`` the placeholder columns the K output tokens (representatives `order`) occupy: the first K, or
        with segments the first ones of each token's own run; outputs of one run must be contiguous, in run
        order."""
        k = order.numel()
        if self.segments is None:
            return self.positions[:k]
        device = self.positions.device
        ends = torch.tensor(self.segments, device=device).cumsum(0)
        segment = torch.bucketize(order.to(device).clamp(min=0), ends, right=True)
        if k and bool((segment[1:] < segment[:-1]).any()):
            raise ValueError("output tokens of a segmented image must come run by run, in the order of the runs")
        counts = torch.bincount(segment, minlength=len(self.segments))
        starts = ends - torch.tensor(self.segments, device=device)
        first_output = counts.cumsum(0) - counts
        rank = torch.arange(k, device=device) - first_output[segment]
        return self.positions[starts[segment] + rank]


@dataclass
class PrunedSequence:
    input_ids: torch.Tensor  # [B, L']
    inputs_embeds: torch.Tensor  # [B, L', D]
    attention_mask: torch.Tensor  # [B, L']
    position_ids: torch.Tensor | None  # [..., B, L'] or None (model default on the pruned sequence)
    source: torch.Tensor  # [B, L'] original column of each new column, -1 for new padding
    extras: dict[str, torch.Tensor]  # other per-token tensors (e.g. labels), compressed alike
    original_length: int
    padding_side: str

    @property
    def kept_mask(self) -> torch.Tensor:
        """``[B, L]`` boolean: which original columns survive (attended tokens only)."""
        batch = self.source.shape[0]
        mask = torch.zeros(batch, self.original_length, dtype=torch.bool, device=self.source.device)
        rows, cols = (self.source >= 0).nonzero(as_tuple=True)
        mask[rows, self.source[rows, cols]] = True
        return mask


def find_image_slots(
    placeholder_mask: torch.Tensor,
    tokens_per_image: Sequence[int],
    segments: Sequence[Sequence[int] | None] | None = None,
) -> list[ImageSlot]:
    """Assign consecutive placeholders, in row-major order, to images of the given sizes.

    Images are matched to placeholders in the order the processor emits them (row by row, left to right),
    which is the order of `pixel_values`. Adjacent images (``<image><image>``) are split by count. `segments`
    (per image, run sizes or None) becomes `ImageSlot.segments`.
    """
    rows, cols = placeholder_mask.nonzero(as_tuple=True)
    total = int(sum(tokens_per_image))
    if rows.numel() != total:
        raise ValueError(
            f"the prompts contain {rows.numel()} image placeholder tokens but the {len(tokens_per_image)} image(s) "
            f"given produce {total} visual tokens; pass one image per image token in the text, processed by the "
            "model's own processor"
        )
    slots = []
    start = 0
    for count in tokens_per_image:
        row = rows[start : start + count]
        if count and not bool((row == row[0]).all()):
            raise ValueError("an image's placeholder tokens span two batch rows; check the prompts and images")
        runs = None if segments is None or segments[len(slots)] is None else list(segments[len(slots)])
        if runs is not None and sum(runs) != count:
            raise ValueError(f"an image's runs {runs} do not add up to its {count} placeholder tokens")
        slots.append(ImageSlot(row=int(row[0]) if count else 0, positions=cols[start : start + count], segments=runs))
        start += count
    return slots


def compress(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    slots: Sequence[ImageSlot],
    image_embeds: Sequence[torch.Tensor],
    image_order: Sequence[torch.Tensor],
    *,
    positions: str,
    position_ids: torch.Tensor | None,
    pad_token_id: int,
    pad_embedding: torch.Tensor,
    extras: dict[str, tuple[torch.Tensor, int]] | None = None,
) -> PrunedSequence:
    """Build the pruned LLM input.

    Args:
        input_ids: ``[B, L]`` the unpruned token ids (placeholders included).
        inputs_embeds: ``[B, L, D]`` token embeddings of `input_ids`; placeholder rows are overwritten.
        attention_mask: ``[B, L]`` or None (all ones).
        slots: one per image, from `find_image_slots`.
        image_embeds: per image ``[K_i, D]`` reduced embeddings, in the order the LLM sees them.
        image_order: per image ``[K_i]`` representative token index of each output (-1 = CLS).
        positions: ``"compact"`` or ``"preserve"``.
        position_ids: ``[..., B, L]`` the positions of the unpruned sequence. Required for preserve; for
            compact, when given, kept tokens are renumbered from each row's first position; when None the
            returned `position_ids` is None (the model assigns its default to the pruned sequence).
        pad_token_id / pad_embedding: what new padding columns hold.
        extras: name -> (``[B, L]`` tensor, fill value for padding), compressed the same way.
    """
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    batch, length = input_ids.shape
    device = input_ids.device
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    embeds = inputs_embeds.clone()
    new_positions = position_ids.clone() if (position_ids is not None and positions == "preserve") else None
    if positions == "preserve" and position_ids is None:
        raise ValueError("preserve positions need the unpruned sequence's position_ids")

    if slots:
        rows_out, cols_out, rows_drop, cols_drop, rep_cols = [], [], [], [], []
        for slot, emb, order in zip(slots, image_embeds, image_order):
            k = emb.shape[0]
            if k > slot.positions.numel():
                raise ValueError(f"an image produced {k} tokens but has only {slot.positions.numel()} placeholders")
            columns = slot.output_columns(order)
            if slot.segments is None:
                left = slot.positions[k:]
            else:
                dropped = torch.ones(slot.positions.numel(), dtype=torch.bool, device=device)
                dropped[torch.searchsorted(slot.positions, columns)] = False
                left = slot.positions[dropped]
            rows_out.append(torch.full((k,), slot.row, dtype=torch.long, device=device))
            cols_out.append(columns)
            rows_drop.append(torch.full((slot.positions.numel() - k,), slot.row, dtype=torch.long, device=device))
            cols_drop.append(left)
            rep = order.to(device).clamp(min=0)  # the CLS token (-1) takes the image's first position
            rep_cols.append(slot.positions[rep])
        rows_out_t, cols_out_t = torch.cat(rows_out), torch.cat(cols_out)
        embeds[rows_out_t, cols_out_t] = torch.cat(list(image_embeds)).to(embeds.dtype)
        keep[torch.cat(rows_drop), torch.cat(cols_drop)] = False
        if new_positions is not None:
            new_positions[..., rows_out_t, cols_out_t] = position_ids[..., rows_out_t, torch.cat(rep_cols)]

    # Everything from a row's first to its last attended token is content (holes in the mask included);
    # the rest is padding, rebuilt below.
    attended = mask.bool()
    index = torch.arange(length, device=device).expand(batch, length)
    has_any = attended.any(dim=1)
    first = torch.where(attended, index, length).min(dim=1).values
    last = torch.where(attended, index, -1).max(dim=1).values
    in_content = (index >= first[:, None]) & (index <= last[:, None]) & has_any[:, None]
    selected = keep & in_content
    counts = selected.sum(dim=1)
    new_length = max(int(counts.max()), 1)

    left_padded = bool((~attended[:, 0]).any())
    right_padded = bool((~attended[:, -1]).any())
    padding_side = "right" if (right_padded and not left_padded) else "left"

    rows, cols = selected.nonzero(as_tuple=True)
    rank = selected.long().cumsum(dim=1)[rows, cols] - 1
    offset = (new_length - counts) if padding_side == "left" else torch.zeros_like(counts)
    dest = rank + offset[rows]

    out_ids = torch.full((batch, new_length), pad_token_id, dtype=input_ids.dtype, device=device)
    out_ids[rows, dest] = input_ids[rows, cols]
    out_embeds = pad_embedding.to(embeds.dtype).expand(batch, new_length, -1).clone()
    out_embeds[rows, dest] = embeds[rows, cols]
    out_mask = torch.zeros((batch, new_length), dtype=mask.dtype, device=device)
    out_mask[rows, dest] = mask[rows, cols]
    source = torch.full((batch, new_length), -1, dtype=torch.long, device=device)
    source[rows, dest] = cols

    out_positions = None
    if new_positions is not None:
        out_positions = torch.zeros((*new_positions.shape[:-2], batch, new_length), dtype=new_positions.dtype, device=device)
        out_positions[..., rows, dest] = new_positions[..., rows, cols]
    elif position_ids is not None:  # compact, renumbered from each row's first position
        start = position_ids[..., torch.arange(batch, device=device), first.clamp(max=length - 1)]
        running = (out_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out_positions = (start[..., None] + running).masked_fill(out_mask == 0, 0).to(position_ids.dtype)

    out_extras = {}
    for name, (tensor, fill) in (extras or {}).items():
        if tensor is None:
            continue
        compressed = torch.full((batch, new_length), fill, dtype=tensor.dtype, device=device)
        compressed[rows, dest] = tensor[rows, cols]
        out_extras[name] = compressed

    return PrunedSequence(
        input_ids=out_ids,
        inputs_embeds=out_embeds,
        attention_mask=out_mask,
        position_ids=out_positions,
        source=source,
        extras=out_extras,
        original_length=length,
        padding_side=padding_side,
    )
