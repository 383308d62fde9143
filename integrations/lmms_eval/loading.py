"""Importing lmms-eval's model modules: its video reader `decord` is optional for vtprune's image models."""

from __future__ import annotations

import sys
import types

__all__ = ["import_lmms_module"]


class _MissingDecord(types.ModuleType):
    """Stand-in for the optional `decord` video reader while lmms-eval's model modules are imported."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise ImportError("reading videos needs the `decord` package (pip install decord); vtprune's lmms-eval models evaluate images")

        return unavailable


def import_lmms_module(name: str):
    """Import an lmms-eval model module; if `decord` is missing, with a placeholder that is removed afterwards."""
    import importlib

    try:
        import decord  # noqa: F401

        return importlib.import_module(name)
    except ImportError:
        pass
    placeholder = _MissingDecord("decord")
    had = "decord" in sys.modules
    previous = sys.modules.get("decord")
    sys.modules["decord"] = placeholder
    try:
        return importlib.import_module(name)
    finally:
        if had:
            sys.modules["decord"] = previous
        elif sys.modules.get("decord") is placeholder:
            del sys.modules["decord"]
