"""Train vtprune's embedded VLM: a small LLaVA-1.5-style model that answers the synthetic benchmark.

    python scripts/train_embedded.py --out assets/vtprune-tiny-llava        # both stages, about 2 hours on 2 CPU cores
    python scripts/train_embedded.py --out /tmp/stage1 --save-vision /tmp/stage1 --language-steps 0   # stage 1 only
    python scripts/train_embedded.py --out /tmp/model --init-vision /tmp/stage1 --vision-steps 0      # stage 2 only
    python scripts/train_embedded.py --out /tmp/smoke --vision-steps 20 --language-steps 20 --scenes 64 --eval-size 12

The model is a real `LlavaForConditionalGeneration`: a CLIP-style ViT with a CLS token (336 px, the benchmark's
size, in 28 px patches, so 12 x 12 = 144 patch tokens; `vision_feature_layer=-2`, CLS dropped as in LLaVA-1.5),
a two-layer GELU projector and a Llama-style decoder, with the byte-level tokenizer of `vtprune.integrations.tiny_models` (merge
rules for the benchmark's words) and the LLaVA chat template. Everything is reproducible from `--seed` (data,
initialisation and batch order), bit for bit on one machine and torch build. Stage 2 trains on the ViT rounded to
float16, so the two stage-only commands give the same weights as the full run.

Two stages, as LLaVA does it, adapted to training from scratch:

1. **Vision pretraining** on richer scenes than the benchmark's (`pretraining_scenes`). A head on the pooled CLS
   output predicts, for each of the 18 (shape, colour) pairs, its count (0..6) and the horizontal third it lies
   in, and the character in the white box (if any): this is what makes the CLS attention of the late layers point
   at the objects, the signal FasterVLM / VisionZip read. Dense heads on the feature layer's patch tokens name,
   per patch, the kind, colour and character of the object covering it, how many objects of its (shape, colour)
   the scene holds, whether an object's centre lies in it, its share of each object's boundary turning
   (`turning_shares`) and the patch's own horizontal third (`scene_targets`), averaged over the patches that show
   something, so the tokens the LLM receives carry their content locally: every benchmark question becomes "find
   the patches of the object asked about and read them" (and a pruner that drops an object's tokens loses it). A character is labelled only on the patches holding a
   good part of its ink (`glyph_shares`), and a further head reads it from the mean of those patches, the view a
   decoder head attending to them gets. Nearly half the scenes are reading sheets of 12-24 character boxes (as
   many as fit), so the characters get enough examples.
2. **Visual instruction tuning.** The ViT is frozen (as LLaVA's stage 2 does with a pretrained CLIP, and so its
   CLS attention keeps its meaning); its features of `--scenes` benchmark scenes are computed once. Projector and
   decoder learn to answer in multi-turn conversations about one image (`conversation`): the record's own
   question first, in exactly the harness's prompt (`vtprune.apps.harness.build_prompt`), then further questions
   derived from the scene's objects (`scene_questions`); the loss covers the answers only. The circuit that
   answers is supervised step by step (`--guidance`): the input of decoder layer `--guidance-layer` must name the
   question's type and the shape and colour it asks about (`QuestionHeads.parse_loss`); that layer's heads, one per
   question type, are routed to the patches of the objects asked about (`attention_guidance_loss`; the count head
   to match one share on each object's centre against a sink, so that it counts, `guidance_pattern`); and its
   output must already give the answer through the model's own norm and LM head (`QuestionHeads.readout_loss`).
   Half the conversations (`--drop-rate`) show the decoder only the patches their answers need plus a random share
   of the others (`visible_patches`), so it reads where an object is from its tokens, not from their index in the
   sequence, which pruning changes. A validation set (another seed) is scored every 250 steps, teacher-forced, on
   the full grid.

Images are rendered on the fly by `vtprune.eval.synthetic` (training seeds never overlap the held-out seed); a
fifth are rendered at 224 px and upscaled by the processor, so other benchmark resolutions work too. The result
is saved in float16 with `save_pretrained` (model, tokenizer, processor, chat template) and loads with
`LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtprune.eval import synthetic

IMAGE_SIZE = 336
PATCH_SIZE = 28
GRID = IMAGE_SIZE // PATCH_SIZE
PAIRS = [(shape, colour) for shape in synthetic.SHAPES for colour in synthetic.COLOURS]
COLOURS = list(synthetic.COLOURS)
MAX_COUNT = 6
THIRDS = 4  # absent, left, middle, right
KINDS = (*synthetic.SHAPES, "text")
COVERAGE = 0.2  # a patch is labelled with the object covering at least this fraction of it
SUBSAMPLES = 4  # per patch side, to measure coverage
READING_SHEETS = 0.45  # share of stage-1 scenes that are mostly character boxes
GLYPH_HALF_WIDTH, GLYPH_HALF_HEIGHT = 0.4, 0.56  # the ink of one character, in units of its box's half side
GLYPH_SHARE = 0.2  # a patch holding at least this share of a character's ink is labelled with the character
TRAIN_SEED_OFFSET = 10_000  # training data uses seeds seed + TRAIN_SEED_OFFSET + stage; held-out seeds are small
# The count head's attention target gives the sink the weight of this many objects, so the mass it puts on the objects'
# centres, n / (n + COUNT_SINK), tells the count (6 separates 5 objects from 6 best). Read out of the frozen attempt-5
# ViT's features pooled this way, it names the count of 97% of held-out questions, against 72% for the mean over the
# objects' patches of attempts 1-5 (`scripts/probe_vit.py`, assets/README).
COUNT_SINK = 6.0
# Question types whose head must match its target pattern exactly (`guidance_targets`); the others need only put their
# mass on it.
EXACT_PATTERN_TYPES = ("count",)
CENTRE_WEIGHT = 20  # stage 1: 5 in attempt 5; counting by attention needs the one centre patch of each object found


def benchmark_texts() -> list[str]:
    """Every question and answer wording of `vtprune.eval.synthetic`, with the harness's prompt words."""
    from vtprune.apps.harness import ANSWER_HINT

    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    texts = ["USER: \n", f"{ANSWER_HINT} ASSISTANT:", "What character is written in the white box?"]
    for colour in colours:
        for shape in shapes:
            texts += [f"How many {colour} {shape}s are there?", f"What colour is the {shape}?",
                      f"What shape is the {colour} object?", f"Is the {colour} {shape} on the left or the right?",
                      f"Is there a {colour} {shape}?"]
    answers = colours + shapes + ["left", "right", "yes", "no"] + list(synthetic.CHARACTERS.lower())
    return texts + [f" {a}" for a in answers]


