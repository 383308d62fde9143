"""Loading the models the experiment configs name: offline tiny models, Hub checkpoints, or local folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from vtprune.errors import ConfigError

from vtprune.integrations.tiny_models import TINY_BUILDERS

SOURCES = ("embedded", "tiny", "hub", "path")
EMBEDDED_MODEL = "vtprune-tiny-llava"


def embedded_model_path() -> Path:
    """The folder of the embedded trained model (shipped in the package as ``vtprune.assets``)."""
    from importlib.resources import files

    try:
        path = Path(str(files("vtprune.assets") / EMBEDDED_MODEL))
    except ModuleNotFoundError:  # an install that predates vtprune.assets
        path = Path(__file__).resolve().parents[1] / "assets" / EMBEDDED_MODEL
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no embedded model in {path}: this build of vtprune does not ship it yet (issue 6); train one with "
            "`python scripts/train_embedded.py --out assets/vtprune-tiny-llava`, or use model=tiny_llava"
        )
    return path


def embedded_model_available() -> bool:
    """Whether this build ships the embedded model (see `embedded_model_path`)."""
    try:
        embedded_model_path()
        return True
    except FileNotFoundError:
        return False


def load_embedded(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, processor)``: vtprune's small trained LLaVA-1.5-style model (see assets/README.md).

    A `LlavaForConditionalGeneration` (CLIP-style ViT with CLS, 336 px / 28 px patches = 144 visual tokens, Llama
    decoder) trained on `vtprune.eval.synthetic` by `scripts/train_embedded.py`, loaded with `from_pretrained`. It is
    stored in float16 and upcast to `dtype`.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = embedded_model_path()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


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
    if source == "embedded":
        return load_embedded(dtype, device)
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
