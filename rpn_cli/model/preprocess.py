"""Resizing and normalising an image as a checkpoint's ``preprocess`` description says."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError
from .spec import PreprocessSpec

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


RESIZE_RULES = ("shorter_side", "torchvision")


def _torchvision_scale(width: int, height: int, size: float, max_size: float) -> float:
    return min(size / min(width, height), max_size / max(width, height))


def resized_size(width: int, height: int, preprocess: PreprocessSpec, size: int | None = None) -> tuple[int, int]:
    """(new_width, new_height) of an image under the description's resize rule.

    ``shorter_side``: the shorter side becomes ``size`` and the longer
    ``int(size * long / short)`` (the seed project's formula); when that makes
    the longer side exceed ``max_size``, the longer side becomes ``max_size`` and
    the shorter ``int(max_size * short / long)``. ``torchvision``: both sides
    times ``min(size / short, max_size / long)``, floored, as torchvision's
    ``GeneralizedRCNNTransform`` does. ``size`` overrides the description's
    (training's scale jitter).
    """
    rule = preprocess.resize
    if rule not in RESIZE_RULES:
        raise CheckpointError(f"unknown resize rule {rule!r}")
    target = int(size if size is not None else preprocess.size)
    max_size = preprocess.max_size
    if rule == "torchvision":
        scale = _torchvision_scale(width, height, target, max_size)
        return int(math.floor(width * scale)), int(math.floor(height * scale))
    short, long = min(width, height), max(width, height)
    new_short, new_long = target, int(target * long / short)
    if max_size is not None and new_long > max_size:
        new_long, new_short = int(max_size), max(1, int(max_size * short / long))
    return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass
class PreparedImage:
    """A model-ready image: ``tensor`` (3, H, W) float32 and the sizes to map boxes back."""

    tensor: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]

    @property
    def scale_x(self) -> float:
        return self.resized_size[0] / self.original_size[0]

    @property
    def scale_y(self) -> float:
        return self.resized_size[1] / self.original_size[1]


def to_tensor(image: Image.Image, preprocess: PreprocessSpec) -> torch.Tensor:
    """RGB PIL image to a normalised (3, H, W) float32 tensor (no resizing).

    Computed as torchvision's ``to_tensor`` and ``normalize`` do (divide by
    1 / scale, subtract the mean, divide by the std), so converted torchvision
    models see the very same numbers.
    """
    array = np.asarray(image, dtype=np.uint8)
    if preprocess.channel_order == "BGR":
        array = array[:, :, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
    tensor = tensor / (1.0 / float(preprocess.scale))
    mean = torch.tensor(preprocess.mean, dtype=torch.float32)
    std = torch.tensor(preprocess.std, dtype=torch.float32)
    return (tensor - mean[:, None, None]) / std[:, None, None]


def resize_image(image: Image.Image, preprocess: PreprocessSpec, size: int | None = None) -> Image.Image:
    new_size = resized_size(image.width, image.height, preprocess, size)
    if new_size == image.size:
        return image
    interpolation = preprocess.interpolation
    if interpolation not in _INTERPOLATIONS:
        raise CheckpointError(f"unknown interpolation {interpolation!r}")
    return image.resize(new_size, _INTERPOLATIONS[interpolation])


def prepare_image(image: Image.Image, preprocess: PreprocessSpec) -> PreparedImage:
    """Resize and normalise an RGB image for the model.

    ``shorter_side`` resizes the 8-bit image with Pillow, then normalises;
    ``torchvision`` normalises, then resizes the float tensor bilinearly by the
    scale factor, as torchvision's detection transform does.
    """
    if preprocess.resize == "torchvision":
        scale = _torchvision_scale(image.width, image.height, preprocess.size, preprocess.max_size)
        tensor = F.interpolate(to_tensor(image, preprocess)[None], scale_factor=scale, mode="bilinear",
                               recompute_scale_factor=True, align_corners=False)[0]
        return PreparedImage(tensor, image.size, (tensor.shape[2], tensor.shape[1]))
    resized = resize_image(image, preprocess)
    return PreparedImage(to_tensor(resized, preprocess), image.size, resized.size)


def pad_batch(tensors: list[torch.Tensor], size_divisible: int = 1) -> torch.Tensor:
    """Stack (3, H_i, W_i) tensors into (N, 3, H, W), zero-padded at the bottom and right, where H and W
    are the largest sizes rounded up to a multiple of ``size_divisible``."""
    height = math.ceil(max(t.shape[1] for t in tensors) / size_divisible) * size_divisible
    width = math.ceil(max(t.shape[2] for t in tensors) / size_divisible) * size_divisible
    batch = tensors[0].new_zeros((len(tensors), 3, height, width))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return batch
