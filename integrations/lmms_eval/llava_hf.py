"""``--model vtprune_llava_hf``: lmms-eval's LLaVA-HF classes (LLaVA-1.5 and what ``llava_hf`` loads) with vtprune
patched in and batched generation."""

from .base import VTPruneMixin
from .batched_llava import LlavaChatLoop, LlavaSimpleLoop
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.llava_hf").LlavaHf
_Chat = import_lmms_module("lmms_eval.models.chat.llava_hf").LlavaHf


class VTPruneLlavaHf(VTPruneMixin, LlavaSimpleLoop, _Simple):
    """lmms-eval's LLaVA-HF (simple) with vtprune patched in and batched generation."""

    is_simple = True


class VTPruneLlavaHfChat(VTPruneMixin, LlavaChatLoop, _Chat):
    """lmms-eval's LLaVA-HF (chat) with vtprune patched in and batched generation."""

    is_simple = False
