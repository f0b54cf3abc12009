"""A moving average of the weights a run trains: what ``rpn train --ema-decay`` writes instead of the
last step's weights.

The average is an exponential one made unbiased as Adam's moments are: after ``n`` steps it is

    sum_k decay ** (n - k) * weights_k / sum_k decay ** (n - k),    k = 1 .. n

so it holds no trace of the weights before the first step, weighs the first ``~1 / (1 - decay)`` steps
nearly equally (as stochastic weight averaging does) and the later ones as an EMA of ``decay``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_step_weight(decay: float, count: int) -> float:
    """The weight of the ``count``-th weights (1-based) in the average of the first ``count``:
    ``(1 - decay) / (1 - decay ** count)``; 1 for the first, about ``1 / count`` while ``count`` is
    small against ``1 / (1 - decay)``, then ``1 - decay``."""
    return (1.0 - decay) / (1.0 - decay ** count)


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """torch's :class:`AveragedModel` of ``model`` (a copy), updated by ``update_parameters(model)``
    after each step with the unbiased EMA above. Buffers are averaged too (frozen BatchNorm statistics
    stay what they are); integer buffers are copied."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        # One call per device and dtype, so a group is all floating point or all integer.
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        torch._foreach_lerp_(averaged, current, ema_step_weight(decay, int(n_averaged) + 1))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
