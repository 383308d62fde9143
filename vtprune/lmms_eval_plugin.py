"""lmms-eval plugin: lmms-eval's own LLaVA-HF, Qwen2-VL and Qwen2.5-VL models with vtprune patched in.

Installing vtprune registers three models with lmms-eval (entry-point group ``lmms_eval.models``, lmms-eval
0.6+). Each one subclasses lmms-eval's class of the same family, pops vtprune's arguments from ``--model_args``
before delegating to it, and patches the model it loaded with `vtprune.apply`:

==========================  =====================================================  ======================
``--model``                 lmms-eval classes wrapped (simple / chat)              checkpoints
==========================  =====================================================  ======================
``vtprune_llava_hf``        ``llava_hf`` (both)                                    LLaVA-1.5 (and what
                                                                                   ``llava_hf`` loads)
``vtprune_qwen2_vl``        ``qwen2_vl`` (simple only, as in lmms-eval)            Qwen2-VL
``vtprune_qwen2_5_vl``      ``qwen2_5_vl`` (both)                                  Qwen2.5-VL
==========================  =====================================================  ======================

Like lmms-eval's own ids, a model with both classes runs the chat class unless ``--force_simple`` is given.

Single GPU::

    pip install "vtprune[lmms]"
    lmms-eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pruner=visionzip,keep=64 \\
        --tasks mme --batch_size 8 --output_path ./logs --log_samples

Several GPUs (data parallel, one model per GPU)::

    accelerate launch --num_processes 8 -m lmms_eval --model vtprune_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,pruner=fastervlm,ratio=0.25 \\
        --tasks mme,pope --batch_size 4 --output_path ./logs --log_samples

On the CPU add ``--device cpu`` (and ``device_map=cpu`` in the Qwen model_args).

vtprune's ``--model_args`` (everything else goes to the lmms-eval class unchanged):

- ``pruner=NAME``: a registered pruner (``vtprune.list_pruners()``); ``none`` (the default) runs the model
  unpatched, so the unpruned baseline goes through exactly the same code and logs the same statistics.
- ``keep=N`` (visual tokens per image) or ``ratio=R`` in (0, 1]; neither: the pruner's paper default.
- ``positions=compact|preserve``: position ids of the kept tokens (default: the family's convention).
- ``pruner_OPTION=VALUE``: a pruner hyperparameter or a family option of `vtprune.apply`, e.g.
  ``pruner_contextual=10`` (VisionZip), ``pruner_alpha=0.2`` (HiPrune), ``pruner_distance=l2`` (DivPrune),
  ``pruner_budget_scope=global`` (LLaVA-NeXT). ``none`` means None; whole numbers become ints.

An unknown pruner, option or an impossible budget raises `vtprune.ConfigError` before the model is loaded
(options the family decides are checked right after loading); lmms-eval prints the traceback. Generation
errors are not swallowed either (lmms-eval's LLaVA-HF class turns them into empty answers).

Batches: lmms-eval's LLaVA-HF classes are batch-size-1 only; the vtprune ones override ``generate_until`` with
a batched version (left padding, ``padding=True``, one ``generate`` per batch, ``until`` stop strings cut,
``max_new_tokens`` / ``temperature`` / ``top_p`` / ``num_beams`` from the task, lmms-eval's ``Collator``
ordering and ``cache_hook``), and ``loglikelihood`` with one that stays correct when the prompt is shortened.
Image and text requests only: a video request raises ``NotImplementedError``. lmms-eval's Qwen classes already
batch and are used as they are (Qwen2-VL's tokenizer is switched to left padding, which batched generation
needs).

Visual-token statistics, logged into lmms-eval's outputs:

- ``*_results.json``, section ``"throughput"`` (lmms-eval prefixes every key with ``avg_``):
  ``avg_vtprune_images`` (images seen), ``avg_vtprune_visual_tokens_in`` / ``..._out`` (mean visual tokens per
  image before / after pruning), ``..._in_min``, ``..._in_max``, ``..._out_min``, ``..._out_max``, and
  ``avg_vtprune_selection_ms_per_image``. One entry is logged per ``generate_until`` / ``loglikelihood`` call
  (normally one per run; with several, lmms-eval averages them). Under ``accelerate launch`` the ranks'
  statistics are gathered first, so they cover the whole run.
- ``*_samples_<task>.jsonl`` (``--log_samples``), LLaVA-HF models: each sample's ``token_counts`` holds
  ``visual_tokens_in`` / ``visual_tokens_out`` (one entry per image of the request), ``input_tokens`` (the
  prompt length the language model actually prefilled, after pruning) and ``output_tokens``. lmms-eval's
  ``"efficiency"`` section of the results sums these ``input_tokens``. lmms-eval's Qwen classes return plain
  strings, so for them only the results summary is available.

Importing this module needs neither lmms-eval nor a model: the classes are built on first access (lmms-eval's
registry imports ``vtprune.lmms_eval_plugin.VTPruneLlavaHf`` etc. only when that model is asked for). If the
optional ``decord`` video reader that lmms-eval's model modules import is missing, a placeholder is used
while importing them; it raises a clear ``ImportError`` only if a video is actually read.
"""

