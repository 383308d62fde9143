"""Random selection: the baseline every pruner has to beat."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import register_pruner
from ..tokens import Reduction, VisualTokens
from .base import Pruner


@register_pruner("random")
class RandomPruner(Pruner):
    """Keep `keep` tokens drawn uniformly without replacement, in raster order.

    Random pruning is a strong baseline (UniPruneBench); it needs no attention and no embeddings.

    The generator (CPU) is seeded once at construction, so a fresh pruner with the same `seed` makes the same
    picks for the same sequence of calls, whatever the device. Default ``seed=0``; no default budget.
    """

    def __init__(self, keep: int | None = None, ratio: float | None = None, seed: int = 0) -> None:
        super().__init__(keep=keep, ratio=ratio)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        picks = torch.randperm(tokens.num_tokens, generator=self.generator)[:keep]
        return Reduction.select(picks.to(tokens.features.device))

    def hparams(self) -> dict:
        return {"seed": self.seed}
