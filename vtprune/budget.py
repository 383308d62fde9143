"""How many visual tokens a pruner keeps: an absolute `keep` or a `ratio` of the tokens available."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import BudgetError, ConfigError


@dataclass(frozen=True)
class Budget:
    """Either `keep` (tokens per image) or `ratio` (fraction of the image's tokens), never both.

    `ratio` resolves to ``max(1, round(ratio * available))``: at least one token always survives. That floor
    is the only adjustment ever made; a `keep` above the tokens available is an error, never clamped.
    """

    keep: int | None = None
    ratio: float | None = None
    label: str = field(default="", compare=False)
    """Prefix of the option names in messages (``"video_"``: video_keep / video_ratio)."""

    def __post_init__(self) -> None:
        keep, ratio = f"{self.label}keep", f"{self.label}ratio"
        if self.keep is not None and self.ratio is not None:
            raise ConfigError(f"give either {keep} or {ratio}, not both (got {keep}={self.keep}, {ratio}={self.ratio})")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise ConfigError(f"{keep} must be a positive integer number of tokens, got {self.keep!r}")
            if self.keep <= 0:
                raise ConfigError(f"{keep} must be a positive integer number of tokens, got {self.keep}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise ConfigError(f"{ratio} must be a number in (0, 1], got {self.ratio!r}")
            if not (0.0 < float(self.ratio) <= 1.0) or math.isnan(self.ratio):
                raise ConfigError(f"{ratio} must be in (0, 1], got {self.ratio}")

    @property
    def is_set(self) -> bool:
        return self.keep is not None or self.ratio is not None

    def resolve(self, available: int, where: str = "the image") -> int:
        """Number of tokens to keep out of `available`."""
        if not self.is_set:
            raise ConfigError("no token budget: pass keep=<tokens per image> or ratio=<fraction in (0, 1]>")
        if self.keep is not None:
            if self.keep > available:
                raise BudgetError(
                    f"{self.label}keep={self.keep} exceeds the {available} visual tokens of {where}; "
                    f"use {self.label}keep <= {available} or a {self.label}ratio in (0, 1]"
                )
            return self.keep
        return max(1, int(round(float(self.ratio) * available)))

    def __str__(self) -> str:
        if self.keep is not None:
            return f"{self.label}keep={self.keep}"
        if self.ratio is not None:
            return f"{self.label}ratio={self.ratio}"
        return "unset"
