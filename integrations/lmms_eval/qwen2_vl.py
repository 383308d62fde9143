"""``--model vtprune_qwen2_vl``: lmms-eval's Qwen2-VL class (simple only, as in lmms-eval) with vtprune patched in."""

from .base import LeftPadding, ReportEachRun
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.qwen2_vl").Qwen2_VL


class VTPruneQwen2VL(LeftPadding, ReportEachRun, _Simple):
    """lmms-eval's Qwen2-VL (simple) with vtprune patched in."""

    is_simple = True
