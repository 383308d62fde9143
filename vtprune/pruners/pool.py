"""Spatial average pooling of the patch grid to `keep` cells."""

from __future__ import annotations

from fractions import Fraction
from typing import Literal

import torch

from ..errors import BudgetError, ConfigError
from ..registry import register_pruner
from ..tokens import Reduction, VisualTokens
from .base import Pruner

POOL_SPACES = ("llm", "vision")


def _factor_pairs(keep: int, rows: int, cols: int) -> list[tuple[int, int]]:
    return [(gh, keep // gh) for gh in range(1, min(keep, rows) + 1) if keep % gh == 0 and keep // gh <= cols]


def _nearby_budgets(keep: int, rows: int, cols: int, each_side: int = 2) -> list[int]:
    below = [k for k in range(keep - 1, 0, -1) if _factor_pairs(k, rows, cols)][:each_side]
    above = [k for k in range(keep + 1, rows * cols + 1) if _factor_pairs(k, rows, cols)][:each_side]
    return sorted(below + above)


def pool_grid(keep: int, rows: int, cols: int) -> tuple[int, int]:
    """Output grid ``(gh, gw)`` with ``gh * gw == keep`` fitting in ``rows x cols``, aspect closest to the input's.

    Closeness is ``|log(gh / gw) - log(rows / cols)|``, compared exactly with fractions; ties go to the larger gh.
    """
    pairs = _factor_pairs(keep, rows, cols)
    if not pairs:
        raise BudgetError(
            f"pool cannot make keep={keep} cells from a {rows}x{cols} grid (no factor pair gh*gw={keep} with "
            f"gh <= {rows}, gw <= {cols}); nearby valid budgets: {_nearby_budgets(keep, rows, cols)}"
        )

    def log_distance(pair: tuple[int, int]) -> Fraction:
        q = Fraction(pair[0] * cols, pair[1] * rows)
        return max(q, 1 / q)  # monotone in |log q|

    return min(pairs, key=lambda p: (log_distance(p), -p[0]))


def _cell_index(n: int, cells: int, device: torch.device) -> torch.Tensor:
    # Cell i spans [floor(i*n/cells), floor((i+1)*n/cells)); so position p lies in cell ceil((p+1)*cells/n) - 1.
    p = torch.arange(n, device=device)
    return ((p + 1) * cells + n - 1) // n - 1


def _centres(n: int, cells: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(cells, device=device)
    start, end = i * n // cells, (i + 1) * n // cells
    return (start + end - 1) // 2


@register_pruner("pool")
class Pool(Pruner):
    """Spatial 2-D average pooling of the patch grid into ``gh x gw = keep`` cells (baseline).

    Algorithm:
        1. Pick the output grid with `pool_grid` (factor pair of keep, aspect closest to the input grid's).
        2. Partition rows at ``floor(i * rows / gh)`` and columns likewise (non-overlapping, every token in one
           cell); each output token is the mean of its cell, in raster order of cells.
        3. The representative of a cell (its position) is the token at the cell's centre.

    Defaults: ``space="llm"``, pooling the projected embeddings as the pooling baselines in the literature do;
    ``space="vision"`` pools the encoder features before the projector. No default budget. ``keep=N`` returns
    the inputs unchanged.
    """

    def __init__(
        self, keep: int | None = None, ratio: float | None = None, space: Literal["llm", "vision"] = "llm"
    ) -> None:
        super().__init__(keep=keep, ratio=ratio)
        if space not in POOL_SPACES:
            raise ConfigError(f"space must be one of {POOL_SPACES}, got {space!r}")
        self.space = space

    def check(self, keep: int, grid: tuple[int, int]) -> None:
        pool_grid(keep, *grid)

    def reduce(self, tokens: VisualTokens, keep: int) -> Reduction:
        rows, cols = tokens.grid
        gh, gw = pool_grid(keep, rows, cols)
        x = tokens.embeddings if self.space == "llm" else tokens.features
        device = x.device
        cell_r, cell_c = _cell_index(rows, gh, device), _cell_index(cols, gw, device)
        assignment = (cell_r[:, None] * gw + cell_c[None, :]).reshape(-1)

        # Sum then divide (rather than a pooling kernel) so a one-token cell comes back bit-exact.
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        sums = torch.zeros(keep, x.shape[1], dtype=acc_dtype, device=device)
        sums.index_add_(0, assignment, x.to(acc_dtype))
        counts = torch.bincount(assignment, minlength=keep).to(acc_dtype)
        pooled = (sums / counts[:, None]).to(x.dtype)

        order = (_centres(rows, gh, device)[:, None] * cols + _centres(cols, gw, device)[None, :]).reshape(-1)
        weights = (1.0 / counts)[assignment]
        return Reduction(order=order, features=pooled, space=self.space, assignment=assignment, weights=weights)

    def hparams(self) -> dict:
        return {"space": self.space}
