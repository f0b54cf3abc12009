"""torchvision's CPU NMS against our early-stopping greedy NMS, side by side on the same boxes.

    python benchmarks/benchmark_nms.py [--boxes 3000] [--keep 300] [--repeats 20]

Boxes: uniformly random, and clustered (near-copies of a few objects, like real proposals).
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import nms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rpn_cli.nms import greedy_nms  # noqa: E402


def _boxes(kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * 600
    wh = torch.rand(count, 2, generator=generator) * 200 + 8
    boxes = torch.cat((xy, xy + wh), 1)
    if kind == "clustered":
        boxes = boxes[torch.randint(0, 20, (count,), generator=generator)] + torch.randn(count, 4, generator=generator) * 6
    return boxes


def _time(function, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=3000)
    parser.add_argument("--keep", type=int, default=300)
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.boxes} boxes, keep {args.keep}, IoU {args.iou}\n")
    print("| boxes | torchvision.ops.nms ms | greedy_nms ms | ratio | same result |")
    print("|---|---|---|---|---|")
    for kind in ("random", "clustered"):
        generator = torch.Generator().manual_seed(0)
        boxes, scores = _boxes(kind, args.boxes, generator), torch.rand(args.boxes, generator=generator)
        theirs = _time(lambda: nms(boxes, scores, args.iou)[: args.keep], args.repeats)
        ours = _time(lambda: greedy_nms(boxes, scores, args.iou, args.keep), args.repeats)
        same = torch.equal(nms(boxes, scores, args.iou)[: args.keep], greedy_nms(boxes, scores, args.iou, args.keep))
        print(f"| {kind} | {theirs * 1000:.1f} | {ours * 1000:.1f} | {theirs / ours:.1f}x | {same} |")


if __name__ == "__main__":
    main()
