"""GPTQ rounding of the int8 model's weights (``rpn export --format onnx-int8 --weight-rounding gptq``).

Rounding each weight to its nearest step of the int8 grid (:mod:`rpn_cli.model.int8_grid`) is what
ONNX Runtime does; it treats every weight alone. GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", after Optimal Brain Quantization)
rounds a convolution's weights one input column at a time and moves each rounding's error onto the
columns not rounded yet, weighted by how the convolution's inputs on real photos correlate, so that
its outputs on those photos change as little as they can. Here it picks integers on the very grid
ONNX Runtime rounds to; the weights are then written back on that grid, so the int8 export stores
exactly the integers chosen.

Shapes: G groups of a convolution (1, or its channels for a depthwise one), R output channels a group,
K = (input channels a group) x kH x kW inputs a position, L positions.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.int8_grid import (
    INT8_WEIGHT_MAX,
    batchnorm_fold_factor,
    channel_steps,
    folded_weights,
    nearest_integers,
    quantized_convolutions,
    unfolded_weights,
)

WEIGHT_ROUNDINGS = ("gptq", "nearest")
# Added to the Hessian's diagonal, times its mean, for a stable inverse (GPTQ's default); raised tenfold
# while the Hessian is still not positive definite in floating point.
DAMPING = 0.01
# Columns rounded between two updates of the columns after them (GPTQ's lazy batches): the same result,
# one matrix product a block instead of one update a column.
BLOCK = 128


def gptq_integers(weight: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor, *,
                  damping: float = DAMPING) -> torch.Tensor:
    """GPTQ's integers for ``weight`` (G, R, K) on the grid ``step`` (G, R, 1), each from -INT8_WEIGHT_MAX
    to INT8_WEIGHT_MAX, given ``hessian`` (G, K, K), the sum of x xᵀ over the inputs x (K,) each group
    sees. Columns go in order of decreasing Hessian diagonal (GPTQ's "act order"); an input that is
    always 0 has no say and its weights round to nearest. Returns (G, R, K) integers, float64."""
    groups, rows, columns = weight.shape
    step = step.double()
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2).double().clone()
    diagonal[diagonal == 0] = 1.0
    order = torch.argsort(diagonal, dim=1, descending=True, stable=True)
    weight = torch.gather(weight.double(), 2, order[:, None, :].expand(groups, rows, columns))
    hessian = torch.stack([matrix.double()[index][:, index] for matrix, index in zip(hessian, order)])
    torch.diagonal(hessian, dim1=1, dim2=2).copy_(torch.gather(diagonal, 1, order))
    spread = _spread(hessian, damping)
    integers = torch.empty_like(weight)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = weight[:, :, start:end].clone()
        errors = torch.empty_like(block)
        for offset, column in enumerate(range(start, end)):
            value = block[:, :, offset]
            chosen = nearest_integers(value, step[:, :, 0])
            integers[:, :, column] = chosen
            errors[:, :, offset] = (value - chosen * step[:, :, 0]) / spread[:, column, column][:, None]
            block[:, :, offset:] -= errors[:, :, offset, None] * spread[:, None, column, column:end]
        weight[:, :, end:] -= errors @ spread[:, start:end, end:]
    return torch.empty_like(integers).scatter_(2, order[:, None, :].expand(groups, rows, columns), integers)


def _spread(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped Hessian's inverse (G, K, K): row by row, how the error of
    rounding one column spreads over the columns after it (GPTQ's form of OBQ's inverse updates)."""
    mean = torch.diagonal(hessian, dim1=1, dim2=2).mean(dim=1, keepdim=True)
    while True:
        damped = hessian.clone()
        torch.diagonal(damped, dim1=1, dim2=2).add_(damping * mean)
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            if damping >= 1.0:
                raise
            damping *= 10


def _supported(conv: nn.Conv2d) -> bool:
    """Whether :func:`input_hessians` can cut this convolution's input patches (zero padding in numbers)."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def input_hessians(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: (G, K, K) float64} for each convolution the int8 model quantizes that runs with zero padding:
    the sum of x xᵀ over every input patch x it sees while ``model.raw_outputs`` runs on each of
    ``images`` ((N, 3, H, W) each). Each image's products are computed in float32, their sum in float64."""
    hessians: dict[str, torch.Tensor] = {}

    def accumulate(name: str, conv: nn.Conv2d):
        def hook(module, inputs):
            patches = F.unfold(inputs[0].float(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                               stride=conv.stride)  # (N, C x kH x kW, L)
            grouped = patches.transpose(0, 1).reshape(conv.groups, patches.shape[1] // conv.groups, -1)
            product = torch.bmm(grouped, grouped.transpose(1, 2)).double()
            hessians[name] = hessians[name] + product if name in hessians else product

        return hook

    handles = [conv.register_forward_pre_hook(accumulate(name, conv))
               for name, conv, _ in quantized_convolutions(model) if _supported(conv)]
    try:
        with torch.no_grad():
            for image in images:
                model.raw_outputs(image)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def round_weights_gptq(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Put each convolution the int8 model quantizes on its int8 grid, in place, with GPTQ's integers
    for the inputs it sees on ``images`` (see :func:`input_hessians`). ``model`` in eval mode. Each
    channel keeps an integer at ±INT8_WEIGHT_MAX (its largest weight's, where GPTQ moved every one
    inward), so the export derives the same step from the new weights; a channel its BatchNorm
    multiplies by 0 keeps its weights. A convolution that never ran, or pads other than with zeros,
    keeps its weights (the export rounds them to nearest). Returns how many convolutions were rounded."""
    if model.training:
        raise ValueError("round_weights_gptq is for inference: put the model in eval mode first")
    hessians = input_hessians(model, images)
    rounded_count = 0
    with torch.no_grad():
        for name, conv, norm in quantized_convolutions(model):
            if name not in hessians:
                continue
            plain = conv.weight.double()
            fold = batchnorm_fold_factor(norm)
            fold = None if fold is None else fold.double()
            folded = folded_weights(plain, fold)
            step = channel_steps(folded)
            groups = conv.groups
            integers = gptq_integers(folded.reshape(groups, conv.out_channels // groups, -1), hessians.pop(name),
                                     step.reshape(groups, -1, 1)).reshape(conv.out_channels, -1)
            # A channel whose integers all fell short of the edge would get a smaller step from the export:
            # its largest weight goes back to its own integer, ±INT8_WEIGHT_MAX.
            channels = folded.reshape(conv.out_channels, -1)
            short = torch.nonzero(integers.abs().amax(dim=1) < INT8_WEIGHT_MAX).flatten()
            largest = channels[short].abs().argmax(dim=1)
            integers[short, largest] = nearest_integers(channels[short, largest], step.flatten()[short])
            rounded = unfolded_weights(integers.reshape(folded.shape) * step, fold, plain)
            conv.weight.copy_(rounded.to(conv.weight.dtype))
            rounded_count += 1
    return rounded_count
