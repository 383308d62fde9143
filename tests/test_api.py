"""Public API contract and bad input: every mistake gives a clear error and leaves no partial patch."""

import pytest
import torch
from conftest import make_inputs

import vtprune
from vtprune import (
    AlreadyPatchedError,
    BudgetError,
    ConfigError,
    UnsupportedModelError,
)


def test_list_pruners_is_sorted_and_complete():
    names = vtprune.list_pruners()
    assert names == sorted(names)
    assert {"fastervlm", "hiprune", "divprune", "visionzip", "random", "pool"} <= set(names)


def test_create_pruner_is_model_agnostic_and_carries_its_options():
    pruner = vtprune.create_pruner("visionzip", keep=64, contextual=10)
    assert pruner.split(64) == (54, 10)
    assert "keep=64" in repr(pruner)


@pytest.fixture
def untouched(llava):
    """Snapshot of the model's instance state; the test asserts nothing was left behind."""
    model = llava[0]
    before = dict(model.__dict__)
    yield model
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is before[k] for k in before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(pruner="nope", keep=8), ConfigError, "registered pruners: divprune, fastervlm, hiprune"),
        (dict(pruner="fastervlm", keep=577), BudgetError, "keep=577 exceeds the 576 visual tokens"),
        (dict(pruner="fastervlm", keep=0), ConfigError, "keep must be a positive integer"),
        (dict(pruner="fastervlm", keep=-3), ConfigError, "keep must be a positive integer"),
        (dict(pruner="fastervlm", keep=2.5), ConfigError, "keep must be a positive integer"),
        (dict(pruner="fastervlm", ratio=0.0), ConfigError, r"ratio must be in \(0, 1\]"),
        (dict(pruner="fastervlm", ratio=1.5), ConfigError, r"ratio must be in \(0, 1\]"),
        (dict(pruner="fastervlm", ratio=-0.1), ConfigError, r"ratio must be in \(0, 1\]"),
        (dict(pruner="fastervlm", keep=8, ratio=0.5), ConfigError, "either keep or ratio, not both"),
        (dict(pruner="random"), ConfigError, "no default budget"),
        (dict(pruner="fastervlm", keep=8, positions="absolute"), ConfigError, "positions must be one of compact, preserve"),
        (dict(pruner="fastervlm", keep=8, bogus=1), ConfigError, r"unknown option\(s\) \['bogus'\]; valid options"),
        (dict(pruner="hiprune", keep=8, object_layer=40), ConfigError, "layer 40 is out of range for an encoder with 8 blocks"),
        (dict(pruner="pool", keep=61), BudgetError, "nearby valid budgets"),
        (dict(pruner=vtprune.create_pruner("fastervlm", keep=8), keep=8), ConfigError, "carries its own budget"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_patch(untouched, kwargs, error, message):
    kwargs = dict(kwargs)
    pruner = kwargs.pop("pruner")
    with pytest.raises(error, match=message):
        vtprune.apply(untouched, pruner, **kwargs)


def test_pool_budget_checked_against_the_grid(untouched):
    """61 is prime: no 2-D grid of 61 cells fits 24 x 24; the error names valid budgets (57 = 3 x 19)."""
    with pytest.raises(BudgetError, match="nearby valid budgets: \\[57, 60, 63, 64\\]"):
        vtprune.apply(untouched, "pool", ratio=61 / 576)


def test_unsupported_model_lists_supported_classes():
    with pytest.raises(UnsupportedModelError, match="supported model classes: Gemma3ForConditionalGeneration, InternVLForConditionalGeneration, LlavaForConditionalGeneration"):
        vtprune.apply(torch.nn.Linear(2, 2), "fastervlm", keep=4)


def test_double_apply_is_refused(llava):
    model = llava[0]
    with vtprune.apply(model, "fastervlm", keep=8) as handle:
        forward = model.forward
        with pytest.raises(AlreadyPatchedError, match="already patched by vtprune"):
            vtprune.apply(model, "divprune", keep=8)
        assert model.forward is forward and model.__dict__["_vtprune_handle"] is handle


def test_remove_on_unpatched_model(llava):
    with pytest.raises(ConfigError, match="not patched"):
        vtprune.remove(llava[0])


def test_mismatched_images_and_placeholders(llava, images):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nx ASSISTANT:"], [images[0]])
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    with vtprune.apply(model, "fastervlm", keep=8), pytest.raises(ValueError, match="image placeholder tokens"):
        with torch.no_grad():
            model(**inputs)


def test_ratio_resolves_per_image(llava, images):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nx ASSISTANT:"], [images[0]])
    with vtprune.apply(model, "fastervlm", ratio=0.25) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats[0].tokens_out == 144 and handle.stats[0].tokens_in == 576


def test_paper_default_budgets(llava, images):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nx ASSISTANT:"], [images[0]])
    expected = {"fastervlm": 144, "divprune": 56, "hiprune": 192, "visionzip": 64}
    for name, tokens in expected.items():
        with vtprune.apply(model, name) as handle, torch.no_grad():
            model(**inputs)
        assert handle.stats[0].tokens_out == tokens, name


def test_stats_for_merging_methods(llava, images):
    model, processor = llava
    inputs = make_inputs(processor, ["USER: <image>\nx ASSISTANT:"], [images[0]])
    with vtprune.apply(model, "visionzip", keep=64) as handle, torch.no_grad():
        model(**inputs)
    stat = handle.stats[0]
    assert stat.order[0] == vtprune.CLS_INDEX  # CLS first, then 53 dominant patches, then 10 contextual
    assert stat.kept.numel() == 63 and torch.equal(stat.kept, torch.sort(stat.kept).values)
    assert stat.assignment.shape == (576,) and bool((stat.assignment >= 1).all())
    groups = torch.bincount(stat.assignment, minlength=64)
    assert groups[0] == 0 and bool((groups[1:54] == 1).all()) and int(groups[54:].sum()) == 576 - 53
