"""The experiment entry points: the Hydra app, the harness, the report, and FLOPs."""

import json
import os
import subprocess
import sys

import pytest

from vtprune.flops import prefill_flops

RESULT_FIELDS = {
    "pruner", "budget", "hparams", "positions", "samples", "accuracy", "accuracy_by_type", "loyalty",
    "visual_tokens_in", "visual_tokens_out", "prefill_tflops", "flops_convention", "prefill_ms", "end_to_end_ms",
    "peak_memory_mb", "selection_ms_per_image", "timing", "predictions", "unpruned", "model", "benchmark", "config",
}
RUN = ["model=tiny_llava", "run.batch_size=2", "run.timing_repeats=1", "run.warmup=0", "run.max_new_tokens=2"]
FAST = ["benchmark.size=2", *RUN]


def vtprune_cli(args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "vtprune", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_flops_match_the_published_convention():
    # Reference 0.6: LLaVA-1.5-7B, ~60 text tokens: 576 -> 3.31 T, 192 -> 1.29, 128 -> 0.96, 64 -> 0.63.
    for visual, expected in ((576, 3.31), (192, 1.29), (128, 0.96), (64, 0.63)):
        assert prefill_flops(visual + 60, 4096, 11008, 32) / 1e12 == pytest.approx(expected, abs=0.006)


def sweep_results(folder, jobs: int) -> list[dict]:
    """The `jobs` results.json files of a finished sweep, each with every field the harness writes."""
    files = sorted(folder.rglob("results.json"))
    assert len(files) == jobs
    results = [json.loads(path.read_text()) for path in files]
    for result in results:
        assert RESULT_FIELDS <= set(result), RESULT_FIELDS - set(result)
    return results


def test_multirun_sweep_and_report(tmp_path):
    done = vtprune_cli(["-m", "pruner=fastervlm,divprune", "pruner.keep=64,128", "hydra.sweep.dir=sweep", *FAST], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = set()
    for result in sweep_results(tmp_path / "sweep", 4):
        assert result["visual_tokens_out"] == {"mean": result["config"]["pruner"]["keep"], "min": result["config"]["pruner"]["keep"], "max": result["config"]["pruner"]["keep"]}
        assert result["visual_tokens_in"]["mean"] == 576 and result["samples"] == 2
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["loyalty"] <= 1
        assert result["prefill_ms"] > 0 and result["end_to_end_ms"] > 0 and result["peak_memory_mb"] > 0
        assert result["prefill_tflops"] < result["unpruned"]["prefill_tflops"]
        seen.add((result["pruner"], result["budget"]))
    assert seen == {("fastervlm", "keep=64"), ("fastervlm", "keep=128"), ("divprune", "keep=64"), ("divprune", "keep=128")}

    from vtprune.apps.report import main as report

    path = report([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    text = path.read_text()
    assert "| pruner | budget | visual tokens | accuracy" in text
    assert text.count("| fastervlm |") == 2 and text.count("| divprune |") == 2 and "| none |" in text
    for image in ("accuracy.png", "latency.png"):
        assert (tmp_path / "report" / image).stat().st_size > 1000
    assert "Duplicate jobs" not in text and "Failed jobs" not in text

    # One folder holding what several sweeps produced: a second model, a job run twice, a job that died before
    # writing results and one whose results.json is cut short.
    import shutil

    merged = tmp_path / "merged"
    shutil.copytree(tmp_path / "sweep", merged / "local")
    jobs = sorted(p.parent for p in (merged / "local").glob("*/results.json"))
    other = merged / "slurm" / "0_fastervlm_64"
    shutil.copytree(jobs[0], other)
    moved = json.loads((other / "results.json").read_text())
    moved["model"] = {**moved["model"], "name": "org/other-model"}
    moved["config"]["model"] = moved["model"]
    (other / "results.json").write_text(json.dumps(moved))
    shutil.copytree(jobs[1], merged / "slurm" / "1_again")
    dead = merged / "slurm" / "2_dead"
    shutil.copytree(jobs[2] / ".hydra", dead / ".hydra")
    cut = merged / "slurm" / "3_cut"
    shutil.copytree(jobs[3], cut)
    (cut / "results.json").write_text((cut / "results.json").read_text()[:100])

    path = report([str(merged), "--out", str(tmp_path / "merged_report")])
    text = path.read_text()
    assert text.count("| pruner | budget |") == 2 and "## org/other-model" in text and "## tiny:llava" in text
    assert text.count("| fastervlm |") == 3 and text.count("| divprune |") == 2  # the duplicate is reported once
    assert f"{merged / 'slurm' / '1_again'} repeats {jobs[1]}" in text
    assert f"{dead}: no results.json" in text and f"{cut}: results.json is incomplete or corrupt" in text
    assert "pruner=" in text.split("Failed jobs")[1]  # the failed job's overrides, to resubmit it
    summary = json.loads((tmp_path / "merged_report" / "report.json").read_text())
    assert len(summary["rows"]) == 5 and len(summary["duplicates"]) == 1 and len(summary["failed"]) == 2
    assert {r["model_label"] for r in summary["rows"]} == {"tiny:llava", "org/other-model"}
    for image in ("accuracy_tiny_llava.png", "latency_tiny_llava.png", "accuracy_org_other-model.png"):
        assert (tmp_path / "merged_report" / image).stat().st_size > 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pruner=fastervlm", "pruner.name=nope"], "unknown pruner 'nope'; registered pruners: divprune, fastervlm"),
        (["pruner=fastervlm", "pruner.keep=-5"], "keep must be a positive integer"),
        (["benchmark=folder", "benchmark.path=/no/such/folder"], "benchmark folder '/no/such/folder' does not exist"),
        (["pruner=random"], "has no default budget"),
    ],
)
def test_bad_config_values_fail_clearly(tmp_path, overrides, message):
    done = vtprune_cli([*overrides, *(RUN if "benchmark=folder" in overrides else FAST)], tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_keep_all_answers_exactly_like_the_unpruned_model(llava):
    from vtprune.eval.synthetic import generate
    from vtprune.apps.harness import evaluate

    model, processor = llava
    records = generate(4, seed=5)
    result = evaluate(model, processor, records, "fastervlm", keep=576, batch_size=2, max_new_tokens=3, timing_repeats=1, warmup=0)
    assert result["loyalty"] == 1.0
    assert result["accuracy"] == result["unpruned"]["accuracy"]
    from vtprune.eval.synthetic import is_correct

    assert all(p["correct"] == is_correct(p["prediction"], p["answer"]) for p in result["predictions"])
    assert result["visual_tokens_out"]["mean"] == 576


def test_the_default_model_is_the_embedded_one(tmp_path):
    done = vtprune_cli(["pruner=fastervlm", "pruner.keep=36", "hydra.run.dir=job", "benchmark.size=6", "run.batch_size=6",
                        "run.timing_repeats=1", "run.warmup=0"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "results.json").read_text())
    assert result["config"]["model"]["source"] == "embedded" and result["visual_tokens_in"]["mean"] == 144
    assert result["visual_tokens_out"]["mean"] == 36 and result["samples"] == 6


def test_the_app_runs_llava_onevision_with_a_family_option(tmp_path):
    """model=tiny_llava_onevision: 336 px synthetic images take a 3x3 crop layout resized to 14 x 14 (259 tokens).
    A family option goes through the pruner group: +pruner.budget_scope=global makes keep=60 the image's total."""
    overrides = ["model=tiny_llava_onevision", "pruner=fastervlm", "pruner.keep=60", "+pruner.budget_scope=global"]
    done = vtprune_cli([*overrides, "hydra.run.dir=job", *RUN[1:], "benchmark.size=2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "results.json").read_text())
    assert result["config"]["model"]["family"] == "llava_onevision"
    assert result["visual_tokens_in"]["mean"] == 259 and result["visual_tokens_out"]["mean"] == 60


def test_the_app_runs_qwen3_vl(tmp_path):
    """model=tiny_qwen3_vl (DeepStack): the 336 px synthetic images round to 320 px, 10 x 10 merged tokens."""
    done = vtprune_cli(["model=tiny_qwen3_vl", "pruner=divprune", "pruner.keep=25", "hydra.run.dir=job", *RUN[1:], "benchmark.size=2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "results.json").read_text())
    assert result["config"]["model"]["family"] == "qwen3_vl"
    assert result["visual_tokens_in"]["mean"] == 100 and result["visual_tokens_out"]["mean"] == 25


def test_the_app_runs_gemma3(tmp_path):
    """model=tiny_gemma3: the synthetic images resized to 224 px, 32 x 32 patches pooled to 8 x 8 tokens."""
    done = vtprune_cli(["model=tiny_gemma3", "pruner=fastervlm", "pruner.keep=16", "hydra.run.dir=job", *RUN[1:], "benchmark.size=2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "results.json").read_text())
    assert result["config"]["model"]["family"] == "gemma3"
    assert result["visual_tokens_in"]["mean"] == 64 and result["visual_tokens_out"]["mean"] == 16


def test_the_app_runs_internvl(tmp_path):
    """model=tiny_internvl: each 336 px synthetic image is cut into 2 x 2 tiles of 112 px plus the thumbnail, 16
    tokens a tile; pruner.keep applies to every tile."""
    done = vtprune_cli(["model=tiny_internvl", "pruner=divprune", "pruner.keep=4", "hydra.run.dir=job", *RUN[1:], "benchmark.size=2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "results.json").read_text())
    assert result["config"]["model"]["family"] == "internvl"
    assert result["visual_tokens_in"]["mean"] == 80 and result["visual_tokens_out"]["mean"] == 20


def test_every_model_config_names_a_supported_class():
    """Each Hub config names a transformers class that vtprune supports; each tiny config a tiny family."""
    from pathlib import Path

    import transformers
    import yaml

    import vtprune
    from vtprune.integrations.tiny_models import TINY_BUILDERS

    configs = sorted((Path(__file__).parent.parent / "configs" / "model").glob("*.yaml"))
    hub = [yaml.safe_load(path.read_text()) for path in configs if yaml.safe_load(path.read_text())["source"] == "hub"]
    assert {spec["class"] for spec in hub} <= set(vtprune.supported_model_classes())
    assert all(hasattr(transformers, spec["class"]) for spec in hub)
    tiny = [yaml.safe_load(path.read_text())["family"] for path in configs if yaml.safe_load(path.read_text())["source"] == "tiny"]
    assert set(tiny) == set(TINY_BUILDERS)


def test_report_rejects_an_empty_folder(tmp_path):
    from vtprune.apps.report import main as report

    with pytest.raises(SystemExit):
        report([str(tmp_path)])


def test_a_killed_sweep_reruns_only_what_is_missing(tmp_path):
    """A sweep killed after its first job: the rerun (same hydra.sweep.dir) skips that job, whose results.json is
    complete and made with the same config, and computes the other; a corrupt or stale file is redone."""
    import signal
    import time

    args = ["-m", "pruner=fastervlm", "pruner.keep=9,18", "hydra.sweep.dir=sweep", *FAST]
    command = [sys.executable, "-m", "vtprune", *args]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "sweep").glob("*/results.json")):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_first = list((tmp_path / "sweep").glob("*/results.json"))
    assert len(done_first) == 1, "the first job should have finished before the kill, and only it"
    kept = done_first[0]
    kept_text = kept.read_text()
    assert not list((tmp_path / "sweep").glob("*/results.json.partial"))

    rerun = vtprune_cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("skipped, complete results for this config") == 1
    assert rerun.stdout.count(": accuracy ") == 1  # only the missing job ran
    assert kept.read_text() == kept_text
    files = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [json.loads(f.read_text())["config"]["pruner"]["keep"] for f in files] == [9, 18]

    other = next(f for f in files if f != kept)
    other.write_text(other.read_text()[:200])  # truncated: redone
    stale = json.loads(kept.read_text())
    stale["config"]["run"]["max_new_tokens"] = 99  # made with another config: redone
    kept.write_text(json.dumps(stale))
    again = vtprune_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped" not in again.stdout and again.stdout.count(": accuracy ") == 2
    assert all(json.loads(f.read_text())["config"]["run"]["max_new_tokens"] == 2 for f in files)
    assert vtprune_cli([*args, "run.resume=false"], tmp_path).stdout.count(": accuracy ") == 2


def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path):
    """`vtprune -m hydra/launcher=submitit_local ...` on the embedded model: every job runs in a process of its own
    (submitit's local executor: one job folder, log and result per job) and writes its results.json."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = ["-m", "hydra/launcher=submitit_local", "pruner=fastervlm,divprune", "pruner.keep=9,18", "hydra.sweep.dir=sweep",
            "benchmark.size=2", "run.timing_repeats=1", "run.warmup=0", "run.max_new_tokens=2"]  # fmt: skip
    done = vtprune_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = set()
    for result in sweep_results(tmp_path / "sweep", 4):
        keep = result["config"]["pruner"]["keep"]
        assert result["visual_tokens_out"]["mean"] == keep and result["visual_tokens_in"]["mean"] == 144  # the embedded model
        assert result["samples"] == 2 and 0 <= result["accuracy"] <= 1
        seen.add((result["pruner"], keep))
    assert seen == {("fastervlm", 9), ("fastervlm", 18), ("divprune", 9), ("divprune", 18)}
    jobs = [folder for folder in (tmp_path / "sweep" / ".submitit").iterdir() if folder.name.isdigit()]
    assert len(jobs) == 4, "one submitit job (a process of its own) per config"
    assert str(os.getpid()) not in {job.name for job in jobs}
    logs = [(job / f"{job.name}_0_log.out").read_text() for job in jobs]
    assert all(log.count(": accuracy ") == 1 and "Job completed successfully" in log for log in logs)


def test_slurm_launcher_config_takes_the_cluster_keys(tmp_path):
    """`hydra/launcher=slurm` composes submitit's SLURM launcher with partition, GPUs, time and array parallelism
    as overridable keys (dispatching needs a cluster; the config is what vtprune ships)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                 "hydra.launcher.timeout_min=30", "hydra.launcher.array_parallelism=4", "--cfg", "hydra"]  # fmt: skip
    shown = vtprune_cli(overrides, tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    import yaml

    launcher = yaml.safe_load(shown.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"], launcher["array_parallelism"]) == ("gpu", 2, 30, 4)
