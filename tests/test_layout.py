"""The layout is the architecture (ARCHITECTURE.md): every public module imports, every command answers --help,
the import graph has no circle, and each room imports only the rooms below it.

The graph is read statically from the source (every import statement, also inside functions; imports under
``if TYPE_CHECKING:`` are annotations only and are skipped), so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROOMS = {
    "library": ("vtprune",),
    "integrations": ("vtprune.integrations",),
    "benchmarks": ("vtprune.eval",),
    "applications": ("vtprune.apps", "vtprune.__main__"),
    "data": ("vtprune.configs", "vtprune.assets"),
}
"""Each room's module prefixes; the longest matching prefix decides (vtprune.integrations is not the library)."""

MAY_IMPORT = {
    "library": {"library"},
    "integrations": {"library", "integrations"},
    "benchmarks": {"library", "integrations", "benchmarks"},
    "applications": {"library", "integrations", "benchmarks", "applications"},
    "data": set(),
}
"""The one-way dependency direction: applications -> benchmarks -> integrations -> library."""

MODEL_LIBRARIES = ("transformers", "timm", "lmms_eval", "hydra", "omegaconf")
"""Third-party model and application libraries the library itself never imports (it knows no model class)."""

OPTIONAL = {"lmms_eval": "lmms-eval", "onnx": "onnx", "skimage": "scikit-image"}
"""Top-level imports of the extras: a module that needs a missing one is skipped by the import test."""


# ---------------------------------------------------------------------------------------------- the graph
def source_modules() -> dict[str, Path]:
    """Installed module name -> source file, from pyproject.toml's package-dir mapping."""
    tomllib = pytest.importorskip("tomllib")
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dir.items():  # sibling top-level folders of the repository
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(the project's modules `name` imports, the top-level third-party packages it imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    full = f"{module}.{alias.name}"
                    found.add(full if full in modules else module)
            visit(child)

    visit(ast.parse(path.read_text()))
    internal, external = set(), set()
    for target in found:
        if target.split(".")[0] != "vtprune":
            external.add(target.split(".")[0])
            continue
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            internal.add(target)
    return internal, external


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = source_modules()
    internal, external = {}, {}
    for name, path in modules.items():
        internal[name], external[name] = _imports(name, path, modules)
    return internal, external


def room_of(module: str) -> str:
    best = max(
        ((room, prefix) for room, prefixes in ROOMS.items() for prefix in prefixes if module == prefix or module.startswith(prefix + ".")),
        key=lambda pair: len(pair[1]),
    )
    return best[0]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


# ---------------------------------------------------------------------------------------------- the rules
def test_the_graph_reader_sees_lazy_relative_and_type_checking_imports(tmp_path):
    (tmp_path / "vtprune").mkdir()
    source = (
        "from typing import TYPE_CHECKING\nfrom . import b\nimport torch\n"
        "if TYPE_CHECKING:\n    from .c import C\n"
        "def f():\n    from vtprune.c import thing\n"
    )
    path = tmp_path / "vtprune" / "a.py"
    path.write_text(source)
    modules = {"vtprune": tmp_path / "vtprune" / "__init__.py", "vtprune.a": path, "vtprune.b": path, "vtprune.c": path}
    internal, external = _imports("vtprune.a", path, modules)
    assert internal == {"vtprune.b", "vtprune.c"}  # the lazy import counts; the TYPE_CHECKING one alone would not
    assert external == {"typing", "torch"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    graph, _ = import_graph()
    assert len(graph) > 40, sorted(graph)  # the reader found the tree
    assert circles(graph) == []


def test_each_room_imports_only_the_rooms_below():
    graph, _ = import_graph()
    wrong = sorted(
        f"{module} ({room_of(module)}) imports {target} ({room_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if room_of(target) not in MAY_IMPORT[room_of(module)]
    )
    assert wrong == []


def test_the_library_knows_no_model_class_and_no_application_framework():
    _, external = import_graph()
    wrong = sorted(
        f"{module} imports {package}"
        for module, packages in external.items()
        if room_of(module) == "library"
        for package in packages
        if package in MODEL_LIBRARIES
    )
    assert wrong == []


def test_integrations_know_no_particular_pruner():
    graph, _ = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if room_of(module) == "integrations"
        for target in targets
        if target.startswith("vtprune.pruners") and target != "vtprune.pruners.base"
    )
    assert wrong == []


def test_pruners_know_no_model_family():
    graph, external = import_graph()
    pruner_modules = [m for m in graph if m.startswith(("vtprune.pruners", "vtprune.merging"))]
    assert pruner_modules
    for module in pruner_modules:
        assert not {t for t in graph[module] if t.startswith(("vtprune.integration", "vtprune.patching"))}, module
        assert not external[module] & set(MODEL_LIBRARIES), module


# ---------------------------------------------------------------------------------------------- imports and commands
def _needs_missing_extra(path: Path) -> str | None:
    tree = ast.parse(path.read_text())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    for module, distribution in OPTIONAL.items():
        if module in top_level and importlib.util.find_spec(module) is None:
            return distribution
    return None


def test_every_public_module_imports():
    modules = source_modules()
    imported = []
    for name, path in sorted(modules.items()):
        if name.startswith("vtprune.integrations.lmms_eval.") and importlib.util.find_spec("lmms_eval") is None:
            continue  # the lmms-eval family modules subclass lmms-eval's classes at import time
        if _needs_missing_extra(path):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # nothing in the tree uses a moved path
            module = importlib.import_module(name)
        assert Path(module.__file__).resolve() == path.resolve(), f"{name} imports from {module.__file__}, not {path}"
        imported.append(name)
    assert "vtprune.apps.experiment" in imported and "vtprune.integrations.llava" in imported


def test_moved_module_paths_still_import_with_a_warning():
    from vtprune._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)


