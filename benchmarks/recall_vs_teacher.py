"""Average recall of a checkpoint, the YOLOX-Nano teacher and Selective Search on the same annotated images.

    python benchmarks/recall_vs_teacher.py [--checkpoint CKPT] [--annotations FILE] [--teacher MODEL.onnx]
                                           [--no-selective-search]

By default: the shipped checkpoint, on the validation images named in its provenance (photos it was not
trained on) of ../shared/data/coco-train2017. Each method gives at most 300 boxes per image; the teacher's
boxes are ranked by objectness after NMS at IoU 0.7 (as its README measures it).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402
from rpn_cli.checkpoint import load_checkpoint  # noqa: E402
from rpn_cli.data import load_coco  # noqa: E402
from rpn_cli.evaluate import average_recall_report, proposals_from_model  # noqa: E402
from rpn_cli.images import load_image  # noqa: E402

SHARED = ROOT.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--annotations", type=Path, default=SHARED / "data" / "coco-train2017" / "instances.json")
    parser.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "yolox-nano" / "yolox_nano.onnx")
    parser.add_argument("--all-images", action="store_true", help="Every annotated image, not the validation split.")
    parser.add_argument("--no-selective-search", action="store_true")
    args = parser.parse_args()

    model = load_checkpoint(args.checkpoint)
    images = load_coco(args.annotations)
    if not args.all_images:
        wanted = set(model.spec.provenance.get("validation_images", []))
        images = [image for image in images if image.image_id in wanted]
    rows = {}

    started = time.perf_counter()
    ours = proposals_from_model(model, images, model.spec.proposal_settings())
    rows["rpn (this checkpoint)"] = (ours, time.perf_counter() - started)

    if args.teacher.is_file():
        from rpn_cli.teacher import YoloxTeacher

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

    print(f"{len(images)} images from {args.annotations}, at most 300 proposals each\n")
    print("| method | AR@10 | AR@100 | AR@300 | R@0.5 | R@0.7 | AR@100 small / medium / large | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    figures = {}
    for name, (found, seconds) in rows.items():
        report = average_recall_report(images, found, (10, 100, 300))
        figures[name] = report
        print(f"| {name} | {report['AR@10']:.3f} | {report['AR@100']:.3f} | {report['AR@300']:.3f} | "
              f"{report['R@0.5@300']:.3f} | {report['R@0.7@300']:.3f} | {report['AR@100_small']:.3f} / "
              f"{report['AR@100_medium']:.3f} / {report['AR@100_large']:.3f} | {seconds / len(images):.3f} |")
    print("\n" + json.dumps(figures))


if __name__ == "__main__":
    main()
