"""Overlays (`vtprune.visualize`): size, pixel semantics on hand-made stats, and stats from real pruned runs."""

import numpy as np
import pytest
import torch
from conftest import make_inputs
from PIL import Image

import vtprune
from vtprune import ImageStats
from vtprune.overlay import center_crop_region, center_crop_view, group_colour, save_overlays

CELL = 14  # pixels per token cell of the synthetic image
YELLOW = (255, 255, 0)


def synthetic_image(rows=4, cols=4, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 226, size=(rows * CELL, cols * CELL, 3), dtype=np.uint8))


def make_stats(assignment, order) -> ImageStats:
    assignment = torch.tensor(assignment)
    order = torch.tensor(order)
    return ImageStats(
        tokens_in=assignment.numel(),
        tokens_out=order.numel(),
        kept=torch.unique(order[order >= 0]),
        order=order,
        assignment=assignment,
    )


# 4 x 4 tokens: 0 and 5 kept alone; {10, 11, 14} merged into slot 2 (representative 10); {3, 7} merged into
# slot 3 (representative 7); every other token dropped.
ASSIGNMENT = [0, -1, -1, 3, -1, 1, -1, 3, -1, -1, 2, 2, -1, -1, 2, -1]
ORDER = [0, 5, 10, 7]


def cell_pixel(array, token, cols=4, dy=CELL // 2, dx=CELL // 2):
    r, c = divmod(token, cols)
    return array[r * CELL + dy, c * CELL + dx].astype(int)


def test_visualize_is_the_function_and_keeps_the_image_size():
    assert callable(vtprune.visualize) and vtprune.visualize is vtprune.overlay.visualize
    assert "visualize" in vtprune.__all__
    image = synthetic_image()
    out = vtprune.visualize(image, make_stats(ASSIGNMENT, ORDER))
    assert isinstance(out, Image.Image) and out.size == image.size and out.mode == "RGB"
    odd = Image.new("RGB", (61, 47), (120, 80, 40))  # cells of unequal size
    assert vtprune.visualize(odd, make_stats(ASSIGNMENT, ORDER)).size == (61, 47)
    assert vtprune.visualize(image.convert("L"), make_stats(ASSIGNMENT, ORDER)).size == image.size


def test_kept_unchanged_dropped_darkened_groups_coloured():
    image = synthetic_image()
    src = np.asarray(image)
    out = np.asarray(vtprune.visualize(image, make_stats(ASSIGNMENT, ORDER), dim=0.3, alpha=0.45))
    # Kept alone (0, 5): interior untouched; outline on the cell border.
    for token in (0, 5):
        np.testing.assert_array_equal(cell_pixel(out, token), cell_pixel(src, token))
        np.testing.assert_array_equal(cell_pixel(out, token, dy=0), YELLOW)
    # Dropped: darkened by dim, no outline.
    for token in (1, 2, 4, 15):
        for dy, dx in ((CELL // 2, CELL // 2), (0, 0), (CELL - 1, 3)):
            expected = cell_pixel(src, token, dy=dy, dx=dx) * 0.3
            np.testing.assert_allclose(cell_pixel(out, token, dy=dy, dx=dx), expected, atol=0.51)
    # Merge groups: one translucent colour per group, over every member (representative outlined too).
    first, second = np.array(group_colour(0)), np.array(group_colour(1))
    assert np.abs(first - second).sum() > 100  # visibly different colours
    for token, colour in ((10, first), (11, first), (14, first), (3, second), (7, second)):
        expected = cell_pixel(src, token) * 0.55 + colour * 0.45
        np.testing.assert_allclose(cell_pixel(out, token), expected, atol=0.51)
    np.testing.assert_array_equal(cell_pixel(out, 10, dy=0), YELLOW)  # representative of its group
    assert not np.array_equal(cell_pixel(out, 11, dy=0), YELLOW)  # a plain member is not outlined


def test_without_outline_kept_cells_are_untouched_and_cls_is_ignored():
    image = synthetic_image()
    stats = make_stats(ASSIGNMENT, [-1] + ORDER)  # a CLS slot (VisionZip) has no cell
    out = np.asarray(vtprune.visualize(image, stats, outline=None))
    src = np.asarray(image)
    np.testing.assert_array_equal(out[:CELL, :CELL], src[:CELL, :CELL])  # token 0, whole cell
    np.testing.assert_array_equal(out[CELL : 2 * CELL, CELL : 2 * CELL], src[CELL : 2 * CELL, CELL : 2 * CELL])


def test_non_square_grid_region_and_errors():
    image = Image.new("RGB", (4 * CELL, 3 * CELL), (200, 200, 200))
    twelve = make_stats([0] + [-1] * 11, [0])
    with pytest.raises(ValueError, match="not a square grid"):
        vtprune.visualize(image, twelve)
    with pytest.raises(ValueError, match="does not hold"):
        vtprune.visualize(image, twelve, grid=(4, 4))
    out = np.asarray(vtprune.visualize(image, twelve, grid=(3, 4), outline=None))
    assert out[CELL // 2, CELL // 2].tolist() == [200, 200, 200] and out[CELL // 2, CELL + 2].tolist() == [60, 60, 60]

    # The grid covers only `region`: outside it the encoder saw nothing, so it is darkened.
    wide = Image.new("RGB", (100, 56), (100, 100, 100))
    all_kept = make_stats(list(range(16)), list(range(16)))
    out = np.asarray(vtprune.visualize(wide, all_kept, region=(22, 0, 78, 56), outline=None))
    assert out[10, 10].tolist() == [30, 30, 30] and out[10, 90].tolist() == [30, 30, 30]
    assert (out[:, 22:78] == 100).all()
    with pytest.raises(TypeError):
        vtprune.visualize(np.zeros((8, 8, 3)), all_kept)


def test_center_crop_region_matches_center_crop_view():
    image = Image.new("RGB", (451, 300))
    left, top, right, bottom = center_crop_region(image.size, 224)
    assert top == 0 and bottom == pytest.approx(300)
    assert abs((right - left) - 300) < 1 and abs(left - (451 - right)) < 1.5  # square, centred
    assert center_crop_view(image, 224).size == (224, 224)
    assert center_crop_region((224, 224), 224) == (0.0, 0.0, 224.0, 224.0)


@pytest.mark.parametrize("name", ["fastervlm", "visionzip", "pool"])
def test_stats_from_a_tiny_llava_run(llava, images, name, tmp_path):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:"] * 2, images[:2])
    with vtprune.apply(model, name, keep=64) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    size = model.config.vision_config.image_size  # 336: the processor's centre crop
    views = [center_crop_view(image, size) for image in images[:2]]
    out = np.asarray(vtprune.visualize(views[0], stats[0], outline=None))
    assert out.shape == (size, size, 3)
    src = np.asarray(views[0])
    cell = size // 24
    assignment = stats[0].assignment
    members = torch.bincount(assignment[assignment >= 0], minlength=stats[0].tokens_out)
    for token in range(0, 576, 7):
        r, c = divmod(token, 24)
        got, orig = out[r * cell + 7, c * cell + 7].astype(int), src[r * cell + 7, c * cell + 7].astype(int)
        slot = int(assignment[token])
        if slot < 0:
            np.testing.assert_allclose(got, orig * 0.3, atol=0.51)
        elif members[slot] == 1:
            np.testing.assert_array_equal(got, orig)
        else:  # merged: tinted, neither the original nor darkened
            assert np.abs(got - orig).max() > 1 and np.abs(got - orig * 0.3).max() > 1
    if name == "visionzip":  # dominant tokens stand alone, contextual tokens form groups
        assert (members == 1).sum() >= 50 and (members > 1).sum() >= 1
    # The original image at full size, with the crop region.
    full = vtprune.visualize(images[0], stats[0], region=center_crop_region(images[0].size, size))
    assert full.size == images[0].size
    paths = save_overlays(tmp_path / name, views, stats, names=["a", "b"])
    assert [Image.open(p).size for p in paths] == [(size, size)] * 2
