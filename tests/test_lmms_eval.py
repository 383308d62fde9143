"""The lmms-eval plugin (`vtprune.integrations.lmms_eval`): argument parsing, registration, and end-to-end CLI runs.

The CLI runs are fully offline: tiny random-weight models saved with `save_pretrained`, the synthetic benchmark
exported to a local parquet file, a task folder passed with ``--include_path``. They check that lmms-eval writes
its results and that the visual-token statistics logged into them match the budget for every image.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune import ConfigError
from vtprune.integrations.lmms_eval.check import KNOWN_BREAKS, LmmsEvalBrokenError, check_lmms_eval, explain_failure
from vtprune.integrations.lmms_eval import MODELS, PruneSettings, pop_vtprune_args

RECORDS = 12
TASK = "vtprune_synthetic_e2e"
VIDEO_TASK = "vtprune_synthetic_video_e2e"  # the same records, each image as a 4-frame clip of shifted copies

TASK_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
import io

from PIL import Image

from vtprune.eval.synthetic import is_correct
from vtprune.apps.harness import ANSWER_HINT


def doc_to_visual(doc):
    image = doc["image"]
    if isinstance(image, dict):  # parquet without datasets' Image feature: {"bytes", "path"}
        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def doc_to_text(doc):
    return f"{doc['question']} {ANSWER_HINT}"


def process_results(doc, results):
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}


def doc_to_video(doc):
    import numpy as np

    frame = np.asarray(doc_to_visual(doc)[0])
    return [np.stack([np.roll(frame, 8 * shift, axis=1) for shift in range(4)])]  # [frames, height, width, 3]
'''


# ---------------------------------------------------------------------------------------------- parsing
def test_pop_vtprune_args_strips_and_types_values():
    # What lmms-eval's simple_parse_args_string makes of "pruner=visionzip,keep=64,pruner_contextual=10,..."
    kwargs = {
        "pretrained": "llava-hf/llava-1.5-7b-hf",
        "device_map": "auto",
        "pruner": "visionzip",
        "keep": 64,
        "positions": "compact",
        "pruner_contextual": 10,
        "pruner_layer": -2.0,
        "pruner_cls_fallback": "error",
    }
    settings = pop_vtprune_args(kwargs)
    assert kwargs == {"pretrained": "llava-hf/llava-1.5-7b-hf", "device_map": "auto"}
    assert settings == PruneSettings("visionzip", keep=64, positions="compact", options={"contextual": 10, "layer": -2, "cls_fallback": "error"})
    assert isinstance(settings.options["layer"], int)

    kwargs = {"pretrained": "x", "pruner": "fastervlm", "ratio": "0.25", "keep": "none"}
    settings = pop_vtprune_args(kwargs)
    assert (settings.pruner, settings.keep, settings.ratio) == ("fastervlm", None, 0.25)
    assert kwargs == {"pretrained": "x"}

    for unpruned in ({}, {"pruner": "none"}, {"pruner": None}):
        settings = pop_vtprune_args(dict(unpruned))
        assert not settings.enabled and settings.describe() == "unpruned"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pruner": "nosuch"}, "unknown pruner 'nosuch'"),
        ({"pruner": "fastervlm", "keep": "abc"}, "keep must be a whole number"),
        ({"pruner": "fastervlm", "keep": 64.5}, "keep must be a whole number"),
        ({"pruner": "fastervlm", "keep": 64, "ratio": 0.5}, "not both"),
        ({"pruner": "fastervlm", "ratio": 1.5}, "ratio must be in (0, 1]"),
        ({"pruner": "hiprune", "keep": 64, "pruner_alpha": 3}, "alpha"),
        ({"pruner": "fastervlm", "positions": "sideways"}, "positions must be one of"),
        ({"keep": 64}, "without a pruner"),
        ({"pruner_contextual": 10}, "without a pruner"),
        ({"pruner": "random", "pruner_": 1, "keep": 8}, "needs a name"),
    ],
)
def test_pop_vtprune_args_errors_before_any_model_is_loaded(kwargs, message):
    with pytest.raises(ConfigError) as error:
        pop_vtprune_args(dict(kwargs))
    assert message in str(error.value)


def test_plugin_import_needs_no_lmms_eval():
    code = "import sys, vtprune.integrations.lmms_eval as p; p.manifests; assert not [m for m in sys.modules if m.startswith('lmms_eval')]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- the guard
def require_lmms_eval() -> None:
    """Skip only where lmms-eval is not installed; an installed lmms-eval that fails to import is a failure."""
    from importlib import metadata

    try:
        metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        pytest.skip('lmms-eval is not installed (pip install "vtprune[lmms]")')
    failure = None
    try:
        import lmms_eval.evaluator  # noqa: F401
    except Exception as error:
        failure = explain_failure(error)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_installed_lmms_eval_runs_its_evaluator(tmp_path):
    """lmms-eval's own simple_evaluate on a two-document task with a stub model: a few seconds, no weights.

    This is the fast guard against an upstream release breaking the evaluator (filelock 4.3 did): the failure
    message names the package and the versions, instead of the CLI tests' missing result files.
    """
    require_lmms_eval()
    failure = None
    try:
        report = check_lmms_eval(tmp_path)
    except LmmsEvalBrokenError as error:
        failure = str(error)
    if failure is not None:  # outside the except block, so the report is the diagnosis alone
        pytest.fail(failure, pytrace=False)
    assert report["exact_match"] == 0.5  # the stub answers the first document right and the second wrong
    assert report["lmms-eval"] and report["filelock"]
    assert (tmp_path / "check_utils.py").exists()


def test_explain_failure_names_the_missing_module_package_and_version():
    error = ModuleNotFoundError("No module named 'filelock._api'", name="filelock._api")
    message = explain_failure(error, {"lmms-eval": "0.7.3", "filelock": "4.3.2"})
    assert message.startswith("lmms-eval 0.7.3 cannot run its evaluator: ModuleNotFoundError: No module named 'filelock._api'")
    assert "The failure comes from filelock 4.3.2." in message
    assert f"Known: {KNOWN_BREAKS['filelock']}." in message and "filelock<4.3" in message
    assert "make test CONSTRAINTS=constraints.txt" in message


def test_explain_failure_blames_the_deepest_third_party_frame():
    import yaml

    def evaluator_step():  # as if lmms-eval called into a dependency that raised
        yaml.safe_load(42)

    with pytest.raises(Exception) as info:
        evaluator_step()
    message = explain_failure(info.value, {"lmms-eval": "0.7.3"})
    assert f"The failure comes from PyYAML {yaml.__version__}." in message
    assert "Known:" not in message


def test_check_lmms_eval_reports_a_broken_evaluator(monkeypatch, tmp_path):
    """The check turns any evaluator failure into LmmsEvalBrokenError with the diagnosis (chained to the cause)."""
    import vtprune.integrations.lmms_eval.check as check

    def broken(folder):
        raise ModuleNotFoundError("No module named 'filelock._api'", name="filelock._api")

    monkeypatch.setattr(check, "_evaluate_stub", broken)
    monkeypatch.setattr(check, "installed_versions", lambda names=check.WATCHED: {"lmms-eval": "0.7.3", "filelock": "4.3.2"})
    with pytest.raises(LmmsEvalBrokenError, match=r"filelock 4\.3\.2") as info:
        check.check_lmms_eval(tmp_path)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert check.main([]) == 1


# ---------------------------------------------------------------------------------------------- registration
def test_entry_point_registers_the_models():
    require_lmms_eval()
    from importlib.metadata import entry_points

    from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

    points = [ep for ep in entry_points().select(group="lmms_eval.models") if ep.name == "vtprune"]
    assert points, "entry point missing: reinstall vtprune (pip install -e .) after editing pyproject.toml"
    assert points[0].value == "vtprune.integrations.lmms_eval:manifests"
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    for model_id, (simple, chat) in MODELS.items():
        manifest = registry.get_manifest(model_id)
        assert isinstance(manifest, ModelManifest)
        assert manifest.simple_class_path == (f"vtprune.integrations.lmms_eval.{simple}" if simple else None)
        assert manifest.chat_class_path == (f"vtprune.integrations.lmms_eval.{chat}" if chat else None)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_lmms_eval()
    pytest.importorskip("pyarrow")
    from transformers import AutoProcessor
    from vtprune.eval.synthetic import generate, to_parquet

    from vtprune.integrations.tiny_models import tiny_gemma3, tiny_internvl, tiny_llava, tiny_llava_onevision, tiny_qwen3_vl, tiny_qwen_vl

    root = tmp_path_factory.mktemp("lmms_eval")
    models = {}
    builders = (
        ("llava", tiny_llava), ("qwen2_vl", lambda: tiny_qwen_vl("2")), ("llava_onevision", tiny_llava_onevision),
        ("qwen3_vl", lambda: tiny_qwen3_vl("3")), ("qwen3_5", lambda: tiny_qwen3_vl("3.5")), ("gemma3", tiny_gemma3),
        ("internvl", tiny_internvl),
    )
    for name, build in builders:
        model, processor = build()
        folder = root / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        reloaded = AutoProcessor.from_pretrained(folder)  # the chat template must survive the round trip
        prompt = reloaded.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
        )
        assert prompt == processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
        )
        models[name] = folder

    tasks = root / "tasks"
    tasks.mkdir()
    parquet = to_parquet(generate(RECORDS, seed=0), root / "synthetic.parquet")
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, parquet=parquet.resolve()))
    video_yaml = TASK_YAML.format(task=VIDEO_TASK, parquet=parquet.resolve()).replace("utils.doc_to_visual", "utils.doc_to_video")
    (tasks / f"{VIDEO_TASK}.yaml").write_text(video_yaml)
    (tasks / "utils.py").write_text(TASK_UTILS)
    return root, models, tasks


def run_lmms_eval(
    workspace, name: str, model: str, model_args: str, *extra: str, task: str = TASK, launcher: tuple = ()
) -> tuple[dict, list[dict], str]:
    """One lmms-eval CLI run (`launcher`: a prefix such as ``accelerate launch ...``, default one process)."""
    root, _, tasks = workspace
    output = root / f"out_{name}"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        HF_DATASETS_CACHE=str(root / "datasets_cache"),
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        *(launcher or (sys.executable,)), "-m", "lmms_eval",
        "--model", model,
        "--model_args", model_args,
        "--tasks", task,
        "--include_path", str(tasks),
        "--device", "cpu",
        "--output_path", str(output),
        "--log_samples",
        *extra,
    ]  # fmt: skip
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    # lmms-eval's CLI prints the traceback and exits 0 when the evaluation fails: the files are the proof.
    results_files = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    assert len(results_files) == 1, log[-6000:]
    samples_files = glob.glob(str(output / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    assert len(samples_files) == 1, log[-6000:]
    results = json.loads(Path(results_files[0]).read_text())
    samples = [json.loads(line) for line in Path(samples_files[0]).read_text().splitlines() if line.strip()]
    return results, samples, log


def check_summary(results: dict, images: int, tokens_in: int, tokens_out: int) -> None:
    """The visual-token summary lmms-eval writes into *_results.json (its "throughput" section, keys avg_*)."""
    summary = results["throughput"]
    assert summary["avg_vtprune_images"] == images
    assert summary["avg_vtprune_visual_tokens_in"] == tokens_in
    assert summary["avg_vtprune_visual_tokens_in_min"] == summary["avg_vtprune_visual_tokens_in_max"] == tokens_in
    assert summary["avg_vtprune_visual_tokens_out"] == tokens_out
    assert summary["avg_vtprune_visual_tokens_out_min"] == summary["avg_vtprune_visual_tokens_out_max"] == tokens_out
    assert summary["avg_vtprune_selection_ms_per_image"] >= 0


def test_cli_llava_fastervlm_batched(workspace):
    """The issue's command shape, offline: --model vtprune_llava_hf (chat class), keep=64, --batch_size 4."""
    _, models, _ = workspace
    results, samples, log = run_lmms_eval(
        workspace, "llava", "vtprune_llava_hf", f"pretrained={models['llava']},pruner=fastervlm,keep=64", "--batch_size", "4"
    )
    assert "VTPruneLlavaHfChat" in results["config"]["model_backend"]
    assert 0.0 <= results["results"][TASK]["exact_match,none"] <= 1.0
    assert results["n-samples"][TASK]["effective"] == RECORDS
    check_summary(results, images=RECORDS, tokens_in=576, tokens_out=64)

    # Per sample: the visual tokens of every image, and the prompt the LLM really prefilled.
    assert sorted(s["doc_id"] for s in samples) == list(range(RECORDS))
    for sample in samples:
        (counts,) = sample["token_counts"]
        assert counts["visual_tokens_in"] == [576] and counts["visual_tokens_out"] == [64]
        assert 64 < counts["input_tokens"] < 576  # 64 visual tokens + the text, not 576 + the text
        assert 0 <= counts["output_tokens"] <= 4
    assert results["efficiency"]["overall"]["total_input_tokens"] == sum(s["token_counts"][0]["input_tokens"] for s in samples)
    assert "vtprune (fastervlm keep=64): 12 images" in log


