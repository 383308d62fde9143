"""A procedurally rendered visual question answering benchmark, deterministic by seed.

Each record is a small scene: coloured shapes on a light background with clutter, sometimes a white box with a
small digit or letter, and one question with an exact short answer. The question types probe what pruning can
destroy: small objects, counting, fine detail (characters a few patches wide), spatial position, and colour.

    from vtprune.eval.synthetic import generate, save_folder, to_parquet
    records = generate(200, seed=0)           # list of Record(id, image, question, answer, type)
    save_folder(records, "bench/")            # images + records.jsonl, reloadable with load_folder
    to_parquet(records, "bench.parquet")      # for lmms-eval (needs pyarrow: pip install vtprune[lmms])

Scoring is exact match after `normalize` (lower case, first word, punctuation stripped, number words mapped to
digits), see `is_correct`.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
CHARACTERS = "0123456789ACEFHKLPRTXY"
QUESTION_TYPES = ("count", "colour", "shape", "position", "text", "exists")
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}


@dataclass
class Record:
    id: int
    image: Image.Image
    question: str
    answer: str
    type: str
    objects: list[dict] = field(default_factory=list)
    """Scene contents: ``{"shape", "colour", "x", "y", "radius"}`` per shape, and for the white character box
    ``{"shape": "text", "colour": "white", ..., "character"}`` (for analysis, overlays and training labels)."""

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "type": self.type, "objects": self.objects}


@dataclass
class _Shape:
    kind: str
    colour: str
    x: float
    y: float
    radius: float


class _Scene:
    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.size = size
        self.shapes: list[_Shape] = []
        self.characters: list[dict] = []
        self.boxes: list[tuple[float, float, float]] = []  # occupied discs (x, y, r)
        background = tuple(rng.randint(215, 245) for _ in range(3))
        self.image = Image.new("RGB", (size, size), background)
        self.draw = ImageDraw.Draw(self.image)
        self._clutter()

    def _clutter(self) -> None:
        # Thin grey strokes and dots: they carry no answer but make "look everywhere" strategies pay.
        rng, size = self.rng, self.size
        for _ in range(rng.randint(6, 14)):
            grey = rng.randint(150, 200)
            x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
            x1, y1 = x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)
            self.draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=rng.randint(1, 2))
        for _ in range(rng.randint(10, 30)):
            grey = rng.randint(140, 200)
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            self.draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(grey, grey, grey))

    def _free_spot(self, radius: float, x_range: tuple[float, float] | None = None) -> tuple[float, float]:
        margin = radius + 4
        low, high = x_range if x_range is not None else (margin, self.size - margin)
        for _ in range(500):
            x = self.rng.uniform(max(low, margin), min(high, self.size - margin))
            y = self.rng.uniform(margin, self.size - margin)
            if all((x - bx) ** 2 + (y - by) ** 2 > (radius + br + 6) ** 2 for bx, by, br in self.boxes):
                return x, y
        raise RuntimeError("scene too crowded")

    def add_shape(self, kind: str, colour: str, x_range: tuple[float, float] | None = None) -> _Shape:
        radius = self.rng.uniform(0.035, 0.06) * self.size  # 12-20 px at 336: one to three 14-px patches
        x, y = self._free_spot(radius, x_range)
        fill = COLOURS[colour]
        if kind == "circle":
            self.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
        elif kind == "square":
            side = radius * 0.9
            self.draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
        else:
            self.draw.polygon([(x, y - radius), (x - radius, y + radius * 0.8), (x + radius, y + radius * 0.8)], fill=fill)
        shape = _Shape(kind, colour, x, y, radius)
        self.shapes.append(shape)
        self.boxes.append((x, y, radius))
        return shape

    def add_character(self, character: str) -> None:
        box = self.rng.uniform(0.06, 0.08) * self.size
        x, y = self._free_spot(box * 0.75)
        self.draw.rectangle((x - box / 2, y - box / 2, x + box / 2, y + box / 2), fill=(255, 255, 255), outline=(60, 60, 60))
        font = ImageFont.load_default(size=max(8, int(box * 0.8)))
        self.draw.text((x, y), character, fill=(10, 10, 10), font=font, anchor="mm")
        self.boxes.append((x, y, box * 0.75))
        self.characters.append({"shape": "text", "colour": "white", "x": x, "y": y, "radius": box / 2, "character": character})

    def distractors(self, count: int, avoid: Iterable[tuple[str, str]] = ()) -> None:
        avoid = set(avoid)
        pairs = [(k, c) for k in SHAPES for c in COLOURS if (k, c) not in avoid]
        for _ in range(count):
            kind, colour = self.rng.choice(pairs)
            self.add_shape(kind, colour)


def _plural(kind: str) -> str:
    return kind + "s"


def _make(kind: str, rng: random.Random, size: int) -> tuple[_Scene, str, str]:
    scene = _Scene(rng, size)
    colours, shapes = list(COLOURS), list(SHAPES)
    if kind == "count":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        count = rng.randint(1, 6)
        for _ in range(count):
            scene.add_shape(shape, colour)
        scene.distractors(rng.randint(2, 5), avoid=[(shape, colour)])
        return scene, f"How many {colour} {_plural(shape)} are there?", str(count)
    if kind == "colour":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        scene.add_shape(shape, colour)
        scene.distractors(rng.randint(2, 5), avoid=[(shape, c) for c in colours])
        return scene, f"What colour is the {shape}?", colour
    if kind == "shape":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        scene.add_shape(shape, colour)
        scene.distractors(rng.randint(2, 5), avoid=[(s, colour) for s in shapes])
        return scene, f"What shape is the {colour} object?", shape
    if kind == "position":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        side = rng.choice(["left", "right"])
        third = size / 3
        scene.add_shape(shape, colour, x_range=(0, third) if side == "left" else (2 * third, size))
        scene.distractors(rng.randint(2, 5), avoid=[(shape, colour)])
        return scene, f"Is the {colour} {shape} on the left or the right?", side
    if kind == "text":
        character = rng.choice(CHARACTERS)
        scene.add_character(character)
        scene.distractors(rng.randint(2, 5))
        return scene, "What character is written in the white box?", character.lower()
    if kind == "exists":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        present = rng.random() < 0.5
        if present:
            scene.add_shape(shape, colour)
        scene.distractors(rng.randint(2, 5), avoid=[(shape, colour)])
        return scene, f"Is there a {colour} {shape}?", "yes" if present else "no"
    raise ValueError(f"unknown question type {kind!r}; valid: {', '.join(QUESTION_TYPES)}")


def generate(
    count: int, seed: int = 0, image_size: int = 336, types: Sequence[str] = QUESTION_TYPES, start: int = 0
) -> list[Record]:
    """`count` records, cycling through `types`; record ``i`` depends only on ``(seed, start + i)``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown question type(s) {unknown}; valid: {', '.join(QUESTION_TYPES)}")
    records = []
    for i in range(start, start + count):
        rng = random.Random(f"{seed}:{i}")
        kind = types[i % len(types)]
        scene, question, answer = _make(kind, rng, image_size)
        objects = [{**asdict(shape), "shape": shape.kind} for shape in scene.shapes]
        for item in objects:
            item.pop("kind")
        objects += scene.characters
        records.append(Record(i, scene.image, question, answer, kind, objects))
    return records


