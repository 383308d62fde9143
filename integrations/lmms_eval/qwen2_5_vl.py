"""``--model vtprune_qwen2_5_vl``: lmms-eval's Qwen2.5-VL classes with vtprune patched in."""

from .base import LeftPadding, ReportEachRun
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.qwen2_5_vl").Qwen2_5_VL
_Chat = import_lmms_module("lmms_eval.models.chat.qwen2_5_vl").Qwen2_5_VL  # imports the simple module first


class VTPruneQwen2_5_VL(LeftPadding, ReportEachRun, _Simple):
    """lmms-eval's Qwen2.5-VL (simple) with vtprune patched in."""

    is_simple = True


class VTPruneQwen2_5_VLChat(LeftPadding, ReportEachRun, _Chat):
    """lmms-eval's Qwen2.5-VL (chat) with vtprune patched in."""

    is_simple = False
