"""Quantization-aware training of weights (``rpn train --quantization-aware``).

The int8 model (:mod:`rpn_cli.inference.quantize`) rounds each convolution's weights, BatchNorm folded
in, to integers per output channel: ``q = clamp(round(w / s), -64, 64)`` with ``s = max |w| / 64``
(ONNX Runtime's symmetric int8 with ``reduce_range``, a 7-bit range). Trained as float32, the network
never sees that rounding. Here each such convolution's forward pass uses its weights as the int8 model
will round them, and the gradient goes through the rounding unchanged (a straight-through estimator),
so the weights learn to work rounded. Activations stay float32: only the weights' rounding is learnt.

At the end of a run :func:`snap_to_int8_grid` writes the rounded weights themselves, so the int8 model
of the file holds the weights its float32 network runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..inference.quantize import FLOAT_WEIGHTS
from ..model.folding import conv_batchnorm_pairs

# The largest integer of the int8 model's weights: they run from -INT8_WEIGHT_MAX to INT8_WEIGHT_MAX.
INT8_WEIGHT_MAX = 64


def int8_rounded(weight: torch.Tensor, fold: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` (O, I, kH, kW) as the int8 model stores it, back in float: each output channel of
    ``weight * fold`` rounded to steps of its largest magnitude / ``INT8_WEIGHT_MAX`` (half to even),
    then divided by ``fold`` again. ``fold`` (O,): the factor folding a BatchNorm into the convolution
    multiplies its weights by (``gamma / sqrt(running_var + eps)``), or None where no BatchNorm follows.
    Gradients pass through the rounding as if it were the identity."""
    # The gradient reaches the weights only through the last line: the rounding is computed detached.
    plain = weight.detach()
    factor = None if fold is None else fold.detach().reshape(-1, 1, 1, 1)
    folded = plain if factor is None else plain * factor
    step = folded.abs().amax(dim=(1, 2, 3), keepdim=True) / INT8_WEIGHT_MAX
    # An all-zero channel stays zero (a step of 1 rounds it to 0 without dividing by 0).
    step = torch.where(step > 0, step, torch.ones_like(step))
    rounded = torch.clamp(torch.round(folded / step), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX) * step
    if factor is not None:
        # A channel that BatchNorm multiplies by 0 outputs a constant whatever its weights: keep them.
        rounded = torch.where(factor != 0, rounded / torch.where(factor != 0, factor, 1.0), plain)
    return weight + (rounded - plain)


class Int8WeightConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward pass uses :func:`int8_rounded` weights. Made from a trained
    convolution in place by :func:`make_quantization_aware`: same parameters, same ``state_dict`` keys."""

    norm: nn.BatchNorm2d | None

    def fold(self) -> torch.Tensor | None:
        """The BatchNorm folding factor (O,), from its running statistics and scale, or None."""
        norm = self.norm
        if norm is None:
            return None
        # As torch.nn.utils.fusion.fuse_conv_bn_weights computes it; the ONNX export's own folding can
        # differ in the last place, which moves no weight to another integer.
        factor = torch.rsqrt(norm.running_var + norm.eps)
        return factor if norm.weight is None else norm.weight * factor

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(inputs, int8_rounded(self.weight, self.fold()), self.bias)


def make_quantization_aware(model: nn.Module) -> int:
    """Make each convolution the int8 model quantizes an :class:`Int8WeightConv2d`, in place; returns
    how many. The head's output convolutions stay float32 in the int8 model, so they stay as they are.
    For BatchNorm layers with fixed statistics (fine-tuning a trained trunk): a BatchNorm that learns
    its statistics would change the folding factor the int8 model sees."""
    norms = {id(parent._modules[conv]): parent._modules[norm] for parent, conv, norm in conv_batchnorm_pairs(model)}
    count = 0
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and not (name + ".weight").endswith(FLOAT_WEIGHTS):
            module.__class__ = Int8WeightConv2d
            # Not a child module: the BatchNorm is already its parent's, and stays out of the state_dict.
            module.__dict__["norm"] = norms.get(id(module))
            count += 1
    return count


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
