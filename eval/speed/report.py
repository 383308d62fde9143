"""The report: the fields of ``results.json`` (`ROW_FIELDS`, `SCALING_FIELDS`), the environment it was measured
in, the markdown table (``table.md``), the plot (``speed.png``) and the summary of the targets.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from vtprune.eval.speed.geometry import FLOPS_CONVENTION

ROW_FIELDS = (
    "family", "pruner", "keep", "tokens_in", "tokens_out", "seq_len_unpruned", "seq_len_pruned",
    "selection_ms", "pruned_prefill_ms", "oracle_prefill_ms", "unpruned_prefill_ms",
    "pruned_layers_ms", "oracle_layers_ms", "unpruned_layers_ms",
    "pruned_outside_layers_ms", "oracle_outside_layers_ms", "vtprune_overhead_ms",
    "pruned_full_ms", "oracle_full_ms", "unpruned_full_ms",
    "selection_pct_of_pruned_full", "pruned_over_oracle", "pruned_over_oracle_full", "speedup_full",
    "vision_encoder_ms",
    "pruned_peak_mb", "unpruned_peak_mb", "selection_peak_mb", "attention_map_mb",
    "pruned_peak_full_mb_est", "unpruned_peak_full_mb_est",
    "pruned_tflops", "unpruned_tflops", "flops_ratio",
    "uses", "identity_check", "identity_detail", "fix_candidates", "targets",
)
"""Fields of every pruner x budget row of ``results.json``."""

SCALING_FIELDS = ("pruner", "n", "grid", "keep", "selection_ms", "algorithm_ms", "selection_peak_mb", "attention_map_mb",
                  "uses", "fix_candidates")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    env = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _f(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Device {env['device']} ({env['cpu'] if env['device'] == 'cpu' else env.get('gpu')}), {env['dtype']}, "
        f"{env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}; min of "
        f"{result['settings']['repeats']} runs after a warm-up. Full-depth times scale the measured decoder layers "
        f"linearly; peak memory is measured at the reduced depth. FLOPs: {FLOPS_CONVENTION}.",
        "",
    ]
    for fam in result["families"]:
        u = fam["unpruned"]
        lines += [
            f"### {fam['label']}: {fam['tokens_per_image']} visual + {fam['text_tokens']} text tokens, "
            f"{fam['llm_layers']} of {fam['full_layers']} LLM layers run",
            "",
            f"Vision encoder {fam['vision_encoder_ms']:.0f} ms (not shortened by pruning). Unpruned prefill: "
            f"{u['prefill_ms']:.0f} ms measured, **{u['full_ms']:.0f} ms at full depth**, peak {_f(u['peak_mb'])} MiB, "
            f"{u['tflops']:.2f} TFLOPs.",
            "",
            "| pruner | keep | LLM seq | selection ms | pruned prefill ms (full) | oracle ms (full) | pruned / oracle | "
            "selection % | speed-up | peak MiB pruned / unpruned | selection peak MiB | TFLOPs | identity |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fam["rows"]:
            lines.append(
                f"| {r['pruner']} | {r['keep']} | {r['seq_len_pruned']} | {r['selection_ms']:.1f} | "
                f"{r['pruned_full_ms']:.0f} | {r['oracle_full_ms']:.0f} | {r['pruned_over_oracle_full']:.3f} | "
                f"{r['selection_pct_of_pruned_full']:.2f} | {r['speedup_full']:.2f}x | "
                f"{_f(r['pruned_peak_mb'])} / {_f(r['unpruned_peak_mb'])} | {_f(r['selection_peak_mb'])} | "
                f"{r['pruned_tflops']:.2f} | {'ok' if r['identity_check'] else 'FAILED'} |"
            )
        lines.append("")
        for skip in fam.get("skipped", []):
            lines.append(f"- {skip['pruner']} keep={skip['keep']}: not measured ({skip['reason']})")
        if fam.get("skipped"):
            lines.append("")
        with_fixes = [r for r in fam["rows"] if r.get("fix_candidates")]
        if with_fixes:
            lines += ["Candidate core changes (temporary patches; selection alone): selection ms and selection peak "
                      "MiB, before -> after.", "",
                      "| pruner | keep | candidate | selection ms | selection peak MiB | same kept |", "|---|---|---|---|---|---|"]
            for r in with_fixes:
                for cand, c in r["fix_candidates"].items():
                    lines.append(f"| {r['pruner']} | {r['keep']} | {cand} | {r['selection_ms']:.1f} -> {c['selection_ms']:.1f} | "
                                 f"{_f(r['selection_peak_mb'])} -> {_f(c['selection_peak_mb'])} | {'yes' if c['same_kept'] else 'no'} |")
            lines.append("")
    scaling = result.get("scaling")
    if scaling:
        ns = scaling["ns"]
        keeps = {p["n"]: p["keep"] for p in scaling["per_n"]}
        lines += [
            f"### Selection time vs N (CLIP-L blocks, keep ~ N/9: {', '.join(f'{n}->{keeps[n]}' for n in ns)})",
            "",
            "| pruner | " + " | ".join(f"N={n} ms (algorithm ms)" for n in ns) + " | exponent (algorithm) | expected <= | "
            + " | ".join(f"peak MiB N={n}" for n in ns) + " |",
            "|---|" + "---|" * (2 * len(ns) + 2),
        ]
        for name, growth in scaling["growth"].items():
            cells = []
            peaks = []
            for n in ns:
                r = next(r for r in scaling["rows"] if r["pruner"] == name and r["n"] == n)
                cells.append(f"{r['selection_ms']:.1f} ({r['algorithm_ms']:.1f})")
                peaks.append(_f(r["selection_peak_mb"]))
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {_f(growth['selection_exponent'], 2)} "
                f"({_f(growth['algorithm_exponent'], 2)}) | {_f(growth['expected_exponent_at_most'], 0)} | "
                + " | ".join(peaks) + " |"
            )
        lines += ["", "| statistic (one block, fresh) | " + " | ".join(f"N={n} ms" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for key in ("qk_projection_ms", "cls_attention_ms", "cls_attention_cls_query_only_ms", "global_attention_ms",
                    "global_attention_query_chunk_64_ms", "keys_ms", "project_all_ms"):
            lines.append(f"| {key[:-3]} | " + " | ".join(f"{p[key]:.1f}" for p in scaling["per_n"]) + " |")
        lines.append("| one HxSxS fp32 map, MiB | " + " | ".join(f"{p['attention_map_mb']:.0f}" for p in scaling["per_n"]) + " |")
        lines.append("")
        candidates = sorted({(r["pruner"], c) for r in scaling["rows"] for c in r.get("fix_candidates", {})})
        if candidates:
            lines += ["Candidate core changes, measured by temporary patches (selection ms / peak MiB, before -> after):", "",
                      "| pruner | candidate | " + " | ".join(f"N={n}" for n in ns) + " | same kept |",
                      "|---|---|" + "---|" * (len(ns) + 1)]
            for pruner, cand in candidates:
                cells, same = [], True
                for n in ns:
                    r = next(r for r in scaling["rows"] if r["pruner"] == pruner and r["n"] == n)
                    c = r["fix_candidates"].get(cand)
                    if c is None:
                        cells.append("-")
                        continue
                    same = same and c["same_kept"]
                    cells.append(f"{r['selection_ms']:.0f} -> {c['selection_ms']:.0f} / "
                                 f"{_f(r['selection_peak_mb'], 0)} -> {_f(c['selection_peak_mb'], 0)}")
                lines.append(f"| {pruner} | {cand} | " + " | ".join(cells) + f" | {'yes' if same else 'no'} |")
            lines.append("")
    t = result["targets"]
    lines += ["### Targets", ""]
    for key, value in t.items():
        lines.append(f"- {key}: {value}")
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    families = result["families"]
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, fam in zip(axes[0], families):
        names = sorted({r["pruner"] for r in fam["rows"]})
        for name in names:
            rows = sorted((r for r in fam["rows"] if r["pruner"] == name), key=lambda r: r["keep"])
            ax.plot([r["keep"] for r in rows], [r["pruned_full_ms"] for r in rows], marker="o", label=name)
        oracle = sorted({(r["keep"], r["oracle_full_ms"]) for r in fam["rows"] if r["pruner"] == names[0]})
        ax.plot([k for k, _ in oracle], [o for _, o in oracle], "k--", label="oracle (kept for free)")
        ax.axhline(fam["unpruned"]["full_ms"], color="gray", linestyle=":", label=f"unpruned ({fam['tokens_per_image']})")
        ax.set_xlabel("visual tokens kept")
        ax.set_ylabel("prefill ms (full depth, est.)")
        ax.set_title(fam["label"], fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def summarize_targets(families: list[dict], scaling: dict | None) -> dict:
    rows = [r for fam in families for r in fam["rows"]]
    vicuna = [r for r in rows if r["family"] == "llava-1.5-7b"]

    def worst(rs, key):
        return max((r[key] for r in rs), default=None)

    def all_true(rs, key):
        values = [r["targets"][key] for r in rs if r["targets"][key] is not None]
        return all(values) if values else None

    summary = {
        "identity_check_all_rows": all(r["identity_check"] for r in rows),
        "selection_le_3pct_vicuna7b": all_true(vicuna, "selection_le_3pct"),
        "max_selection_pct_vicuna7b": worst(vicuna, "selection_pct_of_pruned_full"),
        "pruned_le_1.03_oracle_vicuna7b": all_true(vicuna, "pruned_le_1.03_oracle"),
        "max_pruned_over_oracle_full_vicuna7b": worst(vicuna, "pruned_over_oracle_full"),
        "peak_pruned_le_unpruned_all_rows": all_true(rows, "peak_pruned_le_unpruned"),
        "no_attention_map_cls_based": all_true(rows, "no_attention_map"),
        "other_families": {
            fam["name"]: {
                "selection_le_3pct": all_true(fam["rows"], "selection_le_3pct"),
                "max_selection_pct": worst(fam["rows"], "selection_pct_of_pruned_full"),
                "max_pruned_over_oracle_full": worst(fam["rows"], "pruned_over_oracle_full"),
            }
            for fam in families if fam["name"] != "llava-1.5-7b"
        },
        "skipped_rows": {fam["name"]: [[s["pruner"], s["keep"]] for s in fam["skipped"]] for fam in families if fam["skipped"]},
    }
    if scaling:
        cls_rows = [r for r in scaling["rows"] if r["pruner"] in ("fastervlm", "visionzip") and r["selection_peak_mb"] is not None]
        summary["no_attention_map_cls_based_scaling"] = all(r["selection_peak_mb"] < r["attention_map_mb"] for r in cls_rows) if cls_rows else None
        summary["grows_worse_than_required"] = sorted(n for n, g in scaling["growth"].items() if g["worse_than_required"])
    return summary
