"""A YOLOX ONNX detector as a teacher: class-agnostic boxes for what annotations leave out.

The model's contract (input 416x416 BGR 0..255 letterboxed top-left on 114,
raw output ``(1, 3549, 85)`` at strides 8/16/32) is in the teacher's README.
onnxruntime is an optional dependency (the ``train`` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, nms

from ..errors import UsageError
from ..io.files import file_sha256

_PAD_VALUE = 114
_STRIDES = (8, 16, 32)
# COCO's 80 category ids in the order of the model's class scores (1..90 with gaps).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


class YoloxTeacher:
    """Runs a YOLOX ONNX export and returns objectness-ranked boxes in original pixels."""

    def __init__(self, model_path: str | Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise UsageError('--teacher needs onnxruntime: pip install "rpn-cli[train]"') from error
        model_path = Path(model_path)
        if not model_path.is_file():
            raise UsageError(f"{model_path}: no such teacher model")
        # Which model labelled what: caches of its detections are valid for this file only.
        self.fingerprint = file_sha256(model_path)[:16]
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise UsageError(f"{model_path}: not a loadable ONNX model ({error})") from error
        shape = self.session.get_inputs()[0].shape
        self.input_name = self.session.get_inputs()[0].name
        self.size = int(shape[2]) if isinstance(shape[2], int) else 416
        self.grid = _grid(self.size)

    def boxes(self, image: Image.Image, score_threshold: float = 0.3, nms_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 4) x1y1x2y2 and objectness (K,) for an RGB image, after class-agnostic NMS."""
        boxes, scores, _ = self.detections(image, score_threshold, nms_iou)
        return boxes, scores

    def detections(self, image: Image.Image, score_threshold: float = 0.3,
                   nms_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (K, 4) x1y1x2y2 in original pixels, objectness (K,) and the COCO category id (K,) of
        each box's best class, objectness-ranked after class-agnostic NMS."""
        ratio = min(self.size / image.height, self.size / image.width)
        resized = image.resize((int(image.width * ratio), int(image.height * ratio)), Image.Resampling.BILINEAR)
        canvas = np.full((self.size, self.size, 3), _PAD_VALUE, np.float32)
        canvas[: resized.height, : resized.width] = np.asarray(resized, np.float32)[:, :, ::-1]
        batch = canvas.transpose(2, 0, 1)[None]
        raw = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0][0]
        centres = (raw[:, :2] + self.grid[:, :2]) * self.grid[:, 2:3]
        sizes = np.exp(np.minimum(raw[:, 2:4], 10.0)) * self.grid[:, 2:3]
        boxes = np.concatenate((centres - sizes / 2, centres + sizes / 2), axis=1) / ratio
        scores = raw[:, 4]
        keep = scores >= score_threshold
        categories = np.asarray(COCO_CATEGORY_IDS, np.int64)[raw[keep, 5:].argmax(axis=1)]
        boxes = torch.from_numpy(boxes[keep]).float()
        scores = torch.from_numpy(scores[keep]).float()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        kept = nms(boxes, scores, nms_iou).numpy()
        return boxes[kept].numpy(), scores[kept].numpy(), categories[kept]


def _grid(size: int) -> np.ndarray:
    """(cells, 3): x, y and stride of every output row, strides 8, 16, 32, row-major."""
    rows = []
    for stride in _STRIDES:
        cells = size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        rows.append(np.stack((xs.ravel(), ys.ravel(), np.full(cells * cells, stride)), axis=1))
    return np.concatenate(rows).astype(np.float32)


def merge_teacher_boxes(annotated: np.ndarray, teacher: np.ndarray, max_iou: float = 0.5) -> np.ndarray:
    """Annotated boxes plus the teacher's boxes that overlap none of them by ``max_iou`` or more."""
    return annotated if len(teacher) == 0 else np.concatenate(
        (annotated.astype(np.float32), teacher[_unclaimed(annotated, teacher, max_iou)].astype(np.float32)), axis=0)


def _unclaimed(annotated: np.ndarray, teacher: np.ndarray, max_iou: float) -> np.ndarray:
    """(T,) bool: the teacher boxes that overlap no annotated box by ``max_iou`` or more."""
    if len(annotated) == 0 or len(teacher) == 0:
        return np.ones(len(teacher), bool)
    overlap = box_iou(torch.from_numpy(teacher).float(), torch.from_numpy(annotated).float()).max(dim=1).values
    return (overlap < max_iou).numpy()


def merged_confidence(annotated: np.ndarray, teacher: np.ndarray, teacher_scores: np.ndarray,
                      max_iou: float = 0.5) -> np.ndarray:
    """(K,) float32, row for row with :func:`merge_teacher_boxes`: 1 for an annotated box, the teacher's
    objectness for each of its boxes kept."""
    kept = teacher_scores[_unclaimed(annotated, teacher, max_iou)] if len(teacher) else teacher_scores[:0]
    return np.concatenate((np.ones(len(annotated), np.float32), kept.astype(np.float32)))


def partial_label_targets(
    annotated: np.ndarray, labelled_categories: frozenset[int], teacher_boxes: np.ndarray, teacher_scores: np.ndarray,
    teacher_categories: np.ndarray, threshold: float, ignore_threshold: float, max_iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, confidence, ignore regions) of an image whose annotations cover only ``labelled_categories``.

    annotated: (K, 4) human boxes; teacher_*: (T, 4), (T,), (T,) detections, COCO category ids.
    Boxes: the human boxes plus the teacher's boxes (objectness >= ``threshold``) of other categories
    that overlap no human box by ``max_iou``; the teacher's boxes of labelled categories give way to the
    human ones (those are complete). Confidence (B,): 1 for a human box, the teacher's objectness for its
    own. Ignore regions (R, 4): the teacher's less confident boxes of other categories
    (``ignore_threshold`` <= objectness < ``threshold``), where a missing annotation is not evidence of
    background. Returns float32 arrays.
    """
    other = ~np.isin(teacher_categories, list(labelled_categories))
    confident = other & (teacher_scores >= threshold)
    uncertain = other & (teacher_scores >= ignore_threshold) & (teacher_scores < threshold)
    annotated = annotated.astype(np.float32)
    chosen = teacher_boxes[confident].astype(np.float32).reshape(-1, 4)
    boxes = merge_teacher_boxes(annotated, chosen, max_iou)
    confidence = merged_confidence(annotated, chosen, teacher_scores[confident], max_iou)
    return boxes, confidence, teacher_boxes[uncertain].astype(np.float32).reshape(-1, 4)