def test_cli_llava_unpruned_simple_class(workspace):
    """pruner omitted: the model runs unpatched through the same (simple, batched) code and logs 576 per image."""
    _, models, _ = workspace
    results, samples, _ = run_lmms_eval(
        workspace, "llava_none", "vtprune_llava_hf", f"pretrained={models['llava']}", "--batch_size", "3", "--limit", "6", "--force_simple"
    )
    assert "VTPruneLlavaHf (simple)" in results["config"]["model_backend"]
    check_summary(results, images=6, tokens_in=576, tokens_out=576)
    assert len(samples) == 6
    assert all(s["token_counts"][0]["visual_tokens_out"] == [576] for s in samples)
    assert all(s["token_counts"][0]["input_tokens"] > 576 for s in samples)


def test_cli_qwen2_vl_batched(workspace):
    """lmms-eval's own batched Qwen2-VL loop with vtprune patched in: 336 px -> 12 x 12 merged tokens = 144."""
    _, models, _ = workspace
    results, samples, _ = run_lmms_eval(
        workspace,
        "qwen2_vl",
        "vtprune_qwen2_vl",
        f"pretrained={models['qwen2_vl']},device_map=cpu,pruner=divprune,keep=16",
        "--batch_size", "4",
        "--limit", "8",
    )  # fmt: skip
    assert "VTPruneQwen2VL" in results["config"]["model_backend"]
    assert len(samples) == 8 and "exact_match,none" in results["results"][TASK]
    check_summary(results, images=8, tokens_in=144, tokens_out=16)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_cli_qwen3_batched(workspace, family):
    """lmms-eval's own batched Qwen3-VL (DeepStack) and Qwen3.5 chat classes with vtprune patched in: the 336 px
    images round to 320 px, 20 x 20 patches of 16, 10 x 10 merged tokens."""
    _, models, _ = workspace
    results, samples, _ = run_lmms_eval(
        workspace,
        family,
        f"vtprune_{family}",
        f"pretrained={models[family]},device_map=cpu,pruner=fastervlm,keep=16",
        "--batch_size", "4",
        "--limit", "8",
    )  # fmt: skip
    backend = {"qwen3_vl": "VTPruneQwen3VLChat", "qwen3_5": "VTPruneQwen3_5Chat"}[family]
    assert backend in results["config"]["model_backend"]
    assert len(samples) == 8 and "exact_match,none" in results["results"][TASK]
    check_summary(results, images=8, tokens_in=100, tokens_out=16)


