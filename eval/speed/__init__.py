"""Speed benchmark: what visual-token pruning buys at real model widths, and what vtprune's selection costs.

    python -m vtprune.eval.speed --out speed_results            # defaults: < 10 min on 2 CPU cores
    python -m vtprune.eval.speed --families llava-next-7b --out speed_results_next   # opt-in, ~8 min
    python -m vtprune.eval.speed --families qwen2-vl-2b-video --out speed_results_video  # opt-in
    python -m vtprune.eval.speed --families gemma-3-4b internvl3-2b --out speed_results_new  # opt-in
    python -m vtprune.eval.speed --tiny --out /tmp/speed        # seconds; what the test suite runs

Models (random weights, eval mode, ``torch.no_grad``; fp32 on CPU, fp16 on CUDA; SDPA attention):

- ``llava-1.5-7b``: `LlavaForConditionalGeneration` with the CLIP ViT-L/14-336 tower (24 blocks, width 1024,
  16 heads, 576 tokens per image), the 1024 -> 4096 -> 4096 projector, and a Llama LLM of Vicuna-7B width
  (hidden 4096, FFN 11008, 32 heads, vocab 32064 as llava-hf) but only ``--llm-layers`` decoder layers
  (default 2 on CPU: a 7B in fp32 does not fit 24 GiB; all 32 on CUDA). Budgets 192 / 128 / 64.
- ``qwen2-vl-2b``: `Qwen2VLForConditionalGeneration` with the Qwen2-VL ViT (depth 32, width 1280, 16 heads,
  patch 14, 2x2 merger to 1536) at 448 x 448 (1024 patches -> 256 LLM tokens) and a Qwen2-1.5B LLM
  (hidden 1536, FFN 8960, 12 heads, 2 KV heads, vocab 151936, tied embeddings), reduced depth likewise
  (full depth 28). Budgets 192 / 128 / 64 of 256.
- ``llava-next-7b`` (opt-in: not in the default ``--families``): `LlavaNextForConditionalGeneration` with the
  same tower, projector and LLM as ``llava-1.5-7b`` (reduced depth likewise, full depth 32) and the llava-v1.6
  ``image_grid_pinpoints``. One 672 x 672 image: base crop + 2x2 sub-crops = 5 x 576 = 2880 patch tokens, nothing
  unpadded, plus one newline per row of the 48 x 48 sub-crop grid: the unpatched model packs 2928 visual tokens
  (``tokens_per_image``). Budgets 640 / 320 / 160 with ``budget_scope="global"``: `keep` is the total the LLM
  receives for the image, the 48 newlines included (``per_crop`` would give each of the five crops `keep`).
  Pool cannot tile every crop's equal share on 24 x 24 (640: 118 = 2 x 59): such rows are listed under the
  family's ``skipped`` with the `BudgetError`. Its 2976-token unpruned prefills at 7B width make this family
  take about 7-9 min on 2 CPU cores, as long as the two others together, hence opt-in (the scaling study
  below runs with ``llava-1.5-7b`` only).
- ``qwen2-vl-2b-video`` (opt-in): the ``qwen2-vl-2b`` model on a video of 16 frames at 448 x 448: 8 temporal
  groups of 16 x 16 merged tokens, 2048 video tokens, one selection over the whole clip
  (``video_scope="video"``). Budgets 512 / 205 (25 % and 10 %) as ``video_keep``.
- ``qwen3-vl-2b`` (opt-in): `Qwen3VLForConditionalGeneration` at Qwen3-VL-2B geometry: its ViT (depth 24, width
  1024, 16 heads, patch 16, learned 48 x 48 position grid, DeepStack taps at blocks 5 / 11 / 17, 2x2 merger to 2048)
  at 512 x 512 (1024 patches -> 256 LLM tokens) and its Qwen3 LLM (hidden 2048, FFN 6144, 16 heads, 8 KV heads,
  head dim 128, interleaved M-RoPE, vocab 151936, tied), reduced depth (full depth 28). Budgets 192 / 128 / 64.
  The unpruned run, the oracle and the pruned run all add DeepStack (the unpatched model builds it from the
  tokens handed in as ``mm_encoder_outputs``: all 256, or the kept ones), and the identity check compares the
  ``visual_pos_masks`` and levels the language model received.
- ``gemma-3-4b`` (opt-in): `Gemma3ForConditionalGeneration` at Gemma-3-4B geometry: its SigLIP tower (27 blocks,
  width 1152, 16 heads, patch 14, no CLS) at 896 x 896 (4096 patches, average-pooled 4 x 4 by the projector to 256
  LLM tokens) and its Gemma 3 LLM (hidden 2560, FFN 10240, 8 heads, 4 KV heads, head dim 256, sliding window 1024,
  vocab 262208, tied), reduced depth (full depth 34). Budgets 192 / 128 / 64. Every run passes ``token_type_ids``,
  so the LLM's bidirectional image block covers the 256 tokens, or the kept ones.
- ``internvl3-2b`` (opt-in): `InternVLForConditionalGeneration` at InternVL3-2B geometry: InternViT-300M (24
  blocks, width 1024, 16 heads, a CLS token, patch 14) on five 448 px tiles (an 896 x 896 image: 2 x 2 tiles and
  the thumbnail), pixel shuffle 0.5 to 256 tokens a tile (1280 in all), the LayerNorm + MLP projector, and a
  Qwen2.5-1.5B LLM (hidden 1536, FFN 8960, 12 heads, 2 KV heads, tied), reduced depth (full depth 28). Budgets 640 /
  320 / 160 with ``budget_scope="global"`` (the image's total, split equally over the five tiles).

Each prompt is one image and ``--text-tokens`` (default 48) text tokens, batch 1.

Definitions (every time is the minimum over ``--repeats`` runs after one warm-up run; the warm-up run is the
one whose peak memory is recorded):

- ``vision_encoder_ms``: the vision tower forward alone (post-encoder pruning does not shorten it; LLaVA-NeXT:
  all five crops in one batch, as the unpatched model runs them).
- The vision tower runs once per model; its output (features and the captured block inputs pruners read) is
  cached, and the patched model is made to reuse it (`Case.install_cache`), so every prefill below starts from
  the visual features, exactly where vtprune starts.
- ``unpruned_prefill_ms``: what the unpatched model does after its tower: projector on all N tokens (LLaVA;
  NeXT: then its own ``pack_image_features``: sub-crop grid, unpadding, newlines), splice into the token
  embeddings (Qwen: plus its M-RoPE ids), and the unpatched forward with
  ``inputs_embeds`` (LLM prefill + logits of the last position, ``logits_to_keep=1``, KV cache built).
- ``pruned_prefill_ms``: the patched model's forward with ``vtprune.apply(model, pruner, keep=K)``: selection
  (attention statistics recomputed from the captured block inputs, the pruner, projecting the tokens the LLM
  receives: ``handle.selection_time``), building the pruned sequence, and the same LLM prefill on it.
- ``oracle_prefill_ms``: the unpatched forward on exactly the pruned sequence of the pruned run
  (``handle.last_sequence``: embeddings, mask, positions), i.e. the same kept indices for free.
  Pruned and oracle runs alternate, so machine drift hits both alike.
- ``identity_check``: computed by the benchmark for every row. The LLM inputs captured (a hook on the language
  model) in the pruned run and in the oracle run are bit-identical; the text columns are the token embeddings;
  for pure-selection pruners the visual columns are the projected features of ``handle.stats[0].order``
  (recomputed independently, allclose; NeXT: ``order`` indexes the packed sequence, so they are those rows of
  the unpatched model's own packed features, newlines included); the oracle's logits are compared too
  (``identity_detail``).
- Full depth: the decoder-stack time is measured inside each call (hooks on the first and last decoder
  layer) and scaled linearly, ``full = outside + layers * full_layers / llm_layers`` (prefill time is linear
  in the number of identical layers); ``outside = total - layers`` is everything else (selection, building the
  sequence, embeddings, final norm, lm_head). Pruned and oracle runs feed the stack bit-identical inputs, so
  their stack time is one quantity (min over both kinds of runs) and they differ only in ``outside``:
  ``vtprune_overhead_ms = pruned outside - oracle outside``. ``*_full_ms`` are these estimates; ``*_ms`` the
  measured times at ``llm_layers``.
- ``selection_pct_of_pruned_full``: ``selection_ms / pruned_full_ms`` (target <= 3 %);
  ``pruned_over_oracle_full``: ``pruned_full_ms / oracle_full_ms`` (target <= 1.03);
  ``speedup_full``: ``unpruned_full_ms / pruned_full_ms``.
- Peak memory: bytes allocated by torch during the step above what was allocated before it (weights, the
  cached encoder output excluded). CPU: exact sum of torch's CPU-allocator events recorded by
  ``torch.profiler(profile_memory=True)`` (prefix-sum maximum); it misses memory that MKL/oneDNN allocate on
  their own and allocator fragmentation (RSS would include those, but RSS is monotonic in-process).
  CUDA: ``max_memory_allocated - memory_allocated`` after ``reset_peak_memory_stats``. Measured at
  ``llm_layers``; ``*_peak_full_mb_est`` adds the KV cache of the missing layers (2 x n x kv_heads x
  head_dim x bytes each; activations are freed layer by layer under no_grad). ``selection_peak_mb`` is the
  reduction alone; ``attention_map_mb`` is what one B x H x S x S fp32 attention map of the score block
  would take (the no-full-map target: ``selection_peak_mb`` must stay below it for CLS-based pruners).
- FLOPs (FastV / DivPrune convention, reference 0.6): per decoder layer ``4 n d^2 + 2 n^2 d + 2 n d m``
  (n = sequence length, d = hidden, m = FFN width), times the full depth; LLM prefill only, selection and
  vision tower not counted. Check: LLaVA-1.5-7B with 576 visual + 60 text tokens gives 3.31 TFLOPs.
- Scaling (``--scaling-n``, default 576 / 2880 / 5000 tokens, ``keep ~ N/9`` as 64/576 and 320/2880): per
  pruner, ``selection_ms`` exactly as the LLaVA integration runs it (real CLIP-L blocks recomputing attention
  from a random block input of N+1 tokens, the real projector), ``algorithm_ms`` the pruner alone (statistics
  and projected embeddings served precomputed by a `TensorProbe`), the growth exponent of both (log-log
  slope), and the cost of each statistic (CLS row, global attention, keys, projecting all N tokens).
  Grids are single ``rows x cols`` rectangles (LLaVA-NeXT's 2880 are five crops; per-crop pruning is linear).
  Runs longer than 2 s are not repeated; runs shorter than 0.1 s are repeated at least 5 times.
- ``fix_candidates`` (rows and scaling): core changes tried by temporary patches of the vtprune modules
  (restored afterwards; see `FIX_CANDIDATES`; ``--no-fix-candidates`` skips them): selection time, selection
  peak memory, and whether the kept tokens are unchanged (a different summation order can swap near-ties).

Outputs under ``--out``: ``results.json`` (every field above), ``table.md`` (printed too) and ``speed.png``
(prefill latency vs visual tokens; only when matplotlib is installed, which vtprune does not require).
"""

