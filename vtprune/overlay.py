"""Overlays: what a pruner did to one image, drawn on the image.

    import vtprune
    handle = vtprune.apply(model, "visionzip", keep=64)
    model(**inputs)
    view = vtprune.overlay.center_crop_view(img, 336)          # the image as LLaVA-1.5-HF's processor crops it
    vtprune.visualize(view, handle.stats[0]).save("visionzip.png")
    # or at full resolution, the part the encoder never saw darkened:
    vtprune.visualize(img, handle.stats[0], region=vtprune.overlay.center_crop_region(img.size, 336))

`visualize` maps the token grid onto the image cell for cell: token ``(r, c)`` of a ``rows x cols`` grid
covers the pixels whose centres fall in the ``(r, c)`` cell of ``region`` split into ``rows x cols`` equal
cells. `region` defaults to the whole image. That is only right if it is the part of the image the encoder
saw, after the processor's resizing and cropping. Either pass the processed image (`center_crop_view`
reproduces the CLIP / LLaVA-1.5-HF processors: shortest edge to `size`, bicubic, centre crop), or pass the
original with ``region=center_crop_region(original.size, size)``; for other processors, crop or pad the
same way first. The overlay always has exactly the size of the image passed in.

What is drawn, from `ImageStats.assignment` (output slot of each original token, -1 = dropped):

- dropped tokens are darkened (pixel values multiplied by `dim`);
- tokens that are the only member of their output slot (pure selection, VisionZip's dominant tokens) keep
  their pixels unchanged;
- tokens sharing an output slot with other tokens (a merge group: VisionZip's contextual tokens, pool cells,
  DyMU merges) are tinted with one translucent colour per group (`alpha`), distinct hues for neighbouring slots;
- the representative tokens (`ImageStats.kept`: the position each output token takes) get an outline, drawn
  inside their cell so that it never covers another cell. The CLS token (order -1) has no cell and is not drawn.

Grids that are not square need `grid`: Qwen2-VL / Qwen2.5-VL tokens form an ``(h / 28) x (w / 28)`` grid
(``image_grid_thw // [1, 2, 2]``) over the whole resized image (the processor resizes without cropping, so
``region`` stays the whole image). LLaVA-NeXT's packed sequence (crops plus row newlines) is not one grid over
one image and is not supported: `visualize` refuses stats whose `tokens_in` is not ``rows * cols``.
"""

from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np
import torch

from .tokens import ImageStats

__all__ = ["visualize", "center_crop_view", "center_crop_region", "save_overlays", "group_colour"]

_GOLDEN = 0.6180339887498949


def group_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of merge group number `index` (golden-ratio hues: neighbouring indices differ a lot)."""
    hue = (index * _GOLDEN) % 1.0
    saturation = 0.85 if index % 2 == 0 else 0.6
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 1.0)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def center_crop_view(image, size: int):
    """The image as a CLIP-style processor shows it to the encoder: shortest edge to `size` (bicubic), then the
    centre ``size x size`` crop. RGB. Use it as the `image` of `visualize` for LLaVA-1.5(-HF) and CLIP."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def center_crop_region(image_size: tuple[int, int], size: int) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of the part of an image of `image_size` ``(width, height)`` that
    `center_crop_view` keeps, in the original image's pixel coordinates: pass it as `visualize`'s `region` to
    draw on the full-resolution original instead of the crop."""
    width, height = int(image_size[0]), int(image_size[1])
    scale = size / min(width, height)
    new_w, new_h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = new_w / width, new_h / height
    return left / sx, top / sy, (left + size) / sx, (top + size) / sy


def _grid_for(stats: ImageStats, grid: tuple[int, int] | None) -> tuple[int, int]:
    n = int(stats.tokens_in)
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(
                f"visualize: {n} tokens are not a square grid; pass grid=(rows, cols) with rows * cols == {n}"
            )
        return side, side
    rows, cols = int(grid[0]), int(grid[1])
    if rows <= 0 or cols <= 0 or rows * cols != n:
        raise ValueError(f"visualize: grid {tuple(grid)} does not hold the {n} tokens of these stats")
    return rows, cols


def _cells(length: int, start: float, stop: float, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell of each pixel 0..length-1 along one axis (-1 or `cells` outside ``[start, stop)``; a pixel belongs
    to the cell containing its centre), and the first and last pixel of every cell."""
    centres = np.arange(length, dtype=np.float64) + 0.5
    cell = np.floor((centres - start) * cells / (stop - start)).astype(np.int64)
    cell = np.clip(cell, -1, cells)
    ids = np.arange(cells)
    first = np.searchsorted(cell, ids, side="left")
    last = np.searchsorted(cell, ids, side="right") - 1
    if (last < first).any():
        raise ValueError(f"visualize: the image is too small to give each of the {cells} token cells a pixel")
    return cell, first, last


