"""Side-by-side training speed of `rpn train --precision float32` and `--precision bfloat16`, in one run,
for one checkpoint or several (trunks against each other).

    python benchmarks/benchmark_train.py [--data COCO.json] [--photos 32] [--size 512] [--repeats 2]
                                         [--checkpoint CKPT ...]

Each precision trains one epoch on the same first PHOTOS photos of DATA (default
../shared/data/coco-train2017/instances.json), from each CHECKPOINT (default: the shipped one; its
first 4 trunk blocks fixed, BatchNorm frozen, as `rpn train --init` does), batch 4, at one shorter
side SIZE, as `rpn train` does (decoding, targets, losses, SGD step; no validation). The runs alternate
REPEATS times; a run's time a step is the mean over its steps after the first (which builds the
kernels). Prints a Markdown table with the ratios to float32 and to the first checkpoint, and the
machine. Where the CPU has no bfloat16 units autocast still runs, through slower emulation: the table
says so by its ratio.
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

from rpn_cli.io.checkpoint import read_spec  # noqa: E402
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


def seconds_a_step(data: Path, size: int, precision: str, work_dir: Path, checkpoint: Path) -> float:
    config = TrainConfig(sources=[str(data)], work_dir=str(work_dir), epochs=1, batch_size=BATCH, validation_count=0,
                         train_sizes=[size], warmup_steps=1, init_checkpoint=str(checkpoint),
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
    parser.add_argument("--checkpoint", type=Path, action="append", help="repeatable; default: the shipped one")
    args = parser.parse_args()
    checkpoints = args.checkpoint or [DEFAULT_CHECKPOINT]
    for checkpoint in checkpoints:
        if not checkpoint.is_file():
            sys.exit(f"{checkpoint}: no such checkpoint")
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such COCO file (give --data)")
    if args.photos < 2 * BATCH:
        sys.exit(f"--photos {args.photos}: at least {2 * BATCH}, to time a step after the first")
    precisions = ("float32", "bfloat16")
    times: dict[tuple[int, str], list[float]] = {(index, precision): [] for index in range(len(checkpoints))
                                                 for precision in precisions}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        data = _subset(args.data, args.photos, folder)
        for repeat in range(args.repeats):
            for index, precision in times:
                work_dir = folder / f"{index}-{precision}-{repeat}"
                times[index, precision].append(seconds_a_step(data, args.size, precision, work_dir, checkpoints[index]))
    print(f"Machine: {_machine()}")
    print(f"{args.photos} photos of {args.data}, shorter side {args.size}, batch {BATCH}; median of "
          f"{args.repeats} runs each, alternating\n")
    print("| checkpoint | trunk | precision | s / step | s / photo | speed vs float32 | time vs the first |")
    print("|---|---|---|---|---|---|---|")
    median = {key: statistics.median(seconds) for key, seconds in times.items()}
    for (index, precision), step in median.items():
        trunk = read_spec(checkpoints[index]).backbone.name
        print(f"| {checkpoints[index].name} | {trunk} | {precision} | {step:.2f} | {step / BATCH:.3f} | "
              f"{median[index, 'float32'] / step:.2f}x | {step / median[0, precision]:.2f}x |")


if __name__ == "__main__":
    main()
