"""The main job, for now: every registered pruner on a small offline LLaVA-1.5, tokens before/after and time.

The model is a random-weight LLaVA-1.5 with real CLIP-336/14 geometry (576 visual tokens per image) and tiny
widths, so this runs anywhere in seconds and shows what each pruner does to the LLM input; accuracy numbers
need trained weights (a later release embeds a small trained model).

    python -m vtprune.demo --budgets 64 144 --images 2
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    import vtprune
    from vtprune.testing import random_images, tiny_llava

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 144, 288], help="visual tokens kept per image")
    parser.add_argument("--images", type=int, default=2, help="images in the batch (one per prompt)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (minimum reported)")
    parser.add_argument("--pruners", nargs="+", default=None, help="default: every registered pruner")
    args = parser.parse_args(argv)

    model, processor = tiny_llava()
    processor.tokenizer.padding_side = "left"
    questions = ["What is in the picture?", "How many shapes are there?", "Which colour dominates?", "Describe it."]
    prompts = [f"USER: <image>\n{questions[i % len(questions)]} ASSISTANT:" for i in range(args.images)]
    inputs = processor(images=random_images(args.images), text=prompts, return_tensors="pt", padding=True)
    names = args.pruners or vtprune.list_pruners()

    with torch.no_grad():
        baseline_ms = 1000 * _time(lambda: model(**inputs), args.repeats)
    baseline_len = inputs["input_ids"].shape[1]
    rows = []
    for name in tqdm([(n, k) for n in names for k in args.budgets], desc="pruners x budgets", leave=False):
        pruner, keep = name
        with vtprune.apply(model, pruner, keep=keep) as handle, torch.no_grad():
            forward_ms = 1000 * _time(lambda: model(**inputs), args.repeats)
            rows.append(
                {
                    "pruner": pruner,
                    "keep": keep,
                    "tokens_in": [s.tokens_in for s in handle.stats],
                    "tokens_out": [s.tokens_out for s in handle.stats],
                    "llm_length": handle.last_sequence.inputs_embeds.shape[1],
                    "selection_ms": 1000 * handle.selection_time,
                    "forward_ms": forward_ms,
                }
            )

    print(f"tiny LLaVA-1.5 (random weights, CLIP-336/14 grid), batch of {args.images}, min of {args.repeats} runs")
    print(f"unpruned: {baseline_len} LLM tokens per row, forward {baseline_ms:.1f} ms\n")
    header = f"{'pruner':<10} {'keep':>5} {'visual tokens/image':>20} {'LLM length':>11} {'selection ms':>13} {'forward ms':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        visual = f"{row['tokens_in'][0]} -> {row['tokens_out'][0]}"
        print(
            f"{row['pruner']:<10} {row['keep']:>5} {visual:>20} {baseline_len:>4} -> {row['llm_length']:<4}"
            f" {row['selection_ms']:>13.1f} {row['forward_ms']:>11.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