def _script(name: str) -> list[str]:
    found = Path(sys.executable).parent / name
    if found.exists():
        return [str(found)]
    which = shutil.which(name)
    if which is None:
        pytest.fail(f"console script {name} is not installed: reinstall vtprune (pip install -e .)")
    return [which]


def _run_help(command: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    run = subprocess.run([*command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-4000:])
    return run.stdout


def test_console_scripts_are_the_documented_ones():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(declared) == ["vtprune", "vtprune-calibrate", "vtprune-demo", "vtprune-report"]
    installed = {point.name: point.value for point in metadata.entry_points(group="console_scripts") if point.name in declared}
    assert installed == declared, "the installed console scripts are stale: reinstall vtprune (pip install -e .)"


@pytest.mark.parametrize(
    "command, expect",
    [
        (("vtprune",), "vtprune is powered by Hydra"),
        (("vtprune-report",), "usage: vtprune-report"),
        (("vtprune-demo",), "usage:"),
        (("vtprune-calibrate",), "usage: vtprune-calibrate"),
        (("-m", "vtprune"), "vtprune is powered by Hydra"),
        (("-m", "vtprune.eval.speed"), "usage:"),
        (("-m", "vtprune.integrations.lmms_eval.check"), "usage:"),
    ],
)
def test_each_command_answers_help(command, expect, tmp_path):
    full = [sys.executable, *command] if command[0] == "-m" else _script(command[0])
    assert expect in _run_help(full, tmp_path)


def test_hydra_app_finds_its_configs_from_anywhere(tmp_path):
    """The config search path is the installed package (pkg://vtprune.configs), not the working directory."""
    out = _run_help(_script("vtprune"), tmp_path)
    for group in ("model:", "pruner:", "benchmark:"):
        assert group in out
    assert "embedded" in out and "fastervlm" in out


def test_the_families_are_registered_through_entry_points():
    from vtprune.integration import ENTRY_POINT_GROUP, supported_model_classes

    points = {point.name: point.value for point in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert points == {
        "gemma3": "vtprune.integrations.gemma3:Gemma3Integration",
        "internvl": "vtprune.integrations.internvl:InternVLIntegration",
        "llava": "vtprune.integrations.llava:LlavaIntegration",
        "llava_next": "vtprune.integrations.llava_next:LlavaNextIntegration",
        "llava_onevision": "vtprune.integrations.llava_onevision:LlavaOnevisionIntegration",
        "qwen_vl": "vtprune.integrations.qwen_vl:QwenVLIntegration",
        "qwen3_vl": "vtprune.integrations.qwen3_vl:Qwen3VLIntegration",
        "timm_vit": "vtprune.integrations.timm_vit:TimmViTIntegration",
    }
    assert "Qwen2_5_VLForConditionalGeneration" in supported_model_classes()
    assert {"Qwen3VLMoeForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"} <= set(supported_model_classes())
    assert "LlavaOnevisionForConditionalGeneration" in supported_model_classes()
    assert {"Gemma3ForConditionalGeneration", "InternVLForConditionalGeneration"} <= set(supported_model_classes())
