"""Installing: the constraints file CI's versions are pinned in, and the Makefile's use of it.

`pip install vtprune[lmms]` resolves on its own (pyproject.toml's bounds); `constraints.txt` records the exact
versions of the last green CI run, for `make test CONSTRAINTS=constraints.txt`. These tests keep the two consistent:
a pin that pyproject's bounds exclude would make the constrained install fail to resolve.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REPORTED = ("torch", "transformers", "lmms-eval", "hydra-core", "timm", "filelock")
"""The versions a closing note reports; the constraints file must pin each one."""


def read_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert match, f"constraints.txt line {number} is not NAME==VERSION: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match[2]
    return pins


def project_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return [Requirement(text) for text in requirements]


def test_constraints_pin_every_reported_package():
    pins = read_pins()
    missing = [name for name in REPORTED if canonicalize_name(name) not in pins]
    assert not missing, f"constraints.txt does not pin {missing}: rerun `make constraints` after a green `make test`"


def test_constraints_satisfy_pyproject_bounds():
    pins = read_pins()
    requirements = project_requirements()
    assert any(r.name == "filelock" and not r.specifier.contains("4.3.0") for r in requirements), (
        "the lmms extra must bound filelock below 4.3 (lmms-eval 0.7.3 imports filelock._api)"
    )
    for requirement in requirements:
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (
                f"constraints.txt pins {requirement.name}=={pinned}, outside pyproject's {requirement}"
            )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_with_the_constraints_file():
    """`make test CONSTRAINTS=constraints.txt` passes the file to pip; without it pip resolves on its own."""

    # Under `make test CONSTRAINTS=...` the outer make hands its variables down through the environment.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONSTRAINTS")}

    def dry_run(*arguments: str) -> str:
        command = ["make", "-n", "-B", "install", "VENV=/nonexistent-venv", *arguments]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout

    constrained = [line for line in dry_run("CONSTRAINTS=constraints.txt").splitlines() if "pip install" in line and "-e" in line]
    assert len(constrained) == 1 and constrained[0].rstrip().endswith("-c constraints.txt"), constrained
    resolved = [line for line in dry_run("CONSTRAINTS=").splitlines() if "pip install" in line and "-e" in line]
    assert len(resolved) == 1 and "-c " not in resolved[0], resolved


def test_the_wheel_ships_every_config_without_setuptools_warnings(tmp_path):
    """Building the package warns about no folder (the config groups are listed packages, not stray data) and the
    wheel holds every Hydra config the app can be pointed at."""
    import sys
    import zipfile

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    log = build.stdout + build.stderr
    assert "would be ignored" not in log and "is absent from the `packages` configuration" not in log
    (wheel,) = tmp_path.glob("vtprune-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("vtprune/configs/")}
    expected = {"vtprune/configs/" + str(path.relative_to(ROOT / "configs")) for path in (ROOT / "configs").rglob("*.yaml")}
    assert expected and expected <= shipped, sorted(expected - shipped)
