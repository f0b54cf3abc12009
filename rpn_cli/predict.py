"""Running a model on prepared images: the library API behind ``rpn propose`` and ``rpn eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .boxes import scale_boxes
from .model import RegionProposalNetwork, objectness
from .preprocess import PreparedImage, pad_batch
from .proposals import ProposalSettings, proposals_for_image


@dataclass
class ImageProposals:
    """Proposals of one image in the ORIGINAL image's pixels, sorted by score high to low.

    boxes: (K, 4) float32 x1y1x2y2; scores: (K,) objectness probabilities.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    width: int
    height: int


def proposals_for_batch(
    model: RegionProposalNetwork,
    images: Sequence[PreparedImage],
    settings: ProposalSettings,
    top_k: int | None = None,
) -> list[ImageProposals]:
    """Proposals for a batch of prepared images (padded together, limits applied per image)."""
    device = next(model.parameters()).device
    batch = pad_batch([image.tensor for image in images]).to(device, non_blocking=True)
    batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        levels = model(batch)
        results = []
        for index, image in enumerate(images):
            width, height = image.resized_size
            boxes, scores = proposals_for_image(
                [objectness(level.logits[index], model.spec.score) for level in levels],
                [level.deltas[index] for level in levels],
                [level.anchors for level in levels],
                height,
                width,
                settings,
                model.spec.box_weights,
                model.spec.delta_clamp,
            )
            if top_k is not None:
                boxes, scores = boxes[:top_k], scores[:top_k]
            boxes = scale_boxes(boxes, image.scale_x, image.scale_y)
            ow, oh = image.original_size
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
            results.append(ImageProposals(boxes.cpu(), scores.cpu(), ow, oh))
    return results
