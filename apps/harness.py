"""The evaluation harness: one (model, pruner, budget, benchmark) scored on accuracy, agreement with the unpruned
model ("loyalty"), visual tokens, prefill FLOPs, latency, peak memory and selection time, side by side.

    from vtprune.apps.harness import evaluate
    results = evaluate(model, processor, records, pruner="fastervlm", keep=64)

`records` are `vtprune.eval.synthetic.Record`-like objects (``image``, ``question``, ``answer``, ``type``).
Latency is measured on one fixed batch after warm-up, as the minimum of N runs (machines are noisy); peak memory
is `torch.cuda.max_memory_allocated` on CUDA and the peak resident set size sampled during the timed calls on
the CPU (an upper bound that includes the allocator's cache).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from vtprune.api import apply
from vtprune.flops import CONVENTION, llm_geometry, prefill_flops

ANSWER_HINT = "Answer with one word or number."


def build_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question} {ANSWER_HINT}"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(model, processor, records: Sequence) -> dict:
    """Processor output for a batch of records, on the model's device (pixels in the model's dtype)."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        # One list per prompt: the same inputs for every processor, and Gemma 3's needs it to pair images with rows.
        images=[[r.image] for r in records],
        text=[build_prompt(processor, r.question) for r in records],
        padding=True,
        return_tensors="pt",
    )
    device, dtype = _device(model), _dtype(model)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


