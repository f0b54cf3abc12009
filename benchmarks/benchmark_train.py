"""Side-by-side training speed of `rpn train --precision float32` and `--precision bfloat16`, in one run.

    python benchmarks/benchmark_train.py [--data COCO.json] [--photos 32] [--size 512] [--repeats 2]

Each precision trains one epoch on the same first PHOTOS photos of DATA (default
../shared/data/coco-train2017/instances.json), from the shipped checkpoint, batch 4, at one shorter
side SIZE, as `rpn train` does (decoding, targets, losses, SGD step; no validation). The two alternate
REPEATS times; a run's time a step is the mean over its steps after the first (which builds the
kernels). Prints a Markdown table with the ratio to float32 and the machine. Where the CPU has no
bfloat16 units autocast still runs, through slower emulation: the table says so by its ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchmark_propose import _machine  # noqa: E402

from rpn_cli.model.spec import default_mobilenet_spec  # noqa: E402
from rpn_cli.training.loop import TrainConfig, TrainEvent, train  # noqa: E402
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402

BATCH = 4


def _subset(data: Path, photos: int, folder: Path) -> Path:
    """DATA's first PHOTOS images and their boxes, as a COCO file beside a link to DATA's images."""
    coco = json.loads(data.read_text())
    images = coco["images"][:photos]
    kept = {image["id"] for image in images}
    subset = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}
    (folder / "images").symlink_to(data.parent / "images")
    path = folder / "instances.json"
    path.write_text(json.dumps(subset))
    return path


def seconds_a_step(data: Path, size: int, precision: str, work_dir: Path) -> float:
    config = TrainConfig(sources=[str(data)], work_dir=str(work_dir), epochs=1, batch_size=BATCH, validation_count=0,
                         train_sizes=[size], warmup_steps=1, init_checkpoint=str(DEFAULT_CHECKPOINT),
                         loader_threads=0, precision=precision)
    finished: list[float] = []

    def report(event: TrainEvent) -> None:
        if event.kind == "step":
            finished.append(time.perf_counter())

    train(config, default_mobilenet_spec(), torch.device("cpu"), report)  # --init replaces the spec
    return (finished[-1] - finished[0]) / (len(finished) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/coco-train2017/instances.json")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such COCO file (give --data)")
    if args.photos < 2 * BATCH:
        sys.exit(f"--photos {args.photos}: at least {2 * BATCH}, to time a step after the first")
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        data = _subset(args.data, args.photos, folder)
        for repeat in range(args.repeats):
            for precision in times:
                times[precision].append(seconds_a_step(data, args.size, precision, folder / f"{precision}-{repeat}"))
    print(f"Machine: {_machine()}")
    print(f"{args.photos} photos of {args.data}, shorter side {args.size}, batch {BATCH}, from the shipped "
          f"checkpoint; median of {args.repeats} runs each, alternating\n")
    print("| precision | s / step | s / photo | speed vs float32 |")
    print("|---|---|---|---|")
    reference = statistics.median(times["float32"])
    for precision, seconds in times.items():
        step = statistics.median(seconds)
        print(f"| {precision} | {step:.2f} | {step / BATCH:.3f} | {reference / step:.2f}x |")


if __name__ == "__main__":
    main()