def normalize(text: str) -> str:
    """Lower case, first word, punctuation stripped, number words as digits ("Three." -> "3")."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    return NUMBER_WORDS.get(words[0], words[0])


def is_correct(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def save_folder(records: Sequence[Record], folder: str | Path) -> Path:
    """Write ``images/<id>.png`` and ``records.jsonl`` (the local-folder benchmark format)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "records.jsonl", "w") as f:
        for record in records:
            name = f"images/{record.id:06d}.png"
            record.image.save(folder / name)
            f.write(json.dumps({**record.to_json(), "image": name}) + "\n")
    return folder


def load_folder(folder: str | Path) -> list[Record]:
    """Read a folder of ``records.jsonl`` lines ``{"image", "question", "answer"[, "type", "id"]}``."""
    folder = Path(folder)
    index = folder / "records.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"benchmark folder {folder} has no records.jsonl (expected image/question/answer lines)")
    records = []
    with open(index) as f:
        for line_number, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [key for key in ("image", "question", "answer") if key not in row]
            if missing:
                raise ValueError(f"{index}:{line_number + 1} lacks {missing}")
            image = Image.open(folder / row["image"]).convert("RGB")
            records.append(
                Record(row.get("id", line_number), image, row["question"], str(row["answer"]), row.get("type", "unknown"), row.get("objects", []))
            )
    return records


def to_parquet(records: Sequence[Record], path: str | Path) -> Path:
    """Export for lmms-eval: columns id, question, answer, type and image ({"bytes": PNG}). Needs pyarrow."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("to_parquet needs pyarrow: pip install 'vtprune[lmms]' (or pyarrow)") from error
    rows = []
    for record in records:
        buffer = io.BytesIO()
        record.image.save(buffer, format="PNG")
        row = {**record.to_json(), "image": {"bytes": buffer.getvalue(), "path": f"{record.id:06d}.png"}}
        row["objects"] = json.dumps(row["objects"])
        rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
