"""Batched generation for lmms-eval's LLaVA-HF classes (which are batch-size-1): left padding, one ``generate`` per
batch, the task's stop strings and generation settings, lmms-eval's ``Collator`` order and ``cache_hook``; and a
``loglikelihood`` that stays correct when vtprune shortens the prompt. Imported only when lmms-eval asks for a
LLaVA-HF model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmms_eval.api.instance import TokenCounts

__all__ = ["BatchedLlava", "LlavaChatLoop", "LlavaSimpleLoop", "VideoFrames", "VisualTokenCounts"]


@dataclass
class VideoFrames:
    """One video of a request, decoded: ``[frames, height, width, 3]`` (what lmms-eval's ``load_video`` returns)."""

    frames: object


def split_media(visuals: list) -> tuple[list, list]:
    """Images and decoded videos of a batch, each in order."""
    videos = [v.frames for v in visuals if isinstance(v, VideoFrames)]
    return [v for v in visuals if not isinstance(v, VideoFrames)], videos


@dataclass
class VisualTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus the visual tokens of each image of the request."""

    visual_tokens_in: list = field(default_factory=list)
    visual_tokens_out: list = field(default_factory=list)

    def to_dict(self):
        counts = super().to_dict()
        counts["visual_tokens_in"] = list(self.visual_tokens_in)
        counts["visual_tokens_out"] = list(self.visual_tokens_out)
        return counts


class BatchedLlava:
    """Batched ``generate_until`` and a pruning-safe ``loglikelihood`` for lmms-eval's LLaVA-HF classes."""

    accepts_video = False
    """Whether the family's model takes videos (LLaVA-OneVision): a video visual is then decoded and passed as
    ``videos=`` to the processor; otherwise it is refused."""

    def __init__(self, *args, **kwargs) -> None:
        # lmms-eval's LLaVA-HF passes its default device_map="" to from_pretrained on a single process, which
        # transformers 5 rejects: load straight onto `device` instead (what the empty map meant). Data-parallel
        # GPU runs keep "" so that lmms-eval picks cuda:<local rank> itself; data-parallel CPU runs (no CUDA, or
        # --device cpu) load onto the CPU, where lmms-eval would otherwise ask for cuda:<local rank>, and take
        # their rank from the evaluator.
        if not kwargs.get("device_map"):
            import torch
            from accelerate import PartialState

            device = str(kwargs.get("device") or "cuda")
            if PartialState().num_processes == 1:
                kwargs["device_map"] = device
            elif device == "cpu" or not torch.cuda.is_available():
                kwargs["device_map"] = kwargs["device"] = "cpu"
        super().__init__(*args, **kwargs)

    def _vtprune_processor_kwargs(self) -> dict:
        """Further processor arguments of the family (InternVL: its tiling)."""
        return {}

    def _vtprune_chat_template_text(self, context: str) -> str:
        from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

        messages = [{"role": "user", "content": context}]
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _vtprune_generate(self, texts: list[str], images: list, gen_kwargs: dict) -> tuple[list[str], list]:
        """One batched generate (`images`: the batch's images and `VideoFrames`, in order). Returns the decoded
        continuations and a token-counts object per row."""
        import torch

        processor = self._image_processor
        processor.tokenizer.padding_side = "left"
        images, videos = split_media(images)
        inputs = processor(
            images=images or None, videos=videos or None, text=texts, padding=True, return_tensors="pt", **self._vtprune_processor_kwargs()
        )
        inputs = inputs.to(self._device, self.model.dtype)
        temperature = gen_kwargs.get("temperature", 0) or 0
        do_sample = float(temperature) > 0
        self._vtprune_log.take()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=gen_kwargs.get("top_p") if do_sample else None,
                num_beams=gen_kwargs.get("num_beams", 1) or 1,
                max_new_tokens=gen_kwargs.get("max_new_tokens", 1024),
                use_cache=self.use_cache,
                pad_token_id=self.eot_token_id,
                eos_token_id=self.eot_token_id,
            )
        calls = self._vtprune_log.take()
        self._vtprune_calls.extend(calls)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

        prefill = inputs["attention_mask"].sum(dim=1).tolist()
        per_row_in: list[list[int]] = [[] for _ in texts]
        per_row_out: list[list[int]] = [[] for _ in texts]
        if calls:
            call = calls[0]
            prefill = call.prefill or prefill
            for row, tokens_in, tokens_out in call.images:
                per_row_in[row].append(tokens_in)
                per_row_out[row].append(tokens_out)
        eos, pad = self.eot_token_id, self.tokenizer.pad_token_id
        counts = []
        for row in range(len(texts)):
            ids = new_tokens[row].tolist()
            generated = next((i for i, t in enumerate(ids) if t == eos), len(ids))
            if pad is not None and pad != eos:
                generated = min(generated, next((i for i, t in enumerate(ids) if t == pad), len(ids)))
            counts.append(
                VisualTokenCounts(
                    input_tokens=int(prefill[row]),
                    output_tokens=generated,
                    visual_tokens_in=per_row_in[row],
                    visual_tokens_out=per_row_out[row],
                )
            )
        return decoded, counts

    @staticmethod
    def _vtprune_until(gen_kwargs: dict, default: str) -> list[str]:
        until = gen_kwargs.pop("until", None)
        if until is None:
            return [default]
        if isinstance(until, str):
            return [until]
        if isinstance(until, (list, tuple)):
            return list(until)
        raise ValueError(f"Expected `gen_kwargs['until']` to be of type Union[str,list] but got {type(until)}")

    @staticmethod
    def _vtprune_cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def _vtprune_split_visuals(self, visuals, where: str) -> list:
        """The request's images, and with `accepts_video` its videos as `VideoFrames` (a path is read with
        lmms-eval's ``load_video``, ``max_frames_num`` frames; an array of frames is taken as it is)."""
        from PIL import Image

        media = []
        for visual in visuals or []:
            if visual is None:
                continue
            if isinstance(visual, Image.Image):
                media.append(visual)
            elif self.accepts_video and isinstance(visual, str):
                media.append(VideoFrames(self.load_video(visual, self.max_frames_num)))
            elif self.accepts_video and getattr(visual, "ndim", None) == 4:
                media.append(VideoFrames(visual))
            elif self.accepts_video:
                raise TypeError(
                    f"{where}: a visual is a PIL image, a video path or a [frames, height, width, 3] array; got a "
                    f"{type(visual).__name__}"
                )
            else:
                raise NotImplementedError(
                    f"{where}: vtprune's LLaVA-HF models evaluate images and text; got a {type(visual).__name__} "
                    "visual (a video?). Use vtprune_llava_onevision for video tasks on LLaVA-OneVision."
                )
        return media

    @staticmethod
    def _vtprune_placeholders(context: str, media: list) -> str:
        """Prepend the image / video tokens a prompt lacks (e.g. MME writes none), as lmms-eval's LLaVA-HF does."""
        from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN

        images, videos = split_media(media)
        prefix = []
        if images and DEFAULT_IMAGE_TOKEN not in context:
            prefix.append(" ".join([DEFAULT_IMAGE_TOKEN] * len(images)))
        if videos and DEFAULT_VIDEO_TOKEN not in context:
            prefix.append(" ".join([DEFAULT_VIDEO_TOKEN] * len(videos)))
        return "\n".join(prefix + [context]) if prefix else context

    def _vtprune_run(self, chunks, build, total: int) -> list:
        """Run `chunks` (lists of request args); `build(args) -> (text, images, gen_kwargs, cache_key)`."""
        from lmms_eval.api.instance import GenerationResult
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        from tqdm import tqdm

        results = []
        self._vtprune_calls = []
        pbar = tqdm(total=total, disable=(self.rank != 0), desc="Model Responding")
        elapsed, generated = 0.0, 0
        try:
            for chunk in chunks:
                built = [build(args) for args in chunk]
                texts = [b[0] for b in built]
                images = [image for b in built for image in b[1]]
                gen_kwargs = dict(built[0][2])  # the Collator groups requests by their generation kwargs
                until = self._vtprune_until(gen_kwargs, self.tok_decode(self.eot_token_id))
                started = time.perf_counter()
                decoded, counts = self._vtprune_generate(texts, images, gen_kwargs)
                elapsed += time.perf_counter() - started
                generated += sum(c.output_tokens for c in counts)
                for (text, _, original_kwargs, cache_key), answer, count in zip(built, decoded, counts):
                    answer = self._vtprune_cut(answer, until)
                    results.append(GenerationResult(text=answer, token_counts=count))
                    self.cache_hook.add_partial("generate_until", (cache_key, original_kwargs), answer)
                    pbar.update(1)
        finally:
            pbar.close()
            calls, self._vtprune_calls = self._vtprune_calls, []
            self._vtprune_report(calls)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed if elapsed > 0 else 0.0,
            additional_metrics={"rank": self.rank},
        )
        return results

    def loglikelihood(self, requests):
        """As lmms-eval's LLaVA-HF (same prompt, same ``(loss, is_greedy)`` convention), batch size 1, but with
        the greedy check aligned at the end of the sequence: a pruned prompt is shorter than the processor's."""
        import torch
        from tqdm import tqdm

        results = []
        self._vtprune_log.take()
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        try:
            for context, doc_to_target, doc_to_visual, doc_id, task, split in [req.args for req in requests]:
                doc = self.task_dict[task][split][doc_id]
                continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
                media = self._vtprune_split_visuals(self.flatten([doc_to_visual(doc)]), "loglikelihood")
                context = self._vtprune_placeholders(context, media)
                images, videos = split_media(media)
                visuals = dict(images=images or None, videos=videos or None)
                prompt = self._vtprune_chat_template_text(context)
                messages = [{"role": "user", "content": context}, {"role": "assistant", "content": continuation}]
                full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
                inputs = self._image_processor(text=[full], **visuals, return_tensors="pt").to(self._device, self.model.dtype)
                context_length = self._image_processor(text=[prompt], **visuals, return_tensors="pt")["input_ids"].shape[1]
                labels = inputs["input_ids"].clone()
                labels[:, :context_length] = -100
                with torch.inference_mode():
                    outputs = self.model(**inputs, labels=labels)
                continuation_ids = inputs["input_ids"][0, context_length:]
                n = continuation_ids.shape[0]
                greedy = outputs.logits[0, -n - 1 : -1].argmax(dim=-1) if n else continuation_ids
                results.append((float(outputs.loss.item()), bool((greedy.to(continuation_ids.device) == continuation_ids).all())))
                pbar.update(1)
        finally:
            pbar.close()
            self._vtprune_report(self._vtprune_log.take())
        return results


