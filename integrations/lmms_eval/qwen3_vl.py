"""``--model vtprune_qwen3_vl``: lmms-eval's Qwen3-VL classes (dense and MoE) with vtprune patched in."""

from .base import LeftPadding, ReportEachRun
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.qwen3_vl").Qwen3_VL
_Chat = import_lmms_module("lmms_eval.models.chat.qwen3_vl").Qwen3_VL


class VTPruneQwen3VL(LeftPadding, ReportEachRun, _Simple):
    """lmms-eval's Qwen3-VL (simple) with vtprune patched in."""

    is_simple = True


class VTPruneQwen3VLChat(LeftPadding, ReportEachRun, _Chat):
    """lmms-eval's Qwen3-VL (chat) with vtprune patched in."""

    is_simple = False
