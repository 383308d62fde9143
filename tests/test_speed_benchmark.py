"""The speed benchmark (vtprune.eval.speed) runs end to end on tiny settings and writes complete, valid results.

Nothing here checks a timing against a threshold: speed targets are measured by the benchmark, never by a test.
"""

import json
import math

import pytest

import vtprune


@pytest.fixture(scope="module")
def speed():
    import vtprune.eval.speed as module

    return module


@pytest.fixture(scope="module")
def run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    argv = ["--tiny", "--repeats", "1", "--threads", "1", "--scaling-n", "576", "1152", "--quiet", "--out", str(out)]
    result = speed.main(argv)
    return result, out


# Fields that are times or sizes: finite and > 0. (Differences such as vtprune_overhead_ms may be negative by
# noise, and peak memory may be None where the profiler gives nothing; those are checked separately.)
POSITIVE = (
    "selection_ms", "pruned_prefill_ms", "oracle_prefill_ms", "unpruned_prefill_ms", "pruned_layers_ms",
    "oracle_layers_ms", "unpruned_layers_ms", "pruned_full_ms", "oracle_full_ms", "unpruned_full_ms",
    "selection_pct_of_pruned_full", "pruned_over_oracle", "pruned_over_oracle_full", "speedup_full",
    "vision_encoder_ms", "attention_map_mb", "pruned_tflops", "unpruned_tflops", "flops_ratio",
)


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_writes_json_table(run):
    result, out = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"], default=str))
    assert (out / "table.md").read_text().count("| ok |") == len(result["rows"])
    assert result["outputs"]["plot"] or result["outputs"]["plot_note"]
    env = on_disk["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["torch"] and env["cpu"]
    assert on_disk["flops_check"]["ok"]


def test_every_pruner_and_budget_has_every_field(run, speed):
    result, _ = run
    expected = {(family, name, keep) for family in ("llava-1.5-7b", "qwen2-vl-2b")
                for name in vtprune.list_pruners() for keep in (192, 128, 64)}
    assert {(r["family"], r["pruner"], r["keep"]) for r in result["rows"]} == expected
    for row in result["rows"]:
        missing = [f for f in speed.ROW_FIELDS if f not in row]
        assert not missing, (row["pruner"], missing)
        for key in POSITIVE:
            assert finite(row[key]) and row[key] > 0, (row["family"], row["pruner"], row["keep"], key, row[key])
        for key in ("pruned_peak_mb", "unpruned_peak_mb", "selection_peak_mb"):
            assert row[key] is None or (finite(row[key]) and row[key] >= 0)
        assert finite(row["vtprune_overhead_ms"])
        assert row["tokens_out"] == row["keep"] and row["tokens_in"] in (576, 256)
        assert row["seq_len_pruned"] == row["seq_len_unpruned"] - row["tokens_in"] + row["keep"]
        assert row["pruned_tflops"] < row["unpruned_tflops"]
        assert set(row["targets"]) == {"selection_le_3pct", "pruned_le_1.03_oracle", "peak_pruned_le_unpruned", "no_attention_map"}


def test_oracle_ran_the_pruned_sequence(run):
    result, _ = run
    for row in result["rows"]:
        detail = row["identity_detail"]
        assert row["identity_check"] is True, (row["family"], row["pruner"], row["keep"], detail)
        assert detail["llm_inputs_equal"] and detail["text_match"] and detail["visual_count_match"]
        if row["pruner"] in ("random", "fastervlm", "divprune", "hiprune"):  # pure selection
            assert detail["kept_visual_match"] is True
        if row["pruner"] in ("visionzip", "pool"):  # merging: representatives only
            assert detail["kept_visual_match"] is None
    assert result["targets"]["identity_check_all_rows"] is True


def test_statistics_recorded(run):
    result, _ = run
    uses = {(r["family"], r["pruner"]): r["uses"] for r in result["rows"]}
    assert uses[("llava-1.5-7b", "fastervlm")] == ["cls_attention"]
    assert uses[("llava-1.5-7b", "random")] == []
    assert uses[("qwen2-vl-2b", "fastervlm")] == ["global_attention"]  # no CLS: the global fallback


def test_scaling_section(run, speed):
    result, _ = run
    scaling = result["scaling"]
    assert scaling["ns"] == [576, 1152]
    assert {(r["pruner"], r["n"]) for r in scaling["rows"]} == {(p, n) for p in vtprune.list_pruners() for n in (576, 1152)}
    for row in scaling["rows"]:
        assert all(f in row for f in speed.SCALING_FIELDS)
        assert finite(row["selection_ms"]) and row["selection_ms"] > 0 and finite(row["algorithm_ms"])
    assert [p["keep"] for p in scaling["per_n"]] == [64, 128]
    for name in vtprune.list_pruners():
        assert finite(scaling["growth"][name]["selection_exponent"])


def test_helpers(speed):
    assert abs(speed.prefill_flops(576 + 60, 4096, 11008, 32) / 1e12 - 3.31) < 0.01
    assert speed.near_square_grid(576) == (24, 24) and speed.near_square_grid(5000) == (50, 100)
    assert speed.scaling_keep(2880, (48, 60)) == 320
    assert speed.scaling_keep(5000, (50, 100)) == 555  # 556 = 4 x 139 cannot be pooled on 50 x 100
    assert speed.full_depth(10.0, 20.0, 2, 32) == 330.0


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
# The fixed-budget pruners: a pruner without a fixed keep (in-encoder merging) has no row at 640 / 320 / 160.
NEXT_PRUNERS = ("divprune", "fastervlm", "hiprune", "pool", "random", "visionzip")


@pytest.fixture(scope="module")
def next_run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed_next")
    argv = ["--tiny", "--families", "llava-next-7b", "--pruners", *NEXT_PRUNERS, "--repeats", "1", "--threads", "1",
            "--quiet", "--out", str(out)]
    return speed.main(argv), out


def test_next_is_opt_in(speed):
    assert "llava-next-7b" in speed.CASES
    assert "llava-next-7b" not in speed.parse_args([]).families
    assert speed.parse_args(["--families", "llava-next-7b"]).families == ["llava-next-7b"]


def test_next_every_pruner_and_budget(next_run, speed):
    result, out = next_run
    (family,) = result["families"]
    assert family["name"] == "llava-next-7b" and family["tokens_per_image"] == 2928  # 5 x 576 + 48 newlines
    assert family["geometry"]["anyres"]["patch_tokens"] == 2880 and family["seq_len_unpruned"] == 2928 + 48
    assert result["scaling"] is None  # the scaling study belongs to llava-1.5-7b
    measured = {(r["pruner"], r["keep"]) for r in result["rows"]}
    skipped = {(s["pruner"], s["keep"]) for s in family["skipped"]}
    assert measured | skipped == {(name, keep) for name in NEXT_PRUNERS for keep in (640, 320, 160)}
    assert not measured & skipped
    # Only pool can fail to tile a crop's equal share of a global budget (640: 118 per crop = 2 x 59).
    assert skipped == {("pool", 640)} and family["skipped"][0]["reason"].startswith("BudgetError")
    assert result["targets"]["skipped_rows"] == {"llava-next-7b": [["pool", 640]]}
    assert result["targets"]["identity_check_all_rows"] is True
    for row in result["rows"]:
        missing = [f for f in speed.ROW_FIELDS if f not in row]
        assert not missing, (row["pruner"], missing)
        for key in POSITIVE:
            assert finite(row[key]) and row[key] > 0, (row["pruner"], row["keep"], key, row[key])
        # global budget scope: keep is everything the LLM gets for the image, newlines included
        assert row["tokens_in"] == 2928 and row["tokens_out"] == row["keep"]
        assert row["seq_len_pruned"] == row["seq_len_unpruned"] - 2928 + row["keep"]
        assert row["pruned_tflops"] < row["unpruned_tflops"]
        detail = row["identity_detail"]
        assert row["identity_check"] is True, (row["pruner"], row["keep"], detail)
        assert detail["llm_inputs_equal"] and detail["text_match"] and detail["visual_count_match"]
        assert detail["kept_visual_match"] is (None if row["pruner"] in ("visionzip", "pool") else True)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["families"][0]["skipped"] == family["skipped"]
    assert (out / "table.md").read_text().count("| ok |") == len(result["rows"])


def test_next_case_is_the_unpatched_model(speed):
    """The case's unpruned inputs give the logits of the unpatched model run on pixels, and `expected_visual`
    is the unpatched model's packed image features (what the identity check compares against)."""
    import torch

    case = speed.LlavaNextCase(2, 8, True, torch.device("cpu"), torch.float32)
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        cache, _ = case.time_vision(inputs, set(), 1)
        unpatched = model(**inputs, logits_to_keep=1).logits
        from_cache = type(model).forward(model, **case.unpruned_llm_inputs(inputs, cache), logits_to_keep=1).logits
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    torch.testing.assert_close(from_cache, unpatched)
    packed = torch.cat(features, dim=0)
    assert packed.shape[0] == case.tokens_per_image() == 2928
    order = torch.randperm(2927, generator=torch.Generator().manual_seed(0))[:100]  # order + 1 stays in range
    torch.testing.assert_close(case.expected_visual(cache, order), packed[order])
    assert not torch.allclose(case.expected_visual(cache, order + 1), packed[order])


# ---------------------------------------------------------------------------------------------- video
VIDEO_FAMILIES = {"qwen2-vl-2b-video": (2048, (512, 205), 0), "llava-onevision-0.5b-video": (1569, (392, 156), 1)}
"""family -> (visual tokens of the clip, budgets, tokens the LLM gets on top of the budget: OneVision's newline)."""


@pytest.fixture(scope="module")
def video_run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed_video")
    argv = ["--tiny", "--families", *VIDEO_FAMILIES, "--pruners", "fastervlm", "divprune", "pool", "--repeats", "1",
            "--threads", "1", "--quiet", "--out", str(out)]
    return speed.main(argv)


def test_video_cases_are_opt_in(speed):
    assert not set(VIDEO_FAMILIES) & set(speed.parse_args([]).families)


def test_video_cases_every_row_is_the_unpatched_model_on_the_kept_tokens(video_run):
    by_family = {f["name"]: f for f in video_run["families"]}
    assert set(by_family) == set(VIDEO_FAMILIES)
    for name, (tokens, budgets, extra) in VIDEO_FAMILIES.items():
        assert by_family[name]["tokens_per_image"] == tokens and by_family[name]["skipped"] == []
        rows = [r for r in video_run["rows"] if r["family"] == name]
        assert {(r["pruner"], r["keep"]) for r in rows} == {(p, k) for p in ("fastervlm", "divprune", "pool") for k in budgets}
        for row in rows:
            assert row["tokens_in"] == tokens and row["tokens_out"] == row["keep"] + extra
            assert row["identity_check"] is True, (name, row["pruner"], row["keep"], row["identity_detail"])
            assert row["pruned_tflops"] < row["unpruned_tflops"]


# ---------------------------------------------------------------------------------------------- Qwen3-VL
def test_qwen3_vl_case_every_row_is_the_unpatched_model_on_the_kept_tokens(speed, tmp_path):
    """qwen3-vl-2b (opt-in): 512 px -> 16 x 16 merged tokens; the identity check covers the DeepStack inputs too
    (the pruned run's `visual_pos_masks` and levels equal the oracle's, which the unpatched model builds)."""
    assert "qwen3-vl-2b" in speed.CASES and "qwen3-vl-2b" not in speed.parse_args([]).families
    argv = ["--tiny", "--families", "qwen3-vl-2b", "--pruners", "fastervlm", "divprune", "hiprune", "visionzip", "pool",
            "--repeats", "1", "--threads", "1", "--quiet", "--out", str(tmp_path)]
    result = speed.main(argv)
    (family,) = result["families"]
    assert family["tokens_per_image"] == 256 and family["skipped"] == []
    assert {(r["pruner"], r["keep"]) for r in result["rows"]} == {
        (p, k) for p in ("fastervlm", "divprune", "hiprune", "visionzip", "pool") for k in (192, 128, 64)
    }
    for row in result["rows"]:
        detail = row["identity_detail"]
        assert row["identity_check"] is True and detail["llm_inputs_equal"], (row["pruner"], row["keep"], detail)
        assert detail["logits_equal"] and row["tokens_out"] == row["keep"]
        assert detail["kept_visual_match"] is (None if row["pruner"] in ("visionzip", "pool") else True)
        assert row["uses"] == (["global_attention"] if row["pruner"] == "fastervlm" else row["uses"])


def test_qwen3_vl_case_is_the_unpatched_model(speed):
    """The case's unpruned inputs (the cached tower pass handed in as mm_encoder_outputs, DeepStack included) give
    the logits of the unpatched model run on pixels."""
    import torch

    case = speed.Qwen3VLCase(2, 8, True, torch.device("cpu"), torch.float32)
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        cache, _ = case.time_vision(inputs, set(), 1)
        unpatched = model(**inputs, logits_to_keep=1).logits
        from_cache = type(model).forward(model, **case.unpruned_llm_inputs(inputs, cache), logits_to_keep=1).logits
    assert len(cache.run.deepstack) == 2
    torch.testing.assert_close(from_cache, unpatched)


# ---------------------------------------------------------------------------------------------- Gemma 3, InternVL
NEW_FAMILIES = [
    # family, tokens per image, budgets, what FasterVLM reads
    ("gemma-3-4b", 256, (192, 128, 64), ["global_attention"]),  # tiny: 448 px, 32 x 32 patches pooled 2 x 2; no CLS
    ("internvl3-2b", 1280, (640, 320, 160), ["cls_attention"]),  # five 448 px tiles of 256 shuffled tokens; a CLS
]


@pytest.mark.parametrize("family_name, tokens, budgets, fastervlm_uses", NEW_FAMILIES)
def test_new_family_cases_every_row_is_the_unpatched_model_on_the_kept_tokens(speed, tmp_path, family_name, tokens, budgets, fastervlm_uses):
    """gemma-3-4b and internvl3-2b (opt-in): every row's LLM inputs equal the oracle's (Gemma 3: its sliding and
    global masks, built from token_type_ids, included; InternVL: global budgets split over the tiles)."""
    assert family_name in speed.CASES and family_name not in speed.parse_args([]).families
    argv = ["--tiny", "--families", family_name, "--pruners", "fastervlm", "divprune", "hiprune", "visionzip", "pool",
            "--repeats", "1", "--threads", "1", "--quiet", "--out", str(tmp_path)]
    result = speed.main(argv)
    (family,) = result["families"]
    assert family["tokens_per_image"] == tokens and family["skipped"] == []
    assert {(r["pruner"], r["keep"]) for r in result["rows"]} == {
        (p, k) for p in ("fastervlm", "divprune", "hiprune", "visionzip", "pool") for k in budgets
    }
    for row in result["rows"]:
        detail = row["identity_detail"]
        assert row["identity_check"] is True and detail["llm_inputs_equal"] and detail["logits_equal"], (row["pruner"], row["keep"], detail)
        assert row["tokens_out"] == row["keep"]
        assert detail["kept_visual_match"] is (None if row["pruner"] in ("visionzip", "pool") else True)
        if row["pruner"] == "fastervlm":
            assert row["uses"] == fastervlm_uses


@pytest.mark.parametrize("family_name", [f[0] for f in NEW_FAMILIES])
def test_new_family_cases_are_the_unpatched_model(speed, family_name):
    """The case's unpruned inputs (the cached tower pass spliced into the embeddings; Gemma 3: token_type_ids
    passed) give the logits of the unpatched model run on pixels."""
    import torch

    case = speed.CASES[family_name](2, 8, True, torch.device("cpu"), torch.float32)
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        cache, _ = case.time_vision(inputs, set(), 1)
        unpatched = model(**inputs, logits_to_keep=1).logits
        from_cache = type(model).forward(model, **case.unpruned_llm_inputs(inputs, cache), logits_to_keep=1).logits
    assert torch.equal(from_cache, unpatched)
