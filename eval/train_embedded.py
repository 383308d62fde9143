"""Train vtprune's embedded VLM: a small LLaVA-1.5-style model that answers the synthetic benchmark.

    python eval/train_embedded.py --out assets/vtprune-tiny-llava        # about an hour on 2 CPU cores
    python eval/train_embedded.py --out /tmp/smoke --vision-steps 20 --language-steps 20 --eval-size 12

The model is a real `LlavaForConditionalGeneration`: a CLIP-style ViT with a CLS token (192 px, 16 px patches,
so 12 x 12 = 144 patch tokens, `vision_feature_layer=-2`, CLS dropped as in LLaVA-1.5), a two-layer GELU
projector and a Llama-style decoder, with the byte-level tokenizer of `vtprune.testing` and the LLaVA chat
template. Everything is reproducible from `--seed` (data, initialisation and batch order).

Two stages, as LLaVA does it, adapted to training from scratch:

1. **Vision pretraining.** The ViT learns the scene from its CLS token: a head on the pooled CLS output predicts,
   for each of the 18 (shape, colour) pairs, its count (0..6) and the horizontal third it lies in, and which
   character the white box holds (if any). This is what makes the CLS attention of the late layers point at
   the objects, the signal FasterVLM / VisionZip read. A dense head on the feature layer's patch tokens names
   the object whose centre lies in each patch, so that the tokens the LLM receives carry their content locally
   (the LLM must find and count objects among them, and a pruner that drops an object's token loses it).
2. **Visual instruction tuning.** Projector and decoder learn to answer the benchmark's questions with the
   harness's prompt (`vtprune.harness.build_prompt`), loss on the answer tokens only. The ViT is fine-tuned at
   a lower learning rate with the stage-1 losses kept as an auxiliary term, so its CLS attention keeps its
   meaning (`--language-vision-lr 0` freezes it, as LLaVA's stage 2 does with a pretrained CLIP).

Images are rendered on the fly by `vtprune.eval.synthetic` (training seeds never overlap the held-out seed);
25% are rendered at 336 px and resized by the processor, so both benchmark resolutions work. The result is
saved in float16 with `save_pretrained` (model, tokenizer, processor, chat template) and loads with
`LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtprune.eval import synthetic

IMAGE_SIZE = 192
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE
PAIRS = [(shape, colour) for shape in synthetic.SHAPES for colour in synthetic.COLOURS]
MAX_COUNT = 6
THIRDS = 4  # absent, left, middle, right
PATCH_CLASSES = 1 + len(PAIRS) + len(synthetic.CHARACTERS)  # none, object centre of a pair, character box centre
TRAIN_SEED_OFFSET = 10_000  # training data uses seeds seed + TRAIN_SEED_OFFSET + stage; held-out seeds are small


def benchmark_texts() -> list[str]:
    """Every question and answer wording of `vtprune.eval.synthetic`, with the harness's prompt words."""
    from vtprune.harness import ANSWER_HINT

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

    from vtprune.testing import LLAVA_CHAT_TEMPLATE, byte_level_tokenizer

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
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
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
    """`count` training records from stream `seed`, a quarter rendered at 336 px (the benchmark's default)."""
    out = []
    for i in range(start, start + count):
        size = 336 if random.Random(f"size:{seed}:{i}").random() < 0.25 else IMAGE_SIZE
        out += synthetic.generate(1, seed=seed, image_size=size, start=i)
    return out


def pretraining_scenes(count: int, seed: int, start: int) -> list[synthetic.Record]:
    """Richer scenes than the benchmark's for stage 1: every scene has 1-6 copies of one (shape, colour) pair,
    1-5 other shapes, and a character box half of the time, so each image teaches counting, reading and
    localisation at once (the benchmark's records each exercise one question type)."""
    out = []
    for i in range(start, start + count):
        rng = random.Random(f"pretrain:{seed}:{i}")
        size = 336 if rng.random() < 0.25 else IMAGE_SIZE
        scene = synthetic._Scene(rng, size)
        shape, colour = rng.choice(PAIRS)
        try:
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


