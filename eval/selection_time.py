"""Selection time of every pruner on LLaVA-1.5-7B geometry (CLIP ViT-L/14-336: 576 tokens, width 1024).

Selection = everything vtprune adds between the vision tower and the LLM for one image: recomputing the
attention statistics the pruner reads from captured block inputs, the selection itself, and projecting the
tokens the LLM receives (1024 -> 4096 -> 4096). The vision tower runs once (random weights, real geometry);
each pruner then reduces its output `--repeats` times and the minimum is reported (machines are noisy).

    python eval/selection_time.py --budgets 192 128 64 --repeats 5 --json selection.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def build_model(vision_layers: int = 24, text_hidden: int = 4096, text_layers: int = 1):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=vision_layers, num_attention_heads=16, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=320, hidden_size=text_hidden, intermediate_size=11008, num_hidden_layers=text_layers,
        num_attention_heads=32, num_key_value_heads=32,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=300, vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def main(argv: list[str] | None = None) -> dict:
    import vtprune
    from vtprune.integrations.llava import LlavaIntegration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pruners", nargs="+", default=None)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.pruners or vtprune.list_pruners()

    torch.manual_seed(0)
    model = build_model(vision_layers=args.vision_layers)
    pixel_values = torch.randn(1, 3, 336, 336)
    probe_pruners = [vtprune.create_pruner(n, keep=max(args.budgets)) for n in names]
    info = LlavaIntegration(model, probe_pruners[0]).encoder_info()
    layers = set().union(*(p.attention_layers(info) for p in probe_pruners))
    with torch.no_grad():
        started = time.perf_counter()
        run = LlavaIntegration(model, probe_pruners[0]).run_encoder(pixel_values, -2, layers)
        tower_seconds = time.perf_counter() - started

    rows = []
    for name in names:
        for keep in args.budgets:
            pruner = vtprune.create_pruner(name, keep=keep)
            integration = LlavaIntegration(model, pruner)
            times = []
            with torch.no_grad():
                for _ in range(args.repeats + 1):  # first call is warm-up
                    times.append(integration.reduce(run).selection_seconds)
            rows.append({"pruner": name, "keep": keep, "selection_ms": 1000 * min(times[1:])})
    result = {
        "geometry": "CLIP ViT-L/14-336 (576 tokens, width 1024, 24 blocks) -> projector 1024->4096",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "vision_tower_seconds": tower_seconds,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"vision tower (once): {tower_seconds:.2f} s, threads={result['threads']}, min of {args.repeats}")
    print("| pruner | " + " | ".join(f"keep={k} (ms)" for k in args.budgets) + " |")
    print("|---|" + "---|" * len(args.budgets))
    for name in names:
        cells = [f"{r['selection_ms']:.1f}" for r in rows if r["pruner"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
