"""The command line: `parse_args` and `main` (every family, the scaling study, the report; ``--out`` gets the files).
``python -m vtprune.eval.speed`` runs `main`; the package docstring is the ``--help`` text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vtprune.eval.speed.geometry import CASES, DEFAULT_FAMILIES, FLOPS_CONVENTION
from vtprune.flops import prefill_flops
from vtprune.eval.speed.measure import pick_device
from vtprune.eval.speed.protocol import run_case
from vtprune.eval.speed.report import environment, markdown, plot, summarize_targets
from vtprune.eval.speed.scaling import run_scaling


def parse_args(argv):
    package_doc = sys.modules[__package__].__doc__  # the package docstring (vtprune.eval.speed), imported first
    parser = argparse.ArgumentParser(prog="python -m vtprune.eval.speed", description=package_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for results.json, table.md, speed.png")
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES), choices=list(CASES),
                        help="default: %(default)s (llava-next-7b is opt-in)")
    parser.add_argument("--pruners", nargs="+", default=None, help="default: every registered pruner")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="default: the family's (192 128 64; LLaVA-NeXT 640 320 160)")
    parser.add_argument("--llm-layers", type=int, default=None, help="decoder layers built (default: 2 on CPU, full on CUDA)")
    parser.add_argument("--text-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (min reported), after one warm-up")
    parser.add_argument("--vision-repeats", type=int, default=1, help="timed vision-tower runs (min reported)")
    parser.add_argument("--scaling-n", type=int, nargs="*", default=None, help="token counts for the scaling study (default 576 2880 5000); empty: skip")
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument("--no-fix-candidates", action="store_true", help="skip timing the candidate core changes in the scaling study")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depths (smoke test, seconds)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict (also written to ``--out``/results.json)."""
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _main(args, argv) -> dict:
    import gc

    import vtprune

    device = pick_device(args.device)
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    llm_layers = args.llm_layers if args.llm_layers is not None else (2 if device.type == "cpu" else 0)
    names = args.pruners or vtprune.list_pruners()
    scaling_ns = args.scaling_n if args.scaling_n is not None else ([576, 1152] if args.tiny else [576, 2880, 5000])
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    started = time.perf_counter()
    torch.manual_seed(0)

    result: dict[str, Any] = {
        "benchmark": "vtprune speed",
        "command": "python -m vtprune.eval.speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device, dtype),
        "settings": {**vars(args), "llm_layers": llm_layers, "pruners": names, "scaling_n": scaling_ns},
        "definitions": {
            "unpruned_prefill": "projector on all N + splice + unpatched forward(inputs_embeds), logits_to_keep=1",
            "pruned_prefill": "patched forward with the cached tower pass: selection + pruned sequence + same LLM prefill",
            "oracle_prefill": "unpatched forward on handle.last_sequence (same kept indices, no selection work)",
            "full_depth": "outside + layers * full_layers / llm_layers; layers = decoder-stack time (hooks, same call), "
                          "min over pruned and oracle runs (identical inputs); outside = min(total - layers) per kind",
            "peak_memory": "torch allocations above the pre-step level; CPU: profiler allocator events; CUDA: max_memory_allocated",
            "flops": FLOPS_CONVENTION,
            "timing": f"min of {args.repeats} after one warm-up; pruned and oracle runs alternate",
        },
        "flops_check": {
            "n": 576 + 60,
            "tflops": prefill_flops(636, 4096, 11008, 32) / 1e12,
            "expected": 3.31,
            "ok": abs(prefill_flops(636, 4096, 11008, 32) / 1e12 - 3.31) < 0.01,
        },
        "families": [],
    }
    scaling = None
    for family in args.families:
        case = CASES[family](llm_layers, args.text_tokens, args.tiny, device, dtype)
        result["families"].append(run_case(case, names, args, log))
        if family == "llava-1.5-7b" and scaling_ns:
            scaling = run_scaling(case, names, scaling_ns, args.scaling_repeats, log, not args.no_fix_candidates)
        case.model = None
        del case
        gc.collect()
    result["scaling"] = scaling
    result["rows"] = [r for fam in result["families"] for r in fam["rows"]]
    result["targets"] = summarize_targets(result["families"], scaling)
    result["wall_seconds"] = time.perf_counter() - started

    table = markdown(result)
    result["outputs"] = {"json": None, "table": None, "plot": None, "plot_note": None}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table)
        result["outputs"]["table"] = str(out / "table.md")
        result["outputs"]["plot"] = plot(result, out / "speed.png")
        if result["outputs"]["plot"] is None:
            result["outputs"]["plot_note"] = "matplotlib is not installed: no plot written (pip install matplotlib)"
        result["outputs"]["json"] = str(out / "results.json")
        with open(out / "results.json", "w") as f:
            json.dump(result, f, indent=2, default=str)
    if not args.quiet:
        print()
        print(table)
        if result["outputs"]["plot_note"]:
            print(result["outputs"]["plot_note"])
    return result