class _PeakMemory:
    """Peak memory during a block: CUDA allocations, or resident set size sampled every 2 ms on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = 4096
        try:
            import os

            page = os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
        while not self._stop.is_set():
            try:
                with open("/proc/self/statm") as f:
                    self.peak_bytes = max(self.peak_bytes, int(f.read().split()[1]) * page)
            except OSError:
                return
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def _min_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def answer(model, processor, records: Sequence, batch_size: int = 8, max_new_tokens: int = 8, handle=None, desc: str = "answering"):
    """Greedy answers for `records`; with a `handle`, also the per-image statistics of every batch."""
    predictions, stats, selection = [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
            batch = records[start : start + batch_size]
            inputs = make_inputs(model, processor, batch)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            predictions += processor.batch_decode(new, skip_special_tokens=True)
            if handle is not None:
                stats += handle.stats
                selection.append(handle.selection_time / max(1, len(handle.stats)))
    return predictions, stats, selection


def evaluate(
    model: torch.nn.Module,
    processor,
    records: Sequence,
    pruner: Any = None,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    positions: str | None = None,
    options: dict | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    timing_repeats: int = 3,
    warmup: int = 1,
    loyalty: bool = True,
    score: Callable[[str, str], bool] | None = None,
    reference: dict | None = None,
) -> dict:
    """Score `pruner` (a name, a pruner object, or None for the unpruned model) on `records`.

    `reference`: the result of an earlier unpruned `evaluate` on the same records and settings; when given, loyalty
    and the unpruned numbers come from it instead of a fresh unpruned run (sweeps measure the baseline once).

    Returns a JSON-ready dict; see the module docstring for how each number is measured.
    """
    if score is None:
        from vtprune.eval.synthetic import is_correct as score
    if not records:
        raise ValueError("the benchmark has no records")
    device = _device(model)
    hidden, ffn, layers = llm_geometry(model.config)
    timing_batch = make_inputs(model, processor, records[:batch_size])

    def measure(label: str, handle=None) -> dict:
        predictions, stats, selection = answer(model, processor, records, batch_size, max_new_tokens, handle, desc=label)
        with torch.no_grad(), _PeakMemory(device) as memory:
            prefill = _min_time(lambda: model(**timing_batch, use_cache=False), device, timing_repeats, warmup)
            end_to_end = _min_time(
                lambda: model.generate(**timing_batch, max_new_tokens=max_new_tokens, do_sample=False),
                device,
                timing_repeats,
                warmup,
            )
        if handle is not None and handle.last_sequence is not None:
            lengths = handle.last_sequence.attention_mask.sum(dim=1).tolist()
        else:
            lengths = timing_batch["attention_mask"].sum(dim=1).tolist()
        return {
            "predictions": predictions,
            "stats": stats,
            "selection_ms": 1000 * statistics.mean(selection) if selection else 0.0,
            "prefill_ms": 1000 * prefill,
            "end_to_end_ms": 1000 * end_to_end,
            "peak_memory_mb": memory.peak_bytes / 2**20,
            "prefill_tflops": statistics.mean(prefill_flops(n, hidden, ffn, layers) for n in lengths) / 1e12,
        }

    unpruned = pruner is None or pruner == "none"
    if reference is not None:
        if reference.get("pruner") != "none" or reference.get("samples") != len(records):
            raise ValueError("reference must be an unpruned evaluate() result on the same records")
        if unpruned:
            return reference
        baseline = {key: reference[key] for key in ("prefill_ms", "end_to_end_ms", "peak_memory_mb", "prefill_tflops")}
        baseline["predictions"] = [p["prediction"] for p in reference["predictions"]]
    elif loyalty or unpruned:
        baseline = measure("unpruned")
    else:
        baseline = None
    if unpruned:
        run, name, hparams, budget = baseline, "none", {}, None
    else:
        handle = apply(model, pruner, keep=keep, ratio=ratio, positions=positions, **(options or {}))
        try:
            run = measure(f"{handle.pruner.name}", handle)
        finally:
            handle.remove()
        name, hparams, budget = handle.pruner.name, handle.pruner.hparams(), str(handle.pruner.budget)
        positions = handle.positions

    correct = [score(p, r.answer) for p, r in zip(run["predictions"], records)]
    per_type: dict[str, list[bool]] = defaultdict(list)
    for ok, record in zip(correct, records):
        per_type[getattr(record, "type", "all")].append(ok)
    if run["stats"]:
        tokens_in = [s.tokens_in for s in run["stats"]]
        tokens_out = [s.tokens_out for s in run["stats"]]
    else:  # unpruned: every placeholder reaches the LLM
        image_token = getattr(model.config, "image_token_id", None)
        counts = (timing_batch["input_ids"] == image_token).sum(dim=1).tolist() if image_token is not None else [0]
        tokens_in = tokens_out = [c for c in counts if c] or [0]
    result = {
        "pruner": name,
        "budget": budget,
        "hparams": hparams,
        "positions": positions,
        "samples": len(records),
        "accuracy": sum(correct) / len(correct),
        "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "loyalty": None,
        "visual_tokens_in": _summary(tokens_in),
        "visual_tokens_out": _summary(tokens_out),
        "prefill_tflops": run["prefill_tflops"],
        "flops_convention": CONVENTION,
        "prefill_ms": run["prefill_ms"],
        "end_to_end_ms": run["end_to_end_ms"],
        "peak_memory_mb": run["peak_memory_mb"],
        "selection_ms_per_image": run["selection_ms"],
        "timing": {"batch_size": min(batch_size, len(records)), "repeats": timing_repeats, "warmup": warmup,
                   "statistic": "min", "threads": torch.get_num_threads(), "device": str(device)},
        "predictions": [{"id": getattr(r, "id", i), "prediction": p, "answer": r.answer, "correct": ok}
                        for i, (r, p, ok) in enumerate(zip(records, run["predictions"], correct))],
    }
    if baseline is not None:
        agree = [score(p, b) for p, b in zip(run["predictions"], baseline["predictions"])]
        result["loyalty"] = sum(agree) / len(agree)
        result["unpruned"] = {key: baseline[key] for key in ("prefill_ms", "end_to_end_ms", "peak_memory_mb", "prefill_tflops")}
        result["unpruned"]["accuracy"] = sum(score(p, r.answer) for p, r in zip(baseline["predictions"], records)) / len(records)
    return result


def _summary(values: Sequence[float]) -> dict:
    return {"mean": float(statistics.mean(values)), "min": float(min(values)), "max": float(max(values))}
