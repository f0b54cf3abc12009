"""The proposal layer: from per-anchor scores and deltas to a ranked, NMS-ed set of boxes."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch

from ..errors import UsageError
from .boxes import DEFAULT_DELTA_CLAMP, clip_boxes, decode_deltas, valid_box_mask
from .nms import batched_greedy_nms, greedy_nms
from .voting import vote_boxes

# A log-odds offset beyond this makes a level's objectness 0 or 1 in float32: no longer a calibration.
MAX_LEVEL_OFFSET = 50.0


@dataclass(frozen=True)
class ProposalSettings:
    """Limits of the proposal layer. Test mode by default; :meth:`training` gives the seed's 12000 / 600.
    ``vote_iou`` > 0: box voting after NMS at that IoU (:mod:`.voting`); 0, the seed's layer, leaves the
    kept boxes as decoded. ``level_offsets``: one number a pyramid level (finest first) added to the
    objectness log-odds of that level's anchors before levels compete in NMS and the final ranking
    (scores come out with it); a calibration between levels fitted after training; () adds none."""

    pre_nms_top_n: int = 3000
    post_nms_top_n: int = 300
    nms_iou: float = 0.7
    min_size: float = 16.0
    min_score: float = 0.0
    nms_per_level: bool = False
    top_n_before_filtering: bool = False
    vote_iou: float = 0.0
    level_offsets: tuple[float, ...] = ()

    def __post_init__(self):
        # JSON holds a list; a caller may pass a numpy array or a tensor. Plain floats from here on (a
        # set, a dict or an iterator has no level order and is left for validated() to refuse).
        offsets = self.level_offsets
        if isinstance(offsets, (list, tuple)) or hasattr(offsets, "tolist"):
            values = offsets.tolist() if hasattr(offsets, "tolist") else list(offsets)
            if isinstance(values, list) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                for v in values):
                object.__setattr__(self, "level_offsets", tuple(float(v) for v in values))

    @classmethod
    def training(cls, **overrides) -> "ProposalSettings":
        return replace(cls(pre_nms_top_n=12000, post_nms_top_n=600), **overrides)

    def validated(self) -> "ProposalSettings":
        for name in ("pre_nms_top_n", "post_nms_top_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise UsageError(f"{name} {value!r}: expected a whole number")
        for name in ("nms_iou", "min_size", "min_score", "vote_iou"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise UsageError(f"{name} {value!r}: expected a number")
        if self.pre_nms_top_n < 1 or self.post_nms_top_n < 1:
            raise UsageError("pre-NMS and post-NMS limits must be at least 1")
        if not 0.0 < self.nms_iou <= 1.0:
            raise UsageError(f"NMS IoU must be in (0, 1], got {self.nms_iou}")
        if not 0.0 <= self.min_size < math.inf:
            raise UsageError(f"min size must be a number of pixels >= 0, got {self.min_size}")
        if not 0.0 <= self.min_score <= 1.0:
            raise UsageError(f"min score must be in [0, 1], got {self.min_score}")
        if not 0.0 <= self.vote_iou <= 1.0:
            raise UsageError(f"voting IoU must be in [0, 1] (0: no voting), got {self.vote_iou}")
        if not isinstance(self.level_offsets, tuple) or not all(
                isinstance(value, float) and abs(value) <= MAX_LEVEL_OFFSET for value in self.level_offsets):
            raise UsageError(f"level_offsets {self.level_offsets!r}: expected a list of numbers from "
                             f"-{MAX_LEVEL_OFFSET:g} to {MAX_LEVEL_OFFSET:g}, one a pyramid level")
        return self

    def to_dict(self) -> dict:
        """The JSON form: offsets as a list, left out when there are none (files without them read as
        before, by versions that predate them too)."""
        data = asdict(self)
        if data["level_offsets"]:
            data["level_offsets"] = list(data["level_offsets"])
        else:
            del data["level_offsets"]
        return data


@dataclass(frozen=True)
class ProposalLayer:
    """The proposal layer of one model: its limits and how its head's outputs read (score kind, box
    coding); built once from the model description (:meth:`ModelSpec.proposal_layer`), called per image
    or, on a GPU, once for a whole batch (:meth:`for_batch`)."""

    settings: ProposalSettings
    score_kind: str = "sigmoid"
    box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    delta_clamp: float = DEFAULT_DELTA_CLAMP

    def __call__(self, levels: Sequence, index: int, image_height: int,
                 image_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (K, 4) and scores (K,) of image ``index`` of a batch (see :func:`proposals_for_image`).

        levels: the network's per-level outputs (``LevelOutput``: logits (N, M_l) or (N, M_l, 2),
        deltas (N, M_l, 4), anchors (M_l, 4)); the image is ``image_height x image_width`` resized pixels.
        """
        self._check_level_count(levels)
        return proposals_for_image([self._scores(level.logits[index], number) for number, level in enumerate(levels)],
                                   [level.deltas[index] for level in levels], [level.anchors for level in levels],
                                   image_height, image_width, self.settings, self.box_weights, self.delta_clamp,
                                   scores_are_logits=self._ranks_logits)

    def for_batch(self, levels: Sequence,
                  image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Boxes (K, 4), scores (K,) and per-image counts of every image of a batch, from a few whole-batch
        operations (see :func:`proposals_for_images`); ``image_sizes``: (N, 2) each image's resized
        (height, width)."""
        self._check_level_count(levels)
        return proposals_for_images([self._scores(level.logits, number) for number, level in enumerate(levels)],
                                    [level.deltas for level in levels], [level.anchors for level in levels],
                                    image_sizes, self.settings, self.box_weights, self.delta_clamp,
                                    scores_are_logits=self._ranks_logits)

    def _check_level_count(self, levels: Sequence) -> None:
        offsets = self.settings.level_offsets
        if offsets and len(offsets) != len(levels):
            raise UsageError(f"level_offsets has {len(offsets)} values for a network of {len(levels)} levels")

    @property
    def _ranks_logits(self) -> bool:
        # Softmax pairs with offsets rank by log-odds too: probabilities pushed up by an offset saturate at 1.
        return self.score_kind == "sigmoid" or any(self.settings.level_offsets)

    def _scores(self, logits: torch.Tensor, level: int) -> torch.Tensor:
        """Sigmoid logits as they are (ranked as logits); softmax pairs as objectness probabilities, or
        as log-odds (positive minus negative) where there are offsets; with the level's offset added."""
        offset = self.settings.level_offsets[level] if self.settings.level_offsets else 0.0
        if self.score_kind == "sigmoid":
            return logits.float() + offset if offset else logits.float()
        if self._ranks_logits:
            logits = logits.float()
            return logits[..., 1] - logits[..., 0] + offset
        return objectness(logits, self.score_kind)


def objectness(logits: torch.Tensor, score_kind: str) -> torch.Tensor:
    """Objectness probabilities (..., M) in float32 from logits of either score kind."""
    logits = logits.float()
    if score_kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)[..., 1]


