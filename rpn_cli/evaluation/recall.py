"""Class-agnostic average recall of proposals, computed as COCO's ``COCOeval`` with ``useCats = 0`` does.

For recall only the matching matters: per image, proposals in score order
(stable) each take the unmatched, non-ignored ground-truth box of highest IoU
at or above the threshold. Crowd boxes and boxes outside an area range are
ignored (they neither count nor take matches from the others). Recall at M
proposals is the share of non-ignored boxes matched by an image's top M; AR
is its mean over IoU 0.50:0.05:0.95.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from ..errors import DataError, ImageError, UsageError
from ..io.datasets import AnnotatedImage, load_coco, load_voc
from ..io.files import atomic_write_bytes
from ..io.inputs import InputImage

if TYPE_CHECKING:
    from ..inference.proposer import Proposer

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
DEFAULT_MAX_PROPOSALS = (10, 100, 300, 1000)


def _first_match_ranks(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Greedy matching; returns (T, G) rank of the proposal that matched each box, or -1.

    ious: (D, G), proposals sorted by score, boxes all non-ignored.
    """
    ranks = np.full((len(thresholds), ious.shape[1]), -1, dtype=np.int64)
    # Proposals that reach no box at the lowest threshold never match: skip them.
    useful = np.flatnonzero(ious.max(axis=1, initial=0.0) >= min(thresholds.min(), 1 - 1e-10))
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(ious.shape[1], dtype=bool)
        for d in useful:
            candidates = np.where(taken, -1.0, ious[d])
            best = -1
            best_iou = min(threshold, 1 - 1e-10)
            for g in np.flatnonzero(candidates >= best_iou):
                if candidates[g] >= best_iou:
                    best_iou, best = candidates[g], g
            if best >= 0:
                taken[best] = True
                ranks[t, best] = d
    return ranks


def recall_table(
    ground_truth: Sequence[AnnotatedImage],
    proposals: Mapping[str, tuple[np.ndarray, np.ndarray]],
    max_proposals: Sequence[int] = DEFAULT_MAX_PROPOSALS,
    area_range: str = "all",
) -> np.ndarray:
    """Recall (T, len(max_proposals)) over IoU thresholds; -1 where there is no box to recall.

    ``proposals[image_id] = (boxes (D, 4) x1y1x2y2, scores (D,))``; images without an entry
    have no proposals.
    """
    low, high = AREA_RANGES[area_range]
    matched = np.zeros((len(IOU_THRESHOLDS), len(max_proposals)), dtype=np.int64)
    total = 0
    for image in ground_truth:
        keep = ~image.crowd & (image.areas >= low) & (image.areas <= high)
        boxes = image.boxes[keep]
        total += len(boxes)
        if len(boxes) == 0 or image.image_id not in proposals:
            continue
        dt_boxes, dt_scores = proposals[image.image_id]
        order = np.argsort(-np.asarray(dt_scores, dtype=np.float64), kind="mergesort")[: max(max_proposals)]
        dt = torch.as_tensor(np.asarray(dt_boxes, dtype=np.float64)[order].reshape(-1, 4))
        if dt.shape[0] == 0:
            continue
        ious = box_iou(dt, torch.as_tensor(boxes, dtype=torch.float64)).numpy()
        ranks = _first_match_ranks(ious, IOU_THRESHOLDS)
        for m, limit in enumerate(max_proposals):
            matched[:, m] += ((ranks >= 0) & (ranks < limit)).sum(axis=1)
    if total == 0:
        return np.full(matched.shape, -1.0)
    return matched / total


def average_recall_report(
    ground_truth: Sequence[AnnotatedImage],
    proposals: Mapping[str, tuple[np.ndarray, np.ndarray]],
    max_proposals: Sequence[int] = DEFAULT_MAX_PROPOSALS,
) -> dict:
    """AR@M for each M, recall at IoU 0.5 and 0.7 at the largest M, and AR@100 by object size."""
    table = recall_table(ground_truth, proposals, max_proposals)
    report = {f"AR@{m}": float(table[:, i].mean()) for i, m in enumerate(max_proposals)}
    report[f"R@0.5@{max_proposals[-1]}"] = float(table[0, -1])
    report[f"R@0.7@{max_proposals[-1]}"] = float(table[4, -1])
    for area in ("small", "medium", "large"):
        sized = recall_table(ground_truth, proposals, [100], area)
        report[f"AR@100_{area}"] = float(sized[:, 0].mean()) if (sized >= 0).all() else -1.0
    report["images"] = len(ground_truth)
    report["boxes"] = int(sum(int((~image.crowd).sum()) for image in ground_truth))
    return report


