"""How closely checkpoints reproduce their teacher's boxes, on photos they were trained on and on photos
they were not: whether a student trails its teacher for want of data (it matches the teacher on its own
training photos, not on others) or of capacity and training (it falls short on both).

    python benchmarks/fit_to_teacher.py [--checkpoint CKPT ...] [--trained-on FOLDER]
                                        [--threshold 0.2] [--precision float32]

The truth here is the YOLOX-Nano teacher's boxes (objectness >= --threshold, after its NMS at IoU 0.5: what
`rpn train --teacher` trains on), on the photos of --trained-on (default ``coco-val2017-unlabeled``: the
default checkpoint learned them from the teacher's boxes alone) and on the validation set
(benchmarks/validation_set.py: never trained on). At most 300 proposals per image.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli import Proposer  # noqa: E402
from rpn_cli.errors import RpnError  # noqa: E402
from rpn_cli.evaluation.recall import average_recall_report, proposals_from_model  # noqa: E402
from rpn_cli.io.datasets import AnnotatedImage, load_unlabeled  # noqa: E402
from rpn_cli.io.images import load_image  # noqa: E402
from rpn_cli.training.teacher import YoloxTeacher  # noqa: E402
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402

SHARED = ROOT.parent / "shared"


def teacher_truth(images: list[AnnotatedImage], teacher: YoloxTeacher, threshold: float) -> list[AnnotatedImage]:
    """The same images with the teacher's boxes as their annotations (box areas for the size buckets)."""
    labelled = []
    for image in images:
        picture = load_image(image.path)
        boxes, _ = teacher.boxes(picture, score_threshold=threshold)
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype("float64")
        labelled.append(AnnotatedImage(image.path, picture.width, picture.height, image.image_id, boxes,
                                       crowd=np.zeros(len(boxes), bool), areas=areas))
    return labelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, action="append", help="Repeatable; default: the shipped one.")
    parser.add_argument("--trained-on", type=Path, default=SHARED / "data" / "coco-val2017-unlabeled")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "yolox-nano" / "yolox_nano.onnx")
    args = parser.parse_args()

    from validation_set import validation_images

    if not args.trained_on.is_dir():
        sys.exit(f"{args.trained_on}: no such folder (the photos the checkpoints were trained on)")
    try:
        teacher = YoloxTeacher(args.teacher)
        proposers = {path: Proposer(path, device="cpu", precision=args.precision)
                     for path in args.checkpoint or [DEFAULT_CHECKPOINT]}
    except RpnError as error:
        sys.exit(str(error))
    sets = {f"trained on ({args.trained_on.name})": teacher_truth(load_unlabeled(args.trained_on), teacher,
                                                                  args.threshold),
            "validation (never trained on)": teacher_truth(validation_images(), teacher, args.threshold)}
    print(f"The teacher's boxes (objectness >= {args.threshold:g}) as the truth; at most 300 proposals per image; "
          f"rpn in {args.precision}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| checkpoint | photos | teacher boxes | AR@10 | AR@100 | AR@300 | R@0.5 | R@0.7 | "
          "AR@100 small / medium / large |")
    print("|---|---|---|---|---|---|---|---|---|")
    figures = {}
    for checkpoint, proposer in proposers.items():
        for name, images in sets.items():
            report = average_recall_report(images, proposals_from_model(proposer, images), (10, 100, 300))
            boxes = sum(len(image.boxes) for image in images)
            figures[f"{checkpoint}, {name}"] = {**report, "images": len(images), "boxes": boxes}
            print(f"| {checkpoint} | {name}: {len(images)} | {boxes} | {report['AR@10']:.3f} | "
                  f"{report['AR@100']:.3f} | {report['AR@300']:.3f} | {report['R@0.5@300']:.3f} | "
                  f"{report['R@0.7@300']:.3f} | {report['AR@100_small']:.3f} / {report['AR@100_medium']:.3f} / "
                  f"{report['AR@100_large']:.3f} |")
    print("\n" + json.dumps(figures))


if __name__ == "__main__":
    main()
