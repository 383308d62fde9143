"""`vtprune-report DIR`: a markdown table and plots from every ``results.json`` under a sweep folder.

    vtprune-report multirun/2026-11-24/10-00-00            # writes report.md, report.json and the plots there
    python -m vtprune.apps.report multirun/... --out reports/

A sweep with several models (local or SLURM: any folder tree of Hydra job folders) gets one table and one pair of
plots per model (``accuracy_<model>.png``, ``latency_<model>.png``; ``accuracy.png`` / ``latency.png`` for one
model). Jobs that ran the same configuration twice are flagged as duplicates (the first folder is reported),
and job folders with no complete ``results.json`` (the job failed, was killed or is still running) are listed
as failed with their overrides. ``report.json`` holds the rows, the duplicates and the failed jobs.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def collect(folder: str | Path) -> list[dict]:
    """Every complete results.json under `folder` (see `survey` for the failed ones)."""
    results, _ = survey(folder)
    return results


def _overrides(job: Path) -> list[str]:
    try:
        import yaml

        return list(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, ValueError, ImportError):
        return []


def survey(folder: str | Path) -> tuple[list[dict], list[dict]]:
    """(complete results, failed jobs) under `folder`: a job folder is one with ``.hydra/`` or a results.json."""
    from vtprune.apps.experiment import read_results

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    jobs = {p.parent for p in folder.rglob("results.json")} | {p.parent for p in folder.rglob(".hydra") if p.is_dir()}
    results, failed = [], []
    for job in sorted(jobs):
        row = read_results(job)
        if row is None:
            reason = "results.json is incomplete or corrupt" if (job / "results.json").exists() else "no results.json"
            failed.append({"path": str(job), "reason": reason, "overrides": _overrides(job)})
            continue
        row["_path"] = str(job)
        results.append(row)
    if not results:
        raise FileNotFoundError(f"no results.json under {folder}")
    return results, failed


def model_label(result: dict) -> str:
    """The model a result belongs to: its Hub / local name, else its source (and family)."""
    spec = result.get("model") or {}
    if spec.get("name") or spec.get("path"):
        return str(spec.get("name") or spec.get("path"))
    return ":".join(str(spec[k]) for k in ("source", "family") if spec.get(k)) or "model"


def _job_key(result: dict) -> str:
    from vtprune.apps.experiment import comparable_config

    return json.dumps(comparable_config(result["config"]), sort_keys=True, default=str)


def split_duplicates(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one result per configuration, the duplicates: each with the folder it repeats)."""
    first: dict[str, dict] = {}
    duplicates = []
    for r in results:
        key = _job_key(r)
        if key in first:
            duplicates.append({"path": r["_path"], "same_config_as": first[key]["_path"], "pruner": r["pruner"], "budget": r["budget"]})
        else:
            first[key] = r
    return list(first.values()), duplicates


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict]) -> str:
    """Markdown table, one row per job, sorted by pruner then visual tokens."""
    rows = sorted(results, key=lambda r: (r["pruner"] != "none", r["pruner"], r["visual_tokens_out"]["mean"]))
    if not any(r["pruner"] == "none" for r in rows) and rows[0].get("unpruned"):
        # Every job also measured the unpruned model; show it once as the reference row.
        reference = rows[0]["unpruned"]
        rows.insert(0, {**reference, "pruner": "none", "budget": None, "loyalty": 1.0, "selection_ms_per_image": 0.0,
                        "visual_tokens_out": rows[0]["visual_tokens_in"], "unpruned": reference})
    lines = [
        "| pruner | budget | visual tokens | accuracy | % of unpruned | loyalty | prefill ms | speed-up | prefill TFLOPs | selection ms/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unpruned = r.get("unpruned") or {}
        share = r["accuracy"] / unpruned["accuracy"] if unpruned.get("accuracy") else None
        speedup = unpruned["prefill_ms"] / r["prefill_ms"] if unpruned.get("prefill_ms") else None
        lines.append(
            f"| {r['pruner']} | {r['budget'] or '-'} | {r['visual_tokens_out']['mean']:.0f} | {_fmt(r['accuracy'])} | "
            f"{_fmt(None if share is None else 100 * share, 1)} | {_fmt(r['loyalty'])} | {_fmt(r['prefill_ms'], 1)} | "
            f"{_fmt(speedup, 2)} | {r['prefill_tflops']:.3g} | {_fmt(r['selection_ms_per_image'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def plots(results: list[dict], out: Path, suffix: str = "", title: str | None = None) -> list[Path]:
    """Accuracy and prefill latency against visual tokens, one line per pruner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_pruner: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_pruner[r["pruner"]].append(r)
    written = []
    for key, label, filename in (("accuracy", "accuracy", f"accuracy{suffix}.png"), ("prefill_ms", "prefill latency (ms)", f"latency{suffix}.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in sorted(by_pruner.items()):
            rows = sorted(rows, key=lambda r: r["visual_tokens_out"]["mean"])
            xs = [r["visual_tokens_out"]["mean"] for r in rows]
            ys = [r[key] for r in rows]
            style = dict(marker="*", markersize=12, linestyle="none") if name == "none" else dict(marker="o")
            ax.plot(xs, ys, label="unpruned" if name == "none" else name, **style)
        ax.set_xlabel("visual tokens per image")
        ax.set_ylabel(label)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a sweep folder (e.g. multirun/<date>/<time>)")
    parser.add_argument("--out", default=None, help="where to write report.md and the plots (default: the folder)")
    args = parser.parse_args(argv)
    try:
        results, failed = survey(args.folder)
    except FileNotFoundError as error:
        parser.exit(2, f"vtprune-report: error: {error}\n")
    out = Path(args.out or args.folder)
    out.mkdir(parents=True, exist_ok=True)
    results, duplicates = split_duplicates(results)
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_model[model_label(r)].append(r)
    sections, images = [], []
    for label, rows in sorted(by_model.items()):
        suffix = "" if len(by_model) == 1 else "_" + re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")
        drawn = plots(rows, out, suffix=suffix, title=label)
        images += drawn
        sections.append(f"## {label}\n\n{table(rows)}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in drawn))
    problems = ""
    if duplicates:
        problems += "## Duplicate jobs (same configuration; the first folder is reported)\n\n" + "".join(
            f"- {d['path']} repeats {d['same_config_as']}\n" for d in duplicates) + "\n"
    if failed:
        problems += "## Failed jobs (no complete results.json)\n\n" + "".join(
            f"- {f['path']}: {f['reason']} ({' '.join(f['overrides']) or 'no overrides'})\n" for f in failed) + "\n"
    report = out / "report.md"
    report.write_text(f"# vtprune sweep: {args.folder}\n\n" + "\n".join(sections) + ("\n" + problems if problems else ""))
    rows = [{k: v for k, v in r.items() if k not in ("predictions", "_path")} | {"path": r["_path"], "model_label": model_label(r)} for r in results]
    (out / "report.json").write_text(json.dumps({"rows": rows, "duplicates": duplicates, "failed": failed}, indent=2, default=str))
    print("\n".join(sections))
    if problems:
        print(problems)
    print(f"wrote {report}, report.json and {', '.join(p.name for p in images)}")
    return report


if __name__ == "__main__":
    main()
