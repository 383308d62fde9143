"""``--model vtprune_gemma3``: lmms-eval's Gemma 3 class (batched; simple only, as in lmms-eval) with vtprune
patched in."""

from .base import LeftPadding, ReportEachRun
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.gemma3").Gemma3


class VTPruneGemma3(LeftPadding, ReportEachRun, _Simple):
    """lmms-eval's Gemma 3 (simple) with vtprune patched in."""

    is_simple = True