class LlavaSimpleLoop(BatchedLlava):
    def generate_until(self, requests):
        from lmms_eval import utils

        def sort_key(args):
            return -len(self.tok_encode(args[0])), args[0]

        def build(args):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            doc = self.task_dict[task][split][doc_id]
            media = self._vtprune_split_visuals(self.flatten([doc_to_visual(doc) or []]), task)
            return self._vtprune_chat_template_text(self._vtprune_placeholders(context, media)), media, gen_kwargs, context

        collator = utils.Collator([req.args for req in requests], sort_key, grouping=True)
        chunks = collator.get_batched(n=self.batch_size, batch_fn=None)
        return collator.get_original(self._vtprune_run(chunks, build, len(requests)))


class LlavaChatLoop(BatchedLlava):
    def generate_until(self, requests):
        from lmms_eval import utils
        from lmms_eval.protocol import ChatMessages

        def sort_key(args):
            return args[3], args[3]

        def build(args):
            _, doc_to_messages, gen_kwargs, doc_id, task, split = args
            messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            images, videos, _ = messages.extract_media()
            media = self._vtprune_split_visuals(list(images) + list(videos), task)  # videos: refused unless accepts_video
            text = self._image_processor.apply_chat_template(messages.model_dump()["messages"], tokenize=False, add_generation_prompt=True)
            return text, media, gen_kwargs, text

        collator = utils.Collator([req.args for req in requests], sort_key, group_fn=lambda args: args[2], grouping=True)
        chunks = collator.get_batched(n=self.batch_size, batch_fn=None)
        return collator.get_original(self._vtprune_run(chunks, build, len(requests)))
