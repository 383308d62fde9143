"""The scaling study: selection time vs the number of visual tokens N on the llava-1.5-7b case's CLIP blocks and
projector (`run_scaling`), the pruner alone (`algorithm_ms`), the cost of each statistic, and the growth
exponents; its grids (`near_square_grid`) and budgets (`scaling_keep`).
"""

from __future__ import annotations

import math

import torch

from vtprune.eval.speed.fixes import FIX_CANDIDATES, _cls_query_only, _query_chunk
from vtprune.eval.speed.geometry import LlavaCase, _any_pruner
from vtprune.eval.speed.measure import clock, mb, peak_memory, record_statistics

LONG_RUN_S = 2.0
"""Scaling study: a run longer than this is not repeated (min-of-N matters for short, noisy runs)."""
SHORT_RUN_S, SHORT_RUN_REPEATS = 0.1, 5
"""Scaling study: runs shorter than SHORT_RUN_S are repeated at least SHORT_RUN_REPEATS times."""


def near_square_grid(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def scaling_keep(n: int, grid: tuple[int, int]) -> int:
    """``round(N * 64 / 576)``, moved to the nearest budget the pool baseline can tile on `grid`."""
    from vtprune.pruners.pool import pool_grid

    target = max(1, round(n * 64 / 576))
    for delta in range(0, n):
        for k in (target - delta, target + delta):
            if 1 <= k <= n:
                try:
                    pool_grid(k, *grid)
                    return k
                except Exception:
                    pass
    return target


def _slope(ns: list[int], ts: list[float]) -> float | None:
    points = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if t and t > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else None


EXPECTED_EXPONENT = {
    # selection at keep ~ N/9, what the algorithm needs (d, D fixed): see run_scaling's docstring.
    "random": 1.0, "fastervlm": 1.0, "pool": 1.0, "visionzip": 2.0, "hiprune": 2.0, "divprune": 2.0,
}


def run_scaling(case: LlavaCase, names: list[str], ns: list[int], repeats: int, log, fix_candidates: bool = True) -> dict:
    """Selection time vs N on the LLaVA case's CLIP blocks and projector.

    What each method needs (keep ~ N/9, vision width d, LLM width D): random O(N) + projecting K kept tokens
    O(K d D); fastervlm O(N d^2) (keys of every token; the CLS row itself is O(N d)) + top-k + projection of
    K; pool (LLM space) O(N d D) for projecting all tokens; visionzip O(N d^2) + O(N K) for matching the
    remaining tokens to ~K/6 contextual targets; hiprune O(N^2 d) (global attention, two blocks); divprune
    O(N d D) projection + O(N^2 D) distances + O(K N) greedy.
    """
    import vtprune
    import vtprune.integrations.common.clip_attention as clip_attention
    from vtprune.integration import reduce_images
    from vtprune.tokens import TensorProbe

    model, device, dtype = case.model, case.device, case.dtype
    integration = case.integration_class()(model, _any_pruner())
    blocks = integration._blocks
    projector = model.model.multi_modal_projector
    info = integration.encoder_info()
    width = case.geometry["vision"]["hidden"]
    heads = case.geometry["vision"]["heads"]
    layers = {info.feature_layer}.union(*(vtprune.create_pruner(n, keep=64).attention_layers(info) for n in names))
    g = torch.Generator().manual_seed(2)
    rows, per_n = [], []

    def runs_for(elapsed: float, count: int) -> int:
        # Long runs are not repeated (their relative noise is small); short ones get at least SHORT_RUN_REPEATS.
        if elapsed > LONG_RUN_S:
            return 1
        return max(count, SHORT_RUN_REPEATS) if elapsed < SHORT_RUN_S else max(1, count)

    def timed(fn, count):
        """Min over `count` runs (see runs_for); returns (best seconds, last value)."""
        best, value, done, wanted = float("inf"), None, 0, 1
        while done < wanted:
            start = clock(device)
            value = fn()
            elapsed = clock(device) - start
            best = min(best, elapsed)
            done += 1
            wanted = runs_for(best, count)
        return best, value

    def selection(run, count):
        """Like `timed`, but the time is reduce_images' own selection_seconds; returns (best, last result)."""
        best, result, done, wanted = float("inf"), None, 0, 1
        while done < wanted:
            result = run()
            best = min(best, result.selection_seconds)
            done += 1
            wanted = runs_for(best, count)
        return best, result

    feature_layer = info.feature_layer
    with torch.no_grad():
        for n in ns:
            grid = near_square_grid(n)
            keep = scaling_keep(n, grid)
            block_inputs = {layer: torch.randn(1, n + 1, width, generator=g).to(device, dtype) for layer in layers}
            features = torch.randn(n, width, generator=g).to(device, dtype)
            cls = torch.randn(width, generator=g).to(device, dtype)

            def fresh_probe():  # the class is looked up at call time, so candidate patches apply
                return clip_attention.ClipAttentionProbe(blocks, block_inputs, visual=slice(1, None))

            # Cost of each statistic from a fresh probe (nothing cached across calls); the values are kept to serve
            # the pruners precomputed (algorithm-only timing).
            stat_ms, cls_rows, global_rows, key_rows = {}, {}, {}, {}
            t, _ = timed(lambda: fresh_probe()._queries_keys(feature_layer), repeats)
            stat_ms["qk_projection_ms"] = 1000 * t
            for layer in sorted(layers):
                t_cls, cls_rows[layer] = timed(lambda: fresh_probe().cls_attention(layer, 0), repeats)
                t_glob, global_rows[layer] = timed(lambda: fresh_probe().global_attention(layer, 0), repeats)
                t_keys, key_rows[layer] = timed(lambda: fresh_probe().keys(layer, 0), repeats)
                if layer == feature_layer:
                    stat_ms["cls_attention_ms"] = 1000 * t_cls
                    stat_ms["global_attention_ms"] = 1000 * t_glob
                    stat_ms["keys_ms"] = 1000 * t_keys
            with _cls_query_only():
                t, _ = timed(lambda: fresh_probe().cls_attention(feature_layer, 0), repeats)
            stat_ms["cls_attention_cls_query_only_ms"] = 1000 * t
            with _query_chunk(64):
                t, _ = timed(lambda: fresh_probe().global_attention(feature_layer, 0), repeats)
            stat_ms["global_attention_query_chunk_64_ms"] = 1000 * t
            t, embeddings = timed(lambda: projector(features), repeats)
            stat_ms["project_all_ms"] = 1000 * t
            tensor_probe = TensorProbe(
                cls_attention={l: v[None] for l, v in cls_rows.items()},
                global_attention={l: v[None] for l, v in global_rows.items()},
                keys={l: v[None] for l, v in key_rows.items()},
            )
            map_mb = mb(heads * (n + 1) ** 2 * 4)
            per_n.append({"n": n, "grid": list(grid), "keep": keep, "attention_map_mb": map_mb, **stat_ms})
            log(f"[scaling] N={n} grid={grid} keep={keep}: " + ", ".join(f"{k[:-3]} {v:.0f} ms" for k, v in stat_ms.items()))

            for name in names:
                pruner = vtprune.create_pruner(name, keep=keep)

                def full(pruner=pruner):
                    return reduce_images(pruner, [features], [grid], info, project=projector, probe=fresh_probe(),
                                         cls_features=[cls], projected=lambda: [projector(features)])

                def algorithm(pruner=pruner):
                    return reduce_images(pruner, [features], [grid], info, project=lambda x: x, probe=tensor_probe,
                                         cls_features=[cls], projected=lambda: [embeddings])

                with peak_memory(device) as peak, record_statistics() as used:  # warm-up run, peak memory
                    full()
                sel, before = selection(full, repeats)
                alg, _ = selection(algorithm, repeats)
                row = {"pruner": name, "n": n, "grid": list(grid), "keep": keep, "selection_ms": 1000 * sel,
                       "algorithm_ms": 1000 * alg, "selection_peak_mb": mb(peak["bytes"]), "attention_map_mb": map_mb,
                       "uses": sorted(used), "fix_candidates": {}}
                for fix in FIX_CANDIDATES if fix_candidates else ():
                    if not fix.applies(case.name, name, used):
                        continue
                    with fix.patch():
                        with peak_memory(device) as fix_peak:
                            full()
                        fixed, after = selection(full, repeats)
                    row["fix_candidates"][fix.name] = {
                        "selection_ms": 1000 * fixed,
                        "speedup": sel / fixed,
                        "selection_peak_mb": mb(fix_peak["bytes"]),
                        "same_kept": bool(torch.equal(before.stats[0].kept, after.stats[0].kept)),
                    }
                rows.append(row)
                fixes = ", ".join(f"{k}: {v['selection_ms']:.1f} ms / {v['selection_peak_mb'] or 0:.1f} MiB"
                                  for k, v in row["fix_candidates"].items())
                log(f"[scaling] N={n:>5} {name:>10}: selection {1000 * sel:8.1f} ms, algorithm {1000 * alg:8.1f} ms, "
                    f"peak {row['selection_peak_mb'] or 0:.1f} MiB (one {heads}xSxS map: {map_mb:.0f} MiB)"
                    + (f" | with {fixes}" if fixes else ""))
            del block_inputs, tensor_probe, embeddings, cls_rows, global_rows, key_rows

    growth = {}
    for name in names:
        mine = sorted((r for r in rows if r["pruner"] == name), key=lambda r: r["n"])
        ns_ = [r["n"] for r in mine]
        expected = EXPECTED_EXPONENT.get(name)
        times = [r["selection_ms"] for r in mine]
        sel_exp = _slope(ns_, times)
        alg_exp = _slope(ns_, [r["algorithm_ms"] for r in mine])
        # Local slopes between consecutive N: a growth problem shows in every segment, one noisy run in one.
        local = [_slope(ns_[i : i + 2], times[i : i + 2]) for i in range(len(ns_) - 1)]
        local = [x for x in local if x is not None]
        growth[name] = {
            "selection_exponent": sel_exp,
            "selection_local_exponents": local,
            "algorithm_exponent": alg_exp,
            "expected_exponent_at_most": expected,
            "worse_than_required": None if expected is None or not local else min(local) > expected + 0.3,
        }
    return {"ns": ns, "keep_rule": "round(N*64/576), nearest budget pool can tile", "per_n": per_n, "rows": rows,
            "fix_candidates": {f.name: f.description for f in FIX_CANDIDATES} if fix_candidates else {},
            "growth": growth, "geometry": "CLIP ViT-L/14 blocks of the llava-1.5-7b case, projector to its LLM width"}
