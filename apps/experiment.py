"""The `vtprune` command: a Hydra app running one (model, pruner, budget, benchmark) per job.

    vtprune pruner=fastervlm pruner.keep=36                         # the embedded trained model (the default)
    vtprune -m pruner=fastervlm,divprune pruner.keep=36,18          # a sweep: one results.json per job
    vtprune model=llava-1.5-7b pruner=fastervlm pruner.keep=64      # Hub checkpoint, GPU
    vtprune-report multirun/<date>/<time>                           # markdown table and plots

Each job writes ``results.json`` into its Hydra output folder (see `vtprune.apps.harness.evaluate` for the fields).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vtprune.errors import VTPruneError

BUDGET_KEYS = ("name", "keep", "ratio", "positions")


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
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "results.json", "w") as f:
        json.dump(results, f, indent=2)
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
    print(
        f"{results['pruner']} {results['budget'] or ''}: accuracy {results['accuracy']:.3f}, loyalty "
        f"{results['loyalty'] if results['loyalty'] is None else round(results['loyalty'], 3)}, visual tokens "
        f"{results['visual_tokens_out']['mean']:.0f}, prefill {results['prefill_ms']:.1f} ms -> {output_dir}/results.json"
    )


if __name__ == "__main__":
    main()
