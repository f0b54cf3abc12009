"""Average recall and time per image of checkpoints, the YOLOX-Nano teacher and Selective Search, side by
side on the same annotated images.

    python benchmarks/recall_vs_teacher.py [--checkpoint CKPT] [--baseline OLD.safetensors ...]
                                           [--annotations FILE] [--precision auto|float32|bfloat16]
                                           [--teacher MODEL.onnx] [--no-selective-search]

By default: the shipped checkpoint on the default checkpoint's validation set (benchmarks/validation_set.py:
146 fully annotated photos no checkpoint of its chain was trained on). Each method gives at most 300
boxes per image; the teacher's boxes are ranked by objectness after NMS at IoU 0.7 (as its README
measures it). Times are the whole of each method per image (decode to boxes), one after another here.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli import Proposer  # noqa: E402
from rpn_cli.evaluation.recall import average_recall_report, proposals_from_model  # noqa: E402
from rpn_cli.io.datasets import load_coco  # noqa: E402
from rpn_cli.io.images import load_image  # noqa: E402
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402

SHARED = ROOT.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="Another checkpoint to compare (the previous default, say); repeatable.")
    parser.add_argument("--annotations", type=Path, help="A COCO file to score on instead of the validation set.")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "yolox-nano" / "yolox_nano.onnx")
    parser.add_argument("--no-selective-search", action="store_true")
    args = parser.parse_args()

    if args.annotations:
        images, source = load_coco(args.annotations), str(args.annotations)
    else:
        from validation_set import validation_images

        images, source = validation_images(), "the validation set (benchmarks/validation_set.py)"
    rows = {}
    for label, checkpoint in [("rpn (this checkpoint)", args.checkpoint),
                              *((f"rpn ({path.name})", path) for path in args.baseline)]:
        proposer = Proposer(checkpoint, device="cpu", precision=args.precision)
        proposer(images[0].path)  # warm-up: first-call allocations
        started = time.perf_counter()
        found = proposals_from_model(proposer, images)
        rows[label] = (found, time.perf_counter() - started)

    if args.teacher.is_file():
        from rpn_cli.training.teacher import YoloxTeacher

        teacher, found = YoloxTeacher(args.teacher), {}
        started = time.perf_counter()
        for image in images:
            boxes, scores = teacher.boxes(load_image(image.path), score_threshold=0.0, nms_iou=0.7)
            found[image.image_id] = (boxes[:300], scores[:300])
        rows["YOLOX-Nano teacher"] = (found, time.perf_counter() - started)

    if not args.no_selective_search:
        import cv2

        search, found = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation(), {}
        started = time.perf_counter()
        for image in images:
            search.setBaseImage(cv2.imread(str(image.path)))
            search.switchToSelectiveSearchFast()
            rects = search.process()[:300].astype(np.float64)  # in its own order, best first
            boxes = np.concatenate((rects[:, :2], rects[:, :2] + rects[:, 2:]), axis=1)
            found[image.image_id] = (boxes, -np.arange(len(boxes), dtype=np.float64))
        rows["Selective Search (fast)"] = (found, time.perf_counter() - started)

    print(f"{len(images)} images from {source}, at most 300 proposals each; rpn in {args.precision}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"bfloat16 {'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}\n")
    print("| method | AR@10 | AR@100 | AR@300 | R@0.5 | R@0.7 | AR@100 small / medium / large | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    figures = {}
    for name, (found, seconds) in rows.items():
        report = average_recall_report(images, found, (10, 100, 300))
        figures[name] = {**report, "seconds_per_image": seconds / len(images)}
        print(f"| {name} | {report['AR@10']:.3f} | {report['AR@100']:.3f} | {report['AR@300']:.3f} | "
              f"{report['R@0.5@300']:.3f} | {report['R@0.7@300']:.3f} | {report['AR@100_small']:.3f} / "
              f"{report['AR@100_medium']:.3f} / {report['AR@100_large']:.3f} | {seconds / len(images):.3f} |")
    print("\n" + json.dumps(figures))


if __name__ == "__main__":
    main()
