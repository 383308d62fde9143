"""DivPrune: keep a maximally diverse subset of the projected visual tokens (greedy max-min)."""

from __future__ import annotations

from typing import Literal

import torch

from ..budget import Budget
from ..errors import ConfigError
from ..registry import register_pruner
from ..tokens import Reduction, VisualTokens
from .base import Pruner

Distance = Literal["cosine", "l1", "l2"]
DISTANCES = ("cosine", "l1", "l2")


def pairwise_distance(x: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """``[N, N]`` float32 distances between the rows of `x`; cosine distance is ``1 - cos``."""
    x = x.float()
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
        return (x @ x.T).neg_().add_(1.0)  # in place: one N x N matrix, not two
    if distance == "l1":
        return torch.cdist(x, x, p=1.0)
    if distance == "l2":
        return torch.cdist(x, x, p=2.0)
    raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")


def _first_pick(dist: torch.Tensor) -> torch.Tensor:
    # The token whose nearest neighbour is farthest; the diagonal (distance to itself) must not count.
    # The diagonal is masked in place and restored, rather than cloning the N x N matrix.
    diagonal = dist.diagonal().clone()
    dist.fill_diagonal_(float("inf"))
    try:
        return torch.argmax(dist.min(dim=0).values)
    finally:
        dist.diagonal().copy_(diagonal)


def greedy_max_min(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity: `k` indices of ``dist`` ([N, N], symmetric) in pick order.

    Each step picks ``argmax_j min_{i in S} dist[i, j]`` over unpicked j, keeping the inner min as a running
    vector updated with the new pick's row: O(k N) after the distance matrix. Indices stay on the device
    (no host sync per step).
    """
    n = dist.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in [1, {n}], got {k}")
    picks = torch.empty(k, dtype=torch.long, device=dist.device)
    picked = torch.zeros(n, dtype=torch.bool, device=dist.device)
    j = _first_pick(dist)
    picks[0] = j
    picked[j] = True
    min_dist = dist[j].clone()
    for step in range(1, k):
        j = torch.argmax(min_dist.masked_fill(picked, float("-inf")))
        picks[step] = j
        picked[j] = True
        min_dist = torch.minimum(min_dist, dist[j])
    return picks


def greedy_max_min_naive(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Reference for `greedy_max_min` recomputing the min over all picked rows at every step (O(k^2 N))."""
    n = dist.shape[0]
    picks = [int(_first_pick(dist))]
    for _ in range(1, k):
        score = dist[picks].min(dim=0).values
        picked = torch.zeros(n, dtype=torch.bool, device=dist.device)
        picked[picks] = True
        picks.append(int(torch.argmax(score.masked_fill(picked, float("-inf")))))
    return torch.tensor(picks, dtype=torch.long, device=dist.device)


@register_pruner("divprune")
class DivPrune(Pruner):
    """DivPrune, diversity-based visual token pruning (Alvar et al., CVPR 2025, arXiv 2503.02175).

    Algorithm, on the projected (LLM-space) embeddings:
        1. Pairwise distances ``D`` (default ``1 - cos``).
        2. First pick: the token whose nearest neighbour is farthest, ``argmax_j min_{i != j} D[i, j]``.
        3. Then repeatedly ``argmax_j min_{i in S} D[i, j]`` over unpicked j until `keep` are picked.
        4. Keep the picks in raster order (pure selection).

    Defaults: ``distance="cosine"`` (paper ablation: cosine 62.34 > l2 62.22 > l1 61.94), ``ratio=0.098``
    (56 of 576 tokens).

    Official code: recomputes the min over all picked rows each step (O(k^2 N)); we keep a running min
    vector (O(k N)), which yields the same picks, and mask picked tokens instead of editing their scores.
    """

    default_budget = Budget(ratio=0.098)

    def __init__(self, keep: int | None = None, ratio: float | None = None, distance: Distance = "cosine") -> None:
        super().__init__(keep=keep, ratio=ratio)
        if distance not in DISTANCES:
            raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        dist = pairwise_distance(tokens.embeddings, self.distance)
        return Reduction.select(greedy_max_min(dist, keep))

    def hparams(self) -> dict:
        return {"distance": self.distance}