def build(seed: int):
    """A freshly initialised model and its processor (the architecture of the embedded model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from vtprune.integrations.tiny_models import LLAVA_CHAT_TEMPLATE, byte_level_tokenizer

    tokenizer = byte_level_tokenizer(["<image>"], chat_template=LLAVA_CHAT_TEMPLATE)
    # Merge rules for the benchmark's words: ~25 text tokens per prompt instead of ~85 bytes (any text still
    # round-trips byte by byte).
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" ".join(benchmark_texts()))
    tokenizer = byte_level_tokenizer(["<image>"], chat_template=LLAVA_CHAT_TEMPLATE, words=sorted({p for p, _ in pieces}))
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=128, intermediate_size=512,
        num_hidden_layers=6, num_attention_heads=4, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        # One head per question type in the guided layer (`guidance_targets`).
        num_attention_heads=len(synthetic.QUESTION_TYPES), num_key_value_heads=len(synthetic.QUESTION_TYPES),
        max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        # Fan-in scale (1 / sqrt(width)) instead of Llama's 0.02, which is sized for widths near 2048: at width 192
        # it leaves the question-to-image attention too weak to leave the answer-prior plateau in a CPU budget.
        initializer_range=192**-0.5,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def records(count: int, seed: int, start: int) -> list[synthetic.Record]:
    """`count` training records from stream `seed`: the benchmark's 336 px, a fifth at 224 px (upscaled by the
    processor) so other benchmark resolutions work too."""
    out = []
    for i in range(start, start + count):
        size = 224 if random.Random(f"size:{seed}:{i}").random() < 0.2 else IMAGE_SIZE
        out += synthetic.generate(1, seed=seed, image_size=size, start=i)
    return out


def pretraining_scenes(count: int, seed: int, start: int) -> list[synthetic.Record]:
    """Richer scenes than the benchmark's for stage 1. Most have 1-6 copies of one (shape, colour) pair, 1-5 other
    shapes and a character box half of the time, so each image teaches counting, reading and localisation at once
    (the benchmark's records each exercise one question type). 45% are reading sheets, 12-24 character boxes
    (as many as fit) among a few shapes: one box per scene taught too few glyphs for the characters to be learnt in
    a CPU budget."""
    out = []
    for i in range(start, start + count):
        rng = random.Random(f"pretrain:{seed}:{i}")
        size = 224 if rng.random() < 0.2 else IMAGE_SIZE
        scene = synthetic._Scene(rng, size)
        shape, colour = rng.choice(PAIRS)
        try:
            if rng.random() < READING_SHEETS:
                for _ in range(rng.randint(12, 24)):  # as many as fit: the glyphs are the scarcest labels
                    scene.add_character(rng.choice(synthetic.CHARACTERS))
                scene.distractors(rng.randint(0, 3))
            else:
                if rng.random() < 0.5:
                    scene.add_character(rng.choice(synthetic.CHARACTERS))
                for _ in range(rng.randint(1, MAX_COUNT)):
                    scene.add_shape(shape, colour)
                scene.distractors(rng.randint(1, 5), avoid=[(shape, colour)])
        except RuntimeError:  # too crowded: keep what was drawn
            pass
        objects = [{"shape": s.kind, "colour": s.colour, "x": s.x, "y": s.y, "radius": s.radius} for s in scene.shapes]
        out.append(synthetic.Record(i, scene.image, "", "", "pretraining", objects + scene.characters))
    return out


def _inside(obj: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points lie inside the object as `synthetic` draws it."""
    dx, dy, r = x - obj["x"], y - obj["y"], obj["radius"]
    if obj["shape"] == "circle":
        return dx**2 + dy**2 <= r**2
    if obj["shape"] == "square":
        return (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    if obj["shape"] == "triangle":  # apex (x, y - r), base at y + 0.8 r from x - r to x + r
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)  # the character box


def glyph_shares(obj: dict, size: int) -> torch.Tensor:
    """The share of a character's ink (the central rectangle of its box) inside each of the GRID x GRID patches,
    computed exactly from the rectangle's overlap with each patch."""
    step = size / GRID
    half_w, half_h = GLYPH_HALF_WIDTH * obj["radius"], GLYPH_HALF_HEIGHT * obj["radius"]
    edges = torch.arange(GRID + 1, dtype=torch.float64) * step

    def overlap(low: float, high: float) -> torch.Tensor:
        return (torch.minimum(edges[1:], torch.tensor(high)) - torch.maximum(edges[:-1], torch.tensor(low))).clamp(min=0)

    rows = overlap(obj["y"] - half_h, obj["y"] + half_h) / (2 * half_h)
    cols = overlap(obj["x"] - half_w, obj["x"] + half_w) / (2 * half_w)
    return (rows[:, None] * cols[None, :]).float()


def patch_of(x, y, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the patch holding each point (scalars or arrays), clipped to the grid."""
    return (np.clip((np.asarray(y) / step).astype(int), 0, GRID - 1), np.clip((np.asarray(x) / step).astype(int), 0, GRID - 1))


def turning_shares(objects: list[dict], size: int) -> torch.Tensor:
    """Per patch (GRID x GRID, flattened), its share of each shape's boundary turning: a circle's arc length inside it
    over 2 pi r (360 boundary samples), a square's corners at 1/4 each, a triangle's vertices at their exterior angle
    over 2 pi. One shape's shares sum to 1, and each depends only on what the patch shows of the boundary, so a patch
    can tell its own without knowing the object's size or centre; an attention head weighting patches by them counts
    objects (stage 1, `VisionHeads`)."""
    step = size / GRID
    shares = np.zeros((GRID, GRID))

    def add(x: np.ndarray, y: np.ndarray, weight: float) -> None:
        np.add.at(shares, patch_of(x, y, step), weight)

    apex = 2 * math.atan(1 / 1.8)  # the triangle of `synthetic`: apex (x, y - r), base corners (x -+ r, y + 0.8 r)
    base = (math.pi - apex) / 2
    for obj in objects:
        x, y, r = obj["x"], obj["y"], obj["radius"]
        if obj["shape"] == "circle":
            angles = (np.arange(360) + 0.5) / 360 * 2 * math.pi
            add(x + r * np.cos(angles), y + r * np.sin(angles), 1 / 360)
        elif obj["shape"] == "square":
            for dx in (-0.9 * r, 0.9 * r):
                for dy in (-0.9 * r, 0.9 * r):
                    add(x + dx, y + dy, 0.25)
        elif obj["shape"] == "triangle":
            add(x, y - r, (math.pi - apex) / (2 * math.pi))
            add(x - r, y + 0.8 * r, (math.pi - base) / (2 * math.pi))
            add(x + r, y + 0.8 * r, (math.pi - base) / (2 * math.pi))
    return torch.tensor(shares.flatten(), dtype=torch.float32)


def scene_targets(record: synthetic.Record) -> dict[str, torch.Tensor]:
    """Labels of one scene for vision pretraining (see the module docstring): per scene, each (shape, colour)
    pair's count and horizontal third and the character (ignored, -100, when there are several boxes); per patch,
    the kind, colour and character of the object covering it, how many objects of that (shape, colour) the scene
    holds, whether an object's centre lies in it, its share of the shapes' boundary turning (`turning_shares`, at
    most 1) and the horizontal third of the patch itself."""
    counts = torch.zeros(len(PAIRS), dtype=torch.long)
    thirds = torch.zeros(len(PAIRS), dtype=torch.long)
    character = torch.zeros((), dtype=torch.long)
    size = record.image.size[0]
    step = size / GRID
    offsets = (np.arange(SUBSAMPLES) + 0.5) * step / SUBSAMPLES
    ys, xs_ = np.meshgrid(np.arange(GRID) * step, np.arange(GRID) * step, indexing="ij")
    px = (xs_[..., None, None] + offsets[None, None, None, :]).repeat(SUBSAMPLES, axis=2)
    py = (ys[..., None, None] + offsets[None, None, :, None]).repeat(SUBSAMPLES, axis=3)
    best = np.full((GRID, GRID), COVERAGE)
    kind = torch.zeros(GRID, GRID, dtype=torch.long)
    colour = torch.zeros(GRID, GRID, dtype=torch.long)
    glyph = torch.zeros(GRID, GRID, dtype=torch.long)
    centre = torch.zeros(GRID, GRID, dtype=torch.long)
    pair_of = torch.full((GRID, GRID), -1, dtype=torch.long)
    boxes = 0
    box_weights: list[torch.Tensor] = []
    box_labels: list[int] = []
    xs: dict[int, list[float]] = {}
    for obj in record.objects:
        coverage = _inside(obj, px, py).mean(axis=(2, 3))
        # An object smaller than COVERAGE of any patch (a character box split over four patches) still labels its
        # best-covered patch, unless another object covers that patch more.
        floor = np.minimum(best, max(coverage.max(), 1e-6))
        mine = torch.from_numpy(coverage >= floor)
        best = np.maximum(best, coverage)
        row, col = map(int, patch_of(obj["x"], obj["y"], step))
        centre[row, col] = 1
        kind[mine] = 1 + KINDS.index(obj["shape"])
        if obj["shape"] == "text":
            index = synthetic.CHARACTERS.index(obj["character"])
            character = torch.tensor(1 + index)
            boxes += 1
            # Only the patches that hold a good part of the ink are asked for the character: a patch showing just
            # the box's border cannot know it, and such labels kept the per-patch reading near chance.
            glyph[mine] = 0
            inked = (glyph_shares(obj, size) >= GLYPH_SHARE).flatten()
            glyph[inked.reshape(GRID, GRID)] = 1 + index
            box_weights.append(inked.float() / inked.sum().clamp(min=1))
            box_labels.append(index)
            colour[mine] = 0
            pair_of[mine] = -1
            continue
        colour[mine] = 1 + COLOURS.index(obj["colour"])
        glyph[mine] = 0
        pair = PAIRS.index((obj["shape"], obj["colour"]))
        pair_of[mine] = pair
        counts[pair] = min(MAX_COUNT, counts[pair] + 1)
        xs.setdefault(pair, []).append(obj["x"])
    for pair, values in xs.items():  # the third the pair's mean lies in (exact for a single object)
        thirds[pair] = 1 + min(2, int(3 * sum(values) / len(values) / size))
    if boxes > 1:
        character = torch.tensor(-100)
    count = torch.where(pair_of >= 0, counts[pair_of.clamp(min=0)], 0)
    column_third = 1 + torch.arange(GRID) * 3 // GRID
    return {"counts": counts, "thirds": thirds, "character": character, "kind": kind.flatten(),
            "colour": colour.flatten(), "glyph": glyph.flatten(), "count": count.flatten(),
            "centre": centre.flatten(), "third": column_third.expand(GRID, GRID).flatten(),
            "box_weights": torch.stack(box_weights) if box_weights else torch.zeros(0, GRID * GRID),
            "box_labels": torch.tensor(box_labels, dtype=torch.long),
            "turning": turning_shares(record.objects, size).clamp(max=1)}


def stacked_targets(data: list[synthetic.Record]) -> dict[str, torch.Tensor]:
    """`scene_targets` of a batch, each label stacked along a batch dimension; the character boxes (a variable number
    per scene) concatenated, with ``box_scene`` naming each box's scene."""
    per_record = [scene_targets(r) for r in data]
    boxes = ("box_weights", "box_labels")
    stacked = {key: torch.stack([t[key] for t in per_record]) for key in per_record[0] if key not in boxes}
    stacked.update({key: torch.cat([t[key] for t in per_record]) for key in boxes})
    stacked["box_scene"] = torch.cat([torch.full((len(t["box_labels"]),), i) for i, t in enumerate(per_record)])
    return stacked


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, params: list[torch.nn.Parameter]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


PATCH_LABELS = {"kind": 1 + len(KINDS), "colour": 1 + len(COLOURS), "glyph": 1 + len(synthetic.CHARACTERS),
                "count": 1 + MAX_COUNT, "centre": 2, "third": 4}


class VisionHeads(torch.nn.Module):
    """Pretraining heads; discarded after stage 1."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scene = torch.nn.Linear(width, len(PAIRS) * (MAX_COUNT + 1 + THIRDS) + 1 + len(synthetic.CHARACTERS))
        self.patch = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, sum(PATCH_LABELS.values())))
        # Reads the character from the mean of its inked patches, the view an LLM head attending to them gets.
        self.box = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, len(synthetic.CHARACTERS)))
        self.turning = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 1))

    def loss(self, pooled: torch.Tensor, patch_tokens: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        logits = self.scene(pooled)
        pairs = len(PAIRS)
        counts = logits[:, : pairs * (MAX_COUNT + 1)].reshape(-1, pairs, MAX_COUNT + 1)
        thirds = logits[:, pairs * (MAX_COUNT + 1) : pairs * (MAX_COUNT + 1 + THIRDS)].reshape(-1, pairs, THIRDS)
        character = logits[:, pairs * (MAX_COUNT + 1 + THIRDS) :]
        losses = {
            "counts": F.cross_entropy(counts.flatten(0, 1), targets["counts"].flatten()),
            "thirds": F.cross_entropy(thirds.flatten(0, 1), targets["thirds"].flatten()),
            "character": F.cross_entropy(character, targets["character"]) if bool((targets["character"] >= 0).any())
            else character.sum() * 0,
        }
        accuracy = {
            "counts": (counts.argmax(-1) == targets["counts"]).all(-1).float().mean().item(),
            # Over the scenes with one box: class 0 ("no box") is easy and would hide whether anything is read.
            "character": (character.argmax(-1) == targets["character"])[targets["character"] > 0].float().mean().item(),
        }
        if len(targets["box_labels"]):
            pooled_boxes = torch.einsum("kp,kpd->kd", targets["box_weights"], patch_tokens[targets["box_scene"]])
            box_logits = self.box(pooled_boxes)
            losses["box"] = 3 * F.cross_entropy(box_logits, targets["box_labels"])
            accuracy["box"] = (box_logits.argmax(-1) == targets["box_labels"]).float().mean().item()
        else:
            losses["box"] = sum(p.sum() for p in self.box.parameters()) * 0
            accuracy["box"] = float("nan")
        patch_logits = self.patch(patch_tokens).split(list(PATCH_LABELS.values()), dim=-1)
        for (name, _), patch in zip(PATCH_LABELS.items(), patch_logits):
            # Averaged over the patches that show something: nine in ten patches are background, and a mean over
            # all of them starves the few object patches of gradient (the shapes and characters never get learnt).
            # Only "centre" (objectness) and "third" (where the patch is, which the LLM needs as content for the
            # left/right question) are over all patches; "centre" is up-weighted for the same reason.
            if name == "third":
                losses[name] = F.cross_entropy(patch.flatten(0, 1), targets[name].flatten())
            elif name == "centre":
                losses[name] = CENTRE_WEIGHT * F.cross_entropy(patch.flatten(0, 1), targets[name].flatten())
            elif bool((targets[name] > 0).any()):
                losses[name] = F.cross_entropy(patch.flatten(0, 1), targets[name].flatten(), ignore_index=0)
            else:  # nothing of this kind in the batch (small batches)
                losses[name] = patch.sum() * 0
            labelled = targets[name] > 0  # accuracy where there is something to see
            accuracy[name] = (patch.argmax(-1)[labelled] == targets[name][labelled]).float().mean().item()
        # Soft targets: the cross-entropy less its minimum (the target's own entropy), per patch holding a share.
        turning, shares = self.turning(patch_tokens).squeeze(-1), targets["turning"]
        excess = (F.binary_cross_entropy_with_logits(turning, shares, reduction="none")
                  - F.binary_cross_entropy_with_logits(torch.logit(shares.clamp(1e-4, 1 - 1e-4)), shares, reduction="none"))
        losses["turning"] = 5 * excess.sum() / (shares > 0).sum().clamp(min=1)
        accuracy["turning_err"] = (turning.sigmoid() - shares).abs()[shares > 0].mean().item()
        return sum(losses.values()), {**{k: v.item() for k, v in losses.items()}, **{f"acc_{k}": v for k, v in accuracy.items()}}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vision(model, processor, heads: VisionHeads, steps: int, batch: int, lr: float, seed: int, log) -> None:
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, max(1, steps // 20)))
    feature_index = model.config.vision_feature_layer
    tower.train()
    progress = tqdm(range(steps), desc="stage 1: vision pretraining")
    for step in progress:
        data = pretraining_scenes(batch, seed + TRAIN_SEED_OFFSET + 1, step * batch)
        pixels = processor.image_processor([r.image for r in data], return_tensors="pt")["pixel_values"]
        out = tower(pixels, output_hidden_states=True)
        loss, parts = heads.loss(out.pooler_output, out.hidden_states[feature_index][:, 1:], stacked_targets(data))
        optimizer_step(loss, optimizer, scheduler, params)
        if step % 25 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}", kind=f"{parts['acc_kind']:.2f}", box=f"{parts['acc_box']:.2f}", count=f"{parts['acc_count']:.2f}")
            log({"stage": 1, "step": step, "loss": loss.item(), **parts})
    tower.eval()


def scene_questions(record: synthetic.Record, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every well-posed benchmark question about the scene, as ``(type, question, answer)``, in the benchmark's
    wording: the record's own question is one of them (except "exists" with answer "no", for which a sample of
    absent pairs stands in). A scene thereby teaches a dozen answers instead of one."""
    size = record.image.size[0]
    shapes = [o for o in record.objects if o["shape"] != "text"]
    out = [("text", "What character is written in the white box?", o["character"].lower())
           for o in record.objects if o["shape"] == "text"][:1]
    pairs: dict[tuple[str, str], list[dict]] = {}
    by_shape: dict[str, list[dict]] = {}
    by_colour: dict[str, list[dict]] = {}
    for o in shapes:
        pairs.setdefault((o["shape"], o["colour"]), []).append(o)
        by_shape.setdefault(o["shape"], []).append(o)
        by_colour.setdefault(o["colour"], []).append(o)
    for (shape, colour), objects in pairs.items():
        out.append(("count", f"How many {colour} {shape}s are there?", str(len(objects))))
        out.append(("exists", f"Is there a {colour} {shape}?", "yes"))
        x = objects[0]["x"]
        if len(objects) == 1 and not size / 3 <= x <= 2 * size / 3:  # the benchmark asks about the outer thirds
            out.append(("position", f"Is the {colour} {shape} on the left or the right?", "left" if x < size / 2 else "right"))
    absent = [pair for pair in PAIRS if pair not in pairs]
    for shape, colour in rng.sample(absent, min(len(pairs), len(absent))):
        out.append(("exists", f"Is there a {colour} {shape}?", "no"))
    out += [("colour", f"What colour is the {shape}?", objects[0]["colour"]) for shape, objects in by_shape.items() if len(objects) == 1]
    out += [("shape", f"What shape is the {colour} object?", objects[0]["shape"]) for colour, objects in by_colour.items() if len(objects) == 1]
    return out


def conversation(record: synthetic.Record, rng: random.Random, turns: int) -> list[tuple[str, str, str]]:
    """``(type, question, answer)`` turns about one image: the record's own question first (exactly the
    benchmark's), then `turns - 1` more, each of a question type drawn uniformly from those the scene supports."""
    by_type: dict[str, list[tuple[str, str, str]]] = {}
    for turn in scene_questions(record, rng):
        by_type.setdefault(turn[0], []).append(turn)
    kinds = sorted(by_type)
    chat = [(record.type, record.question, record.answer)]
    for _ in range(turns - 1):
        chat.append(rng.choice(by_type[rng.choice(kinds)]))
    return chat


def encode_conversation(processor, chat: list[tuple[str, str]], image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (answers and their end of turn only) of a multi-turn chat about one image; the first
    turn is the harness's prompt (`vtprune.apps.harness.build_prompt`) with the image expanded as the processor does."""
    from vtprune.apps.harness import ANSWER_HINT, build_prompt

    tokenizer = processor.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for turn, (question, answer) in enumerate(chat):
        if turn == 0:
            prompt = build_prompt(processor, question).replace("<image>", "<image>" * image_tokens)
        else:
            prompt = f"USER: {question} {ANSWER_HINT} ASSISTANT:"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
    return ids, labels


def asked_shapes(record: synthetic.Record, shapes: list[str], colours: list[str]) -> list[dict]:
    """The record's shapes (not character boxes) of the named shapes and colours (any, where none is named)."""
    return [o for o in record.objects if o["shape"] != "text" and (not colours or o["colour"] in colours)
            and (not shapes or o["shape"] in shapes)]


def relevant_patches(record: synthetic.Record, question: str) -> torch.Tensor:
    """Which of the GRID x GRID patches show the objects a benchmark question is about (any overlap; for the
    character, the patches holding at least GLYPH_SHARE of its ink): the patches the answer must be read from. Empty
    for an absent pair ("Is there ...?" answered "no")."""
    shapes, colours, character = named_in(question)
    size = record.image.size[0]
    if character:  # the patches that hold a good part of the ink, as the glyph labels of stage 1
        shares = [glyph_shares(o, size) >= GLYPH_SHARE for o in record.objects if o["shape"] == "text"]
        return torch.stack(shares).any(0).flatten() if shares else torch.zeros(GRID * GRID, dtype=torch.bool)
    wanted = asked_shapes(record, shapes, colours)
    step = size / GRID
    centres = (np.arange(GRID * SUBSAMPLES) + 0.5) * step / SUBSAMPLES
    py, px = np.meshgrid(centres, centres, indexing="ij")
    covered = np.zeros((GRID * SUBSAMPLES, GRID * SUBSAMPLES), dtype=bool)
    for obj in wanted:
        covered |= _inside(obj, px, py)
    return torch.from_numpy(covered.reshape(GRID, SUBSAMPLES, GRID, SUBSAMPLES).any(axis=(1, 3)).flatten())


def object_centres(record: synthetic.Record, question: str) -> torch.Tensor:
    """Which of the GRID x GRID patches hold the centre of an object a benchmark question names (one per object)."""
    shapes, colours, _ = named_in(question)
    step = record.image.size[0] / GRID
    centres = torch.zeros(GRID, GRID, dtype=torch.bool)
    for obj in asked_shapes(record, shapes, colours):
        centres[tuple(map(int, patch_of(obj["x"], obj["y"], step)))] = True
    return centres.flatten()


def guidance_pattern(record: synthetic.Record, kind: str, question: str) -> torch.Tensor:
    """Where the guided head of question type `kind` should look from the answer: weights over the sink (the first
    token) and the GRID x GRID patches, ``(1 + GRID * GRID,)``, summing to 1.

    - count: each asked object's centre patch weighs 1 and the sink COUNT_SINK, so the head's output, the mean of
      what it reads, scales with n / (n + COUNT_SINK) and counts objects rather than averaging their patches;
    - the others: uniform over the patches of the objects asked about (`relevant_patches`: for the character, its
      inked patches, the pooled view stage 1 taught the ViT to be read from); the sink when there are none."""
    if kind == "count":
        return count_pattern(object_centres(record, question).float()[None])[0]
    relevant = relevant_patches(record, question).float()
    weights = torch.cat([torch.tensor([0.0 if relevant.any() else 1.0]), relevant])
    return weights / weights.sum()


def count_pattern(centres: torch.Tensor) -> torch.Tensor:
    """``(questions, 1 + GRID * GRID)`` from ``(questions, GRID * GRID)`` centre indicators: COUNT_SINK shares on the
    sink, one on each centre, normalised (the count branch of `guidance_pattern`, batched for `scripts/probe_vit.py`)."""
    weights = torch.cat([torch.full((len(centres), 1), COUNT_SINK), centres], 1)
    return weights / weights.sum(1, keepdim=True)


def pattern_divergence(targets: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """KL divergence from target attention patterns to attention rows, over the last dimension."""
    return (torch.special.xlogy(targets, targets) - targets * (attention + 1e-6).log()).sum(-1)


class AttentionProbe:
    """Recomputes the attention rows of every head of one decoder layer at chosen query positions (from the layer's
    own inputs, so SDPA stays on for the forward pass) for the attention-guidance loss of stage 2."""

    def __init__(self, model, layer: int) -> None:
        self.attention = model.model.language_model.layers[layer].self_attn
        self.inputs: tuple | None = None
        self.handle = self.attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.inputs = (hidden, kwargs["position_embeddings"])

    def rows(self, batch_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (len(positions), heads, sequence) at (batch_index, positions), causal."""
        from transformers.models.llama.modeling_llama import rotate_half

        hidden, (cos, sin) = self.inputs
        cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
        attention = self.attention
        dim = attention.head_dim
        query = attention.q_proj(hidden[batch_index, positions]).unflatten(-1, (-1, dim))  # (n, heads, dim)
        keys = attention.k_proj(hidden).unflatten(-1, (-1, dim))[batch_index]  # (n, sequence, kv heads, dim)
        keys = keys.repeat_interleave(attention.num_key_value_groups, dim=2)
        query = query * cos[batch_index, positions, None] + rotate_half(query) * sin[batch_index, positions, None]
        keys = keys * cos[batch_index, :, None] + rotate_half(keys) * sin[batch_index, :, None]
        scores = torch.einsum("nhd,nthd->nht", query, keys) * attention.scaling
        causal = torch.arange(hidden.shape[1])[None, :] > positions[:, None]
        return scores.masked_fill(causal[:, None], float("-inf")).softmax(-1)

    def remove(self) -> None:
        self.handle.remove()


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(batch_index, positions, turn_index)`` of every position that predicts an answer token (position t predicts
    label t + 1), with the conversation turn each belongs to (turns are counted by their answers)."""
    predicts = labels[:, 1:] != -100
    starts = predicts & ~F.pad(predicts, (1, 0))[:, :-1]
    turn_of = starts.long().cumsum(1) - 1
    batch_index, positions = predicts.nonzero(as_tuple=True)
    return batch_index, positions, turn_of[batch_index, positions]


def named_in(question: str) -> tuple[list[str], list[str], bool]:
    """The shapes and colours a benchmark question names (plurals included), and whether it asks for the character."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    shapes = [s for s in synthetic.SHAPES if s in words or f"{s}s" in words]
    return shapes, [c for c in COLOURS if c in words], "character" in words


def question_labels(question: str) -> tuple[int, int]:
    """``(shape, colour)`` a benchmark question names, as indices into ``(none, *SHAPES)`` and ``(none, *COLOURS)``."""
    shapes, colours, _ = named_in(question)
    return (1 + synthetic.SHAPES.index(shapes[0]) if shapes else 0), (1 + COLOURS.index(colours[0]) if colours else 0)


class QuestionHeads(torch.nn.Module):
    """Stage-2 deep supervision, discarded after training. `parse` reads, from the input of the guided layer at each
    answer position, the question's type and the shape and colour it names: what the guided heads must look up.
    `readout_loss` scores the answer from the guided layer's output through the model's own final norm and LM head,
    so each head's output projection learns to turn what it read into the answer word directly."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.sizes = (len(synthetic.QUESTION_TYPES), 1 + len(synthetic.SHAPES), 1 + len(COLOURS))
        self.parse = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, sum(self.sizes)))

    def parse_loss(self, hidden: torch.Tensor, labels: torch.Tensor, chats: list[list[tuple[str, str, str]]]) -> torch.Tensor:
        batch_index, positions, turn_index = answer_positions(labels)
        if not len(positions):
            return hidden.new_zeros(())
        wanted = torch.tensor([[synthetic.QUESTION_TYPES.index(chats[b][turn][0]), *question_labels(chats[b][turn][1])]
                               for b, turn in zip(batch_index.tolist(), turn_index.tolist())])
        logits = self.parse(hidden[batch_index, positions]).split(list(self.sizes), dim=-1)
        return sum(F.cross_entropy(part, wanted[:, i]) for i, part in enumerate(logits)) / len(logits)

    @staticmethod
    def readout_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(model.model.language_model.norm(hidden))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def visible_patches(record: synthetic.Record, chat: list[tuple[str, str, str]], rng: random.Random,
                    drop_rate: float) -> torch.Tensor:
    """Which of the GRID x GRID patches a stage-2 conversation shows the decoder: all of them, or, with probability
    `drop_rate`, those any of its questions needs (`relevant_patches`, and the object centres of count questions)
    plus a uniformly drawn share of the rest, in their original order.

    Pruning renumbers the visual tokens it keeps, so a decoder that only ever saw the full grid reads "where" from a
    token's index in the sequence and loses it under any pruner (attempt 6: position 1.00 unpruned, 0.40-0.80 at 25%
    of the tokens). Dropping only patches no answer depends on teaches it to read position from the token itself,
    and never teaches it to answer about an object it cannot see, so a pruner that drops relevant tokens still pays."""
    keep = torch.ones(GRID * GRID, dtype=torch.bool)
    if rng.random() >= drop_rate:
        return keep
    needed = torch.zeros(GRID * GRID, dtype=torch.bool)
    for kind, question, _ in chat:
        needed |= relevant_patches(record, question)
        if kind == "count":
            needed |= object_centres(record, question)
    background = (~needed).nonzero()[:, 0].tolist()
    keep[rng.sample(background, round(len(background) * (1.0 - rng.random())))] = False
    return keep


def shown_pattern(pattern: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A `guidance_pattern` over the sink and the patches `keep` shows (`visible_patches` keeps all it weighs)."""
    shown = torch.cat([pattern[:1], pattern[1:][keep]])
    return shown / shown.sum()


def guidance_targets(input_ids: torch.Tensor, labels: torch.Tensor, turns: list[list[tuple[str, torch.Tensor]]],
                     image_token_id: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each head of the guided layer should look from every position that predicts an answer token:
    ``(batch_index, positions, targets, exact)``, ``targets`` (positions, heads, sequence) a distribution over the
    sequence and ``exact`` (positions, heads) whether the head must match it (`EXACT_PATTERN_TYPES`) or only put its
    mass on it. ``turns[b][t]`` is ``(type, guidance_pattern)`` of conversation ``b``'s turn ``t``. Head ``i`` serves
    question type ``QUESTION_TYPES[i]``: on its own type's turns it follows the turn's pattern, on every other turn at
    the first token, a sink. The layer then reads each attribute through its own head, so turning what is read into
    the answer is linear."""
    if heads != len(synthetic.QUESTION_TYPES):
        raise ValueError(f"routing needs one head per question type ({len(synthetic.QUESTION_TYPES)}), the layer has {heads}")
    batch_index, positions, turn_index = answer_positions(labels)
    image_slots = input_ids == image_token_id
    targets = torch.zeros(len(positions), heads, input_ids.shape[1])
    targets[:, :, 0] = 1.0
    exact = torch.zeros(len(positions), heads, dtype=torch.bool)
    for n, (b, turn) in enumerate(zip(batch_index.tolist(), turn_index.tolist())):
        kind, pattern = turns[b][turn]
        head = synthetic.QUESTION_TYPES.index(kind)
        targets[n, head, 0] = pattern[0]
        targets[n, head, image_slots[b].nonzero()[:, 0]] = pattern[1:]
        exact[n, head] = kind in EXACT_PATTERN_TYPES
    return batch_index, positions, targets, exact


def attention_guidance_loss(probe: AttentionProbe, input_ids: torch.Tensor, labels: torch.Tensor,
                            turns: list[list[tuple[str, torch.Tensor]]], image_token_id: int) -> torch.Tensor:
    """Per head and position that predicts an answer token (a count's first token is a bare space), averaged: the KL
    divergence from the `guidance_targets` pattern to the head's attention where it must match the pattern exactly,
    else -log of the head's attention mass on the pattern's support."""
    heads = probe.attention.config.num_attention_heads
    batch_index, positions, targets, exact = guidance_targets(input_ids, labels, turns, image_token_id, heads)
    if not len(positions):
        return input_ids.new_zeros((), dtype=torch.float)
    rows = probe.rows(batch_index, positions)
    mass = -((rows * (targets > 0)).sum(-1) + 1e-6).log()
    return torch.where(exact, pattern_divergence(targets, rows), mass).mean()


@torch.no_grad()
def vision_features(model, processor, data: list[synthetic.Record], batch: int = 64) -> torch.Tensor:
    """The patch features LLaVA feeds its projector (``vision_feature_layer``, CLS dropped), float16."""
    tower = model.model.vision_tower
    out = []
    for start in range(0, len(data), batch):
        pixels = processor.image_processor([r.image for r in data[start : start + batch]], return_tensors="pt")["pixel_values"]
        hidden = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        out.append(hidden[:, 1:].to(torch.float16))
    return torch.cat(out)


def _batch_tensors(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, answer_labels) in enumerate(rows):  # right padded
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(answer_labels)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask


def _language_forward(model, input_ids, attention_mask, features, hidden_states: bool = False):
    embeds = model.get_input_embeddings()(input_ids)
    visual = model.model.multi_modal_projector(features.float())
    slots = (input_ids == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=hidden_states)


@torch.no_grad()
def validation_accuracy(model, processor, data, features, batch: int = 50) -> dict:
    """Teacher-forced exact match of the first answer (all its tokens argmax-correct), per question type: a cheap
    progress signal on validation scenes (not the held-out seed)."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(data), batch):
        chunk = range(start, min(start + batch, len(data)))
        rows = [encode_conversation(processor, [(data[i].question, data[i].answer)], GRID * GRID) for i in chunk]
        input_ids, labels, attention_mask = _batch_tensors(rows, processor.tokenizer.pad_token_id)
        predicted = _language_forward(model, input_ids, attention_mask, features[list(chunk)]).logits.argmax(-1)
        for row, i in enumerate(chunk):
            positions = (labels[row] != -100).nonzero()[:, 0]
            correct = bool((predicted[row, positions - 1] == labels[row, positions]).all())
            hits.setdefault(data[i].type, []).append(correct)
    model.train()
    scores = {kind: round(sum(v) / len(v), 3) for kind, v in sorted(hits.items())}
    scores["all"] = round(sum(sum(v) for v in hits.values()) / len(data), 3)
    return scores


def train_language(model, processor, steps: int, batch: int, lr: float, scenes: int, turns: int, seed: int, log,
                   validation_size: int = 300, guidance: float = 1.0, guidance_layer: int = 2, drop_rate: float = 0.0) -> None:
    """Projector and decoder learn to answer, LLaVA-style, with the ViT frozen (so its CLS attention keeps the
    meaning stage 1 gave it). The ViT's features of `scenes` benchmark scenes are computed once; each step draws
    `batch` of them and a fresh `turns`-turn conversation about each.

    Attention guidance (loss weight `guidance`): the heads of decoder layer `guidance_layer`, at the positions that
    predict an answer, are routed one per question type (`guidance_targets`): the head of the question's type to
    the patches of the objects asked about (`guidance_pattern`), the others to a sink. Answering needs a two-hop circuit (gather the
    question's words, then look them up among the patches) and a question-dependent choice of what to read; a
    decoder trained from scratch otherwise sits on the answer priors for thousands of steps (attempts 1-3). With
    guidance on, two further losses (weight 1 each, `QuestionHeads`) supervise the hops before and after it: the
    guided layer's input must name what to look up, and its output must already give the answer.

    With probability `drop_rate` a conversation sees only some of the patches (`visible_patches`)."""
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate is a probability in [0, 1], got {drop_rate}")
    if guidance and not 0 <= guidance_layer < model.config.text_config.num_hidden_layers - 1:
        raise ValueError(f"guidance_layer must be below the last decoder layer (0..{model.config.text_config.num_hidden_layers - 2}): "
                         f"the readout loss reads the layer's output before the final norm; got {guidance_layer}")
    torch.manual_seed(seed + 2)  # a stage-2-only run (--init-vision) initialises the question heads as a full run does
    tower = model.model.vision_tower
    tower.eval().requires_grad_(False)
    data = []
    for start in tqdm(range(0, scenes, 256), desc="stage 2: rendering scenes"):
        data += records(min(256, scenes - start), seed + TRAIN_SEED_OFFSET + 2, start)
    features = torch.cat([vision_features(model, processor, data[i : i + 1024]) for i in
                          tqdm(range(0, scenes, 1024), desc="stage 2: vision features")])
    validation = records(validation_size, seed + TRAIN_SEED_OFFSET + 3, 0)
    validation_features = vision_features(model, processor, validation)
    question_heads = QuestionHeads(model.config.text_config.hidden_size)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    if guidance:
        params += list(question_heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, max(1, steps // 20)))
    rng = random.Random(f"language:{seed}")
    order: list[int] = []
    pad = processor.tokenizer.pad_token_id
    probe = AttentionProbe(model, guidance_layer) if guidance else None
    model.train()
    tower.eval()
    progress = tqdm(range(steps), desc="stage 2: visual instruction tuning")
    for step in progress:
        if len(order) < batch:
            order += rng.sample(range(scenes), scenes)
        chosen, order = order[:batch], order[batch:]
        chats = [conversation(data[i], rng, turns) for i in chosen]
        shown = [visible_patches(data[i], chat, rng, drop_rate) for i, chat in zip(chosen, chats)]
        rows = [encode_conversation(processor, [(q, a) for _, q, a in chat], int(keep.sum())) for chat, keep in zip(chats, shown)]
        input_ids, labels, attention_mask = _batch_tensors(rows, pad)
        visual = torch.cat([features[i][keep] for i, keep in zip(chosen, shown)])
        out = _language_forward(model, input_ids, attention_mask, visual, hidden_states=probe is not None)
        answer_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss = answer_loss
        parts = {}
        if probe is not None:
            turns_seen = [[(kind, shown_pattern(guidance_pattern(data[i], kind, question), keep)) for kind, question, _ in chat]
                          for i, chat, keep in zip(chosen, chats, shown)]
            parts["guidance_loss"] = attention_guidance_loss(probe, input_ids, labels, turns_seen, model.config.image_token_id)
            parts["parse_loss"] = question_heads.parse_loss(out.hidden_states[guidance_layer], labels, chats)
            parts["readout_loss"] = question_heads.readout_loss(model, out.hidden_states[guidance_layer + 1], labels)
            loss = loss + guidance * parts["guidance_loss"] + parts["parse_loss"] + parts["readout_loss"]
        optimizer_step(loss, optimizer, scheduler, params)
        validate = (step + 1) % 250 == 0 or step == steps - 1
        if step % 25 == 0 or validate:
            progress.set_postfix(loss=f"{answer_loss.item():.3f}", **{k.split("_")[0]: f"{v.item():.3f}" for k, v in parts.items()})
            entry = {"stage": 2, "step": step, "loss": answer_loss.item(), **{k: v.item() for k, v in parts.items()}}
            if validate:
                entry["validation"] = validation_accuracy(model, processor, validation, validation_features)
                tqdm.write(f"step {step + 1}: loss {answer_loss.item():.3f}, validation {entry['validation']}")
            log(entry)
    if probe is not None:
        probe.remove()
    model.eval()
    tower.requires_grad_(True)


def evaluate_accuracy(model, processor, size: int, seed: int, image_size: int = IMAGE_SIZE, batch_size: int = 32) -> dict:
    """Exact-match accuracy, overall and per question type, on the held-out benchmark stream `seed`."""
    from vtprune.apps.harness import answer

    held_out = synthetic.generate(size, seed=seed, image_size=image_size)
    predictions, _, _ = answer(model, processor, held_out, batch_size=batch_size, max_new_tokens=10)
    per_type: dict[str, list[bool]] = {}
    for record, prediction in zip(held_out, predictions):
        per_type.setdefault(record.type, []).append(synthetic.is_correct(prediction, record.answer))
    scores = {kind: sum(v) / len(v) for kind, v in per_type.items()}
    scores["all"] = sum(sum(v) for v in per_type.values()) / len(held_out)
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for save_pretrained (e.g. assets/vtprune-tiny-llava)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=2000)
    parser.add_argument("--vision-batch", type=int, default=64)
    parser.add_argument("--vision-lr", type=float, default=1e-3)
    parser.add_argument("--language-steps", type=int, default=2000)
    parser.add_argument("--language-batch", type=int, default=32)
    parser.add_argument("--language-lr", type=float, default=2e-3)
    parser.add_argument("--scenes", type=int, default=16_000, help="benchmark scenes of stage 2 (ViT features computed once)")
    parser.add_argument("--turns", type=int, default=6, help="questions per image in one stage-2 conversation")
    parser.add_argument("--guidance", type=float, default=5.0, help="weight of the stage-2 attention-guidance loss (0: off)")
    parser.add_argument("--guidance-layer", type=int, default=2, help="decoder layer whose heads are guided, one per question type")
    parser.add_argument("--drop-rate", type=float, default=0.5,
                        help="share of stage-2 conversations shown only the patches their answers need plus some others")
    parser.add_argument("--validation-size", type=int, default=300, help="stage-2 validation scenes (another seed)")
    parser.add_argument("--eval-size", type=int, default=600, help="held-out records (cycling through the 6 types)")
    parser.add_argument("--eval-seed", type=int, default=1000, help="the benchmark seed of configs/benchmark")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-vision", default=None, help="also save the model after stage 1 (float32, its ViT rounded to float16) here")
    parser.add_argument("--init-vision", default=None, help="take the ViT from a --save-vision folder; with --vision-steps 0 this runs stage 2 only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history = []

    def log(entry: dict) -> None:
        history.append({**entry, "time_s": round(time.perf_counter() - started, 1)})
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")

    started = time.perf_counter()
    model, processor = build(args.seed)
    if args.init_vision:
        from transformers import LlavaForConditionalGeneration

        pretrained = LlavaForConditionalGeneration.from_pretrained(args.init_vision, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(pretrained.model.vision_tower.state_dict())
    if args.vision_steps:
        heads = VisionHeads(model.config.vision_config.hidden_size)
        train_vision(model, processor, heads, args.vision_steps, args.vision_batch, args.vision_lr, args.seed, log)
    # Stage 2 trains on the ViT rounded to float16, the dtype the model ships in: the decoder then learns from
    # exactly the features users get, and a stage-2-only run from any saved stage-1 folder (float32 or float16)
    # is bit for bit the second half of a full run with the same seed.
    model.model.vision_tower.to(torch.float16).to(torch.float32)
    if args.vision_steps:
        if args.save_vision:
            model.save_pretrained(args.save_vision)
            processor.save_pretrained(args.save_vision)
    vision_seconds = time.perf_counter() - started
    if args.language_steps:
        train_language(model, processor, args.language_steps, args.language_batch, args.language_lr, args.scenes,
                       args.turns, args.seed, log, validation_size=args.validation_size, guidance=args.guidance,
                       guidance_layer=args.guidance_layer, drop_rate=args.drop_rate)
    train_seconds = time.perf_counter() - started

    accuracy = evaluate_accuracy(model, processor, args.eval_size, args.eval_seed)
    accuracy_224 = evaluate_accuracy(model, processor, max(6, args.eval_size // 3), args.eval_seed, image_size=224)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "log.jsonl") / 2**20
    summary = {
        "seed": args.seed,
        "arguments": vars(args),
        "vision_seconds": round(vision_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_mb": round(size_mb, 2),
        "held_out_accuracy": accuracy,
        "held_out_accuracy_224px": accuracy_224,
    }
    (out / "training.json").write_text(json.dumps({**summary, "history": history}, indent=1))
    print(json.dumps(summary, indent=1))
    return {**summary, "history": history}


if __name__ == "__main__":
    main()
