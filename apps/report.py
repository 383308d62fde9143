"""`vtprune-report DIR`: a markdown table and plots from every ``results.json`` under a sweep folder.

    vtprune-report multirun/2026-11-24/10-00-00            # writes report.md, accuracy.png, latency.png there
    python -m vtprune.apps.report multirun/... --out reports/
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def collect(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    results = []
    for path in sorted(folder.rglob("results.json")):
        with open(path) as f:
            row = json.load(f)
        row["_path"] = str(path.parent)
        results.append(row)
    if not results:
        raise FileNotFoundError(f"no results.json under {folder}")
    return results


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


def plots(results: list[dict], out: Path) -> list[Path]:
    """Accuracy and prefill latency against visual tokens, one line per pruner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_pruner: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_pruner[r["pruner"]].append(r)
    written = []
    for key, label, filename in (("accuracy", "accuracy", "accuracy.png"), ("prefill_ms", "prefill latency (ms)", "latency.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in sorted(by_pruner.items()):
            rows = sorted(rows, key=lambda r: r["visual_tokens_out"]["mean"])
            xs = [r["visual_tokens_out"]["mean"] for r in rows]
            ys = [r[key] for r in rows]
            style = dict(marker="*", markersize=12, linestyle="none") if name == "none" else dict(marker="o")
            ax.plot(xs, ys, label="unpruned" if name == "none" else name, **style)
        ax.set_xlabel("visual tokens per image")
        ax.set_ylabel(label)
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
        results = collect(args.folder)
    except FileNotFoundError as error:
        parser.exit(2, f"vtprune-report: error: {error}\n")
    out = Path(args.out or args.folder)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    images = plots(results, out)
    report = out / "report.md"
    report.write_text(f"# vtprune sweep: {args.folder}\n\n{text}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images))
    print(text)
    print(f"wrote {report} and {', '.join(p.name for p in images)}")
    return report


if __name__ == "__main__":
    main()
