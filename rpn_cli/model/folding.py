"""Folding inference-mode BatchNorm into the convolutions before it."""

from __future__ import annotations

from torch import nn


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each inference-mode BatchNorm into the convolution that feeds it; returns how many.

    A convolution feeds a BatchNorm when it comes right before it in an ``nn.Sequential`` (or
    torchvision's ``IntermediateLayerGetter``), or, in torchvision's ResNet blocks, when they are
    named ``conv<k>`` and ``bn<k>``.
    For inference only (``module`` in eval mode): the folded model computes the same function
    with one layer fewer.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ValueError("fold_batchnorm is for inference: put the model in eval mode first")
    pairs = conv_batchnorm_pairs(module)
    for parent, conv_name, norm_name in pairs:
        conv, norm = parent._modules[conv_name], parent._modules[norm_name]
        parent._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
        parent._modules[norm_name] = nn.Identity()
    return len(pairs)


def conv_batchnorm_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, convolution's name, BatchNorm's name) of each plain convolution that feeds a BatchNorm
    with running statistics, as :func:`fold_batchnorm` finds them."""
    candidates = []
    for parent in module.modules():
        names = list(parent._modules)
        # torchvision's IntermediateLayerGetter, like a Sequential, runs its children in order.
        if isinstance(parent, nn.Sequential) or type(parent).__name__ == "IntermediateLayerGetter":
            candidates.extend((parent, a, b) for a, b in zip(names, names[1:]))
        elif type(parent).__module__ == "torchvision.models.resnet":
            candidates.extend((parent, name, "bn" + name[4:]) for name in names
                              if name.startswith("conv") and name[4:].isdigit() and "bn" + name[4:] in names)
    return [(parent, conv_name, norm_name) for parent, conv_name, norm_name in candidates
            if type(parent._modules[conv_name]) is nn.Conv2d and type(parent._modules[norm_name]) is nn.BatchNorm2d
            and parent._modules[norm_name].track_running_stats]