def visualize(
    image,
    stats: ImageStats,
    grid: tuple[int, int] | None = None,
    *,
    region: tuple[float, float, float, float] | None = None,
    dim: float = 0.3,
    alpha: float = 0.45,
    outline: tuple[int, int, int] | None = (255, 255, 0),
    outline_width: int | None = None,
):
    """Draw `stats` (one image's `ImageStats`) on `image` (a PIL image) and return a new RGB PIL image of the
    same size.

    Args:
        grid: ``(rows, cols)`` of the token grid; default: the square grid of ``stats.tokens_in`` tokens.
        region: ``(left, top, right, bottom)`` in pixels, the part of `image` the token grid covers (what the
            encoder saw); default: the whole image, which must then be the image as the encoder saw it.
            `center_crop_region` gives the region of a CLIP-style centre crop. Pixels outside it, which the
            encoder never saw, are darkened like dropped tokens.
        dim: brightness factor for dropped tokens (0 = black, 1 = unchanged).
        alpha: opacity of a merge group's colour over its members' pixels.
        outline: RGB colour of the outline around representative (kept) tokens; None draws no outline.
        outline_width: pixels; default about 1/12 of a cell, at least 1.
    """
    from PIL import Image, ImageDraw

    if not isinstance(image, Image.Image):
        raise TypeError(f"visualize: image must be a PIL image, got {type(image).__name__}")
    if not 0.0 <= dim <= 1.0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"visualize: dim and alpha must lie in [0, 1], got dim={dim}, alpha={alpha}")
    rows, cols = _grid_for(stats, grid)
    assignment = torch.as_tensor(stats.assignment).reshape(-1).long().cpu().numpy()
    if assignment.shape[0] != rows * cols:
        raise ValueError(f"visualize: assignment has {assignment.shape[0]} entries for {rows * cols} tokens")
    width, height = image.size
    left, top, right, bottom = (0.0, 0.0, float(width), float(height)) if region is None else map(float, region)
    if not (right > left and bottom > top):
        raise ValueError(f"visualize: region {tuple(region)} is empty")
    col, x_first, x_last = _cells(width, left, right, cols)
    row, y_first, y_last = _cells(height, top, bottom, rows)

    # Per-token brightness factor and tint: pixel * factor * (1 - a) + colour * a.
    n = rows * cols
    factor = np.ones(n + 1, dtype=np.float32)  # entry n: outside the region
    factor[:n][assignment < 0] = dim
    factor[n] = dim
    tint = np.zeros((n + 1, 3), dtype=np.float32)
    tint_alpha = np.zeros(n + 1, dtype=np.float32)
    valid = assignment >= 0
    if valid.any():
        slots, sizes = np.unique(assignment[valid], return_counts=True)
        for number, slot in enumerate(slots[sizes > 1]):
            members = np.flatnonzero(assignment == slot)
            tint[members] = group_colour(number)
            tint_alpha[members] = alpha

    inside = ((row >= 0) & (row < rows))[:, None] & ((col >= 0) & (col < cols))[None, :]
    token = np.where(inside, np.clip(row, 0, rows - 1)[:, None] * cols + np.clip(col, 0, cols - 1)[None, :], n)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = tint_alpha[token][..., None]
    out = pixels * factor[token][..., None] * (1.0 - a) + tint[token] * a
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")

    if outline is not None:
        cell = int(min((x_last - x_first).min(), (y_last - y_first).min())) + 1
        line = outline_width if outline_width is not None else max(1, round(cell / 12))
        draw = ImageDraw.Draw(result)
        for index in torch.as_tensor(stats.kept).reshape(-1).tolist():
            if index < 0:
                continue
            r, c = divmod(int(index), cols)
            box = (int(x_first[c]), int(y_first[r]), int(x_last[c]), int(y_last[r]))
            draw.rectangle(box, outline=tuple(outline), width=line)
    return result


def save_overlays(
    folder: str | os.PathLike,
    images: Sequence,
    stats: Sequence[ImageStats],
    names: Sequence[str] | None = None,
    regions: Sequence[tuple[float, float, float, float] | None] | None = None,
    **kwargs,
) -> list[str]:
    """Write ``visualize(images[i], stats[i], region=regions[i], **kwargs)`` to ``folder/<names[i]>.png``
    (default names ``image_<i>``); creates the folder and returns the paths written."""
    count = len(images)
    names = [f"image_{i}" for i in range(count)] if names is None else list(names)
    regions = [None] * count if regions is None else list(regions)
    if not len(stats) == len(names) == len(regions) == count:
        raise ValueError(
            f"save_overlays: {count} images, {len(stats)} stats, {len(names)} names, {len(regions)} regions"
        )
    os.makedirs(folder, exist_ok=True)
    paths = []
    for image, stat, name, region in zip(images, stats, names, regions):
        path = os.path.join(os.fspath(folder), f"{name}.png")
        visualize(image, stat, region=region, **kwargs).save(path)
        paths.append(path)
    return paths
