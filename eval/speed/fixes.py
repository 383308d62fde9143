"""Candidate core changes, tried by temporary patches of the vtprune modules (restored afterwards; nothing in
vtprune/ is edited): `FIX_CANDIDATES`, timed by every row (`protocol`) and by the scaling study (`scaling`).
"""

from __future__ import annotations

import contextlib
import sys

import torch


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
    import vtprune.integrations.common.clip_attention as module

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