def scene_targets(record: synthetic.Record) -> dict[str, torch.Tensor]:
    """Labels of one scene for vision pretraining (see the module docstring)."""
    counts = torch.zeros(len(PAIRS), dtype=torch.long)
    thirds = torch.zeros(len(PAIRS), dtype=torch.long)
    character = torch.zeros((), dtype=torch.long)
    patches = torch.zeros(GRID, GRID, dtype=torch.long)
    xs: dict[int, list[float]] = {}
    size = record.image.size[0]
    for obj in record.objects:
        row = min(GRID - 1, int(obj["y"] / size * GRID))
        col = min(GRID - 1, int(obj["x"] / size * GRID))
        if obj["shape"] == "text":
            index = synthetic.CHARACTERS.index(obj["character"])
            character = torch.tensor(1 + index)
            patches[row, col] = 1 + len(PAIRS) + index
            continue
        pair = PAIRS.index((obj["shape"], obj["colour"]))
        counts[pair] = min(MAX_COUNT, counts[pair] + 1)
        xs.setdefault(pair, []).append(obj["x"])
        patches[row, col] = 1 + pair
    for pair, values in xs.items():  # the third the pair's mean lies in (exact for a single object)
        thirds[pair] = 1 + min(2, int(3 * sum(values) / len(values) / size))
    return {"counts": counts, "thirds": thirds, "character": character, "patches": patches.flatten()}


def stacked_targets(data: list[synthetic.Record]) -> dict[str, torch.Tensor]:
    """`scene_targets` of a batch, each label stacked along a batch dimension."""
    per_record = [scene_targets(r) for r in data]
    return {key: torch.stack([t[key] for t in per_record]) for key in per_record[0]}


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, params: list[torch.nn.Parameter]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


