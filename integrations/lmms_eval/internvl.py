"""``--model vtprune_internvl``: lmms-eval's InternVL-HF class (chat; the InternVL3 / 3.5 "-hf" checkpoints) with
vtprune patched in and the batched chat loop of the LLaVA-HF classes (lmms-eval's own InternVL-HF is
batch-size-1 and turns generation errors into empty answers); images and videos."""

from .base import VTPruneMixin
from .batched_llava import LlavaChatLoop
from .loading import import_lmms_module

_Chat = import_lmms_module("lmms_eval.models.chat.internvl_hf").InternVLHf


class VTPruneInternVLChat(VTPruneMixin, LlavaChatLoop, _Chat):
    """lmms-eval's InternVL-HF (chat) with vtprune patched in; batched, videos included."""

    is_simple = False
    accepts_video = True

    def __init__(self, *args, batch_size=1, **kwargs) -> None:
        super().__init__(*args, batch_size=1, **kwargs)  # the parent asserts 1; the loop here batches
        self.batch_size_per_gpu = int(batch_size)

    @property
    def _image_processor(self):
        return self.processor

    @property
    def max_frames_num(self) -> int:
        return self.num_frames

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def load_video(self, video_path, max_frames_num):
        from lmms_eval.models.model_utils.load_video import load_video_decord

        return load_video_decord(video_path, max_frames_num)

    def _vtprune_processor_kwargs(self) -> dict:
        """The tiling lmms-eval's InternVL-HF asks the processor for (``min_patches`` / ``max_patches``)."""
        return {key: value for key, value in (("min_patches", self.min_patches), ("max_patches", self.max_patches)) if value is not None}
