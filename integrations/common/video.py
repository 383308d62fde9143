"""What the video-capable families share: one budget vocabulary for images and videos, and the prompt order of
a call's images and videos.

Budgets (`vtprune.apply` options of every family that takes video): ``ratio`` applies to every image and every
video; ``video_keep=K`` (tokens the LLM receives for one whole video) or ``video_ratio=r`` override it for
videos. A per-image ``keep`` says nothing about a clip of thousands of tokens, so a video under a ``keep``
budget without ``video_keep`` / ``video_ratio`` is refused. ``video_scope="video"`` (default) makes one selection
over the whole clip; ``"frame"`` gives every frame (temporal group) the same share, and ``video_keep`` must then
be a multiple of the frames.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from vtprune.budget import Budget
from vtprune.errors import BudgetError, ConfigError

VIDEO_SCOPES = ("video", "frame")
VIDEO_OPTIONS = {"video_keep": None, "video_ratio": None, "video_scope": "video"}
"""The family options (`Integration.options`) of the video budget, with their defaults."""


class VideoBudget:
    """The video budget of one `vtprune.apply` call, from the family's settings and the pruner's image budget."""

    def __init__(self, settings: dict, image_budget: Budget) -> None:
        self.scope = settings["video_scope"]
        if self.scope not in VIDEO_SCOPES:
            raise ConfigError(f"video_scope must be one of {', '.join(map(repr, VIDEO_SCOPES))}; got {self.scope!r}")
        self.image_budget = image_budget
        self.budget = Budget(keep=settings["video_keep"], ratio=settings["video_ratio"], label="video_")
        if not self.budget.is_set and image_budget.ratio is not None:
            self.budget = Budget(ratio=image_budget.ratio)  # ratio applies to videos too

    def split(self, frames: int, frame_tokens: int, where: str, unit: str = "frame") -> list[int]:
        """Tokens kept per selection of one video of `frames` x `frame_tokens` tokens: ``[K]`` for
        ``video_scope="video"``, one equal share per frame for ``"frame"``. Raises `BudgetError` when the budget
        cannot be met (more than the clip's tokens, or a video_keep that does not split evenly)."""
        if not self.budget.is_set:
            raise BudgetError(
                f"{self.image_budget} is a per-image budget and says nothing about {where}: pass video_keep="
                "<tokens per video> or video_ratio=<(0, 1]> to vtprune.apply, or a ratio for images and videos alike"
            )
        if self.scope == "video":
            return [self.budget.resolve(frames * frame_tokens, where=where)]
        if self.budget.keep is not None:
            if self.budget.keep % frames:
                raise BudgetError(
                    f"video_keep={self.budget.keep} does not split evenly over the {frames} {unit}s of {where} "
                    f"(video_scope='frame'): use a multiple of {frames}, video_ratio, or video_scope='video'"
                )
            share = Budget(keep=self.budget.keep // frames, label=f"per-{unit.split()[-1]} video_")
            return [share.resolve(frame_tokens, where=f"each {unit} of {where}")] * frames
        return [self.budget.resolve(frame_tokens, where=f"each {unit} of {where}")] * frames


class Visual(Protocol):
    modality: str  # "image" | "video"

    @property
    def tokens(self) -> int: ...


def in_prompt_order(input_ids: torch.Tensor, placeholders: torch.Tensor, token_ids: dict[str, int], pending: dict[str, Sequence[Visual]]) -> list:
    """The call's images and videos (each modality in processor order, `pending`) in the order their placeholder
    runs appear, row by row, which is how `vtprune.sequence.find_image_slots` assigns placeholders.

    `placeholders` is the ``[B, L]`` mask of image and video placeholder tokens; `token_ids` maps a modality to
    its placeholder id. A clear `ValueError` when the placeholders and the pixel inputs do not match.
    """
    queues = {modality: list(visuals) for modality, visuals in pending.items()}
    given = {modality: sum(v.tokens for v in visuals) for modality, visuals in pending.items()}
    by_id = {token: modality for modality, token in token_ids.items()}
    sequence = input_ids[placeholders].tolist()  # row-major
    ordered, position = [], 0
    while position < len(sequence):
        modality = by_id.get(sequence[position])
        if not queues.get(modality):
            break
        visual = queues[modality].pop(0)
        if sequence[position : position + visual.tokens] != [token_ids[modality]] * visual.tokens:
            break
        ordered.append(visual)
        position += visual.tokens
    if position != len(sequence) or any(queues.values()):
        counts = {m: int((input_ids == token_ids[m]).sum()) for m in token_ids}
        raise ValueError(
            f"the prompts hold {counts.get('image', 0)} image and {counts.get('video', 0)} video placeholder tokens, "
            f"but the pixel inputs give {given.get('image', 0)} image and {given.get('video', 0)} video tokens, or "
            "in another arrangement; pass the processor's full output for these prompts"
        )
    return ordered
