"""DyMU at LLaVA-1.5 geometry: tokens per preset and vision-encoder time with and without merging (this CPU).

The vision tower is CLIP ViT-L/14-336 (24 blocks, width 1024, 16 heads, 576 patches + CLS) with random weights;
LLaVA-1.5 takes its features after block 23 of 24 (vision_feature_layer=-2), so 23 blocks run. Random-weight
keys are far more alike than trained ones, so the thresholds are calibrated on this same random tower (the
presets' targets then hold for it; the absolute thresholds do not transfer to a trained CLIP). Calibration
images and measured images are disjoint: synthetic scenes (`vtprune.eval.synthetic`) and smooth random blobs
(`vtprune.integrations.tiny_models.random_images`) of different seeds.

Timed, per image (batch 1), minimum of `--repeats` runs after one warm-up round, fp32, interleaved (each round
times every setting once, so load from other jobs on a shared machine hits all settings alike):
- ``unpatched``: ``model.model.vision_tower(pixel_values, output_hidden_states=True)``, what the unpatched
  LLaVA runs (all 24 blocks);
- ``dymu inf``: the DyMU encoder path with infinite thresholds (23 blocks, no merging);
- ``dymu <preset>``: the DyMU encoder path with the preset's thresholds (merging in every block).

    python eval/dymu_encoder_time.py --threads 2 --repeats 3 --json dymu_encoder_time.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

PRESETS = ("low", "mid", "high")


def build_model(vision_layers: int = 24):
    """LLaVA with a CLIP ViT-L/14-336 tower (random weights) and a tiny LLM (only the tower is timed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=vision_layers, num_attention_heads=16, projection_dim=768,
    )
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=300, vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def main(argv: list[str] | None = None) -> dict:
    import vtprune
    from vtprune.eval import synthetic
    from vtprune.integrations.llava import LlavaIntegration
    from vtprune.integrations.tiny_models import random_images, tiny_llava

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--json", default=None)
    parser.add_argument("--thresholds-dir", default=None,
                        help="reuse <dir>/<preset>.json if present (else calibrate and save there): time again without recalibrating")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args.vision_layers)
    _, processor = tiny_llava()  # the LLaVA-1.5 image processor (336 px crop); its tiny model is not used
    half = args.calibration_images // 2
    calibration = [r.image for r in synthetic.generate(half, seed=101)] + random_images(args.calibration_images - half, seed=102)
    names = [f"synthetic-{r.type}" for r in synthetic.generate(4, seed=7)] + ["blobs-0", "blobs-1"]
    measured = [r.image for r in synthetic.generate(4, seed=7)] + random_images(2, seed=8)
    pixels = processor.image_processor(images=measured, return_tensors="pt")["pixel_values"]

    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results: dict = {
        "geometry": "CLIP ViT-L/14-336: 24 blocks (23 run), width 1024, 16 heads, 576 patches; random weights",
        "threads": torch.get_num_threads(), "repeats": args.repeats, "statistic": "min", "dtype": "float32",
        "cpu": platform.processor() or platform.machine(), "images": names, "tokens": {}, "ms": {}, "thresholds": {},
    }
    with torch.no_grad():
        tower = model.model.vision_tower
        settings = {"inf": math.inf}
        for preset in PRESETS:
            started = time.perf_counter()
            saved = Path(args.thresholds_dir) / f"{preset}.json" if args.thresholds_dir else None
            if saved is not None and saved.is_file():
                settings[preset] = vtprune.DyMUThresholds.load(saved)
            else:
                settings[preset] = vtprune.calibrate(model, "dymu", calibration, processor=processor, preset=preset,
                                                     batch_size=8, progress=False)
                if saved is not None:
                    settings[preset].save(saved)
            results["thresholds"][preset] = {
                "targets": settings[preset].meta["targets"], "values": settings[preset].values,
                "calibration_seconds": time.perf_counter() - started, "calibration_images": settings[preset].meta["images"],
            }
        images = [pixels[i : i + 1] for i in range(len(measured))]
        runs = {"unpatched": [lambda image=image: tower(image, output_hidden_states=True) for image in images]}
        for name, thresholds in settings.items():
            merger = vtprune.create_pruner("dymu", thresholds=thresholds)
            integration = LlavaIntegration(model, merger)
            results["tokens"][name] = [int(integration.run_merging(image, merger)[0].counts[0]) - 1 for image in images]
            runs[f"dymu {name}"] = [lambda image=image, i=integration, m=merger: i.run_merging(image, m) for image in images]
        # Interleaved: every repeat times every setting once, so load from other jobs hits all settings alike.
        best = {name: [math.inf] * len(images) for name in runs}
        for repeat in range(args.repeats + 1):
            for name, calls in runs.items():
                for i, call in enumerate(calls):
                    started = time.perf_counter()
                    call()
                    if repeat:  # the first round is the warm-up
                        best[name][i] = min(best[name][i], 1000 * (time.perf_counter() - started))
        results["ms"] = best
        results["load_average_before"] = load_before
        results["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for line in report(results):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def report(results: dict) -> list[str]:
    names = results["images"]
    lines = [f"{results['geometry']}; {results['threads']} threads, min of {results['repeats']} (interleaved), fp32; "
             f"load average before / after: {results.get('load_average_before')} / {results.get('load_average_after')}", ""]
    lines.append("| setting | " + " | ".join(names) + " | mean |")
    lines.append("|---" * (len(names) + 2) + "|")
    for name, tokens in results["tokens"].items():
        lines.append(f"| tokens, dymu {name} | " + " | ".join(map(str, tokens)) + f" | {sum(tokens) / len(tokens):.0f} |")
    for name, times in results["ms"].items():
        lines.append(f"| encoder ms, {name} | " + " | ".join(f"{t:.0f}" for t in times) + f" | {sum(times) / len(times):.0f} |")
    return lines


if __name__ == "__main__":
    main()
