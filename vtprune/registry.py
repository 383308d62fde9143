"""The pruner registry: `@register_pruner("name")`, `create_pruner(name, **kwargs)`, `list_pruners()`."""

from __future__ import annotations

import inspect
from typing import Callable, TypeVar

from .errors import ConfigError
from .pruners.base import Pruner

_PRUNERS: dict[str, type[Pruner]] = {}

P = TypeVar("P", bound=type[Pruner])


def register_pruner(name: str) -> Callable[[P], P]:
    """Class decorator adding a `Pruner` subclass to the registry under `name`."""

    def decorator(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pruner)):
            raise TypeError(f"@register_pruner({name!r}) must decorate a Pruner subclass, got {cls!r}")
        if name in _PRUNERS and _PRUNERS[name] is not cls:
            raise ConfigError(f"a pruner named {name!r} is already registered ({_PRUNERS[name].__name__})")
        cls.name = name
        _PRUNERS[name] = cls
        return cls

    return decorator


def list_pruners(kind: str | None = "reduce") -> list[str]:
    """Sorted names of the registered pruners of `kind`: ``"reduce"`` (default: methods with a keep/ratio budget
    that reduce the encoder's output), ``"encoder_merging"`` (methods that merge inside the encoder, e.g. DyMU),
    or None for all."""
    return sorted(name for name, cls in _PRUNERS.items() if kind is None or cls.kind == kind)


def get_pruner_class(name: str) -> type[Pruner]:
    if not isinstance(name, str) or name not in _PRUNERS:
        merging = list_pruners("encoder_merging")
        raise ConfigError(
            f"unknown pruner {name!r}; registered pruners: {', '.join(list_pruners())}"
            + (f"; in-encoder merging methods: {', '.join(merging)}" if merging else "")
        )
    return _PRUNERS[name]


def create_pruner(name: str, **kwargs) -> Pruner:
    """Instantiate a registered pruner, e.g. ``create_pruner("visionzip", keep=64, contextual=10)``."""
    cls = get_pruner_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"pruner {name!r} got unknown option(s) {unknown}; valid options: {accepted}")
    return cls(**kwargs)
