"""`EncoderMerger`: the base of methods that merge tokens *inside* the vision encoder (DyMU's DToMe).

Unlike a `vtprune.Pruner`, which reduces the encoder's finished output, an encoder merger is called by the
integration after the attention of every encoder block it runs (`merge`), so the remaining blocks, and the LLM,
see fewer tokens; the token count varies per image. The integration side (which knows the model) lives in
``integrations/common/encoder_merging.py`` (running blocks with merging and proportional attention) and
``integrations/common/virtual_unmerging.py`` (the LLM attention patch for `virtual_unmerging`).
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch

from ..budget import Budget
from ..pruners.base import Pruner
from ..tokens import Reduction, VisualTokens
from .dtome import MergeState


class DynamicBudget(Budget):
    """No keep/ratio: the number of tokens follows each image (reported as "dynamic")."""

    def __str__(self) -> str:
        return "dynamic"


class EncoderMerger(Pruner):
    """A token-merging method that runs inside the vision encoder.

    Subclasses implement `merges_at` and `merge`. `begin` is called once per encoder run with the number of
    blocks that run, so a per-block setting of the wrong length fails with a clear error.
    """

    kind: ClassVar[str] = "encoder_merging"
    virtual_unmerging: bool = False
    """Whether the LLM should attend over the virtual full-length sequence (DyMU's VTU)."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = DynamicBudget()
        self.merge_seconds = 0.0

    def begin(self, blocks: int) -> None:
        """Called before each encoder run; `blocks` is how many encoder blocks run (features are taken after
        the last of them)."""
        self.merge_seconds = 0.0

    def merges_at(self, layer: int) -> bool:
        """Whether `merge` is called after the attention of block `layer`."""
        raise NotImplementedError

    def merge(self, layer: int, state: MergeState, keys: torch.Tensor) -> MergeState:
        """Merge tokens of `state` (hidden states after block `layer`'s attention and residual) using that
        block's head-averaged `keys` ``[B, T, d]``."""
        raise NotImplementedError

    def timed_merge(self, layer: int, state: MergeState, keys: torch.Tensor) -> MergeState:
        started = time.perf_counter()
        out = self.merge(layer, state, keys)
        self.merge_seconds += time.perf_counter() - started
        return out

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        raise TypeError(
            f"{type(self).__name__} merges inside the vision encoder; vtprune.apply runs it through the model "
            "integration, not through Pruner.reduce"
        )
