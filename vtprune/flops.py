"""Prefill FLOPs of a decoder-only LLM, in the convention of FastV and DivPrune (reference 0.6).

Per decoder layer ``4 n d^2 + 2 n^2 d + 2 n d m`` for a sequence of ``n`` tokens, hidden width ``d`` and FFN
width ``m``: attention projections, attention scores and values, and the FFN, each multiply-add counted once.
LLaVA-1.5-7B (d=4096, m=11008, 32 layers) with 576 visual and ~60 text tokens gives 3.31 TFLOPs; 64 visual
tokens give 0.63 TFLOPs. Some papers count twice this (FasterVLM, HiPrune): compare like with like.
"""

from __future__ import annotations

CONVENTION = "FastV/DivPrune: per layer 4nd^2 + 2n^2d + 2ndm (n tokens, d hidden, m FFN width)"


def prefill_flops(tokens: float, hidden: int, ffn: int, layers: int) -> float:
    """FLOPs to prefill `tokens` tokens through `layers` decoder layers."""
    n = float(tokens)
    return layers * (4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * ffn)


def llm_geometry(config) -> tuple[int, int, int]:
    """``(hidden, ffn, layers)`` of a transformers VLM or LLM config."""
    text = getattr(config, "text_config", None) or config
    return text.hidden_size, text.intermediate_size, text.num_hidden_layers
