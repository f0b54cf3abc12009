"""Running a model on prepared images: the library API behind ``rpn propose`` and ``rpn eval``."""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.boxes import scale_boxes
from ..model.network import LevelOutput, RegionProposalNetwork
from ..model.preprocess import PreparedImage, pad_batch
from ..model.proposals import ImageProposals, ProposalLayer


def run_model(model: RegionProposalNetwork, images: Sequence[PreparedImage]) -> list[LevelOutput]:
    """The network's per-level outputs for a batch of prepared images (padded together)."""
    device = model.device
    size_divisible = model.spec.preprocess.size_divisible
    batch = pad_batch([image.tensor for image in images], size_divisible)
    if device.type == "cuda":
        # Page-locked memory lets the copy run asynchronously with the host's next work.
        batch = batch.pin_memory()
    batch = batch.to(device, model.dtype, non_blocking=True)
    if model.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(batch)


def proposals_from_outputs(
    levels: list[LevelOutput],
    images: Sequence[PreparedImage],
    proposal_layer: ProposalLayer,
    top_k: int | None = None,
) -> list[ImageProposals]:
    """The proposal layer on each image of a batch, with that image's own size, mapped to original pixels.

    On a GPU a batch goes through the proposal layer in one pass (:meth:`ProposalLayer.for_batch`) and
    comes back to the host in one copy; on the CPU, where the per-image loop is faster (see
    benchmarks/benchmark_nms.py), image by image.
    """
    with torch.inference_mode():
        if len(images) > 1 and levels[0].logits.is_cuda:
            sizes = torch.tensor([[image.resized_size[1], image.resized_size[0]] for image in images])
            boxes, scores, counts = proposal_layer.for_batch(levels, sizes)
            found = torch.cat((boxes, scores[:, None]), dim=1).cpu().split(counts)
            per_image = [(rows[:, :4], rows[:, 4].contiguous()) for rows in found]
        else:
            per_image = [proposal_layer(levels, index, image.resized_size[1], image.resized_size[0])
                         for index, image in enumerate(images)]
        return [_in_original_pixels(boxes, scores, image, top_k) for (boxes, scores), image in zip(per_image, images)]


def _in_original_pixels(boxes: torch.Tensor, scores: torch.Tensor, image: PreparedImage,
                        top_k: int | None) -> ImageProposals:
    """One image's best ``top_k`` boxes (K, 4), from resized-image pixels to the original's, clipped to it."""
    if top_k is not None:
        boxes, scores = boxes[:top_k], scores[:top_k]
    boxes = scale_boxes(boxes, image.scale_x, image.scale_y)
    original_width, original_height = image.original_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, original_width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, original_height)
    return ImageProposals(boxes.cpu(), scores.cpu(), original_width, original_height)


def proposals_for_batch(
    model: RegionProposalNetwork,
    images: Sequence[PreparedImage],
    proposal_layer: ProposalLayer,
    top_k: int | None = None,
) -> list[ImageProposals]:
    """Proposals for a batch of prepared images (limits applied per image)."""
    return proposals_from_outputs(run_model(model, images), images, proposal_layer, top_k)
