"""lmms-eval plugin: lmms-eval's own LLaVA-HF, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Gemma 3 and InternVL models
with vtprune patched in.

Installing vtprune registers eight models with lmms-eval (entry-point group ``lmms_eval.models``, lmms-eval
0.6+). Each one subclasses lmms-eval's class of the same family, pops vtprune's arguments from ``--model_args``
before delegating to it, and patches the model it loaded with `vtprune.apply`:

==========================  =====================================================  ======================
``--model``                 lmms-eval classes wrapped (simple / chat)              checkpoints
==========================  =====================================================  ======================
``vtprune_llava_hf``        ``llava_hf`` (both)                                    LLaVA-1.5 (and what
                                                                                   ``llava_hf`` loads)
``vtprune_llava_onevision`` ``llava_hf`` (both), images and videos                 LLaVA-OneVision
``vtprune_qwen2_vl``        ``qwen2_vl`` (simple only, as in lmms-eval)            Qwen2-VL
``vtprune_qwen2_5_vl``      ``qwen2_5_vl`` (both)                                  Qwen2.5-VL
``vtprune_qwen3_vl``        ``qwen3_vl`` (both), dense and MoE (DeepStack)         Qwen3-VL
``vtprune_qwen3_5``         ``qwen3_5`` (both), dense and MoE                      Qwen3.5
``vtprune_gemma3``          ``gemma3`` (simple only, as in lmms-eval)              Gemma 3
``vtprune_internvl``        ``internvl_hf`` (chat only, as in lmms-eval),          InternVL3 / 3.5 "-hf"
                            images and videos, batched
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

On the CPU add ``--device cpu`` (and ``device_map=cpu`` in the Qwen model_args). Data-parallel on CPUs:
``accelerate launch --multi_gpu --num_processes 2 -m lmms_eval ... --device cpu`` (torchrun with gloo; accelerate's
``--cpu`` alone starts one process unless MPI is set up); the LLaVA-HF classes then load onto the CPU per rank.

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
``vtprune_llava_hf`` takes image and text requests (a video raises ``NotImplementedError``);
``vtprune_llava_onevision`` takes videos too: a video path is read with lmms-eval's ``load_video``
(``max_frames_num`` frames, default 32, ``decord``), an array of frames ``[F, H, W, 3]`` returned by a task's
``doc_to_visual`` is used as it is, and ``pruner_video_keep`` / ``pruner_video_ratio`` / ``pruner_video_scope``
set the video budget (a per-image ``keep`` alone is refused on a video). lmms-eval's Qwen classes already
batch and are used as they are (Qwen2-VL's tokenizer is switched to left padding, which batched generation
needs); the Qwen integration prunes video tokens too, with ``pruner_video_keep`` / ``pruner_video_ratio`` /
``pruner_video_scope`` (lmms-eval reads the videos itself, with ``decord``; that path is not in the offline
test suite). lmms-eval's Qwen3-VL / Qwen3.5 classes load in bfloat16 and pick the MoE class when the
``pretrained`` name holds ``A<n>B`` (``Qwen3-VL-30B-A3B-Instruct``): a local copy of a MoE checkpoint must keep
that in its folder name. Their generate passes the processor's whole output, ``mm_token_type_ids`` included, which
the Qwen3 M-RoPE needs. lmms-eval's Gemma 3 class batches too (the prompts are padded on the left), loads in
bfloat16, reads a video as frames (each frame an image to the model: the per-image budget applies to each), and
sends inputs to CUDA when ``device_map=auto`` (its default): on the CPU pass ``device_map=cpu``.

Visual-token statistics, logged into lmms-eval's outputs:

- ``*_results.json``, section ``"throughput"`` (lmms-eval prefixes every key with ``avg_``):
  ``avg_vtprune_images`` (images seen), ``avg_vtprune_visual_tokens_in`` / ``..._out`` (mean visual tokens per
  image before / after pruning), ``..._in_min``, ``..._in_max``, ``..._out_min``, ``..._out_max``, and
  ``avg_vtprune_selection_ms_per_image``. One entry is logged per ``generate_until`` / ``loglikelihood`` call
  (normally one per run; with several, lmms-eval averages them). Under ``accelerate launch`` the ranks'
  statistics are gathered first, so they cover the whole run; ``avg_vtprune_ranks`` is the number of processes.
- ``*_samples_<task>.jsonl`` (``--log_samples``), LLaVA-HF models: each sample's ``token_counts`` holds
  ``visual_tokens_in`` / ``visual_tokens_out`` (one entry per image of the request), ``input_tokens`` (the
  prompt length the language model actually prefilled, after pruning) and ``output_tokens``. lmms-eval's
  ``"efficiency"`` section of the results sums these ``input_tokens``. lmms-eval's Qwen classes return plain
  strings, so for them only the results summary is available.

The package, one module a concern and one short module a family:

- ``settings``: vtprune's ``--model_args`` (`pop_vtprune_args`, `PruneSettings`), checked before a model loads;
- ``base``: vtprune's part of every class (patching, statistics, ``clean``); ``token_stats``: the statistics;
- ``batched_llava``: the batched LLaVA-HF loops; ``loading``: importing lmms-eval's model modules;
- ``llava_hf``, ``llava_onevision``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_5``, ``gemma3``, ``internvl``: the model
  classes,
  each a few lines;
- ``check``: does the installed lmms-eval run its evaluator (``python -m vtprune.integrations.lmms_eval.check``).

Importing this package needs neither lmms-eval nor a model: lmms-eval's registry imports a family module
(``vtprune.integrations.lmms_eval.llava_hf.VTPruneLlavaHf`` etc.) only when that model is asked for. If the
optional ``decord`` video reader that lmms-eval's model modules import is missing, a placeholder is used
while importing them; it raises a clear ``ImportError`` only if a video is actually read.

To add a family: a module here with its classes (mixing in `base.VTPruneMixin` and, for LLaVA-style
batch-size-1 parents, a `batched_llava` loop) and one `MODELS` entry.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MODELS", "OPTION_PREFIX", "PruneSettings", "manifests", "pop_vtprune_args"]

MODELS: dict[str, tuple[str | None, str | None]] = {
    "vtprune_llava_hf": ("llava_hf.VTPruneLlavaHf", "llava_hf.VTPruneLlavaHfChat"),
    "vtprune_llava_onevision": ("llava_onevision.VTPruneLlavaOnevision", "llava_onevision.VTPruneLlavaOnevisionChat"),
    "vtprune_qwen2_vl": ("qwen2_vl.VTPruneQwen2VL", None),
    "vtprune_qwen2_5_vl": ("qwen2_5_vl.VTPruneQwen2_5_VL", "qwen2_5_vl.VTPruneQwen2_5_VLChat"),
    "vtprune_qwen3_vl": ("qwen3_vl.VTPruneQwen3VL", "qwen3_vl.VTPruneQwen3VLChat"),
    "vtprune_qwen3_5": ("qwen3_5.VTPruneQwen3_5", "qwen3_5.VTPruneQwen3_5Chat"),
    "vtprune_gemma3": ("gemma3.VTPruneGemma3", None),
    "vtprune_internvl": (None, "internvl.VTPruneInternVLChat"),
}
"""lmms-eval model id -> (simple class, chat class), as ``module.Class`` paths inside this package (None where
lmms-eval has no class of that kind for the family)."""

_SETTINGS_NAMES = ("OPTION_PREFIX", "PruneSettings", "pop_vtprune_args")


def manifests() -> list:
    """The `ModelManifest` list lmms-eval's registry loads from the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=model_id,
            simple_class_path=f"{__name__}.{simple}" if simple else None,
            chat_class_path=f"{__name__}.{chat}" if chat else None,
        )
        for model_id, (simple, chat) in MODELS.items()
    ]


def __getattr__(name: str) -> Any:
    """The settings names, and each model class by its bare name (``VTPruneLlavaHf``), imported on first access."""
    if name in _SETTINGS_NAMES:
        return getattr(importlib.import_module(f"{__name__}.settings"), name)
    for path in (path for pair in MODELS.values() for path in pair if path):
        module, _, cls = path.rpartition(".")
        if cls == name:
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