from __future__ import annotations

import inspect
import itertools
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODELS", "OPTION_PREFIX", "PruneSettings", "manifests", "pop_vtprune_args"]

OPTION_PREFIX = "pruner_"
"""``--model_args`` keys starting with this are passed to `vtprune.apply` without the prefix."""

MODELS: dict[str, tuple[str, str | None]] = {
    "vtprune_llava_hf": ("VTPruneLlavaHf", "VTPruneLlavaHfChat"),
    "vtprune_qwen2_vl": ("VTPruneQwen2VL", None),
    "vtprune_qwen2_5_vl": ("VTPruneQwen2_5_VL", "VTPruneQwen2_5_VLChat"),
}
"""lmms-eval model id -> (simple class, chat class) defined by this module."""

_NONE_WORDS = {"", "none", "null"}


# ---------------------------------------------------------------------------------------------- registration
def manifests() -> list:
    """The `ModelManifest` list lmms-eval's registry loads from the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=model_id,
            simple_class_path=f"{__name__}.{simple}",
            chat_class_path=f"{__name__}.{chat}" if chat else None,
        )
        for model_id, (simple, chat) in MODELS.items()
    ]


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class PruneSettings:
    """vtprune's part of ``--model_args``, parsed and type-checked."""

    pruner: str | None = None
    keep: int | None = None
    ratio: float | None = None
    positions: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.pruner is not None

    def describe(self) -> str:
        if not self.enabled:
            return "unpruned"
        parts = [self.pruner] + [f"{k}={v}" for k, v in (("keep", self.keep), ("ratio", self.ratio), ("positions", self.positions)) if v is not None]
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        return " ".join(parts)


