"""Proposal records in the formats other tools import: COCO results and datasets (pycocotools, CVAT,
FiftyOne), YOLO label files, Label Studio pre-annotations, detectron2 precomputed proposals.

Every function takes proposal records (``outputs.proposal_record``: image, width, height, boxes as
x1, y1, x2, y2 in original pixels, scores high to low) and returns plain data; writing is the caller's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from ..errors import DataError

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
# detectron2's BoxMode.XYXY_ABS
DETECTRON2_XYXY_ABS = 0
# The Label Studio labelling config these tasks fit (names used in every result).
LABEL_STUDIO_CONFIG = ('<View><Image name="image" value="$image"/>'
                       '<RectangleLabels name="label" toName="image"><Label value="object"/></RectangleLabels></View>')


def default_image_ids(images: Sequence[str]) -> dict[str, int]:
    """COCO-style numeric ids: a file's name when every name is a distinct number (COCO's own files,
    ``000000397133.jpg`` -> 397133), else 1..N in input order."""
    stems = [os.path.splitext(os.path.basename(image))[0] for image in images]
    if stems and all(stem.isdecimal() and stem.isascii() for stem in stems) and len({int(s) for s in stems}) == len(stems):
        return {image: int(stem) for image, stem in zip(images, stems)}
    return {image: number for number, image in enumerate(images, 1)}


def image_ids_from_annotations(annotation_file: Path, images: Sequence[str]) -> dict[str, int]:
    """The ids a COCO annotation file gives ``images``, matched by path (relative to the file's
    ``images/`` folder or as written), else by file name. Raises :class:`DataError` (an annotation file
    that cannot be used) for a file that is not such a COCO file, or naming an image the file does not list."""
    try:
        data = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
        entries = [(str(entry["file_name"]), entry["id"]) for entry in data["images"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{annotation_file}: not a COCO file with images (id, file_name) ({error})") from error
    by_path = {os.path.normpath(name): image_id for name, image_id in entries}
    by_name = {os.path.basename(name): image_id for name, image_id in entries}
    ids = {}
    for image in images:
        image_id = by_path.get(os.path.normpath(image), by_name.get(os.path.basename(image)))
        if image_id is None:
            raise DataError(f"{image}: not among the images of {annotation_file}")
        ids[image] = image_id
    return ids


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]


def coco_results(records: Sequence[dict], ids: dict[str, int]) -> list[dict]:
    """COCO detection results (what ``COCO.loadRes`` takes): category 1, bbox x, y, width, height."""
    return [{"image_id": ids[record["image"]], "category_id": CATEGORY["id"], "bbox": _xywh(box), "score": score}
            for record in records for box, score in zip(record["boxes"], record["scores"])]


def coco_instances(records: Sequence[dict], ids: dict[str, int]) -> dict:
    """A COCO instances dataset: the images, and the proposals as annotations of one category (each with
    its ``score``), for tools that import datasets (CVAT, FiftyOne, pycocotools' ``COCO``)."""
    images, annotations = [], []
    for record in records:
        image_id = ids[record["image"]]
        images.append({"id": image_id, "file_name": record["image"], "width": record["width"],
                       "height": record["height"]})
        for box, score in zip(record["boxes"], record["scores"]):
            xywh = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                                "bbox": xywh, "area": round(xywh[2] * xywh[3], 2), "iscrowd": 0, "score": score})
    return {"images": images, "annotations": annotations, "categories": [CATEGORY]}


def yolo_lines(record: dict) -> str:
    """A YOLO label file: ``0 cx cy w h score`` per box, coordinates divided by the image's size."""
    width, height = record["width"], record["height"]
    lines = []
    for (x1, y1, x2, y2), score in zip(record["boxes"], record["scores"]):
        values = ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)
        lines.append("0 " + " ".join(f"{v:.6f}" for v in values) + f" {score:.6f}")
    return "".join(line + "\n" for line in lines)


def label_studio_tasks(records: Sequence[dict], model_version: str) -> list[dict]:
    """Label Studio tasks with predictions (pre-annotations): ``rectanglelabels`` in percent of the
    image, a score per box, for the config :data:`LABEL_STUDIO_CONFIG`."""
    tasks = []
    for record in records:
        width, height = record["width"], record["height"]
        results = []
        for number, ((x1, y1, x2, y2), score) in enumerate(zip(record["boxes"], record["scores"])):
            results.append({
                "id": f"p{number}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                "original_width": width, "original_height": height, "image_rotation": 0, "score": score,
                "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                          "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": ["object"]},
            })
        top = record["scores"][0] if record["scores"] else 0.0
        tasks.append({"data": {"image": record["image"]},
                      "predictions": [{"model_version": model_version, "score": top, "result": results}]})
    return tasks


def _logit(probability: float) -> float:
    p = min(max(probability, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def detectron2_proposals(records: Sequence[dict], ids: dict[str, int]) -> dict:
    """What detectron2's ``load_proposals_into_dataset`` reads from ``PROPOSAL_FILES``: ``ids``,
    ``boxes`` (N, 4) float32 x1, y1, x2, y2 in pixels (``bbox_mode`` XYXY_ABS) and
    ``objectness_logits`` (N,) float32, best first. Our scores are probabilities: their logits."""
    import numpy as np

    return {
        "ids": [ids[record["image"]] for record in records],
        "boxes": [np.asarray(record["boxes"], np.float32).reshape(-1, 4) for record in records],
        "objectness_logits": [np.asarray([_logit(s) for s in record["scores"]], np.float32) for record in records],
        "bbox_mode": DETECTRON2_XYXY_ABS,
    }