def test_cli_gemma3_batched(workspace):
    """lmms-eval's own batched Gemma 3 class with vtprune patched in: every image is resized to 224 px, 32 x 32
    patches pooled to 8 x 8 = 64 tokens, of which divprune keeps 16."""
    _, models, _ = workspace
    results, samples, _ = run_lmms_eval(
        workspace, "gemma3", "vtprune_gemma3", f"pretrained={models['gemma3']},device_map=cpu,pruner=divprune,keep=16",
        "--batch_size", "4", "--limit", "8",
    )  # fmt: skip
    assert "VTPruneGemma3" in results["config"]["model_backend"]
    assert len(samples) == 8 and "exact_match,none" in results["results"][TASK]
    check_summary(results, images=8, tokens_in=64, tokens_out=16)


def test_cli_internvl_batched(workspace):
    """vtprune_internvl (lmms-eval's InternVL-HF chat class, batch-size-1 there) batched: with lmms-eval's
    max_patches=12 the 336 x 336 synthetic images are cut into 3 x 3 tiles of 112 px plus the thumbnail,
    10 x 16 = 160 tokens; keep=4 per tile."""
    _, models, _ = workspace
    results, samples, _ = run_lmms_eval(
        workspace, "internvl", "vtprune_internvl", f"pretrained={models['internvl']},pruner=fastervlm,keep=4",
        "--batch_size", "4", "--limit", "8",
    )  # fmt: skip
    assert "VTPruneInternVLChat" in results["config"]["model_backend"]
    assert len(samples) == 8 and "exact_match,none" in results["results"][TASK]
    check_summary(results, images=8, tokens_in=160, tokens_out=40)
    assert all(s["token_counts"][0]["visual_tokens_out"] == [40] for s in samples)


