"""Quantization-aware training of weights (``rpn train --quantization-aware``).

The int8 model rounds each convolution's weights, BatchNorm folded in, to integers per output channel
(:mod:`rpn_cli.model.int8_grid`). Trained as float32, the network
never sees that rounding. Here each such convolution's forward pass uses its weights as the int8 model
will round them, and the gradient goes through the rounding unchanged (a straight-through estimator),
so the weights learn to work rounded. Activations stay float32: only the weights' rounding is learnt.

At the end of a run :func:`snap_to_int8_grid` writes the rounded weights themselves, so the int8 model
of the file holds the weights its float32 network runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.int8_grid import (
    batchnorm_fold_factor,
    channel_steps,
    folded_weights,
    nearest_integers,
    quantized_convolutions,
    unfolded_weights,
)


def int8_rounded(weight: torch.Tensor, fold: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` (O, I, kH, kW) as the int8 model stores it, back in float: each output channel of
    ``weight * fold`` rounded to steps of its largest magnitude / ``INT8_WEIGHT_MAX`` (half to even),
    then divided by ``fold`` again. ``fold`` (O,): the factor folding a BatchNorm into the convolution
    multiplies its weights by (``gamma / sqrt(running_var + eps)``), or None where no BatchNorm follows.
    Gradients pass through the rounding as if it were the identity."""
    # The gradient reaches the weights only through the last line: the rounding is computed detached.
    plain = weight.detach()
    fold = None if fold is None else fold.detach()
    folded = folded_weights(plain, fold)
    step = channel_steps(folded)
    rounded = unfolded_weights(nearest_integers(folded, step) * step, fold, plain)
    return weight + (rounded - plain)


class Int8WeightConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward pass uses :func:`int8_rounded` weights. Made from a trained
    convolution in place by :func:`make_quantization_aware`: same parameters, same ``state_dict`` keys."""

    norm: nn.BatchNorm2d | None

    def fold(self) -> torch.Tensor | None:
        """The BatchNorm folding factor (O,), from its running statistics and scale, or None."""
        return batchnorm_fold_factor(self.norm)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(inputs, int8_rounded(self.weight, self.fold()), self.bias)


def make_quantization_aware(model: nn.Module) -> int:
    """Make each convolution the int8 model quantizes an :class:`Int8WeightConv2d`, in place; returns
    how many. The head's output convolutions stay float32 in the int8 model, so they stay as they are.
    For BatchNorm layers with fixed statistics (fine-tuning a trained trunk): a BatchNorm that learns
    its statistics would change the folding factor the int8 model sees."""
    convolutions = quantized_convolutions(model)
    for _, module, norm in convolutions:
        module.__class__ = Int8WeightConv2d
        # Not a child module: the BatchNorm is already its parent's, and stays out of the state_dict.
        module.__dict__["norm"] = norm
    return len(convolutions)


def snap_to_int8_grid(model: nn.Module) -> int:
    """Replace each :class:`Int8WeightConv2d`'s weights with their int8 rounding and make it a plain
    ``nn.Conv2d`` again, in place; returns how many."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Int8WeightConv2d):
                module.weight.copy_(int8_rounded(module.weight, module.fold()))
                module.__class__ = nn.Conv2d
                del module.__dict__["norm"]
                count += 1
    return count
