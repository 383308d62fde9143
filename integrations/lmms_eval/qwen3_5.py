"""``--model vtprune_qwen3_5``: lmms-eval's Qwen3.5 classes (dense and MoE) with vtprune patched in."""

from .base import LeftPadding, ReportEachRun
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.qwen3_5").Qwen3_5
_Chat = import_lmms_module("lmms_eval.models.chat.qwen3_5").Qwen3_5


class VTPruneQwen3_5(LeftPadding, ReportEachRun, _Simple):
    """lmms-eval's Qwen3.5 (simple) with vtprune patched in."""

    is_simple = True


class VTPruneQwen3_5Chat(LeftPadding, ReportEachRun, _Chat):
    """lmms-eval's Qwen3.5 (chat) with vtprune patched in."""

    is_simple = False
