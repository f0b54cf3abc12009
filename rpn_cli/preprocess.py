"""Resizing and normalising an image as a checkpoint's ``preprocess`` description says."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import CheckpointError

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resized_size(width: int, height: int, preprocess: dict, size: int | None = None) -> tuple[int, int]:
    """(new_width, new_height) under the ``shorter_side`` rule.

    The shorter side becomes ``size`` and the longer ``int(size * long / short)``
    (the seed project's formula); when that makes the longer side exceed
    ``max_size``, the longer side becomes ``max_size`` and the shorter
    ``int(max_size * short / long)``. ``size`` overrides the description's
    (training's scale jitter).
    """
    if preprocess.get("resize") != "shorter_side":
        raise CheckpointError(f"unknown resize rule {preprocess.get('resize')!r}")
    target = int(size if size is not None else preprocess["size"])
    max_size = preprocess.get("max_size")
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


def to_tensor(image: Image.Image, preprocess: dict) -> torch.Tensor:
    """RGB PIL image to a normalised (3, H, W) float32 tensor (no resizing)."""
    array = np.asarray(image, dtype=np.float32)
    if preprocess.get("channel_order", "RGB") == "BGR":
        array = array[:, :, ::-1]
    array = array * float(preprocess.get("scale", 1.0))
    mean = np.asarray(preprocess.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32)
    std = np.asarray(preprocess.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
    array = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def resize_image(image: Image.Image, preprocess: dict, size: int | None = None) -> Image.Image:
    new_size = resized_size(image.width, image.height, preprocess, size)
    if new_size == image.size:
        return image
    interpolation = preprocess.get("interpolation", "bilinear")
    if interpolation not in _INTERPOLATIONS:
        raise CheckpointError(f"unknown interpolation {interpolation!r}")
    return image.resize(new_size, _INTERPOLATIONS[interpolation])


def prepare_image(image: Image.Image, preprocess: dict) -> PreparedImage:
    """Resize and normalise an RGB image for the model."""
    resized = resize_image(image, preprocess)
    return PreparedImage(to_tensor(resized, preprocess), image.size, resized.size)


def pad_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H_i, W_i) tensors into (N, 3, max H, max W), zero-padded at the bottom and right."""
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    batch = tensors[0].new_zeros((len(tensors), 3, height, width))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return batch
