"""Module paths that moved out of the library in vtprune 0.2's layout, kept importable with a DeprecationWarning.

``import vtprune.harness`` (or ``python -m vtprune.demo``) still works and gives the module at its new path; the
library never imports these itself. The old paths go in vtprune 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

MOVED: dict[str, str] = {
    "vtprune.app": "vtprune.apps.experiment",
    "vtprune.demo": "vtprune.apps.demo",
    "vtprune.harness": "vtprune.apps.harness",
    "vtprune.models": "vtprune.apps.models",
    "vtprune.report": "vtprune.apps.report",
    "vtprune.testing": "vtprune.integrations.tiny_models",
    "vtprune.lmms_eval_plugin": "vtprune.integrations.lmms_eval",
    "vtprune.integrations.clip_attention": "vtprune.integrations.common.clip_attention",
    "vtprune.integrations.encoder_merging": "vtprune.integrations.common.encoder_merging",
    "vtprune.integrations.virtual_unmerging": "vtprune.integrations.common.virtual_unmerging",
}
"""Old module path -> where it lives now."""


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {self.target}; import it from there (the old path goes in vtprune 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.target)  # the one module object, under both names

    def exec_module(self, module) -> None:
        pass

    def get_code(self, name: str):
        """For ``python -m OLD_PATH``: run the new module's code."""
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        moved = MOVED.get(name)
        if moved is None:
            return None
        # The new module's file as origin: `python -m OLD_PATH` puts it in sys.argv[0].
        return importlib.machinery.ModuleSpec(name, _Alias(moved), origin=importlib.util.find_spec(moved).origin)


def install() -> None:
    """Put the finder last on `sys.meta_path` (real modules always win); idempotent."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
