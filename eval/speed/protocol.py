"""The timing protocol of one family (`run_case`, one row per pruner x budget in `_run_row`): a warm-up run
(whose peak memory is recorded), then the minimum over ``--repeats`` runs, pruned and oracle runs alternating; the
decoder-stack time is measured inside each call and scaled to full depth (`full_depth`); each row is judged
against `TARGETS`. The package docstring defines every field.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from vtprune.eval.speed.fixes import FIX_CANDIDATES
from vtprune.eval.speed.geometry import Case
from vtprune.eval.speed.identity import _capture_llm_inputs, _identity
from vtprune.eval.speed.measure import LayerClock, clock, mb, peak_memory, record_statistics

TARGETS = {
    "selection_pct_of_pruned_full": 3.0,  # selection <= 3 % of the full-depth pruned prefill
    "pruned_over_oracle_full": 1.03,  # pruned prefill <= 1.03 x oracle prefill
}


def full_depth(outside: float, layers: float, run_layers: int, full_layers: int) -> float:
    """A prefill at `full_layers` layers: the time outside the decoder stack plus the stack scaled linearly."""
    return outside + layers * full_layers / run_layers


def run_case(case: Case, names: list[str], args, log: Callable[[str], None]) -> dict:
    import vtprune
    from vtprune.errors import BudgetError

    started = time.perf_counter()
    model = case.build()
    log(f"[{case.name}] built in {time.perf_counter() - started:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, {case.llm_layers} LLM layers)")
    budgets = [b for b in (args.budgets or case.budgets) if b <= case.tokens_per_image()]
    integration_cls = case.integration_class()
    info = integration_cls(model, vtprune.create_pruner(names[0], keep=budgets[0]), **case.apply_options).encoder_info()
    layers = set().union(*(vtprune.create_pruner(n, keep=budgets[0]).attention_layers(info) for n in names))
    inputs = case.inputs()
    n_unpruned = inputs["input_ids"].shape[1]
    device = case.device
    result: dict[str, Any] = {
        "name": case.name, "label": case.label, "geometry": case.geometry, "budgets": budgets,
        "llm_layers": case.llm_layers, "full_layers": case.full_layers, "tokens_per_image": case.tokens_per_image(),
        "text_tokens": n_unpruned - case.tokens_per_image(), "seq_len_unpruned": n_unpruned,
        "score_blocks_captured": sorted(layers),
    }

    with torch.no_grad():
        cache, vision_times = case.time_vision(inputs, layers, args.vision_repeats)
        result["vision_encoder_ms"] = 1000 * min(vision_times)
        result["vision_encoder_runs_ms"] = [1000 * t for t in vision_times]
        log(f"[{case.name}] vision encoder {result['vision_encoder_ms']:.0f} ms (min of {len(vision_times)})")

        layer_clock = LayerClock(case.decoder_layers, device)
        captured, capture_handle = _capture_llm_inputs(case.language_model)
        forward = type(model).forward  # the unpatched forward, whatever is patched on the instance
        try:
            # ---------------------------------------------------------------- unpruned
            def unpruned_call():
                return forward(model, **case.unpruned_llm_inputs(inputs, cache), logits_to_keep=1)

            with peak_memory(device) as peak:  # warm-up run; its peak is recorded
                unpruned_call()
            unpruned_peak = peak["bytes"]
            totals, layer_times = [], []
            for _ in range(args.repeats):
                layer_clock.reset()
                start = clock(device)
                unpruned_call()
                totals.append(clock(device) - start)
                layer_times.append(layer_clock.seconds)
            unpruned = {
                "prefill_ms": 1000 * min(totals),
                "layers_ms": 1000 * min(layer_times),
                "outside_layers_ms": 1000 * min(t - l for t, l in zip(totals, layer_times)),
                "peak_mb": mb(unpruned_peak),
                "tflops": case.flops(n_unpruned) / 1e12,
            }
            unpruned["full_ms"] = full_depth(unpruned["outside_layers_ms"], unpruned["layers_ms"], case.llm_layers, case.full_layers)
            unpruned["peak_full_mb_est"] = None if unpruned_peak is None else mb(
                unpruned_peak + (case.full_layers - case.llm_layers) * case.kv_bytes_per_layer(n_unpruned))
            result["unpruned"] = unpruned
            log(f"[{case.name}] unpruned prefill {unpruned['prefill_ms']:.0f} ms at {case.llm_layers} layers, "
                f"{unpruned['full_ms']:.0f} ms at {case.full_layers} (est.)")

            heads, score_len = case.score_heads_and_length()
            map_mb = mb(heads * score_len * score_len * 4)
            rows, skipped = [], []
            for name in names:
                for keep in budgets:
                    try:
                        rows.append(_run_row(case, name, keep, inputs, cache, forward, layer_clock, captured,
                                             unpruned, n_unpruned, map_mb, result["vision_encoder_ms"], args, log))
                    except BudgetError as error:  # e.g. pool cannot tile a crop's share of a global budget
                        skipped.append({"pruner": name, "keep": keep, "reason": f"{type(error).__name__}: {error}"})
                        log(f"[{case.name}] {name:>10} keep={keep:<4} skipped: {error}")
        finally:
            layer_clock.remove()
            capture_handle.remove()
    result["rows"] = rows
    result["skipped"] = skipped
    result["seconds"] = time.perf_counter() - started
    return result


def _run_row(case, name, keep, inputs, cache, forward, layer_clock, captured, unpruned, n_unpruned, map_mb,
             vision_ms, args, log) -> dict:
    import vtprune

    model, device = case.model, case.device
    handle = vtprune.apply(model, name, **case.budget_options(keep), **case.apply_options)
    try:
        case.install_cache(handle, cache)

        def pruned_call():
            return model(**inputs, logits_to_keep=1)

        with peak_memory(device) as peak:  # warm-up; peak recorded
            pruned_call()
        pruned_peak = peak["bytes"]
        with peak_memory(device) as peak, record_statistics() as used:
            handle.integration.encode(dict(inputs))
        selection_peak = peak["bytes"]

        p_tot, p_lay, p_sel, o_tot, o_lay = [], [], [], [], []
        identity_ok, details = True, None
        for _ in range(args.repeats):
            layer_clock.reset()
            start = clock(device)
            out = pruned_call()
            p_tot.append(clock(device) - start)
            p_lay.append(layer_clock.seconds)
            p_sel.append(handle.selection_time)
            pruned_inputs = dict(captured)
            sequence, stats = handle.last_sequence, handle.stats
            oracle_kwargs = case.oracle_kwargs(sequence, pruned_inputs)
            layer_clock.reset()
            start = clock(device)
            oracle_out = forward(model, **oracle_kwargs, logits_to_keep=1)
            o_tot.append(clock(device) - start)
            o_lay.append(layer_clock.seconds)
            check = _identity(case, cache, pruned_inputs, dict(captured), sequence, stats[0], out, oracle_out)
            identity_ok = identity_ok and check["ok"]
            details = check
        fixes = {}
        for fix in FIX_CANDIDATES if not args.no_fix_candidates else ():
            if not fix.applies(case.name, name, used):
                continue
            with fix.patch():  # selection alone, as the patched model runs it
                with peak_memory(device) as fix_peak:
                    handle.integration.encode(dict(inputs))
                runs = [handle.integration.encode(dict(inputs)) for _ in range(args.repeats)]
            fixes[fix.name] = {
                "selection_ms": 1000 * min(r.selection_seconds for r in runs),
                "selection_peak_mb": mb(fix_peak["bytes"]),
                "same_kept": bool(torch.equal(runs[-1].stats[0].kept, stats[0].kept)),
            }
    finally:
        handle.remove()

    n_pruned = sequence.inputs_embeds.shape[1]
    L, F = case.llm_layers, case.full_layers
    # Pruned and oracle runs feed the decoder bit-identical inputs (identity check), so the stack time of both is
    # one measurement (min over all their runs); what differs is the time outside the stack.
    layers_ms = 1000 * min(p_lay + o_lay)
    pruned_outside = 1000 * min(t - l for t, l in zip(p_tot, p_lay))
    oracle_outside = 1000 * min(t - l for t, l in zip(o_tot, o_lay))
    pruned_full = full_depth(pruned_outside, layers_ms, L, F) / 1000
    oracle_full = full_depth(oracle_outside, layers_ms, L, F) / 1000
    selection_ms = 1000 * min(p_sel)
    row = {
        "family": case.name,
        "pruner": name,
        "keep": keep,
        "tokens_in": stats[0].tokens_in,
        "tokens_out": stats[0].tokens_out,
        "seq_len_unpruned": n_unpruned,
        "seq_len_pruned": n_pruned,
        "selection_ms": selection_ms,
        "pruned_prefill_ms": 1000 * min(p_tot),
        "oracle_prefill_ms": 1000 * min(o_tot),
        "unpruned_prefill_ms": unpruned["prefill_ms"],
        "pruned_layers_ms": 1000 * min(p_lay),
        "oracle_layers_ms": 1000 * min(o_lay),
        "pruned_outside_layers_ms": pruned_outside,
        "oracle_outside_layers_ms": oracle_outside,
        "vtprune_overhead_ms": pruned_outside - oracle_outside,
        "unpruned_layers_ms": unpruned["layers_ms"],
        "pruned_full_ms": 1000 * pruned_full,
        "oracle_full_ms": 1000 * oracle_full,
        "unpruned_full_ms": unpruned["full_ms"],
        "selection_pct_of_pruned_full": 100 * selection_ms / (1000 * pruned_full),
        "pruned_over_oracle": min(p_tot) / min(o_tot),
        "pruned_over_oracle_full": pruned_full / oracle_full,
        "speedup_full": unpruned["full_ms"] / (1000 * pruned_full),
        "vision_encoder_ms": vision_ms,
        "pruned_peak_mb": mb(pruned_peak),
        "unpruned_peak_mb": unpruned["peak_mb"],
        "selection_peak_mb": mb(selection_peak),
        "attention_map_mb": map_mb,
        "pruned_peak_full_mb_est": None if pruned_peak is None else mb(
            pruned_peak + (F - L) * case.kv_bytes_per_layer(n_pruned)),
        "unpruned_peak_full_mb_est": unpruned["peak_full_mb_est"],
        "pruned_tflops": case.flops(n_pruned) / 1e12,
        "unpruned_tflops": unpruned["tflops"],
        "flops_ratio": case.flops(n_pruned) / case.flops(n_unpruned),
        "uses": sorted(used),
        "identity_check": identity_ok,
        "identity_detail": details,
        "fix_candidates": fixes,
    }
    row["targets"] = _row_targets(row)
    log(f"[{case.name}] {name:>10} keep={keep:<4} selection {selection_ms:7.1f} ms | prefill pruned "
        f"{row['pruned_prefill_ms']:7.0f} oracle {row['oracle_prefill_ms']:7.0f} ms | full-depth speed-up "
        f"{row['speedup_full']:.2f}x | identity {'ok' if identity_ok else 'FAILED'}")
    return row


def _row_targets(row: dict) -> dict:
    cls_based = "cls_attention" in row["uses"]
    return {
        "selection_le_3pct": row["selection_pct_of_pruned_full"] <= TARGETS["selection_pct_of_pruned_full"],
        "pruned_le_1.03_oracle": row["pruned_over_oracle_full"] <= TARGETS["pruned_over_oracle_full"],
        "peak_pruned_le_unpruned": None if row["pruned_peak_mb"] is None or row["unpruned_peak_mb"] is None
        else row["pruned_peak_mb"] <= row["unpruned_peak_mb"],
        "no_attention_map": (row["selection_peak_mb"] < row["attention_map_mb"]) if cls_based and row["selection_peak_mb"] is not None else None,
    }
