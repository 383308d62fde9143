"""Can the installed lmms-eval run its evaluator? A fast, model-free check with a clear verdict.

An upstream release can break lmms-eval without touching vtprune (filelock 4.3.0 removed ``filelock._api``, which
lmms-eval 0.7.3's evaluator imports), and lmms-eval's CLI then prints a traceback and still exits 0. This module
runs lmms-eval's own ``simple_evaluate`` on a two-document local task with a stub model (no weights, a few
seconds, offline) and, if anything fails, raises `LmmsEvalBrokenError` naming the package and the versions
involved, and how to install the versions CI last passed with (``constraints.txt``).

From a shell::

    python -m vtprune.integrations.lmms_eval.check      # prints the versions and "ok", or the diagnosis (exit status 1)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from vtprune.errors import VTPruneError

__all__ = ["KNOWN_BREAKS", "LmmsEvalBrokenError", "check_lmms_eval", "explain_failure", "installed_versions"]

WATCHED = ("lmms-eval", "torch", "transformers", "datasets", "filelock", "accelerate", "huggingface-hub", "pyarrow")
"""Distributions whose versions every diagnosis lists: lmms-eval and what its evaluator leans on most."""

KNOWN_BREAKS: dict[str, str] = {
    "filelock": "filelock 4.3.0 removed filelock._api, which lmms-eval 0.7.3's evaluator imports; "
    "vtprune's `lmms` extra bounds filelock<4.3",
}
"""Distribution -> what is known about how one of its releases breaks lmms-eval, and vtprune's remedy."""

REMEDY = (
    "To install the exact versions CI last passed with: `make test CONSTRAINTS=constraints.txt`, or "
    "`pip install -c constraints.txt -e \".[lmms]\"` in a clone of vtprune."
)

TASK = "vtprune_lmms_eval_check"

_TASK_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function check_utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

_TASK_UTILS = "def doc_to_visual(doc):\n    return []\n"


class LmmsEvalBrokenError(VTPruneError, RuntimeError):
    """The installed lmms-eval cannot run its evaluator (the message names the package and versions)."""


def installed_versions(names: tuple[str, ...] = WATCHED) -> dict[str, str | None]:
    """Distribution name -> installed version (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _distribution_of(module: str) -> str | None:
    top = module.split(".")[0]
    names = metadata.packages_distributions().get(top)
    return names[0] if names else None


def _culprit(error: BaseException) -> str | None:
    """The distribution an error comes from: the module an ImportError names, else the deepest frame outside
    lmms-eval that lies in an installed distribution."""
    for link in _chain(error):
        if isinstance(link, ImportError) and link.name:
            found = _distribution_of(link.name)
            if found:
                return found
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame.f_globals.get("__name__", ""))
        traceback = traceback.tb_next
    for module in reversed(frames):
        found = _distribution_of(module) if module else None
        if found and found.replace("_", "-").lower() not in {"lmms-eval", "vtprune"}:
            return found
    return None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def explain_failure(error: BaseException, versions: dict[str, str | None] | None = None) -> str:
    """A one-paragraph diagnosis: what failed, which package (and version) it comes from, what is known, the remedy."""
    versions = installed_versions() if versions is None else versions
    culprit = _culprit(error)
    if culprit is not None and culprit not in versions:
        versions = {**versions, **installed_versions((culprit,))}
    lmms = versions.get("lmms-eval") or "(not installed)"
    lines = [f"lmms-eval {lmms} cannot run its evaluator: {type(error).__name__}: {error}"]
    if culprit is not None:
        lines.append(f"The failure comes from {culprit} {versions.get(culprit) or '(not installed)'}.")
        if culprit in KNOWN_BREAKS:
            lines.append(f"Known: {KNOWN_BREAKS[culprit]}.")
    lines.append("Installed: " + ", ".join(f"{name} {version or '-'}" for name, version in versions.items()) + ".")
    lines.append(REMEDY)
    return "\n".join(lines)


def check_lmms_eval(workdir: str | Path | None = None) -> dict[str, Any]:
    """Run lmms-eval's evaluator on a two-document local task with a stub model.

    Returns the installed versions (`WATCHED`) and the task's score (``"exact_match"``, 0.5 by construction: the
    stub answers the first document right and the second wrong). Raises `LmmsEvalBrokenError` with
    `explain_failure`'s diagnosis when lmms-eval is not importable, its evaluator fails, or the score is not 0.5;
    `ModuleNotFoundError` when lmms-eval is not installed at all (``pip install "vtprune[lmms]"``).
    """
    versions = installed_versions()
    if versions["lmms-eval"] is None:
        raise ModuleNotFoundError('lmms-eval is not installed: pip install "vtprune[lmms]"', name="lmms_eval")
    with tempfile.TemporaryDirectory(prefix="vtprune-lmms-check-") as scratch:
        folder = Path(workdir) if workdir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            score = _evaluate_stub(folder)
        except Exception as error:
            raise LmmsEvalBrokenError(explain_failure(error, versions)) from error
    if score != 0.5:
        raise LmmsEvalBrokenError(
            explain_failure(RuntimeError(f"the stub task scored {score}, expected 0.5"), versions)
        )
    return {**versions, "exact_match": score}


def _evaluate_stub(folder: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lmms_eval import evaluator
    from lmms_eval.api.model import lmms
    from lmms_eval.tasks import TaskManager

    class EchoTail(lmms):
        """Answers every question with its last three characters (no model, no weights)."""

        is_simple = True

        def generate_until(self, requests):
            return [request.args[0][-3:] for request in requests]

        def generate_until_multi_round(self, requests):
            return self.generate_until(requests)

        def loglikelihood(self, requests):
            return [(0.0, True) for _ in requests]

    parquet = folder / "check.parquet"
    pq.write_table(pa.table({"question": ["say abc", "say xyz"], "answer": ["abc", "no"]}), parquet)
    (folder / f"{TASK}.yaml").write_text(_TASK_YAML.format(task=TASK, parquet=parquet, cache=folder / "cache"))
    (folder / "check_utils.py").write_text(_TASK_UTILS)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = evaluator.simple_evaluate(model=EchoTail(), tasks=[TASK], task_manager=manager, batch_size=1)
    if not results or TASK not in results.get("results", {}):
        raise RuntimeError(f"simple_evaluate returned no results for the stub task: {results!r}"[:500])
    return float(results["results"][TASK]["exact_match,none"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vtprune.integrations.lmms_eval.check", description="Check that the installed lmms-eval runs its evaluator."
    )
    parser.parse_args(argv)
    try:
        report = check_lmms_eval()
    except (LmmsEvalBrokenError, ModuleNotFoundError) as error:
        print(error, file=sys.stderr)
        return 1
    print(", ".join(f"{name} {version}" for name, version in report.items() if name != "exact_match"))
    print("ok: lmms-eval's evaluator ran the two-document check task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
