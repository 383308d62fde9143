"""Loading the models the experiment configs name: offline tiny models, Hub checkpoints, or local folders."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import ConfigError

TINY_BUILDERS = {
    "llava": lambda seed: __import__("vtprune.testing", fromlist=["tiny_llava"]).tiny_llava(seed=seed),
    "llava_next": lambda seed: __import__("vtprune.testing", fromlist=["tiny_llava_next"]).tiny_llava_next(seed=seed),
    "qwen2_vl": lambda seed: __import__("vtprune.testing", fromlist=["tiny_qwen_vl"]).tiny_qwen_vl("2", seed=seed),
    "qwen2_5_vl": lambda seed: __import__("vtprune.testing", fromlist=["tiny_qwen_vl"]).tiny_qwen_vl("2.5", seed=seed),
}
SOURCES = ("tiny", "hub", "path")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; use e.g. float32, float16 or bfloat16")
    return value


def _device(name: str) -> str:
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; set model.device=cpu")
    return str(name)


def load_model(spec: Mapping[str, Any]):
    """``(model, processor)`` for a model config (see configs/model/*.yaml)."""
    source = spec.get("source")
    if source not in SOURCES:
        raise ConfigError(f"model.source must be one of {SOURCES}, got {source!r}")
    dtype, device = _dtype(spec.get("dtype", "float32")), _device(spec.get("device", "cpu"))
    if source == "tiny":
        family = spec.get("family")
        if family not in TINY_BUILDERS:
            raise ConfigError(f"unknown tiny model family {family!r}; choices: {', '.join(sorted(TINY_BUILDERS))}")
        model, processor = TINY_BUILDERS[family](int(spec.get("seed", 0)))
        return model.to(device=device, dtype=dtype), processor

    import transformers

    location = spec.get("name") if source == "hub" else spec.get("path")
    if not location:
        raise ConfigError(f"model.{'name' if source == 'hub' else 'path'} is required for source={source!r}")
    if source == "path":
        from pathlib import Path

        if not Path(location).is_dir():
            raise FileNotFoundError(f"model.path {location!r} is not a folder saved with save_pretrained")
    class_name = spec.get("class", "auto")
    model_class = transformers.AutoModelForImageTextToText if class_name == "auto" else getattr(transformers, class_name, None)
    if model_class is None:
        raise ConfigError(f"transformers has no class {class_name!r}")
    kwargs = {"dtype": dtype}
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]
    model = model_class.from_pretrained(location, **kwargs).to(device).eval()
    processor = transformers.AutoProcessor.from_pretrained(location)
    return model, processor
