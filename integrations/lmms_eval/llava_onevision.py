"""``--model vtprune_llava_onevision``: lmms-eval's LLaVA-HF classes on a LLaVA-OneVision checkpoint (what ``llava_hf``
loads for ``model_type: llava_onevision``) with vtprune patched in, batched generation, images and videos."""

from .base import VTPruneMixin
from .batched_llava import LlavaChatLoop, LlavaSimpleLoop
from .loading import import_lmms_module

_Simple = import_lmms_module("lmms_eval.models.simple.llava_hf").LlavaHf
_Chat = import_lmms_module("lmms_eval.models.chat.llava_hf").LlavaHf


class VTPruneLlavaOnevision(VTPruneMixin, LlavaSimpleLoop, _Simple):
    """lmms-eval's LLaVA-HF (simple) for LLaVA-OneVision, with vtprune patched in; videos included."""

    is_simple = True
    accepts_video = True


class VTPruneLlavaOnevisionChat(VTPruneMixin, LlavaChatLoop, _Chat):
    """lmms-eval's LLaVA-HF (chat) for LLaVA-OneVision, with vtprune patched in; videos included."""

    is_simple = False
    accepts_video = True
