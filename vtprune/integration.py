"""The contract a model family implements, the registry `vtprune.apply` searches, and the per-image reduction
loop every family shares.

An integration knows one model family (where its vision encoder, projector and placeholders are); it knows
nothing about any particular pruner: it builds `VisualTokens`, calls `pruner.reduce`, and splices the result
into the LLM input (see `vtprune.patching`). The library names no family: the built-in ones (the
``vtprune.integrations`` package) and any third-party package register theirs under the entry-point group
`ENTRY_POINT_GROUP`, loaded on the first look-up; `register_integration` adds one at run time.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Sequence

import torch

from .errors import ConfigError, UnsupportedModelError
from .patching import VLMSplice
from .pruners.base import Pruner
from .tokens import AttentionProbe, EncoderInfo, ImageStats, Reduction, VisualTokens

ENTRY_POINT_GROUP = "vtprune.integrations"
"""Entry points of this group name `Integration` classes (``name = "package.module:Class"``)."""

_INTEGRATIONS: list[type["Integration"]] = []
_entry_points_loaded = False


def register_integration(cls: type["Integration"]) -> type["Integration"]:
    """Class decorator adding an `Integration` to the list `vtprune.apply` searches."""
    if cls not in _INTEGRATIONS:
        _INTEGRATIONS.append(cls)
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name):
        try:
            cls = point.load()
        except Exception as error:
            raise ImportError(f"the model family {point.name!r} ({point.value}) failed to import: {error}") from error
        if not (isinstance(cls, type) and issubclass(cls, Integration)):
            raise TypeError(f"entry point {point.name!r} of {ENTRY_POINT_GROUP!r} names {point.value}, not an Integration")
        register_integration(cls)
    _entry_points_loaded = True


def supported_model_classes() -> list[str]:
    _load_entry_points()
    return sorted(name for cls in _INTEGRATIONS for name in cls.model_classes)


def family_options() -> set[str]:
    """Every option name some model family accepts in `vtprune.apply` (``budget_scope``, ``video_keep``, ...)."""
    _load_entry_points()
    return {name for cls in _INTEGRATIONS for name in cls.options}


def find_integration(model: Any) -> type["Integration"]:
    _load_entry_points()
    for cls in _INTEGRATIONS:
        if cls.matches(model):
            return cls
    if not _INTEGRATIONS:
        raise UnsupportedModelError(
            f"no model family is registered (entry-point group {ENTRY_POINT_GROUP!r} is empty): install vtprune "
            "with pip (pip install -e . in a clone) so that its integrations are registered"
        )
    raise UnsupportedModelError(
        f"vtprune has no integration for {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_model_classes())}"
    )


@dataclass
class EncodedImages:
    """The reduced visual tokens of every image of a batch, in the order the images were given."""

    embeds: list[torch.Tensor]  # per image [K_i, D_llm]
    order: list[torch.Tensor]  # per image [K_i]; -1 = CLS
    stats: list[ImageStats]
    selection_seconds: float = 0.0
    carried: list[list[torch.Tensor]] | None = None
    """Per image, the reduced values that travel with its tokens (`reduce_images`' ``carried``), ``[K_i, D]`` each."""
    segments: list[list[int] | None] | None = None
    """Per image, the sizes of the placeholder runs its tokens split into in the prompt (a video's frames between
    timestamps), or None for one run; see `vtprune.sequence.find_image_slots`."""

    @property
    def tokens_in(self) -> list[int]:
        return [s.tokens_in for s in self.stats]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_images(
    pruner: Pruner,
    features: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    encoder: EncoderInfo,
    project: Callable[[torch.Tensor], torch.Tensor],
    probe: AttentionProbe | None = None,
    cls_features: Sequence[torch.Tensor | None] | None = None,
    projected: Callable[[], Sequence[torch.Tensor]] | None = None,
    budgets: Sequence[int] | None = None,
    gather_projected: bool = False,
    carried: Sequence[Sequence[torch.Tensor]] | None = None,
) -> EncodedImages:
    """Run `pruner` on each image and return LLM-space embeddings of the surviving tokens.

    Args:
        features: per image ``[N_i, D_vision]`` projector inputs.
        project: the model's projector, applied to vision-space tokens.
        projected: returns per image ``[N_i, D_llm]`` projections of all tokens, computed once on demand
            (integrations project the whole batch at once, as the unpatched model does, so that keeping every
            token is bit-exact).
        budgets: tokens to keep per image; default: the pruner's own budget resolved per image.
        gather_projected: selected tokens always come from `projected`, never from projecting `features`: for
            families whose LLM tokens are mixed after the projector (pooled or resized), so that the projection
            of a feature is not the LLM's token.
        carried: per image a list of ``[N_i, D]`` values that travel with its tokens (Qwen3-VL's DeepStack
            levels), each reduced as the tokens were (`Reduction.carry`); returned as `EncodedImages.carried`.
    """
    cache: dict[str, Sequence[torch.Tensor]] = {}

    def all_projected() -> Sequence[torch.Tensor]:
        if "p" not in cache:
            cache["p"] = projected() if projected is not None else [project(f) for f in features]
        return cache["p"]

    device = features[0].device if len(features) else torch.device("cpu")
    _synchronize(device)
    started = time.perf_counter()
    embeds, orders, stats, carried_out = [], [], [], []
    for i, feats in enumerate(features):
        n = feats.shape[0]
        keep = budgets[i] if budgets is not None else pruner.budget.resolve(n, where=f"image {i}")
        tokens = VisualTokens(
            feats,
            grids[i],
            encoder,
            probe=probe,
            image=i,
            cls_feature=None if cls_features is None else cls_features[i],
            embeddings=lambda i=i: all_projected()[i],
        )
        reduction = pruner.reduce(tokens, keep)
        _check_reduction(pruner, reduction, n, keep)
        if reduction.features is None:
            order = reduction.order.to(feats.device)
            if "p" in cache or keep == n or gather_projected:
                # Already projected for the pruner, or keep-all: gather from the batch projection, which is
                # bit-identical to the unpatched model's.
                gathered = all_projected()[i][order]
            else:
                gathered = project(feats[order])  # the projector is per-token: project only what the LLM gets
        elif reduction.space == "vision":
            gathered = project(reduction.features)
        else:
            gathered = reduction.features
        embeds.append(gathered)
        orders.append(reduction.order)
        stats.append(ImageStats.from_reduction(reduction, n))
        if carried is not None:
            carried_out.append([reduction.carry(values) for values in carried[i]])
    _synchronize(device)
    # Selection time includes projecting the tokens the LLM receives (the unpatched model projects all N).
    return EncodedImages(
        embeds=embeds, order=orders, stats=stats, selection_seconds=time.perf_counter() - started,
        carried=carried_out if carried is not None else None,
    )


def _check_reduction(pruner: Pruner, reduction: Reduction, n: int, keep: int) -> None:
    order = reduction.order
    name = pruner.name or type(pruner).__name__
    if order.ndim != 1 or order.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"pruner {name!r} returned an order that is not a 1-D integer tensor")
    if order.numel() != keep:
        raise RuntimeError(f"pruner {name!r} returned {order.numel()} tokens for a budget of {keep}")
    if order.numel() and (int(order.max()) >= n or int(order.min()) < -1):
        raise RuntimeError(f"pruner {name!r} returned token indices outside [-1, {n})")
    if reduction.features is None and bool((order < 0).any()):
        raise RuntimeError(f"pruner {name!r} selected the CLS token without returning features")
    if reduction.features is not None and reduction.features.shape[0] != keep:
        raise RuntimeError(f"pruner {name!r} returned {reduction.features.shape[0]} features for {keep} tokens")