# The files, by concern. Imports only point down these layers, never up or sideways within one: cli (and
# __main__); protocol, scaling, report; identity, fixes, geometry; measure; then torch and the vtprune library.
#   geometry.py  the families at real geometry (`Case` and its subclasses, `CASES`), FLOPs of a geometry
#   measure.py   device, synchronised clock, `LayerClock`, peak memory, `record_statistics`
#   identity.py  the identity check (pruned run vs oracle)
#   fixes.py     candidate core changes tried by temporary patches (`FIX_CANDIDATES`)
#   protocol.py  the timing protocol of one family (`run_case`: one row per pruner x budget), row targets
#   scaling.py   the scaling study (selection time vs N)
#   report.py    results.json fields, environment, markdown table, plot, target summary
#   cli.py       `parse_args`, `main`; __main__.py runs it
from vtprune.eval.speed.cli import main, parse_args
from vtprune.eval.speed.fixes import FIX_CANDIDATES, ClsRowProbe, FixCandidate
from vtprune.eval.speed.geometry import (
    CASES, DEFAULT_FAMILIES, FLOPS_CONVENTION, Case, Gemma3Case, InternVLCase, LlavaCase, LlavaNextCase, LlavaNextRunCache,
    Qwen3VLCase, QwenCase, RunCache, prefill_flops,
)
from vtprune.eval.speed.measure import MiB, LayerClock, clock, mb, peak_memory, pick_device, record_statistics, synchronize
from vtprune.eval.speed.protocol import TARGETS, full_depth, run_case
from vtprune.eval.speed.report import ROW_FIELDS, SCALING_FIELDS, cpu_model, environment, markdown, plot, summarize_targets
from vtprune.eval.speed.scaling import (
    EXPECTED_EXPONENT, LONG_RUN_S, SHORT_RUN_REPEATS, SHORT_RUN_S, near_square_grid, run_scaling, scaling_keep,
)

__all__ = [
    "CASES", "DEFAULT_FAMILIES", "EXPECTED_EXPONENT", "FIX_CANDIDATES", "FLOPS_CONVENTION", "LONG_RUN_S", "ROW_FIELDS",
    "SCALING_FIELDS", "SHORT_RUN_REPEATS", "SHORT_RUN_S", "TARGETS", "Case", "ClsRowProbe", "FixCandidate", "Gemma3Case",
    "InternVLCase", "LayerClock",
    "LlavaCase", "LlavaNextCase", "LlavaNextRunCache", "MiB", "Qwen3VLCase", "QwenCase", "RunCache", "clock", "cpu_model",
    "environment", "full_depth", "main", "markdown", "mb", "near_square_grid", "parse_args", "peak_memory",
    "pick_device", "plot", "prefill_flops", "record_statistics", "run_case", "run_scaling", "scaling_keep",
    "summarize_targets", "synchronize",
]