def proposals_for_image(
    scores: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    image_height: int,
    image_width: int,
    settings: ProposalSettings = ProposalSettings(),
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    delta_clamp: float = DEFAULT_DELTA_CLAMP,
    scores_are_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals of one image from its per-level outputs.

    scores[l]: (M_l,) objectness probabilities, or sigmoid logits when
    ``scores_are_logits`` (ranked as logits, which keeps apart what float32
    probabilities would tie, as torchvision does; returned as probabilities);
    deltas[l]: (M_l, 4); anchors[l]: (M_l, 4), all in the resized image's
    pixels, whose size is ``image_height x image_width``.

    Per level: decode (float32, dw/dh clamped), clip to the image, drop
    non-finite boxes and boxes under ``min_size``, keep the top
    ``pre_nms_top_n`` by score (the seed's order; with ``top_n_before_filtering``
    the top ``pre_nms_top_n`` are taken first, as torchvision does). Then one NMS
    (across levels, or per level when ``nms_per_level``) and the top
    ``post_nms_top_n``; with ``vote_iou`` > 0, box voting among the boxes that entered
    NMS. Returns boxes (K, 4) and scores (K,), float32, sorted by score high to low;
    K may be 0.
    """
    if settings.top_n_before_filtering:
        boxes, score, level_ids = _top_n_then_filter(scores, deltas, anchors, image_height, image_width, settings,
                                                     box_weights, delta_clamp, scores_are_logits)
    else:
        boxes, score, level_ids = _filter_then_top_n(scores, deltas, anchors, image_height, image_width, settings,
                                                     box_weights, delta_clamp, scores_are_logits)
    if boxes.shape[0] == 0:
        return boxes.reshape(0, 4), score
    if settings.nms_per_level:
        keep = _torchvision_ops().batched_nms(boxes, score, level_ids, settings.nms_iou)[: settings.post_nms_top_n]
    else:
        keep = greedy_nms(boxes, score, settings.nms_iou, settings.post_nms_top_n)
    if settings.vote_iou > 0:
        return vote_boxes(boxes[keep], boxes, score, settings.vote_iou), score[keep]
    return boxes[keep], score[keep]


def proposals_for_images(
    scores: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    image_sizes: torch.Tensor,
    settings: ProposalSettings = ProposalSettings(),
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    delta_clamp: float = DEFAULT_DELTA_CLAMP,
    scores_are_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`proposals_for_image` for every image of a batch, without a loop over the images: on a GPU
    each small operation costs a kernel launch, and the loop would launch them per image.

    scores[l]: (N, M_l); deltas[l]: (N, M_l, 4); anchors[l]: (M_l, 4), shared by the batch;
    image_sizes: (N, 2) each image's resized (height, width). Returns boxes (K, 4) and scores (K,) of all
    the images, image by image, each image's best first, and how many each image has (N ints).

    Each image's share is what :func:`proposals_for_image` gives for it, up to float rounding (the NMS
    kernel sees boxes offset per image, see :func:`batched_greedy_nms`) and the order of equal scores:
    among boxes of one score, per-level top-n and NMS may pick others. In float32 scores rarely tie; in
    float16 or bfloat16 many do, and a few boxes of an image's 300 can differ (equally good ones).
    """
    count = scores[0].shape[0]
    device = scores[0].device
    sizes = image_sizes.to(device=device, dtype=torch.float32)
    heights, widths = sizes[:, 0:1], sizes[:, 1:2]
    level_boxes, level_scores, level_valid, level_ids = [], [], [], []
    for level, (level_score, level_delta, level_anchor) in enumerate(zip(scores, deltas, anchors)):
        level_score = level_score.to(torch.float32)
        take = min(settings.pre_nms_top_n, level_score.shape[1])
        if settings.top_n_before_filtering:
            level_score, order = level_score.topk(take, dim=1)
            level_delta = level_delta.gather(1, order[..., None].expand(-1, -1, 4))
            boxes = clip_boxes(decode_deltas(level_anchor[order], level_delta, box_weights, delta_clamp),
                               heights, widths)
            # As the per-image layer: scores are checked once, as probabilities, below.
            valid = valid_box_mask(boxes, settings.min_size)
        else:
            boxes = clip_boxes(decode_deltas(level_anchor, level_delta, box_weights, delta_clamp), heights, widths)
            valid = valid_box_mask(boxes, settings.min_size) & torch.isfinite(level_score)
            # The seed's order: the best n of the valid boxes (the invalid rank last and are dropped).
            level_score, order = level_score.masked_fill(~valid, float("-inf")).topk(take, dim=1)
            boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
            valid = valid.gather(1, order)
        level_boxes.append(boxes)
        level_scores.append(level_score)
        level_valid.append(valid)
        level_ids.append(torch.full((count, take), level, dtype=torch.int64, device=device))
    score = torch.cat(level_scores, dim=1)
    probability = torch.sigmoid(score) if scores_are_logits else score
    boxes, level_ids = torch.cat(level_boxes, dim=1), torch.cat(level_ids, dim=1)
    valid = torch.cat(level_valid, dim=1) & torch.isfinite(probability) & (probability >= settings.min_score)
    image, index = batched_greedy_nms(boxes, probability, valid, settings.nms_iou, settings.post_nms_top_n,
                                      groups=level_ids if settings.nms_per_level else None)
    counts = torch.bincount(image, minlength=count).tolist()
    kept = boxes[image, index]
    if settings.vote_iou > 0 and kept.shape[0]:
        kept = _vote_in_batch(kept, image, counts, boxes, torch.where(valid, probability, 0.0), settings.vote_iou)
    return kept, probability[image, index], counts


def _vote_in_batch(kept: torch.Tensor, image: torch.Tensor, counts: list[int], candidates: torch.Tensor,
                   weights: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`vote_boxes` for the kept boxes (K, 4) of a batch, listed image by image (``image``: (K,) each
    one's image), against each image's candidates (N, C, 4) with ``weights`` (N, C), 0 where invalid."""
    starts = torch.tensor([0, *counts[:-1]], device=kept.device).cumsum(0)
    position = torch.arange(kept.shape[0], device=kept.device) - starts[image]
    padded = kept.new_zeros((len(counts), max(counts), 4))
    padded[image, position] = kept
    return vote_boxes(padded, candidates, weights, iou_threshold)[image, position]


def _torchvision_ops():
    # Imported where needed only: importing torchvision costs a second of start-up (see mobilenet.py).
    from torchvision import ops

    return ops


def _filter_then_top_n(scores, deltas, anchors, image_height, image_width, settings, box_weights, delta_clamp,
                       scores_are_logits):
    """The seed's order, per level: decode, clip, drop small and non-finite boxes, then the top n."""
    level_boxes, level_scores, level_ids = [], [], []
    for level, (level_score, level_delta, level_anchor) in enumerate(zip(scores, deltas, anchors)):
        level_score = level_score.to(torch.float32)
        boxes = clip_boxes(decode_deltas(level_anchor, level_delta, box_weights, delta_clamp), image_height, image_width)
        keep = valid_box_mask(boxes, settings.min_size) & torch.isfinite(level_score)
        boxes, level_score = boxes[keep], level_score[keep]
        if level_score.numel() > settings.pre_nms_top_n:
            level_score, order = torch.topk(level_score, settings.pre_nms_top_n, sorted=True)
            boxes = boxes[order]
        level_boxes.append(boxes)
        level_scores.append(level_score)
        level_ids.append(torch.full((boxes.shape[0],), level, dtype=torch.int64, device=boxes.device))
    score = torch.cat(level_scores)
    probability = torch.sigmoid(score) if scores_are_logits else score
    boxes, level_ids = torch.cat(level_boxes), torch.cat(level_ids)
    keep = probability >= settings.min_score
    return boxes[keep], probability[keep], level_ids[keep]


def _top_n_then_filter(scores, deltas, anchors, image_height, image_width, settings, box_weights, delta_clamp,
                       scores_are_logits):
    """torchvision's order: the top n of each level first, then one pass of decode, clip and filters."""
    chosen_scores, chosen_deltas, chosen_anchors, chosen_ids = [], [], [], []
    for level, (level_score, level_delta, level_anchor) in enumerate(zip(scores, deltas, anchors)):
        level_score = level_score.to(torch.float32)
        count = min(settings.pre_nms_top_n, level_score.numel())
        # topk over a (1, M) row as torchvision takes it, so equal logits come out in the same order.
        level_score, order = (row[0] for row in level_score[None].topk(count, dim=1))
        chosen_scores.append(level_score)
        chosen_deltas.append(level_delta[order])
        chosen_anchors.append(level_anchor[order])
        chosen_ids.append(torch.full((count,), level, dtype=torch.int64, device=level_score.device))
    score = torch.cat(chosen_scores)
    # One sigmoid over all levels, as torchvision computes it: same numbers to the last bit, same ties in NMS.
    probability = torch.sigmoid(score) if scores_are_logits else score
    boxes = decode_deltas(torch.cat(chosen_anchors), torch.cat(chosen_deltas), box_weights, delta_clamp)
    boxes = clip_boxes(boxes, image_height, image_width)
    keep = valid_box_mask(boxes, settings.min_size) & torch.isfinite(probability) & (probability >= settings.min_score)
    return boxes[keep], probability[keep], torch.cat(chosen_ids)[keep]


@dataclass
class ImageProposals:
    """Proposals of one image in the ORIGINAL image's pixels, sorted by score high to low.

    boxes: (K, 4) float32 x1y1x2y2; scores: (K,) objectness probabilities.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    width: int
    height: int