def test_cli_llava_onevision_images_batched(workspace):
    """vtprune_llava_onevision on images: the synthetic 336 x 336 images take a 3x3 layout of 98 px crops, whose
    21 x 21 grid anyres_max_4 resizes to 14 x 14: 49 + 14 x 15 = 259 tokens; per_crop keep=8 keeps 8 of the base
    crop and of each of the 9 sub-crops (their rectangles of the resized grid) plus the 14 newlines."""
    _, models, _ = workspace
    results, samples, log = run_lmms_eval(
        workspace, "onevision", "vtprune_llava_onevision", f"pretrained={models['llava_onevision']},pruner=divprune,keep=8",
        "--batch_size", "4", "--limit", "8",
    )  # fmt: skip
    assert "VTPruneLlavaOnevisionChat" in results["config"]["model_backend"]
    assert len(samples) == 8 and "exact_match,none" in results["results"][TASK]
    check_summary(results, images=8, tokens_in=259, tokens_out=8 * 10 + 14)
    assert all(s["token_counts"][0]["visual_tokens_out"] == [94] for s in samples)


def test_cli_llava_onevision_video_simple_class(workspace):
    """A video task offline (doc_to_visual returns decoded frames): 4 frames x 16 pooled tokens + the newline."""
    _, models, _ = workspace
    results, samples, log = run_lmms_eval(
        workspace, "onevision_video", "vtprune_llava_onevision",
        f"pretrained={models['llava_onevision']},pruner=fastervlm,keep=8,pruner_video_keep=16,pruner_video_scope=frame",
        "--batch_size", "3", "--limit", "6", "--force_simple", task=VIDEO_TASK,
    )  # fmt: skip
    assert "VTPruneLlavaOnevision (simple)" in results["config"]["model_backend"]
    assert len(samples) == 6 and "exact_match,none" in results["results"][VIDEO_TASK]
    check_summary(results, images=6, tokens_in=65, tokens_out=17)
    assert all(s["token_counts"][0]["visual_tokens_in"] == [65] for s in samples)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_data_parallel_two_cpu_processes_equal_one(workspace):
    """lmms-eval data-parallel under accelerate, 2 CPU processes, on the embedded trained model: each rank patches
    its own model, lmms-eval gathers the documents, vtprune reduces its statistics over both ranks; scores,
    per-document answers and token counts equal the single-process run. (accelerate's --cpu flag alone starts one
    process unless MPI is set up, so on CPU the launch is --multi_gpu, which runs torchrun with gloo.)"""
    from vtprune.apps.models import embedded_model_available, embedded_model_path

    if not embedded_model_available():
        pytest.skip("assets/vtprune-tiny-llava is missing from this build")
    accelerate = Path(sys.executable).with_name("accelerate")
    model_args = f"pretrained={embedded_model_path()},pruner=fastervlm,keep=36"
    launcher = (str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()))  # fmt: skip
    single, single_samples, _ = run_lmms_eval(workspace, "dp1", "vtprune_llava_hf", model_args, "--batch_size", "2")
    double, double_samples, log = run_lmms_eval(workspace, "dp2", "vtprune_llava_hf", model_args, "--batch_size", "2", launcher=launcher)

    assert "Running on rank 1" in log and "Running on rank 0" in log  # two processes really ran
    assert double["results"][TASK] == single["results"][TASK]
    assert single["results"][TASK]["exact_match,none"] > 0.5  # the trained model answers, so the comparison means something
    assert double["n-samples"][TASK]["effective"] == RECORDS

    def by_doc(samples):
        return {s["doc_id"]: (s["filtered_resps"], s["exact_match"], s["token_counts"]) for s in samples}

    assert sorted(by_doc(double_samples)) == list(range(RECORDS))
    assert by_doc(double_samples) == by_doc(single_samples)
    # vtprune's statistics cover both ranks' images (lmms-eval's own throughput numbers are rank 0's).
    check_summary(double, images=RECORDS, tokens_in=144, tokens_out=36)
    assert double["throughput"]["avg_vtprune_ranks"] == 2 and single["throughput"]["avg_vtprune_ranks"] == 1
    assert "12 images, visual tokens per image 144.0 -> 36.0" in log and "over 2 process(es)" in log