class Integration(abc.ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods.

    `install` decides what is patched on the model instance; everything it sets goes through
    ``handle.set_attribute`` so that `PruneHandle.remove` restores it.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    """Class names this integration accepts (for error messages)."""
    default_positions: ClassVar[str | None] = "compact"
    """Default position convention; None when the family has no LLM positions (plain ViTs)."""
    options: ClassVar[dict[str, Any]] = {}
    """Family-specific `vtprune.apply` options and their defaults (e.g. LLaVA-NeXT's budget_scope)."""

    def __init__(self, model: torch.nn.Module, pruner: Pruner, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(f"{type(self).__name__} got unknown option(s) {unknown}; valid: {sorted(self.options)}")
        self.model = model
        self.pruner = pruner
        self.settings = {**self.options, **options}

    @classmethod
    @abc.abstractmethod
    def matches(cls, model: Any) -> bool:
        """Whether this integration handles `model`."""

    def validate(self) -> None:
        """Apply-time checks (e.g. the budget against the tokens per image); raise `ConfigError`."""

    @abc.abstractmethod
    def encoder_info(self) -> EncoderInfo: ...

    @abc.abstractmethod
    def install(self, handle: Any) -> None:
        """Patch `self.model` (through ``handle.set_attribute``) so that its calls are pruned."""

    encoder_merging_unsupported: ClassVar[str] = "this model family has no in-encoder merging support yet"
    """Why the family cannot run in-encoder merging methods (the error's reason) unless it implements
    `EncoderMerging`."""

    def check_budget(self, grid: tuple[int, int]) -> None:
        """Fail at apply time, not at the first forward, when every image (a fixed `grid` of tokens) would fail."""
        tokens = grid[0] * grid[1]
        keep = self.pruner.budget.resolve(tokens, where=f"each image of {type(self.model).__name__}")
        self.pruner.check(keep, grid)


class VLMIntegration(Integration):
    """A VLM whose processor writes image placeholder tokens that the model fills with projected features.

    The shared machinery (`vtprune.patching.VLMSplice`) encodes and reduces the images, shortens the LLM input
    and calls the original forward / generate with ``inputs_embeds``.
    """

    visual_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Forward keyword arguments that carry visual input: a call with any of them is pruned."""
    encoder_kwargs: ClassVar[tuple[str, ...]] = ()
    """Further keyword arguments `encode` reads; like `visual_kwargs`, never passed on after a pruned call."""
    token_kwargs: ClassVar[dict[str, int]] = {"labels": -100}
    """Per-token ``[B, L]`` keyword arguments shortened along with the sequence, and their padding value."""

    def install(self, handle: Any) -> None:
        VLMSplice(handle, self).install()

    def has_visual_input(self, inputs: dict) -> bool:
        return any(inputs.get(name) is not None for name in self.visual_kwargs)

    @abc.abstractmethod
    def encode(self, inputs: dict) -> EncodedImages:
        """Run the vision encoder on the visual inputs of one call and reduce every image."""

    @abc.abstractmethod
    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` boolean mask of image placeholder tokens."""

    @abc.abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def original_position_ids(self, inputs: dict, for_generate: bool) -> torch.Tensor:
        """Positions the unpatched model would give the unpruned sequence of this call."""

    def position_ids_for(self, inputs: dict, for_generate: bool, positions: str) -> torch.Tensor | None:
        """Positions of the unpruned sequence handed to `compress`: the user's if given; the model's own when
        preserving them; None for compact, so the model numbers the pruned sequence as it would any prompt."""
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        if positions == "preserve":
            return self.original_position_ids(inputs, for_generate=for_generate)
        return None

    def after_prefill(self, sequence: Any, for_generate: bool) -> None:
        """Hook after the pruned prefill input is built (e.g. to update model state that decoding reads)."""

    @property
    def pad_token_id(self) -> int:
        config = self.model.config
        for cfg in (config, getattr(config, "text_config", None)):
            pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if pad is not None:
                return int(pad)
        return 0


class EncoderMerging(abc.ABC):
    """The capability to run an in-encoder merging method (`vtprune.merging.EncoderMerger`, e.g. DyMU): a family
    opts in by also subclassing this (VLM families: `VLMEncoderMerging`); `vtprune.apply` and `vtprune.calibrate`
    refuse merging methods on the others with their `Integration.encoder_merging_unsupported` reason."""

    def validate_merging(self) -> None:
        """Apply-time checks for an in-encoder merging method (replaces `Integration.validate`, which checks
        budgets)."""

    @abc.abstractmethod
    def merging_geometry(self) -> tuple[int, int]:
        """``(blocks, tokens)``: encoder blocks that run before the features are taken, and visual tokens per
        image (per crop) before merging."""

    @abc.abstractmethod
    def calibration_pixels(self, images: Sequence[Any], processor: Any) -> torch.Tensor:
        """Encoder input for a list of images (crops flattened), for `vtprune.calibrate`."""

    @abc.abstractmethod
    def run_merging(self, pixel_values: torch.Tensor, merger: Any) -> tuple[Any, list[torch.Tensor]]:
        """Run the vision encoder on `pixel_values` with `merger`; the final `MergeState` and per-block counts."""


class VLMEncoderMerging(EncoderMerging):
    """`EncoderMerging` for a `VLMIntegration`: the splice encodes with `encode_merged` instead of `encode`."""

    @abc.abstractmethod
    def encode_merged(self, inputs: dict) -> EncodedImages:
        """Run the vision encoder with the merging method and return every image's merged tokens."""


def encoder_merging_refusal(integration_cls: type[Integration]) -> str | None:
    """None when the family runs in-encoder merging methods, else the reason it cannot."""
    return None if issubclass(integration_cls, EncoderMerging) else integration_cls.encoder_merging_unsupported
