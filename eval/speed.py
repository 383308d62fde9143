"""Speed benchmark: what visual-token pruning buys at real model widths, and what vtprune's selection costs.

    python eval/speed.py --out speed_results            # defaults: < 10 min on 2 CPU cores
    python eval/speed.py --families llava-next-7b --out speed_results_next   # opt-in, ~8 min
    python eval/speed.py --tiny --out /tmp/speed        # seconds; what the test suite runs

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

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

FLOPS_CONVENTION = "per decoder layer 4*n*d^2 + 2*n^2*d + 2*n*d*m (FastV / DivPrune), times the full depth"

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

TARGETS = {
    "selection_pct_of_pruned_full": 3.0,  # selection <= 3 % of the full-depth pruned prefill
    "pruned_over_oracle_full": 1.03,  # pruned prefill <= 1.03 x oracle prefill
}

MiB = 2.0**20
LONG_RUN_S = 2.0
"""Scaling study: a run longer than this is not repeated (min-of-N matters for short, noisy runs)."""
SHORT_RUN_S, SHORT_RUN_REPEATS = 0.1, 5
"""Scaling study: runs shorter than SHORT_RUN_S are repeated at least SHORT_RUN_REPEATS times."""


# ============================================================================================== measurement
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """A timestamp after every queued kernel has finished (synchronised timing on CUDA)."""
    synchronize(device)
    return time.perf_counter()


class LayerClock:
    """Times the decoder stack inside a call: hooks on the first layer's input and the last layer's output."""

    def __init__(self, layers, device: torch.device) -> None:
        self.device = device
        self.start: float | None = None
        self.end: float | None = None
        self._handles = [
            layers[0].register_forward_pre_hook(self._on_start),
            layers[-1].register_forward_hook(self._on_end),
        ]

    def _on_start(self, module, args) -> None:
        self.start = clock(self.device)

    def _on_end(self, module, args, output) -> None:
        self.end = clock(self.device)

    def reset(self) -> None:
        self.start = self.end = None

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the decoder layers did not run in the timed call")
        return self.end - self.start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _profile_peak_bytes(prof) -> int | None:
    """Maximum prefix sum of the CPU allocator's (de)allocation events recorded by the profiler."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - profiler internals moved
        return None
    records = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """``with peak_memory(device) as box: ...``; afterwards ``box["bytes"]`` is the step's peak (see the docstring)."""
    box: dict[str, int | None] = {"bytes": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        synchronize(device)
        box["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs "profiler_start/stop" lines on the C stderr at every start and stop
        prof.start()
    try:
        yield box
    finally:
        with _quiet_stderr():
            prof.stop()
    box["bytes"] = _profile_peak_bytes(prof)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C-level logging) for the duration of the block only."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def mb(nbytes: int | float | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


def prefill_flops(n: int, d: int, m: int, layers: int) -> float:
    """LLM prefill FLOPs in the FastV / DivPrune convention (see `FLOPS_CONVENTION`)."""
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def full_depth(outside: float, layers: float, run_layers: int, full_layers: int) -> float:
    """A prefill at `full_layers` layers: the time outside the decoder stack plus the stack scaled linearly."""
    return outside + layers * full_layers / run_layers


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


# ============================================================================================== cases
class Case:
    """One model family at real geometry. Subclasses know the model; the benchmark loop knows nothing of it.

    To add a family, implement the methods below and list the class in `CASES`.
    """

    name = ""
    label = ""
    budgets: tuple[int, ...] = ()
    full_layers = 0
    image_token_id = 0
    apply_options: ClassVar[dict[str, Any]] = {}
    """Family options every `vtprune.apply` of the benchmark passes (LLaVA-NeXT: its budget scope)."""

    def __init__(self, llm_layers: int, text_tokens: int, tiny: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.llm_layers = llm_layers or self.full_layers  # 0: full depth
        self.text_tokens = text_tokens
        self.tiny = tiny
        self.device = device
        self.dtype = dtype
        self.model: Any = None
        self.geometry: dict = {}
        self.hidden = self.ffn = self.kv_heads = self.head_dim = 0

    # ------------------------------------------------------------------ per family
    def integration_class(self):
        raise NotImplementedError

    def tokens_per_image(self) -> int:
        raise NotImplementedError

    def build(self) -> torch.nn.Module:
        """Build `self.model` (random weights, eval mode, SDPA) on `self.device` in `self.dtype`."""
        raise NotImplementedError

    def inputs(self) -> dict:
        """The keyword arguments of one call with one image, as the family's processor would give them."""
        raise NotImplementedError

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> "RunCache":
        """One vision-tower pass through the integration's own encoder step, capturing what pruners read."""
        raise NotImplementedError

    def time_vision(self, inputs: dict, attention_layers: set[int], repeats: int) -> tuple["RunCache", list[float]]:
        """Run the vision tower `repeats` times; return the last pass and the times."""
        integration = self.integration_class()(self.model, _any_pruner(), **self.apply_options)
        times, cache = [], None
        for _ in range(repeats):
            start = clock(self.device)
            cache = self.encode_once(integration, inputs, attention_layers)
            times.append(clock(self.device) - start)
        return cache, times

    def install_cache(self, handle, cache: "RunCache") -> None:
        """Make the patched model reuse the cached tower pass: the integration's own encode() still runs (and
        everything after it), only its `run_encoder` returns the cached pass."""
        handle.integration.run_encoder = lambda *args, **kwargs: cache.run

    def unpruned_llm_inputs(self, inputs: dict, cache) -> dict:
        """What the unpatched model computes after its tower: the LLM's ``inputs_embeds`` (and positions)."""
        raise NotImplementedError

    def _splice(self, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `ids` with `visual` scattered into the image placeholders, as the unpatched model."""
        embeds = self.model.get_input_embeddings()(ids)
        mask = (ids == self.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, visual.to(embeds.dtype))

    def expected_visual(self, cache, order: torch.Tensor) -> torch.Tensor:
        """LLM-space embeddings of the visual tokens `order`, recomputed independently of vtprune."""
        raise NotImplementedError

    def score_heads_and_length(self) -> tuple[int, int]:
        """Heads (times the images or crops the tower runs at once) and sequence length of the encoder block
        pruners score at (for the attention-map size)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers

    @property
    def language_model(self):
        return self.model.model.language_model

    def kv_bytes_per_layer(self, n: int) -> int:
        return 2 * n * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def flops(self, n: int) -> float:
        return prefill_flops(n, self.hidden, self.ffn, self.full_layers)

    def _construct(self, model_class, config) -> torch.nn.Module:
        """Build on the device in the benchmark dtype, initialising every weight once (N(0, 0.02), norms 1,
        biases 0): transformers' constructor would initialise twice, ~30 s for 1 B parameters on 2 cores."""
        from transformers.initialization import no_init_weights

        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), no_init_weights():
                model = model_class(config)
        finally:
            torch.set_default_dtype(previous)
        generator = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif param.ndim == 1 and "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        if getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.get_input_embeddings().weight
        model.set_attn_implementation("sdpa")
        return model.eval()

    @staticmethod
    def _text_ids(count: int, high: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(10, high, (count,), generator=generator)


class RunCache:
    """The cached tower pass: what the integration's `run_encoder` returned (LLaVA: an `EncoderRun` with
    features, CLS and captured block inputs; Qwen: a `QwenEncoderRun` with the merged tokens)."""

    def __init__(self, run) -> None:
        self.run = run


class LlavaCase(Case):
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (reduced depth)."""

    name = "llava-1.5-7b"
    label = "LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B width)"
    budgets = (192, 128, 64)
    full_layers = 32
    image_token_id = 32000  # llava-hf: <image> = 32000, vocab 32064

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tiny = self.tiny
        width, heads, layers, hidden, ffn, text_heads = (
            (32, 4, 4, 64, 128, 4) if tiny else (1024, 16, 24, 4096, 11008, 32)
        )
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, text_heads, hidden // text_heads
        self.geometry = {
            "vision": {"model": "CLIP ViT", "image_size": 336, "patch_size": 14, "hidden": width,
                       "intermediate": 4 * width, "layers": layers, "heads": heads},
            "projector": f"{width} -> {hidden} -> {hidden} (GELU)",
            "llm": {"model": "Llama (Vicuna-7B geometry)", "hidden": hidden, "intermediate": ffn, "heads": text_heads,
                    "kv_heads": text_heads, "vocab": 32064, "layers_run": self.llm_layers,
                    "layers_full": self.full_layers},
        }

    def integration_class(self):
        from vtprune.integrations.llava import LlavaIntegration

        return LlavaIntegration

    def tokens_per_image(self) -> int:
        return 576

    def _tower_and_llm_configs(self):
        """The CLIP ViT-L/14-336 tower and the Vicuna-7B-width Llama configs (shared with LLaVA-NeXT)."""
        from transformers import CLIPVisionConfig, LlamaConfig

        v, t = self.geometry["vision"], self.geometry["llm"]
        vision = CLIPVisionConfig(
            image_size=336, patch_size=14, hidden_size=v["hidden"], intermediate_size=v["intermediate"],
            num_hidden_layers=v["layers"], num_attention_heads=v["heads"], projection_dim=768,
        )
        text = LlamaConfig(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            max_position_embeddings=4096, pad_token_id=0,
        )
        return vision, text

    def build(self):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        vision, text = self._tower_and_llm_configs()
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=self.image_token_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", pad_token_id=0,
        )
        self.model = self._construct(LlavaForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        before = min(5, self.text_tokens)  # "USER: <image>\n{question} ASSISTANT:"
        ids = torch.cat([
            self._text_ids(before, 30000, g),
            torch.full((self.tokens_per_image(),), self.image_token_id),
            self._text_ids(self.text_tokens - before, 30000, g),
        ])[None]
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "pixel_values": torch.randn(*self._pixel_shape(), generator=g).to(self.device, self.dtype),
        }

    def _pixel_shape(self) -> tuple[int, ...]:
        return (1, 3, 336, 336)

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values"], -2, attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        embeds = self._splice(inputs["input_ids"], self.model.model.multi_modal_projector(cache.run.features))
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(cache.run.features[0][order.to(self.device)])

    def score_heads_and_length(self) -> tuple[int, int]:
        v = self.geometry["vision"]
        return v["heads"], 577


class QwenCase(Case):
    """Qwen2-VL-2B: Qwen2-VL ViT at 448 x 448 + Qwen2-1.5B (reduced depth)."""

    name = "qwen2-vl-2b"
    label = "Qwen2-VL-2B (Qwen2-VL ViT at 448x448, Qwen2-1.5B)"
    budgets = (192, 128, 64)
    full_layers = 28
    image_token_id = 151655

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tiny = self.tiny
        if tiny:
            vision = {"depth": 4, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2}
            hidden, ffn, heads, kv, mrope = 64, 128, 4, 2, [4, 2, 2]
        else:
            vision = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}
            hidden, ffn, heads, kv, mrope = 1536, 8960, 12, 2, [16, 24, 24]
        self.hidden, self.ffn, self.kv_heads, self.head_dim = hidden, ffn, kv, hidden // heads
        self.image_size = 448
        self.geometry = {
            "vision": {"model": "Qwen2-VL ViT", **vision, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "image_size": self.image_size, "out_hidden": hidden},
            "llm": {"model": "Qwen2 (Qwen2-1.5B geometry)", "hidden": hidden, "intermediate": ffn, "heads": heads,
                    "kv_heads": kv, "vocab": 151936, "mrope_section": mrope, "layers_run": self.llm_layers,
                    "layers_full": self.full_layers, "tie_word_embeddings": True},
        }

    def integration_class(self):
        from vtprune.integrations.qwen_vl import QwenVLIntegration

        return QwenVLIntegration

    @property
    def _side(self) -> int:
        return self.image_size // 14

    def tokens_per_image(self) -> int:
        return (self._side // 2) ** 2

    def build(self):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        v, t = self.geometry["vision"], self.geometry["llm"]
        text = dict(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
            num_hidden_layers=self.llm_layers, num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            max_position_embeddings=32768, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": t["mrope_section"], "rope_theta": 1000000.0},
        )
        vision = dict(
            depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=t["hidden"], num_heads=v["num_heads"],
            mlp_ratio=v["mlp_ratio"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        self.model = self._construct(Qwen2VLForConditionalGeneration, config)
        return self.model

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(1)
        side, tokens = self._side, self.tokens_per_image()
        before = min(4, self.text_tokens)  # "<|im_start|>user\n<|vision_start|>...<|vision_end|>{question}..."
        vision_start, vision_end = 151652, 151653
        ids = torch.cat([
            self._text_ids(before, 150000, g),
            torch.tensor([vision_start]),
            torch.full((tokens,), self.image_token_id),
            torch.tensor([vision_end]),
            self._text_ids(max(0, self.text_tokens - before - 2), 150000, g),
        ])[None]
        grid = torch.tensor([[1, side, side]])
        patches = side * side
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
            "mm_token_type_ids": (ids == self.image_token_id).int().to(self.device),
            "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=g).to(self.device, self.dtype),
            "image_grid_thw": grid.to(self.device),
        }

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> RunCache:
        return RunCache(integration.run_encoder(inputs["pixel_values"], inputs["image_grid_thw"], attention_layers))

    def unpruned_llm_inputs(self, inputs: dict, cache: RunCache) -> dict:
        ids = inputs["input_ids"]
        embeds = self._splice(ids, cache.run.merged)
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "position_ids": positions}

    def expected_visual(self, cache: RunCache, order: torch.Tensor) -> torch.Tensor:
        return cache.run.merged[order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        v = self.geometry["vision"]
        return v["num_heads"], self._side * self._side


class LlavaNextRunCache(RunCache):
    """The cached tower pass over every crop (`LlavaIntegration.run_encoder` on `crop_batch`'s batch), the crop
    counts and image sizes, and the unpatched packed visual sequence for the identity check (filled on first
    use, outside every timed region)."""

    def __init__(self, run, crops_per_image: list[int], image_sizes: torch.Tensor) -> None:
        super().__init__(run)
        self.crops_per_image = crops_per_image
        self.image_sizes = image_sizes
        self.packed: torch.Tensor | None = None


class LlavaNextCase(LlavaCase):
    """LLaVA-NeXT-7B (llava-v1.6-vicuna-7b geometry): CLIP ViT-L/14-336 anyres + Vicuna-7B (reduced depth).

    Tower, projector and LLM as `LlavaCase`; the llava-v1.6 `image_grid_pinpoints`. One 672 x 672 image: the
    2x2 pinpoint, so a base crop and four sub-crops, 5 x 576 = 2880 patch tokens; a square image on a square
    grid loses nothing to unpadding, and the unpatched model appends one newline per row of the 48 x 48
    sub-crop grid: it packs 576 + 48 x 49 = 2928 visual tokens (`tokens_per_image`, taken from the model's own
    `pack_image_features`). No image gets closer to 2880 packed: unpadding cuts rows or columns in pairs, so the
    nearest layouts are 2928 (nothing cut) and 2832 / 2830 (two columns / rows cut).

    ``budget_scope="global"``: `keep` is the total the LLM receives for the image, the 48 newlines included
    (keep=640 is 48 newlines + 592 patch tokens split equally over the five crops), which is what a budget of
    "640 / 320 / 160 of 2880" compares against. ``"per_crop"`` would apply `keep` to each of the five crops
    (5 x keep + 48 tokens). Pool cannot tile every equal share on a 24 x 24 crop (118 = 2 x 59): such rows
    are reported under ``skipped`` with the `BudgetError`, not measured.
    """

    name = "llava-next-7b"
    label = "LLaVA-NeXT-7B (CLIP ViT-L/14-336 anyres, Vicuna-7B width)"
    budgets = (640, 320, 160)
    full_layers = 32
    image_token_id = 32000  # llava-hf llava-v1.6-vicuna: <image> = 32000, vocab 32064
    apply_options: ClassVar[dict[str, Any]] = {"budget_scope": "global"}
    grid_pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    """llava-v1.6 resolutions, (height, width)."""
    image_size = (672, 672)
    """(height, width) of the benchmark image, as the processor reports it in ``image_sizes``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.geometry["anyres"] = {
            "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints], "image_size": list(self.image_size),
            "budget_scope": self.apply_options["budget_scope"],
        }
        self._packed_tokens: int | None = None
        self._crops = 0

    def integration_class(self):
        from vtprune.integrations.llava_next import LlavaNextIntegration

        return LlavaNextIntegration

    def tokens_per_image(self) -> int:
        if self._packed_tokens is None:
            raise RuntimeError("tokens_per_image() is known once build() has run")
        return self._packed_tokens

    def build(self):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vision, text = self._tower_and_llm_configs()
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=self.image_token_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=[list(p) for p in self.grid_pinpoints],
            image_seq_length=576, pad_token_id=0,
        )
        self.model = self._construct(LlavaNextForConditionalGeneration, config)
        self._crops = image_size_to_num_patches(list(self.image_size), config.image_grid_pinpoints, 336)
        # The length the unpatched model packs (unpadding, newlines), from its own code on placeholder features.
        placeholder = [torch.zeros(self._crops, 576, 1)]
        packed, _ = self.model.model.pack_image_features(
            placeholder, torch.tensor([self.image_size]), "default", image_newline=torch.zeros(1)
        )
        self._packed_tokens = int(packed[0].shape[0])
        self.geometry["anyres"].update(crops=self._crops, patch_tokens=self._crops * 576, packed_tokens=self._packed_tokens)
        return self.model

    def inputs(self) -> dict:
        return {**super().inputs(), "image_sizes": torch.tensor([self.image_size]).to(self.device)}

    def _pixel_shape(self) -> tuple[int, ...]:
        return (1, self._crops, 3, 336, 336)

    def encode_once(self, integration, inputs: dict, attention_layers: set[int]) -> LlavaNextRunCache:
        # Timed as the unpatched model pays it: crop batching, then the tower over every crop. The patched
        # model still runs its own crop_batch and reduce_anyres around the cached pass.
        pixel_values, crops_per_image = integration.crop_batch(inputs)
        run = integration.run_encoder(pixel_values, -2, attention_layers)
        return LlavaNextRunCache(run=run, crops_per_image=crops_per_image, image_sizes=inputs["image_sizes"])

    def _unpatched_packed(self, cache: LlavaNextRunCache) -> torch.Tensor:
        """What the unpatched get_image_features does after its tower: the projector on every crop at once,
        then the model's own pack_image_features (sub-crop grid, unpadding, newlines, base crop first)."""
        inner = self.model.model
        features = torch.split(inner.multi_modal_projector(cache.run.features), cache.crops_per_image, dim=0)
        packed, _ = inner.pack_image_features(features, cache.image_sizes, "default", image_newline=inner.image_newline)
        return torch.cat(packed, dim=0)

    def unpruned_llm_inputs(self, inputs: dict, cache: LlavaNextRunCache) -> dict:
        ids = inputs["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        packed = self._unpatched_packed(cache).to(embeds.dtype)
        mask = self.model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=packed)
        return {"inputs_embeds": embeds.masked_scatter(mask, packed), "attention_mask": inputs["attention_mask"]}

    def expected_visual(self, cache: LlavaNextRunCache, order: torch.Tensor) -> torch.Tensor:
        # For a pure selection, stats.order indexes the packed sequence (newline slots included), so the visual
        # columns are rows of what the unpatched model would have spliced in.
        if cache.packed is None:
            cache.packed = self._unpatched_packed(cache)
        return cache.packed[order.to(self.device)]

    def score_heads_and_length(self) -> tuple[int, int]:
        # The tower runs all crops as one batch, so one map of the score block covers every crop.
        return self.geometry["vision"]["heads"] * self._crops, 577


CASES: dict[str, type[Case]] = {"llava-1.5-7b": LlavaCase, "qwen2-vl-2b": QwenCase, "llava-next-7b": LlavaNextCase}
"""Benchmarked families."""

DEFAULT_FAMILIES = ("llava-1.5-7b", "qwen2-vl-2b")
"""What runs without ``--families``: llava-next-7b is opt-in (its 2928-token prefills at 7B width take about as
long as the two others together on 2 CPU cores; see the module docstring)."""


def _any_pruner():
    import vtprune

    return vtprune.create_pruner("random", keep=1)


# ============================================================================================== one family
def _capture_llm_inputs(language_model):
    box: dict[str, Any] = {}

    def hook(module, args, kwargs):
        box.clear()
        box.update({name: kwargs.get(name) for name in ("inputs_embeds", "attention_mask", "position_ids")})

    return box, language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _is_pure_selection(stat) -> bool:
    assigned = int((stat.assignment >= 0).sum())
    return bool((stat.order >= 0).all()) and assigned == stat.tokens_out


@contextlib.contextmanager
def record_statistics():
    """Record which attention statistics pruners ask `VisualTokens` for (one untimed call; methods restored)."""
    from vtprune.tokens import VisualTokens

    used: set[str] = set()
    originals = {name: getattr(VisualTokens, name) for name in ("cls_attention", "global_attention", "keys")}

    def wrap(name, method):
        def recorded(self, layer):
            used.add(name)
            return method(self, layer)

        return recorded

    try:
        for name, method in originals.items():
            setattr(VisualTokens, name, wrap(name, method))
        yield used
    finally:
        for name, method in originals.items():
            setattr(VisualTokens, name, method)


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
    handle = vtprune.apply(model, name, keep=keep, **case.apply_options)
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
            oracle_kwargs = {
                "inputs_embeds": sequence.inputs_embeds,
                "attention_mask": sequence.attention_mask,
                "position_ids": sequence.position_ids,
                **{k: v for k, v in sequence.extras.items() if v is not None},
            }
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


def _identity(case, cache, pruned_inputs: dict, oracle_inputs: dict, sequence, stat, out, oracle_out) -> dict:
    """The benchmark's own check that the oracle ran the very sequence the pruned run gave the LLM."""
    llm_inputs_equal = all(_same(pruned_inputs.get(k), oracle_inputs.get(k)) for k in ("inputs_embeds", "attention_mask", "position_ids"))
    logits_equal = _same(out.logits, oracle_out.logits)
    embeds = sequence.inputs_embeds[0]
    image_columns = sequence.input_ids[0] == case.image_token_id
    text_ids = sequence.input_ids[0][~image_columns]
    text_match = bool(torch.equal(embeds[~image_columns], case.model.get_input_embeddings()(text_ids)))
    count_match = int(image_columns.sum()) == stat.tokens_out
    kept_match = None
    if _is_pure_selection(stat):
        expected = case.expected_visual(cache, stat.order).to(embeds.dtype)
        tol = 1e-4 if embeds.dtype == torch.float32 else 2e-2
        kept_match = bool(torch.allclose(embeds[image_columns], expected, rtol=tol, atol=tol))
    ok = llm_inputs_equal and text_match and count_match and kept_match is not False
    return {"ok": ok, "llm_inputs_equal": llm_inputs_equal, "logits_equal": logits_equal, "text_match": text_match,
            "visual_count_match": count_match, "kept_visual_match": kept_match}


def _row_targets(row: dict) -> dict:
    cls_based = "cls_attention" in row["uses"]
    return {
        "selection_le_3pct": row["selection_pct_of_pruned_full"] <= TARGETS["selection_pct_of_pruned_full"],
        "pruned_le_1.03_oracle": row["pruned_over_oracle_full"] <= TARGETS["pruned_over_oracle_full"],
        "peak_pruned_le_unpruned": None if row["pruned_peak_mb"] is None or row["unpruned_peak_mb"] is None
        else row["pruned_peak_mb"] <= row["unpruned_peak_mb"],
        "no_attention_map": (row["selection_peak_mb"] < row["attention_map_mb"]) if cls_based and row["selection_peak_mb"] is not None else None,
    }


# ============================================================================================== scaling with N
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


class ClsRowProbe:
    """Candidate core fix, measured here only: the CLS row needs the CLS query alone, not q for all N tokens.

    Wraps a `ClipAttentionProbe` (same block weights, same captured ``block_inputs``): `cls_attention` and
    `keys` project keys for every token but the query of token 0 only (the probe projects q for all S tokens
    and then uses row 0). Global attention is delegated unchanged.
    """

    def __init__(self, probe) -> None:
        self.probe = probe
        self._k: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cls: dict[int, torch.Tensor] = {}

    def _x_and_k(self, layer):
        if layer not in self._k:
            block = self.probe.blocks[layer]
            attn = block.self_attn
            x = block.layer_norm1(self.probe.block_inputs[layer])
            images, length, _ = x.shape
            k = attn.k_proj(x).view(images, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
            self._k[layer] = (x, k)
        return self._k[layer]

    def cls_attention(self, layer, image):
        if layer not in self._cls:
            attn = self.probe.blocks[layer].self_attn
            x, k = self._x_and_k(layer)
            q = attn.q_proj(x[:, :1]).view(x.shape[0], attn.num_heads, 1, attn.head_dim).float() * attn.scale
            self._cls[layer] = (q @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0, self.probe.visual]
        return self._cls[layer][image]

    def global_attention(self, layer, image):
        return self.probe.global_attention(layer, image)

    def keys(self, layer, image):
        _, k = self._x_and_k(layer)
        return k[image].mean(dim=0)[self.probe.visual]


@contextlib.contextmanager
def _replaced(original, replacement):
    """Temporarily rebind every vtprune module attribute that is `original` (including names imported
    elsewhere with ``from ... import``) to `replacement`; everything is restored on exit."""
    bound = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("vtprune"):
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                bound.append((module, attribute))
    try:
        for module, attribute in bound:
            setattr(module, attribute, replacement)
        yield
    finally:
        for module, attribute in bound:
            setattr(module, attribute, original)


@contextlib.contextmanager
def _query_chunk(chunk: int):
    """Global attention (`vtprune.attention.received_attention`) accumulated over `chunk` queries at a time."""
    import vtprune.attention as module

    original = module.received_attention

    def received_attention(queries, keys, chunk_=None):
        return original(queries, keys, chunk=chunk)

    with _replaced(original, received_attention):
        yield


@contextlib.contextmanager
def _cls_query_only():
    import vtprune.integrations.clip_attention as module

    original = module.ClipAttentionProbe

    def probe(*args, **kwargs):
        return ClsRowProbe(original(*args, **kwargs))

    with _replaced(original, probe):
        yield


class FixCandidate:
    """A core change tried by a temporary patch of the vtprune modules (nothing in vtprune/ is edited).

    ``applies(family, pruner_name, statistics_used)`` says where it can change anything.
    """

    def __init__(self, name: str, description: str, applies, patch) -> None:
        self.name, self.description, self.applies, self.patch = name, description, applies, patch


FIX_CANDIDATES = (
    FixCandidate(
        "cls_query_only",
        "ClipAttentionProbe: the CLS row projects the CLS query only (the probe projects q for all S tokens)",
        applies=lambda family, name, used: "cls_attention" in used,
        patch=_cls_query_only,
    ),
)


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
    import vtprune.integrations.clip_attention as clip_attention
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


# ============================================================================================== report
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


# ============================================================================================== main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "command": "python eval/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
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


if __name__ == "__main__":
    main()