def recall_curves(
    ground_truth: Sequence[AnnotatedImage], proposals: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict:
    """Data of the ``--plot`` figure: recall vs IoU at 100 and 300 proposals, AR vs proposal count."""
    counts = [1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000]
    table = recall_table(ground_truth, proposals, counts)
    return {
        "iou": IOU_THRESHOLDS.tolist(),
        "recall_100": table[:, counts.index(100)].tolist(),
        "recall_300": table[:, counts.index(300)].tolist(),
        "counts": counts,
        "average_recall": table.mean(axis=0).tolist(),
    }


def load_ground_truth(annotations: Path, images: Path | None = None, limit: int | None = None) -> list[AnnotatedImage]:
    """Annotated images of a COCO file or a VOC folder (the first ``limit`` of them)."""
    annotations = Path(annotations)
    if annotations.is_dir():
        found = load_voc(annotations)
    elif annotations.is_file():
        found = load_coco(annotations, images)
    else:
        raise DataError(f"{annotations}: no such annotation file or folder")
    return found[:limit] if limit else found


def proposals_from_model(
    proposer: "Proposer", ground_truth: Sequence[AnnotatedImage], advance: Callable[[], None] = lambda: None,
    unreadable: Callable[[AnnotatedImage, ImageError], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run ``proposer`` on every annotated image, through its stream (so in lanes where ``rpn propose`` would
    use them). An image that cannot be read (missing, corrupt) gets no entry and is passed to
    ``unreadable`` (which may raise); the figures should then leave it out (:func:`readable_only`), not
    count its objects as missed."""
    found = {}
    items = [InputImage(str(image.path), image.path.name) for image in ground_truth]
    with contextlib.closing(proposer.stream(items)) as results:
        for image, result in zip(ground_truth, results):
            if result.error is None:
                found[image.image_id] = (result.proposals.boxes.numpy(), result.proposals.scores.numpy())
            elif unreadable is not None:
                unreadable(image, ImageError(result.error))
            advance()
    return found


def readable_only(ground_truth: Sequence[AnnotatedImage], unreadable: Sequence[AnnotatedImage]) -> list[AnnotatedImage]:
    """The annotated images less those that could not be read: what the figures are computed over."""
    left_out = {image.image_id for image in unreadable}
    return [image for image in ground_truth if image.image_id not in left_out]


def proposals_from_jsonl(path: Path, ground_truth: Sequence[AnnotatedImage]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Proposals of an ``rpn propose`` JSON Lines file, matched to annotated images by file path,
    else by file name."""
    by_path = {str(image.path.resolve()): image.image_id for image in ground_truth}
    by_name = {image.path.name: image.image_id for image in ground_truth}
    found = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from error
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name = record["image"]
            boxes = np.asarray(record["boxes"], np.float64).reshape(-1, 4)
            scores = np.asarray(record["scores"], np.float64)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}:{number}: not a proposal record ({error})") from error
        image_id = by_path.get(str(Path(name).resolve())) or by_name.get(Path(name).name)
        if image_id is not None:
            found[image_id] = (boxes, scores)
    if not found:
        raise DataError(f"{path}: no record names an image of the annotations")
    return found


def write_recall_plot(ground_truth: Sequence[AnnotatedImage], proposals: Mapping, path: Path) -> None:
    """Recall against IoU at 100 and 300 proposals, and AR against the number of proposals (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UsageError('--plot needs matplotlib: pip install "rpn-cli[train]"') from error
    curves = recall_curves(ground_truth, proposals)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(curves["iou"], curves["recall_100"], marker="o", label="100 proposals")
    left.plot(curves["iou"], curves["recall_300"], marker="o", label="300 proposals")
    left.set(xlabel="IoU threshold", ylabel="recall", ylim=(0, 1), title="Recall against IoU")
    left.legend()
    right.semilogx(curves["counts"], curves["average_recall"], marker="o")
    right.set(xlabel="proposals per image", ylabel="average recall (IoU 0.5:0.95)", ylim=(0, 1),
              title="Average recall against proposals")
    figure.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
