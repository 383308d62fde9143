"""vtprune's part of every lmms-eval model class: strip vtprune's ``--model_args``, patch the loaded model,
report the visual-token statistics, and restore the model in ``clean``."""

from __future__ import annotations

from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger

from vtprune.api import apply

from .settings import PruneSettings, pop_vtprune_args
from .token_stats import PrefillCall, VisualTokenLog, gather_across_ranks, ranks_reporting
from .token_stats import summary as summary_of

__all__ = ["LeftPadding", "ReportEachRun", "VTPruneMixin"]


class VTPruneMixin:
    """vtprune's part of every model class: argument stripping, patching, statistics."""

    vtprune_settings: PruneSettings
    vtprune_handle = None

    def __init__(self, *args, **kwargs) -> None:
        settings = pop_vtprune_args(kwargs)
        super().__init__(*args, **kwargs)
        self._vtprune_install(settings)

    def _vtprune_install(self, settings: PruneSettings) -> None:
        self.vtprune_settings = settings
        model = self.model  # unwrapped by lmms-eval when accelerate wrapped it
        self.vtprune_handle = None
        if settings.enabled:
            self.vtprune_handle = apply(
                model, settings.pruner, keep=settings.keep, ratio=settings.ratio, positions=settings.positions, **settings.options
            )
            logger.info(f"vtprune: {self.vtprune_handle!r}")
        else:
            logger.info("vtprune: pruner=none, the model runs unpatched (visual-token statistics are still logged)")
        self._vtprune_log = VisualTokenLog(model, self.vtprune_handle)

    def _vtprune_report(self, calls: list[PrefillCall]) -> dict[str, float] | None:
        """Log one results entry for `calls` (gathered over ranks); returns the summary on rank 0."""
        images = [(i, o, call.selection_ms / len(call.images)) for call in calls for (_, i, o) in call.images]
        images, ranks = gather_across_ranks(images), ranks_reporting()
        if not images or getattr(self, "rank", 0) != 0:
            return None
        summary = {**summary_of(images), "vtprune_ranks": float(ranks)}
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=summary)
        logger.info(
            f"vtprune ({self.vtprune_settings.describe()}): {len(images)} images, visual tokens per image "
            f"{summary['vtprune_visual_tokens_in']:.1f} -> {summary['vtprune_visual_tokens_out']:.1f} "
            f"(out min {summary['vtprune_visual_tokens_out_min']:.0f}, max {summary['vtprune_visual_tokens_out_max']:.0f}), "
            f"selection {summary['vtprune_selection_ms_per_image']:.2f} ms/image, over {ranks} process(es)"
        )
        return summary

    def clean(self):
        log = getattr(self, "_vtprune_log", None)
        if log is not None:
            log.close()
        if self.vtprune_handle is not None:
            self.vtprune_handle.remove()
            self.vtprune_handle = None
        return super().clean()


class ReportEachRun:
    """Qwen: lmms-eval's own batched loop, with the statistics of each request run reported at its end."""

    def generate_until(self, requests):
        self._vtprune_log.take()
        try:
            return super().generate_until(requests)
        finally:
            self._vtprune_report(self._vtprune_log.take())


class LeftPadding(VTPruneMixin):
    """Classes that batch with the processor's own padding (Qwen, Gemma 3): batched generation appends after the
    last column, so the prompts are padded on the left (lmms-eval's Qwen2-VL processor pads on the right)."""

    def _vtprune_install(self, settings: PruneSettings) -> None:
        tokenizer = getattr(getattr(self, "processor", None), "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        super()._vtprune_install(settings)
