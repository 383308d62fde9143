"""``--model vtprune_qwen2_5_vl``: lmms-eval's Qwen2.5-VL classes with vtprune patched in."""

from .base import QwenLeftPadding, ReportEachRun
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.qwen2_5_vl").Qwen2_5_VL
_Chat = import_lmms_module("lmms_eval.models.chat.qwen2_5_vl").Qwen2_5_VL  # imports the simple module first


class VTPruneQwen2_5_VL(QwenLeftPadding, ReportEachRun, _Simple):
    """lmms-eval's Qwen2.5-VL (simple) with vtprune patched in."""

    is_simple = True


class VTPruneQwen2_5_VLChat(QwenLeftPadding, ReportEachRun, _Chat):
    """lmms-eval's Qwen2.5-VL (chat) with vtprune patched in."""

    is_simple = False
