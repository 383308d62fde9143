import pytest
import torch

import vtprune
from vtprune.integrations.tiny_models import random_images, tiny_llava

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def llava():
    model, processor = tiny_llava(seed=0)
    return model, processor


@pytest.fixture(autouse=True)
def _unpatched(request):
    """A failing test must not leave a shared model patched for the next one: every ``(model, processor)``
    fixture the test used is unpatched after it."""
    yield
    for value in request.node.funcargs.values():
        model = value[0] if isinstance(value, tuple) and value and isinstance(value[0], torch.nn.Module) else None
        if model is not None and model.__dict__.get("_vtprune_handle") is not None:
            vtprune.remove(model)


@pytest.fixture(scope="session")
def images():
    return random_images(6, size=(400, 300), seed=1)


def make_inputs(processor, prompts, images, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    kwargs = dict(text=prompts, return_tensors="pt", padding=True)
    if images:
        kwargs["images"] = images
    return dict(processor(**kwargs))


def mask_positions(attention_mask):
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def qwen_prompt(body: str) -> str:
    """One user turn in the Qwen chat format, ready for the assistant's answer."""
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def inputs_for(processor, prompts, images=(), videos=(), padding_side="left"):
    """The processor's output for prompts with their images and videos (flat lists, in prompt order)."""
    processor.tokenizer.padding_side = padding_side
    kwargs = dict(text=list(prompts), return_tensors="pt", padding=True)
    if images:
        kwargs["images"] = list(images)
    if videos:
        kwargs["videos"] = list(videos)
    return dict(processor(**kwargs))


def eager_attentions(tower, pixel_values):
    """Every block's full attention maps from `tower` run eager (restored afterwards): the independent reference
    the recomputed attention statistics are checked against."""
    saved = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixel_values, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation(saved)
