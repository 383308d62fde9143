"""The ``vtprune-calibrate`` command: DyMU thresholds (`vtprune.calibrate`) from a folder of images.

    vtprune-calibrate IMAGE_FOLDER --model llava-hf/llava-1.5-7b-hf --preset mid --out dymu-mid.json
    vtprune-calibrate IMAGE_FOLDER --model tiny:llava --keep 64 --out dymu-64.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from vtprune.apps.models import load_model
from vtprune.calibration import calibrate
from vtprune.errors import VTPruneError
from vtprune.pruners.dymu import PRESETS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _folder_images(folder: Path, limit: int | None):
    from PIL import Image

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}")
    for path in paths:
        with Image.open(path) as image:
            yield image.convert("RGB")


def main(argv: Sequence[str] | None = None) -> int:
    """``vtprune-calibrate FOLDER --model NAME_OR_PATH --preset mid --out thresholds.json``."""
    parser = argparse.ArgumentParser(prog="vtprune-calibrate", description="Calibrate DyMU thresholds on a folder of images.")
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--model", required=True, help="Hub id or save_pretrained folder, or tiny:<family> (tiny:llava, tiny:llava_next: the families with in-encoder merging)")
    parser.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    parser.add_argument("--targets", default=None, help="comma-separated merges per block (replaces --preset)")
    parser.add_argument("--keep", type=int, default=None, help="tokens an average image keeps (replaces --preset)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the thresholds JSON")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.model.startswith("tiny:"):
            spec = {"source": "tiny", "family": args.model[len("tiny:") :], "dtype": args.dtype, "device": args.device}
        elif Path(args.model).is_dir():
            spec = {"source": "path", "path": args.model, "dtype": args.dtype, "device": args.device}
        else:
            spec = {"source": "hub", "name": args.model, "dtype": args.dtype, "device": args.device}
        targets = [int(t) for t in args.targets.split(",")] if args.targets else None
        images = list(_folder_images(args.folder, args.limit))
        model, processor = load_model(spec)
        thresholds = calibrate(model, "dymu", images, processor=processor, preset=args.preset, targets=targets,
                               keep=args.keep, batch_size=args.batch_size)
        path = thresholds.save(args.out)
    except (VTPruneError, FileNotFoundError, ValueError) as error:
        print(f"vtprune-calibrate: error: {error}", file=sys.stderr)
        return 2
    schedule = f"preset {args.preset}" if thresholds.meta["preset"] else f"keep {args.keep}" if args.keep is not None else "given targets"
    print(f"wrote {len(thresholds)} thresholds ({thresholds.meta['images']} images, {schedule}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
