"""Base class of every pruner. A pruner sees `VisualTokens` and returns a `Reduction`; it never sees a model."""

from __future__ import annotations

import abc
from typing import ClassVar

from ..budget import Budget
from ..tokens import EncoderInfo, Reduction, VisualTokens


class Pruner(abc.ABC):
    """A training-free visual-token reduction method.

    Subclasses set `name`, optionally `default_budget` (the paper's default, used when neither keep nor ratio is
    given), declare in `attention_layers` which encoder blocks' attention they read (so integrations capture
    just those), and implement `reduce`.
    """

    name: ClassVar[str] = ""
    default_budget: ClassVar[Budget] = Budget()
    kind: ClassVar[str] = "reduce"
    """``"reduce"``: reduces the encoder's output (`reduce`); ``"encoder_merging"``: merges inside the encoder
    (`vtprune.merging.EncoderMerger`, run by the integration)."""

    def __init__(self, keep: int | None = None, ratio: float | None = None) -> None:
        budget = Budget(keep=keep, ratio=ratio)
        self.budget = budget if budget.is_set else self.default_budget

    def attention_layers(self, encoder: EncoderInfo) -> set[int]:
        """Normalised indices of the encoder blocks whose attention or keys `reduce` will ask for."""
        return set()

    def check(self, keep: int, grid: tuple[int, int]) -> None:
        """Raise a `ConfigError` now if `keep` tokens can never be produced from an image of this grid.

        Integrations call it at apply time for encoders with a fixed grid, so that impossible settings fail
        before the first forward.
        """

    @abc.abstractmethod
    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        """Reduce one image's N visual tokens to `keep` output tokens (1 <= keep <= N)."""

    def hparams(self) -> dict:
        """The method's hyperparameters, for logging and `repr`."""
        return {}

    def __repr__(self) -> str:
        args = [str(self.budget)] + [f"{k}={v!r}" for k, v in self.hparams().items()]
        return f"{type(self).__name__}({', '.join(args)})"
