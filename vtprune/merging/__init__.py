"""Model-agnostic token merging inside the vision encoder (DyMU's DToMe) and virtual unmerging (VTU) math."""

from .base import EncoderMerger
from .dtome import MergeState, attention_bias, batch_threshold, bipartite_best, groups, merge_edges, threshold_edges
from .vtu import VirtualMap, build_virtual_map, expand, scatter_mean, virtual_attention_mask

__all__ = [
    "EncoderMerger",
    "MergeState",
    "VirtualMap",
    "attention_bias",
    "batch_threshold",
    "bipartite_best",
    "build_virtual_map",
    "expand",
    "groups",
    "merge_edges",
    "scatter_mean",
    "threshold_edges",
    "virtual_attention_mask",
]
