"""Can a decoder count from a stage-1 ViT's patch features? A 2-minute check before a 65-minute stage 2.

    python scripts/probe_vit.py /tmp/stage1                  # a --save-vision folder of scripts/train_embedded.py
    python scripts/probe_vit.py /tmp/stage1 --train 3000 --test 600 --steps 4000

Counting by attention needs one unit of attention per object: the head puts one share on each asked object's
centre patch and `COUNT_SINK` shares on a sink, so the mass on the objects, n / (n + COUNT_SINK), names n (stage 2
routes its count head so, `train_embedded.guidance_pattern`). This script fits,
on the frozen features (`vision_feature_layer`, CLS dropped) of benchmark count questions, a head of that kind:

- **learnt**: one attention head as a decoder layer has it, a query per (shape, colour) pair, keys linear in the
  normalised features and a learnt sink logit per pair, KL-guided to that pattern; its output (rank 4) feeds a
  small MLP that names the count. The head must find the centres from the features, as a decoder's must.
- **exact**: the same read-out of the features pooled with the exact pattern (taken from the scene): what the
  features' values allow when the pattern is right.

A stage-2 decoder's count accuracy has tracked the learnt head's (attempt 5: 0.70 held out, probe 0.75; the exact
pattern 0.97): the gap between the two is what the ViT's localisation costs. Training questions come from another
seed than the held-out stream (seed 1000).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_embedded  # noqa: E402

from vtprune.eval import synthetic  # noqa: E402

def count_questions(model, processor, count: int, seed: int) -> dict[str, torch.Tensor]:
    records = synthetic.generate(count, seed=seed, image_size=train_embedded.IMAGE_SIZE, types=("count",))
    pairs = [train_embedded.named_in(r.question) for r in records]
    return {
        "features": train_embedded.vision_features(model, processor, records).float(),
        "pattern": torch.stack([train_embedded.object_centres(r, r.question) for r in records]).float(),
        "pair": torch.tensor([train_embedded.PAIRS.index((shapes[0], colours[0])) for shapes, colours, _ in pairs]),
        "count": torch.tensor([int(r.answer) - 1 for r in records]),
    }


class CountingHead(torch.nn.Module):
    def __init__(self, width: int, learnt: bool, key_width: int = 32, rank: int = 4) -> None:
        super().__init__()
        self.learnt = learnt
        self.norm = torch.nn.LayerNorm(width)
        self.query = torch.nn.Embedding(len(train_embedded.PAIRS), key_width)
        self.key = torch.nn.Linear(width, key_width)
        self.sink = torch.nn.Parameter(torch.zeros(len(train_embedded.PAIRS)))
        self.value = torch.nn.Linear(width, rank, bias=False)
        self.readout = torch.nn.Sequential(torch.nn.Linear(rank, 64), torch.nn.GELU(), torch.nn.Linear(64, train_embedded.MAX_COUNT))

    def forward(self, features: torch.Tensor, pair: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(features)
        if self.learnt:
            scores = torch.einsum("bk,btk->bt", self.query(pair), self.key(x)) * self.key.out_features**-0.5
            attention = torch.cat([self.sink[pair][:, None], scores], 1).softmax(-1)
        else:
            attention = target
        values = torch.cat([x.new_zeros(len(x), 1, self.value.out_features), self.value(x)], 1)  # the sink reads nothing
        return self.readout(torch.einsum("bt,btr->br", attention, values)), attention


def fit(train: dict, test: dict, learnt: bool, steps: int, batch: int = 128, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    head = CountingHead(train["features"].shape[-1], learnt)
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    size = len(train["count"])
    for _ in range(steps):
        rows = torch.randint(0, size, (batch,))
        target = train_embedded.count_pattern(train["pattern"][rows])
        logits, attention = head(train["features"][rows], train["pair"][rows], target)
        loss = F.cross_entropy(logits, train["count"][rows])
        if learnt:
            loss = loss + train_embedded.pattern_divergence(target, attention).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        target = train_embedded.count_pattern(test["pattern"])
        logits, attention = head(test["features"], test["pair"], target)
        right = logits.argmax(-1) == test["count"]
        mass = attention[:, 1:].sum(1)
    return {
        "accuracy": round(right.float().mean().item(), 3),
        "per_count": {str(n + 1): round(right[test["count"] == n].float().mean().item(), 3) for n in range(train_embedded.MAX_COUNT)
                      if bool((test["count"] == n).any())},
        "object_mass_error": round((mass - target[:, 1:].sum(1)).abs().mean().item(), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vision", help="a --save-vision folder (or any saved embedded model)")
    parser.add_argument("--train", type=int, default=3000, help="count questions to fit on (seed 77)")
    parser.add_argument("--test", type=int, default=600, help="held-out count questions (seed 1000)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.vision, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.vision)
    train, test = count_questions(model, processor, args.train, 77), count_questions(model, processor, args.test, 1000)
    result = {"vision": args.vision, "learnt": fit(train, test, True, args.steps), "exact": fit(train, test, False, args.steps)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
