"""A training set that travels: `rpn train`'s data, labels resolved, photos shrunk, in plain COCO files.

    python benchmarks/training_bundle.py OUT DATA... [--partial F.json] [--teacher M.onnx]
        [--teacher-threshold 0.2] [--validation-set VAL.json] --work-dir DIR
        [--shorter-side 416] [--quality 35]

Takes the data options of `rpn train` and writes what a run of it would train on:
OUT/train/instances.json and OUT/train/images/*.webp (each photo's boxes: annotations merged with
the teacher's; ignore regions, such as the teacher's less sure boxes on partially labelled photos, as
crowd boxes, which `rpn train` ignores), and OUT/validation/ the same way for --validation-set. Photos
larger than --shorter-side are scaled down to it and stored as WebP, so that the set fits where little
can be carried (a GPU machine that gets 64 MiB with the repository); the teacher is then not needed
there: `rpn train OUT/train/instances.json --validation-set OUT/validation/instances.json ...`.
The teacher's detections are cached in --work-dir as `rpn train` caches them (the same folder reuses
them). Without --validation-set every photo goes to train/ (as `rpn train --validation 0`). The
teacher's objectness is not carried, so neither are --soft-targets and --confidence-weights.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli.errors import RpnError  # noqa: E402
from rpn_cli.io.files import atomic_write_bytes  # noqa: E402
from rpn_cli.io.images import load_image  # noqa: E402
from rpn_cli.io.tool_formats import CATEGORY  # noqa: E402
from rpn_cli.training.loop import TrainConfig, training_data  # noqa: E402


def _shrunk(path: Path, shorter_side: int) -> tuple[Image.Image, float, float]:
    """The photo (as rpn reads it) scaled down to ``shorter_side`` if larger, and its x and y scales
    (each side's, as the sizes are rounded)."""
    original = load_image(path)
    scale = min(1.0, shorter_side / min(original.width, original.height))
    image = original
    if scale < 1.0:
        image = original.resize((round(original.width * scale), round(original.height * scale)),
                                Image.Resampling.LANCZOS)
    return image, image.width / original.width, image.height / original.height


def _coco_boxes(rows: np.ndarray, sx: float, sy: float) -> list[list[float]]:
    """x1y1x2y2 rows to COCO [x, y, w, h], scaled."""
    return [[round(float(x1) * sx, 2), round(float(y1) * sy, 2), round(float(x2 - x1) * sx, 2),
             round(float(y2 - y1) * sy, 2)] for x1, y1, x2, y2 in rows]


def write_set(folder: Path, photos: list[tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]], shorter_side: int,
              quality: int) -> int:
    """Write ``photos`` ((path, boxes, ignore regions, COCO areas of the boxes or None) each, original
    pixels) as a COCO set in ``folder``; returns the bytes of images written. Unreadable photos are left
    out with a line on stderr."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, names, written = [], [], set(), 0
    for path, boxes, ignore, areas in photos:
        try:
            image, sx, sy = _shrunk(path, shorter_side)
        except RpnError as error:
            print(f"skipped: {error}", file=sys.stderr)
            continue
        # The whole original name, so that rpn train's by-name exclusion of validation photos still holds.
        name, copy = f"{path.name}.webp", 1
        while name in names:  # two folders can hold photos of one name
            copy += 1
            name = f"{path.name}-{copy}.webp"
        names.add(name)
        image.save(folder / "images" / name, "WEBP", quality=quality, method=6)  # slowest, smallest
        written += (folder / "images" / name).stat().st_size
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": image.width, "height": image.height,
                       "source": str(path)})
        for crowd, rows, row_areas in ((0, boxes, areas), (1, ignore, None)):
            for index, box in enumerate(_coco_boxes(rows, sx, sy)):
                # COCO's area (of the object's mask) sorts validation objects by size: scaled, kept.
                area = box[2] * box[3] if row_areas is None else float(row_areas[index]) * sx * sy
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                                    "bbox": box,
                                    "area": round(area, 2), "iscrowd": crowd})
    coco = {"images": images, "annotations": annotations, "categories": [CATEGORY]}
    atomic_write_bytes(folder / "instances.json", lambda tmp: Path(tmp).write_text(json.dumps(coco, separators=(",", ":"))))
    return written


def _in_range(low: int, high: int):
    """An argparse type: an integer from ``low`` to ``high``."""
    def integer(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value
    return integer


def _warn(event) -> None:
    if event.kind == "warning":
        print(f"warning: {event.message}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("data", nargs="*", default=[])
    parser.add_argument("--partial", action="append", default=[])
    parser.add_argument("--validation-set", action="append", default=[])
    parser.add_argument("--teacher")
    parser.add_argument("--teacher-threshold", type=float, default=0.3)
    parser.add_argument("--teacher-ignore-threshold", type=float, default=0.1)
    parser.add_argument("--work-dir", type=Path, required=True, help="Where the teacher's detections are cached.")
    parser.add_argument("--shorter-side", type=_in_range(32, 4096), default=416)
    parser.add_argument("--quality", type=_in_range(0, 100), default=35, help="WebP quality (0-100).")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists: give a new folder")
    config = TrainConfig(sources=args.data, work_dir=str(args.work_dir), partial_sources=args.partial,
                         validation_sets=args.validation_set, teacher=args.teacher,
                         teacher_threshold=args.teacher_threshold,
                         teacher_ignore_threshold=args.teacher_ignore_threshold, validation_count=0)
    # Written beside OUT and renamed when complete: a run that fails leaves no half-made bundle.
    partial = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        samples, validation = training_data(config, args.work_dir, _warn)
        train_bytes = write_set(partial / "train", [(s.path, s.boxes, s.ignore, None) for s in samples],
                                args.shorter_side, args.quality)
        validation_bytes = write_set(partial / "validation",
                                     [(v.path, v.boxes[~v.crowd], v.boxes[v.crowd], v.areas[~v.crowd])
                                      for v in validation], args.shorter_side, args.quality) if validation else 0
        partial.rename(args.out)
    except RpnError as error:
        sys.exit(f"error: {error}")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"{args.out}: {len(samples)} training photos ({train_bytes / 2**20:.1f} MiB), {len(validation)} "
          f"validation photos ({validation_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
