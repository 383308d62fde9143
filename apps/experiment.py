"""The `vtprune` command: a Hydra app running one (model, pruner, budget, benchmark) per job.

    vtprune pruner=fastervlm pruner.keep=36                         # the embedded trained model (the default)
    vtprune -m pruner=fastervlm,divprune pruner.keep=36,18          # a sweep: one results.json per job
    vtprune model=llava-1.5-7b pruner=fastervlm pruner.keep=64      # Hub checkpoint, GPU
    vtprune-report multirun/<date>/<time>                           # markdown table and plots

Each job writes ``results.json`` into its Hydra output folder (see `vtprune.apps.harness.evaluate` for the fields),
atomically: a job killed half-way leaves no results file. With ``run.resume=true`` (the default) a job whose folder
already holds a complete ``results.json`` made with the same configuration is skipped, so rerunning a killed sweep
with the same ``hydra.sweep.dir`` computes only what is missing; a partial, corrupt or stale file is redone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vtprune.errors import VTPruneError

BUDGET_KEYS = ("name", "keep", "ratio", "positions")
RESULT_KEYS = ("pruner", "budget", "accuracy", "samples", "predictions", "visual_tokens_out", "prefill_ms", "model", "benchmark", "config")
"""Fields a complete results.json has (the harness writes them all at once)."""


def comparable_config(config: dict) -> dict:
    """The configuration a results file must match to be reused: everything but the resume switch itself."""
    run_settings = {k: v for k, v in config.get("run", {}).items() if k != "resume"}
    return {**config, "run": run_settings}


def read_results(output_dir: str | Path) -> dict | None:
    """The results.json in `output_dir` when it is complete (every field, one prediction per sample); else None."""
    try:
        results = json.loads((Path(output_dir) / "results.json").read_text())
    except (OSError, ValueError):  # missing, truncated or not JSON
        return None
    if not isinstance(results, dict) or any(key not in results for key in RESULT_KEYS):
        return None
    if not isinstance(results["config"], dict) or results["samples"] != len(results["predictions"]):
        return None
    return results


def completed_results(output_dir: str | Path, config: dict) -> dict | None:
    """The results already in `output_dir` when they are complete and were made with `config`; else None."""
    results = read_results(output_dir)
    if results is None or comparable_config(results["config"]) != comparable_config(config):
        return None
    return results


def write_results(output_dir: str | Path, results: dict) -> None:
    """Write results.json atomically (a temporary file renamed), so that a killed job leaves none half-written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / "results.json.partial"
    temporary.write_text(json.dumps(results, indent=2))
    os.replace(temporary, output_dir / "results.json")


def load_benchmark(spec: dict) -> list:
    from vtprune.eval import synthetic

    kind = spec.get("kind")
    if kind == "synthetic":
        if int(spec.get("size", 0)) <= 0:
            raise ValueError(f"benchmark.size must be positive, got {spec.get('size')}")
        return synthetic.generate(int(spec["size"]), seed=int(spec.get("seed", 0)), image_size=int(spec.get("image_size", 336)),
                                  types=list(spec.get("types") or synthetic.QUESTION_TYPES))
    if kind == "folder":
        path = spec.get("path")
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"benchmark folder {path!r} does not exist (set benchmark.path=<folder with records.jsonl>)")
        records = synthetic.load_folder(path)
        return records[: spec["limit"]] if spec.get("limit") else records
    raise ValueError(f"benchmark.kind must be 'synthetic' or 'folder', got {kind!r}")


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one job and write ``results.json`` into `output_dir`."""
    from vtprune.apps.harness import evaluate
    from vtprune.apps.models import load_model

    config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.run.get("resume", False):
        previous = completed_results(output_dir, config)
        if previous is not None:
            previous["resumed"] = True
            return previous
    model_spec = OmegaConf.to_container(cfg.model, resolve=True)
    pruner_spec = OmegaConf.to_container(cfg.pruner, resolve=True)
    benchmark_spec = OmegaConf.to_container(cfg.benchmark, resolve=True)
    name = pruner_spec.get("name", "none")
    options = {k: v for k, v in pruner_spec.items() if k not in BUDGET_KEYS}
    if name != "none":  # validate the pruner settings before loading anything heavy
        from vtprune.integration import family_options
        from vtprune.registry import create_pruner

        # Family options (budget_scope, video_keep, ...) are checked by vtprune.apply once the model is loaded.
        hyperparameters = {k: v for k, v in options.items() if k not in family_options()}
        create_pruner(name, keep=pruner_spec.get("keep"), ratio=pruner_spec.get("ratio"), **hyperparameters)
    records = load_benchmark(benchmark_spec)
    model, processor = load_model(model_spec)
    settings = cfg.run
    results = evaluate(
        model, processor, records, None if name == "none" else name,
        keep=pruner_spec.get("keep"), ratio=pruner_spec.get("ratio"), positions=pruner_spec.get("positions"),
        options=options, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
        timing_repeats=settings.timing_repeats, warmup=settings.warmup, loyalty=settings.loyalty,
    )
    results["model"] = model_spec
    results["benchmark"] = benchmark_spec
    results["config"] = config
    write_results(output_dir, results)
    return results


@hydra.main(version_base="1.3", config_path="pkg://vtprune.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run(cfg, output_dir)
    except (VTPruneError, FileNotFoundError, ValueError) as error:
        print(f"vtprune: error: {error}", file=sys.stderr)
        sys.exit(2)
    if results.get("resumed"):
        print(f"{results['pruner']} {results['budget'] or ''}: skipped, complete results for this config in {output_dir}/results.json")
        return
    print(
        f"{results['pruner']} {results['budget'] or ''}: accuracy {results['accuracy']:.3f}, loyalty "
        f"{results['loyalty'] if results['loyalty'] is None else round(results['loyalty'], 3)}, visual tokens "
        f"{results['visual_tokens_out']['mean']:.0f}, prefill {results['prefill_ms']:.1f} ms -> {output_dir}/results.json"
    )


if __name__ == "__main__":
    main()