def _config_error(message: str):
    from .errors import ConfigError

    return ConfigError(f"vtprune lmms-eval plugin: {message}")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _as_int(name: str, value: Any) -> int | None:
    if _is_none(value):
        return None
    if isinstance(value, bool):
        raise _config_error(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _config_error(f"{name} must be a whole number, got {value!r}")


def _as_float(name: str, value: Any) -> float | None:
    if _is_none(value):
        return None
    if isinstance(value, bool):
        raise _config_error(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _config_error(f"{name} must be a number, got {value!r}") from None


def _as_option(value: Any) -> Any:
    """lmms-eval auto-casts model_args ("64" -> 64, "-2" -> -2.0, "true" -> True); finish the job."""
    if _is_none(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return text
    return value


def pop_vtprune_args(kwargs: dict) -> PruneSettings:
    """Remove vtprune's keys from `kwargs` (in place) and return them parsed and checked.

    Keys: ``pruner``, ``keep``, ``ratio``, ``positions`` and ``pruner_<option>``. The pruner name, the budget
    and the pruner's own hyperparameters are validated here, before any model is loaded.
    """
    from .budget import Budget
    from .registry import create_pruner, get_pruner_class
    from .sequence import POSITION_MODES

    pruner = kwargs.pop("pruner", None)
    keep = _as_int("keep", kwargs.pop("keep", None))
    ratio = _as_float("ratio", kwargs.pop("ratio", None))
    positions = kwargs.pop("positions", None)
    options = {key[len(OPTION_PREFIX) :]: _as_option(kwargs.pop(key)) for key in [k for k in kwargs if k.startswith(OPTION_PREFIX)]}
    if "" in options:
        raise _config_error(f"an option key needs a name after {OPTION_PREFIX!r}")

    if _is_none(pruner):
        given = {"keep": keep, "ratio": ratio, "positions": positions, **{OPTION_PREFIX + k: v for k, v in options.items()}}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            raise _config_error(f"{sorted(given)} given without a pruner: add pruner=<name> (or drop them for the unpruned model)")
        return PruneSettings()
    if not isinstance(pruner, str):
        raise _config_error(f"pruner must be a registered name, got {pruner!r}")
    pruner = pruner.strip()
    positions = None if _is_none(positions) else str(positions).strip()
    if positions is not None and positions not in POSITION_MODES:
        raise _config_error(f"positions must be one of {', '.join(POSITION_MODES)}; got {positions!r}")

    cls = get_pruner_class(pruner)  # ConfigError listing the registered pruners
    Budget(keep=keep, ratio=ratio)  # ConfigError for a bad budget
    own = {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "keep", "ratio")}
    create_pruner(pruner, keep=keep, ratio=ratio, **{k: v for k, v in options.items() if k in own})
    return PruneSettings(pruner=pruner, keep=keep, ratio=ratio, positions=positions, options=options)


# ---------------------------------------------------------------------------------------------- statistics
def _summary(images: list[tuple[int, int, float]]) -> dict[str, float]:
    """``images``: (tokens_in, tokens_out, selection_ms) per image -> the numeric results entry."""
    tokens_in = [float(i) for i, _, _ in images]
    tokens_out = [float(o) for _, o, _ in images]
    return {
        "vtprune_images": float(len(images)),
        "vtprune_visual_tokens_in": statistics.fmean(tokens_in),
        "vtprune_visual_tokens_in_min": min(tokens_in),
        "vtprune_visual_tokens_in_max": max(tokens_in),
        "vtprune_visual_tokens_out": statistics.fmean(tokens_out),
        "vtprune_visual_tokens_out_min": min(tokens_out),
        "vtprune_visual_tokens_out_max": max(tokens_out),
        "vtprune_selection_ms_per_image": statistics.fmean(ms for _, _, ms in images),
    }


@dataclass
class _Call:
    """One prefill with images: per image (row, tokens_in, tokens_out), per row the prefilled prompt length."""

    images: list[tuple[int, int, int]]
    prefill: list[int]
    selection_ms: float


class _VisualTokenLog:
    """Watches a model's forward calls and records the visual tokens of every prefill that carries images.

    Pruned: reads ``handle.stats`` each time vtprune replaced it (one new list per call with images).
    Unpruned: counts the image placeholders of the prefill (per image: the family's fixed count, or the row's
    count split evenly among its images).
    """

    def __init__(self, model, handle) -> None:
        self.model = model
        self.handle = handle
        self.calls: list[_Call] = []
        self._seen = handle.stats if handle is not None else None
        self._hook = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def take(self) -> list[_Call]:
        calls, self.calls = self.calls, []
        return calls

    def _after_forward(self, module, args, kwargs, output) -> None:
        try:
            call = self._pruned_call() if self.handle is not None else self._unpruned_call(kwargs)
        except Exception:  # noqa: BLE001  (statistics must never break an evaluation)
            return
        if call is not None:
            self.calls.append(call)

    def _pruned_call(self) -> _Call | None:
        handle = self.handle
        stats = handle.stats
        if stats is self._seen or not stats:
            return None
        self._seen = stats
        images = [(int(s.extra.get("row", 0)), int(s.tokens_in), int(s.tokens_out)) for s in stats]
        sequence = handle.last_sequence
        prefill = sequence.attention_mask.sum(dim=1).tolist() if sequence is not None else []
        return _Call(images, [int(n) for n in prefill], 1000.0 * float(handle.selection_time))

    def _unpruned_call(self, kwargs: dict) -> _Call | None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None or (kwargs.get("pixel_values") is None and not kwargs.get("mm_encoder_outputs")):
            return None
        config = self.model.config
        image_token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        if image_token is None:
            return None
        per_row = (input_ids == image_token).sum(dim=1).tolist()
        start = getattr(config, "vision_start_token_id", None)
        starts = (input_ids == start).sum(dim=1).tolist() if start is not None else None
        fixed = getattr(config, "image_seq_length", None)
        images: list[tuple[int, int, int]] = []
        for row, count in enumerate(per_row):
            if not count:
                continue
            if starts is not None and starts[row]:
                n = starts[row]
            elif fixed and count % fixed == 0:
                n = count // fixed
            else:
                n = 1
            images += [(row, count // n, count // n)] * n
        if not images:
            return None
        mask = kwargs.get("attention_mask")
        prefill = mask.sum(dim=1).tolist() if mask is not None and mask.ndim == 2 else [input_ids.shape[1]] * input_ids.shape[0]
        return _Call(images, [int(n) for n in prefill], 0.0)


def _gather_across_ranks(items: list) -> list:
    """All ranks' items (data-parallel runs under accelerate / torchrun); the items themselves otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return list(itertools.chain.from_iterable(part or [] for part in gathered))


# ---------------------------------------------------------------------------------------------- decord
class _MissingDecord(types.ModuleType):
    """Stand-in for the optional `decord` video reader while lmms-eval's model modules are imported."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise ImportError("reading videos needs the `decord` package (pip install decord); vtprune's lmms-eval models evaluate images")

        return unavailable


def _import_lmms_module(name: str):
    """Import an lmms-eval model module; if `decord` is missing, with a placeholder that is removed afterwards."""
    import importlib

    try:
        import decord  # noqa: F401

        return importlib.import_module(name)
    except ImportError:
        pass
    placeholder = _MissingDecord("decord")
    had = "decord" in sys.modules
    previous = sys.modules.get("decord")
    sys.modules["decord"] = placeholder
    try:
        return importlib.import_module(name)
    finally:
        if had:
            sys.modules["decord"] = previous
        elif sys.modules.get("decord") is placeholder:
            del sys.modules["decord"]


# ---------------------------------------------------------------------------------------------- shared part
class _VTPruneMixin:
    """vtprune's part of every model class: argument stripping, patching, statistics."""

    vtprune_settings: PruneSettings
    vtprune_handle = None

    def __init__(self, *args, **kwargs) -> None:
        settings = pop_vtprune_args(kwargs)
        super().__init__(*args, **kwargs)
        self._vtprune_install(settings)

    def _vtprune_install(self, settings: PruneSettings) -> None:
        from loguru import logger

        import vtprune

        self.vtprune_settings = settings
        model = self.model  # unwrapped by lmms-eval when accelerate wrapped it
        self.vtprune_handle = None
        if settings.enabled:
            self.vtprune_handle = vtprune.apply(
                model, settings.pruner, keep=settings.keep, ratio=settings.ratio, positions=settings.positions, **settings.options
            )
            logger.info(f"vtprune: {self.vtprune_handle!r}")
        else:
            logger.info("vtprune: pruner=none, the model runs unpatched (visual-token statistics are still logged)")
        self._vtprune_log = _VisualTokenLog(model, self.vtprune_handle)

    def _vtprune_report(self, calls: list[_Call]) -> dict[str, float] | None:
        """Log one results entry for `calls` (gathered over ranks); returns the summary on rank 0."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        from loguru import logger

        images = [(i, o, call.selection_ms / len(call.images)) for call in calls for (_, i, o) in call.images]
        images = _gather_across_ranks(images)
        if not images or getattr(self, "rank", 0) != 0:
            return None
        summary = _summary(images)
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=summary)
        logger.info(
            f"vtprune ({self.vtprune_settings.describe()}): {len(images)} images, visual tokens per image "
            f"{summary['vtprune_visual_tokens_in']:.1f} -> {summary['vtprune_visual_tokens_out']:.1f} "
            f"(out min {summary['vtprune_visual_tokens_out_min']:.0f}, max {summary['vtprune_visual_tokens_out_max']:.0f}), "
            f"selection {summary['vtprune_selection_ms_per_image']:.2f} ms/image"
        )
        return summary

    def clean(self):
        log = getattr(self, "_vtprune_log", None)
        if log is not None:
            log.close()
        if self.vtprune_handle is not None:
            self.vtprune_handle.remove()
            self.vtprune_handle = None
        return super().clean()


class _WrapCalls:
    """Qwen: lmms-eval's own batched loop, with the statistics of each request run reported at its end."""

    def generate_until(self, requests):
        self._vtprune_log.take()
        try:
            return super().generate_until(requests)
        finally:
            self._vtprune_report(self._vtprune_log.take())


def _prepare_qwen_left_padding(self) -> None:
    processor = getattr(self, "processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generation appends after the prompt


# ---------------------------------------------------------------------------------------------- LLaVA-HF
_VISUAL_TOKEN_COUNTS: list = []


def _visual_token_counts_class():
    if _VISUAL_TOKEN_COUNTS:
        return _VISUAL_TOKEN_COUNTS[0]
    from lmms_eval.api.instance import TokenCounts

    @dataclass
    class VisualTokenCounts(TokenCounts):
        """lmms-eval's per-sample token counts plus the visual tokens of each image of the request."""

        visual_tokens_in: list = field(default_factory=list)
        visual_tokens_out: list = field(default_factory=list)

        def to_dict(self):
            counts = super().to_dict()
            counts["visual_tokens_in"] = list(self.visual_tokens_in)
            counts["visual_tokens_out"] = list(self.visual_tokens_out)
            return counts

    VisualTokenCounts.__module__ = __name__
    _VISUAL_TOKEN_COUNTS.append(VisualTokenCounts)
    return VisualTokenCounts


class _BatchedLlava:
    """Batched ``generate_until`` and a pruning-safe ``loglikelihood`` for lmms-eval's LLaVA-HF classes."""

    def __init__(self, *args, **kwargs) -> None:
        # lmms-eval's LLaVA-HF passes its default device_map="" to from_pretrained on a single process, which
        # transformers 5 rejects: load straight onto `device` instead (what the empty map meant). Data-parallel
        # runs keep "" so that lmms-eval picks cuda:<local rank> itself.
        if not kwargs.get("device_map"):
            from accelerate import PartialState

            if PartialState().num_processes == 1:
                kwargs["device_map"] = str(kwargs.get("device") or "cuda")
        super().__init__(*args, **kwargs)

    def _vtprune_chat_template_text(self, context: str) -> str:
        from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

        messages = [{"role": "user", "content": context}]
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _vtprune_generate(self, texts: list[str], images: list, gen_kwargs: dict) -> tuple[list[str], list]:
        """One batched generate. Returns the decoded continuations and a token-counts object per row."""
        import torch

        VisualTokenCounts = _visual_token_counts_class()
        processor = self._image_processor
        processor.tokenizer.padding_side = "left"
        inputs = processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self._device, self.model.dtype)
        temperature = gen_kwargs.get("temperature", 0) or 0
        do_sample = float(temperature) > 0
        self._vtprune_log.take()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=gen_kwargs.get("top_p") if do_sample else None,
                num_beams=gen_kwargs.get("num_beams", 1) or 1,
                max_new_tokens=gen_kwargs.get("max_new_tokens", 1024),
                use_cache=self.use_cache,
                pad_token_id=self.eot_token_id,
                eos_token_id=self.eot_token_id,
            )
        calls = self._vtprune_log.take()
        self._vtprune_calls.extend(calls)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

        prefill = inputs["attention_mask"].sum(dim=1).tolist()
        per_row_in: list[list[int]] = [[] for _ in texts]
        per_row_out: list[list[int]] = [[] for _ in texts]
        if calls:
            call = calls[0]
            prefill = call.prefill or prefill
            for row, tokens_in, tokens_out in call.images:
                per_row_in[row].append(tokens_in)
                per_row_out[row].append(tokens_out)
        eos, pad = self.eot_token_id, self.tokenizer.pad_token_id
        counts = []
        for row in range(len(texts)):
            ids = new_tokens[row].tolist()
            generated = next((i for i, t in enumerate(ids) if t == eos), len(ids))
            if pad is not None and pad != eos:
                generated = min(generated, next((i for i, t in enumerate(ids) if t == pad), len(ids)))
            counts.append(
                VisualTokenCounts(
                    input_tokens=int(prefill[row]),
                    output_tokens=generated,
                    visual_tokens_in=per_row_in[row],
                    visual_tokens_out=per_row_out[row],
                )
            )
        return decoded, counts

    @staticmethod
    def _vtprune_until(gen_kwargs: dict, default: str) -> list[str]:
        until = gen_kwargs.pop("until", None)
        if until is None:
            return [default]
        if isinstance(until, str):
            return [until]
        if isinstance(until, (list, tuple)):
            return list(until)
        raise ValueError(f"Expected `gen_kwargs['until']` to be of type Union[str,list] but got {type(until)}")

    @staticmethod
    def _vtprune_cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    @staticmethod
    def _vtprune_split_visuals(visuals, where: str) -> list:
        from PIL import Image

        images = []
        for visual in visuals or []:
            if visual is None:
                continue
            if isinstance(visual, Image.Image):
                images.append(visual)
            else:
                raise NotImplementedError(
                    f"{where}: vtprune's LLaVA-HF models evaluate images and text; got a {type(visual).__name__} "
                    "visual (a video?). Use lmms-eval's own llava_hf for video tasks."
                )
        return images

    def _vtprune_run(self, chunks, build, total: int) -> list:
        """Run `chunks` (lists of request args); `build(args) -> (text, images, gen_kwargs, cache_key)`."""
        from lmms_eval.api.instance import GenerationResult
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        from tqdm import tqdm

        results = []
        self._vtprune_calls = []
        pbar = tqdm(total=total, disable=(self.rank != 0), desc="Model Responding")
        elapsed, generated = 0.0, 0
        try:
            for chunk in chunks:
                built = [build(args) for args in chunk]
                texts = [b[0] for b in built]
                images = [image for b in built for image in b[1]]
                gen_kwargs = dict(built[0][2])  # the Collator groups requests by their generation kwargs
                until = self._vtprune_until(gen_kwargs, self.tok_decode(self.eot_token_id))
                started = time.perf_counter()
                decoded, counts = self._vtprune_generate(texts, images, gen_kwargs)
                elapsed += time.perf_counter() - started
                generated += sum(c.output_tokens for c in counts)
                for (text, _, original_kwargs, cache_key), answer, count in zip(built, decoded, counts):
                    answer = self._vtprune_cut(answer, until)
                    results.append(GenerationResult(text=answer, token_counts=count))
                    self.cache_hook.add_partial("generate_until", (cache_key, original_kwargs), answer)
                    pbar.update(1)
        finally:
            pbar.close()
            calls, self._vtprune_calls = self._vtprune_calls, []
            self._vtprune_report(calls)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed if elapsed > 0 else 0.0,
            additional_metrics={"rank": self.rank},
        )
        return results

    def loglikelihood(self, requests):
        """As lmms-eval's LLaVA-HF (same prompt, same ``(loss, is_greedy)`` convention), batch size 1, but with
        the greedy check aligned at the end of the sequence: a pruned prompt is shorter than the processor's."""
        import torch
        from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN
        from tqdm import tqdm

        results = []
        self._vtprune_log.take()
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        try:
            for context, doc_to_target, doc_to_visual, doc_id, task, split in [req.args for req in requests]:
                doc = self.task_dict[task][split][doc_id]
                continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
                visuals = self._vtprune_split_visuals(self.flatten([doc_to_visual(doc)]), "loglikelihood")
                if visuals and DEFAULT_IMAGE_TOKEN not in context:
                    context = " ".join([DEFAULT_IMAGE_TOKEN] * len(visuals)) + "\n" + context
                prompt = self._vtprune_chat_template_text(context)
                messages = [{"role": "user", "content": context}, {"role": "assistant", "content": continuation}]
                full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
                inputs = self._image_processor(text=[full], images=visuals or None, return_tensors="pt").to(self._device, self.model.dtype)
                context_length = self._image_processor(text=[prompt], images=visuals or None, return_tensors="pt")["input_ids"].shape[1]
                labels = inputs["input_ids"].clone()
                labels[:, :context_length] = -100
                with torch.inference_mode():
                    outputs = self.model(**inputs, labels=labels)
                continuation_ids = inputs["input_ids"][0, context_length:]
                n = continuation_ids.shape[0]
                greedy = outputs.logits[0, -n - 1 : -1].argmax(dim=-1) if n else continuation_ids
                results.append((float(outputs.loss.item()), bool((greedy.to(continuation_ids.device) == continuation_ids).all())))
                pbar.update(1)
        finally:
            pbar.close()
            self._vtprune_report(self._vtprune_log.take())
        return results


class _LlavaSimple(_BatchedLlava):
    def generate_until(self, requests):
        from lmms_eval import utils
        from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN

        def sort_key(args):
            return -len(self.tok_encode(args[0])), args[0]

        def build(args):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            doc = self.task_dict[task][split][doc_id]
            images = self._vtprune_split_visuals(self.flatten([doc_to_visual(doc) or []]), task)
            if images and DEFAULT_IMAGE_TOKEN not in context:  # e.g. MME: no image token in the prompt
                context = " ".join([DEFAULT_IMAGE_TOKEN] * len(images)) + "\n" + context
            return self._vtprune_chat_template_text(context), images, gen_kwargs, context

        collator = utils.Collator([req.args for req in requests], sort_key, grouping=True)
        chunks = collator.get_batched(n=self.batch_size, batch_fn=None)
        return collator.get_original(self._vtprune_run(chunks, build, len(requests)))


class _LlavaChat(_BatchedLlava):
    def generate_until(self, requests):
        from lmms_eval import utils
        from lmms_eval.protocol import ChatMessages

        def sort_key(args):
            return args[3], args[3]

        def build(args):
            _, doc_to_messages, gen_kwargs, doc_id, task, split = args
            messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            images, videos, _ = messages.extract_media()
            if videos:
                self._vtprune_split_visuals(videos, task)  # raises NotImplementedError
            images = self._vtprune_split_visuals(images, task)
            text = self._image_processor.apply_chat_template(messages.model_dump()["messages"], tokenize=False, add_generation_prompt=True)
            return text, images, gen_kwargs, text

        collator = utils.Collator([req.args for req in requests], sort_key, group_fn=lambda args: args[2], grouping=True)
        chunks = collator.get_batched(n=self.batch_size, batch_fn=None)
        return collator.get_original(self._vtprune_run(chunks, build, len(requests)))


# ---------------------------------------------------------------------------------------------- class factory
def _define(name: str, bases: tuple, doc: str, extra: dict | None = None) -> type:
    cls = type(name, bases, {"__module__": __name__, "__doc__": doc, "__qualname__": name, **(extra or {})})
    globals()[name] = cls
    return cls


def _build(name: str) -> type:
    if name in ("VTPruneLlavaHf", "VTPruneLlavaHfChat"):
        simple = _import_lmms_module("lmms_eval.models.simple.llava_hf").LlavaHf
        if name == "VTPruneLlavaHf":
            return _define(
                name,
                (_VTPruneMixin, _LlavaSimple, simple),
                "lmms-eval's LLaVA-HF (simple) with vtprune patched in and batched generation.",
                {"is_simple": True},
            )
        chat = _import_lmms_module("lmms_eval.models.chat.llava_hf").LlavaHf
        return _define(
            name,
            (_VTPruneMixin, _LlavaChat, chat),
            "lmms-eval's LLaVA-HF (chat) with vtprune patched in and batched generation.",
            {"is_simple": False},
        )
    if name == "VTPruneQwen2VL":
        base = _import_lmms_module("lmms_eval.models.simple.qwen2_vl").Qwen2_VL
        return _define(name, (_QwenMixin, _WrapCalls, base), "lmms-eval's Qwen2-VL (simple) with vtprune patched in.", {"is_simple": True})
    if name == "VTPruneQwen2_5_VL":
        base = _import_lmms_module("lmms_eval.models.simple.qwen2_5_vl").Qwen2_5_VL
        return _define(name, (_QwenMixin, _WrapCalls, base), "lmms-eval's Qwen2.5-VL (simple) with vtprune patched in.", {"is_simple": True})
    if name == "VTPruneQwen2_5_VLChat":
        _import_lmms_module("lmms_eval.models.simple.qwen2_5_vl")
        base = _import_lmms_module("lmms_eval.models.chat.qwen2_5_vl").Qwen2_5_VL
        return _define(name, (_QwenMixin, _WrapCalls, base), "lmms-eval's Qwen2.5-VL (chat) with vtprune patched in.", {"is_simple": False})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _QwenMixin(_VTPruneMixin):
    def _vtprune_install(self, settings: PruneSettings) -> None:
        _prepare_qwen_left_padding(self)
        super()._vtprune_install(settings)


def __getattr__(name: str):
    """Build the lmms-eval model classes on first access, so importing this module needs no lmms-eval."""
    if any(name in pair for pair in MODELS.values()):
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
