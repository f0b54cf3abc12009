"""The int8 model's weight grid: which convolutions ONNX Runtime quantizes and the steps it rounds to.

The int8 export (:mod:`rpn_cli.inference.quantize`) folds each BatchNorm into the convolution before it,
then rounds each output channel of the folded weights to integers: ``q = clamp(round(w / s), -64, 64)``
with ``s = max |w| / 64`` (ONNX Runtime's symmetric int8 with ``reduce_range``, a 7-bit range).
Quantization-aware training (:mod:`rpn_cli.training.quantization`) and GPTQ rounding
(:mod:`rpn_cli.inference.weight_rounding`) both work on that grid.
"""

from __future__ import annotations

import torch
from torch import nn

from .folding import conv_batchnorm_pairs

# The largest integer of the int8 model's weights: they run from -INT8_WEIGHT_MAX to INT8_WEIGHT_MAX.
INT8_WEIGHT_MAX = 64
# Quantized heads lose the most recall for the least time: these weights stay float32.
FLOAT_WEIGHTS = ("head.score.weight", "head.loc.weight")


def quantized_convolutions(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """(name, convolution, the BatchNorm folded into it or None) of each convolution the int8 model
    quantizes, in the model's order: every plain ``nn.Conv2d`` but the head's two output convolutions."""
    norms = {id(parent._modules[conv]): parent._modules[norm] for parent, conv, norm in conv_batchnorm_pairs(model)}
    return [(name, module, norms.get(id(module))) for name, module in model.named_modules()
            if type(module) is nn.Conv2d and not (name + ".weight").endswith(FLOAT_WEIGHTS)]


def batchnorm_fold_factor(norm: nn.BatchNorm2d | None) -> torch.Tensor | None:
    """(O,): what folding ``norm`` multiplies each output channel's weights by, ``gamma / sqrt(var + eps)``
    from its running statistics, or None for no BatchNorm; a constant, outside autograd. As torch.nn.utils.fusion.fuse_conv_bn_weights
    computes it; the ONNX export's own folding can differ in the last place, which moves no weight to
    another integer."""
    if norm is None:
        return None
    with torch.no_grad():
        factor = torch.rsqrt(norm.running_var + norm.eps)
        return factor if norm.weight is None else norm.weight * factor


def channel_steps(folded: torch.Tensor) -> torch.Tensor:
    """(O, 1, ..., 1): each output channel's step, its largest magnitude / ``INT8_WEIGHT_MAX``, for folded
    weights (O, ...). An all-zero channel gets a step of 1, which rounds it to 0 without dividing by 0."""
    step = folded.abs().amax(dim=tuple(range(1, folded.dim())), keepdim=True) / INT8_WEIGHT_MAX
    return torch.where(step > 0, step, torch.ones_like(step))


def nearest_integers(values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to their nearest multiple of ``step`` (half to even, as numpy in ONNX Runtime's
    quantizer), as integers from -INT8_WEIGHT_MAX to INT8_WEIGHT_MAX in the values' dtype."""
    return torch.clamp(torch.round(values / step), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX)


def folded_weights(weight: torch.Tensor, fold: torch.Tensor | None) -> torch.Tensor:
    """``weight`` (O, ...) with each output channel multiplied by ``fold`` (O,), or as it is for None."""
    return weight if fold is None else weight * fold.reshape(-1, *[1] * (weight.dim() - 1))


def unfolded_weights(folded: torch.Tensor, fold: torch.Tensor | None, original: torch.Tensor) -> torch.Tensor:
    """``folded`` (O, ...) divided by ``fold`` (O,) again. A channel that BatchNorm multiplies by 0 outputs
    a constant whatever its weights: it keeps ``original``'s."""
    if fold is None:
        return folded
    factor = fold.reshape(-1, *[1] * (folded.dim() - 1))
    return torch.where(factor != 0, folded / torch.where(factor != 0, factor, 1.0), original)
