"""Temporary hooks that capture the inputs and outputs of a few layers during one forward."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def capture_layers(
    layers: Sequence[torch.nn.Module], inputs: set[int] = frozenset(), outputs: set[int] = frozenset()
) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """Capture the first positional (or ``hidden_states``) input of ``layers[i]`` for ``i in inputs`` and the
    (first) output of ``layers[i]`` for ``i in outputs``. Hooks are removed on exit, even after an exception."""
    captured_in: dict[int, torch.Tensor] = {}
    captured_out: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            captured_in[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(index):
        def hook(module, args, output):
            captured_out[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    try:
        for i in sorted(inputs):
            handles.append(layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        for i in sorted(outputs):
            handles.append(layers[i].register_forward_hook(post_hook(i)))
        yield captured_in, captured_out
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_calls(layers: Sequence[torch.nn.Module], indices: set[int]) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Capture the positional and keyword arguments of ``layers[i]`` for ``i in indices`` (for blocks whose
    attention needs more than the hidden states: sequence boundaries, rotary embeddings). Hooks are removed on
    exit, even after an exception."""
    captured: dict[int, tuple[tuple, dict]] = {}
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            captured[index] = (args, dict(kwargs))

        return hook

    try:
        for i in sorted(indices):
            handles.append(layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