class VisionHeads(torch.nn.Module):
    """Pretraining heads; discarded after stage 1."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scene = torch.nn.Linear(width, len(PAIRS) * (MAX_COUNT + 1 + THIRDS) + 1 + len(synthetic.CHARACTERS))
        self.patch = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, PATCH_CLASSES))

    def loss(self, pooled: torch.Tensor, patch_tokens: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        logits = self.scene(pooled)
        pairs = len(PAIRS)
        counts = logits[:, : pairs * (MAX_COUNT + 1)].reshape(-1, pairs, MAX_COUNT + 1)
        thirds = logits[:, pairs * (MAX_COUNT + 1) : pairs * (MAX_COUNT + 1 + THIRDS)].reshape(-1, pairs, THIRDS)
        character = logits[:, pairs * (MAX_COUNT + 1 + THIRDS) :]
        patch = self.patch(patch_tokens)
        losses = {
            "counts": F.cross_entropy(counts.flatten(0, 1), targets["counts"].flatten()),
            "thirds": F.cross_entropy(thirds.flatten(0, 1), targets["thirds"].flatten()),
            "character": F.cross_entropy(character, targets["character"]),
            "patches": F.cross_entropy(patch.flatten(0, 1), targets["patches"].flatten()),
        }
        accuracy = {
            "counts": (counts.argmax(-1) == targets["counts"]).all(-1).float().mean().item(),
            "character": (character.argmax(-1) == targets["character"]).float().mean().item(),
        }
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
            progress.set_postfix(loss=f"{loss.item():.3f}", counts=f"{parts['acc_counts']:.2f}", char=f"{parts['acc_character']:.2f}")
            log({"stage": 1, "step": step, "loss": loss.item(), **parts})
    tower.eval()


def language_batch(processor, data: list[synthetic.Record], image_tokens: int) -> dict:
    """Processor inputs with labels on the answer (and end of turn) only, right padded."""
    from vtprune.harness import build_prompt

    tokenizer = processor.tokenizer
    prompts = [build_prompt(processor, r.question) for r in data]
    texts = [f"{p} {r.answer}</s>" for p, r in zip(prompts, data)]
    tokenizer.padding_side = "right"
    inputs = processor(images=[r.image for r in data], text=texts, padding=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    for row, prompt in enumerate(prompts):
        prompt_length = len(tokenizer(prompt.replace("<image>", "<image>" * image_tokens))["input_ids"])
        labels[row, :prompt_length] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


def train_language(model, processor, heads: VisionHeads, steps: int, batch: int, lr: float, vision_lr: float,
                   seed: int, log, offset: int = 0) -> None:
    """Projector and decoder at `lr`; the ViT at `vision_lr` (0 freezes it), still trained on the stage-1 losses
    (weight 0.5) so its CLS keeps summarising the scene while its patch tokens adapt to the questions."""
    tower = model.model.vision_tower
    tune_vision = vision_lr > 0
    tower.requires_grad_(tune_vision)
    language = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.vision_tower.")]
    groups = [{"params": language, "lr": lr}]
    if tune_vision:
        groups.append({"params": list(tower.parameters()) + list(heads.parameters()), "lr": vision_lr})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, max(1, steps // 20)))
    model.train()
    tower.train(tune_vision)
    image_tokens = GRID * GRID
    feature_index = model.config.vision_feature_layer
    embed = model.get_input_embeddings()
    projector = model.model.multi_modal_projector
    progress = tqdm(range(steps), desc="stage 2: visual instruction tuning")
    for step in progress:
        data = records(batch, seed + TRAIN_SEED_OFFSET + 2, (offset + step) * batch)
        inputs = language_batch(processor, data, image_tokens)
        # The tower runs once and feeds both the LLaVA path (exactly what the model's forward splices in) and the
        # stage-1 heads.
        with torch.set_grad_enabled(tune_vision):
            vision = tower(inputs["pixel_values"], output_hidden_states=True)
        features = projector(vision.hidden_states[feature_index][:, 1:])
        embeds = embed(inputs["input_ids"])
        slots = (inputs["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
        loss = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss
        parts = {"answer": loss.item()}
        if tune_vision:
            auxiliary, _ = heads.loss(vision.pooler_output, vision.hidden_states[feature_index][:, 1:], stacked_targets(data))
            loss = loss + 0.5 * auxiliary
            parts["vision"] = auxiliary.item()
        optimizer_step(loss, optimizer, scheduler, params)
        if step % 25 == 0 or step == steps - 1:
            progress.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
            log({"stage": 2, "step": step, "loss": loss.item(), **parts})
    model.eval()
    tower.requires_grad_(True)


def evaluate_accuracy(model, processor, size: int, seed: int, image_size: int = IMAGE_SIZE, batch_size: int = 32) -> dict:
    """Exact-match accuracy, overall and per question type, on the held-out benchmark stream `seed`."""
    from vtprune.harness import answer

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
    parser.add_argument("--vision-steps", type=int, default=700)
    parser.add_argument("--vision-batch", type=int, default=64)
    parser.add_argument("--vision-lr", type=float, default=1e-3)
    parser.add_argument("--language-steps", type=int, default=1400)
    parser.add_argument("--language-batch", type=int, default=32)
    parser.add_argument("--language-lr", type=float, default=1.5e-3)
    parser.add_argument("--language-vision-lr", type=float, default=3e-4, help="ViT learning rate in stage 2 (0: frozen)")
    parser.add_argument("--eval-size", type=int, default=600, help="held-out records (cycling through the 6 types)")
    parser.add_argument("--eval-seed", type=int, default=1000, help="the benchmark seed of configs/benchmark")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-vision", default=None, help="also save the model after stage 1 (float32) here")
    parser.add_argument("--resume", default=None, help="continue training a saved model (its --out folder)")
    parser.add_argument("--data-offset", type=int, default=0, help="skip this many batches of each data stream (when resuming)")
    parser.add_argument("--init-vision", default=None, help="take the ViT (and heads) from a --save-vision folder; with --vision-steps 0 this runs stage 2 only")
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
    if args.resume:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.resume, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.resume)
    else:
        model, processor = build(args.seed)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    if args.resume and Path(args.resume, "vision_heads.pt").is_file():
        heads.load_state_dict(torch.load(Path(args.resume, "vision_heads.pt")))
    if args.init_vision:
        from transformers import LlavaForConditionalGeneration

        pretrained = LlavaForConditionalGeneration.from_pretrained(args.init_vision, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(pretrained.model.vision_tower.state_dict())
        if Path(args.init_vision, "vision_heads.pt").is_file():
            heads.load_state_dict(torch.load(Path(args.init_vision, "vision_heads.pt")))
    if args.vision_steps:
        train_vision(model, processor, heads, args.vision_steps, args.vision_batch, args.vision_lr, args.seed, log)
    vision_seconds = time.perf_counter() - started
    if args.vision_steps and args.save_vision:
        model.save_pretrained(args.save_vision)
        processor.save_pretrained(args.save_vision)
        torch.save(heads.state_dict(), Path(args.save_vision, "vision_heads.pt"))
    if args.language_steps:
        train_language(model, processor, heads, args.language_steps, args.language_batch, args.language_lr,
                       args.language_vision_lr, args.seed, log, offset=args.data_offset)
    train_seconds = time.perf_counter() - started

    accuracy = evaluate_accuracy(model, processor, args.eval_size, args.eval_seed)
    accuracy_336 = evaluate_accuracy(model, processor, max(6, args.eval_size // 3), args.eval_seed, image_size=336)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    torch.save(heads.state_dict(), out / "vision_heads.pt")  # stage-1 heads, to continue training (--resume)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    summary = {
        "seed": args.seed,
        "arguments": vars(args),
        "vision_seconds": round(vision_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_mb": round(size_mb, 2),
        "held_out_accuracy": accuracy,
        "held_out_accuracy_336px": accuracy_336,
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
