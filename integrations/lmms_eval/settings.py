"""vtprune's part of lmms-eval's ``--model_args``: parsed, type-checked and validated before any model loads."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from vtprune.budget import Budget
from vtprune.errors import ConfigError
from vtprune.registry import create_pruner, get_pruner_class
from vtprune.sequence import POSITION_MODES

__all__ = ["OPTION_PREFIX", "PruneSettings", "pop_vtprune_args"]

OPTION_PREFIX = "pruner_"
"""``--model_args`` keys starting with this are passed to `vtprune.apply` without the prefix."""

_NONE_WORDS = {"", "none", "null"}


@dataclass
class PruneSettings:
    """vtprune's part of ``--model_args``, parsed and type-checked."""

    pruner: str | None = None
    keep: int | None = None
    ratio: float | None = None
    positions: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.pruner is not None

    def describe(self) -> str:
        if not self.enabled:
            return "unpruned"
        parts = [self.pruner] + [f"{k}={v}" for k, v in (("keep", self.keep), ("ratio", self.ratio), ("positions", self.positions)) if v is not None]
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        return " ".join(parts)


def _config_error(message: str) -> ConfigError:
    return ConfigError(f"vtprune lmms-eval plugin: {message}")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _as_int(name: str, value: Any) -> int | None:
    if _is_none(value):
        return None
    if isinstance(value, bool):
        raise _config_error(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _config_error(f"{name} must be a whole number, got {value!r}")


def _as_float(name: str, value: Any) -> float | None:
    if _is_none(value):
        return None
    if isinstance(value, bool):
        raise _config_error(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _config_error(f"{name} must be a number, got {value!r}") from None


def _as_option(value: Any) -> Any:
    """lmms-eval auto-casts model_args ("64" -> 64, "-2" -> -2.0, "true" -> True); finish the job."""
    if _is_none(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return text
    return value


def pop_vtprune_args(kwargs: dict) -> PruneSettings:
    """Remove vtprune's keys from `kwargs` (in place) and return them parsed and checked.

    Keys: ``pruner``, ``keep``, ``ratio``, ``positions`` and ``pruner_<option>``. The pruner name, the budget
    and the pruner's own hyperparameters are validated here, before any model is loaded.
    """
    pruner = kwargs.pop("pruner", None)
    keep = _as_int("keep", kwargs.pop("keep", None))
    ratio = _as_float("ratio", kwargs.pop("ratio", None))
    positions = kwargs.pop("positions", None)
    options = {key[len(OPTION_PREFIX) :]: _as_option(kwargs.pop(key)) for key in [k for k in kwargs if k.startswith(OPTION_PREFIX)]}
    if "" in options:
        raise _config_error(f"an option key needs a name after {OPTION_PREFIX!r}")

    if _is_none(pruner):
        given = {"keep": keep, "ratio": ratio, "positions": positions, **{OPTION_PREFIX + k: v for k, v in options.items()}}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            raise _config_error(f"{sorted(given)} given without a pruner: add pruner=<name> (or drop them for the unpruned model)")
        return PruneSettings()
    if not isinstance(pruner, str):
        raise _config_error(f"pruner must be a registered name, got {pruner!r}")
    pruner = pruner.strip()
    positions = None if _is_none(positions) else str(positions).strip()
    if positions is not None and positions not in POSITION_MODES:
        raise _config_error(f"positions must be one of {', '.join(POSITION_MODES)}; got {positions!r}")

    cls = get_pruner_class(pruner)  # ConfigError listing the registered pruners
    Budget(keep=keep, ratio=ratio)  # ConfigError for a bad budget
    own = {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "keep", "ratio")}
    create_pruner(pruner, keep=keep, ratio=ratio, **{k: v for k, v in options.items() if k in own})
    return PruneSettings(pruner=pruner, keep=keep, ratio=ratio, positions=positions, options=options)
