"""Greedy non-maximum suppression that stops once it has kept enough boxes.

torchvision's ``nms`` runs the suppression over every box even when only the
first ``post_nms_top_n`` survivors are wanted. A box can only be suppressed by
a better one, so NMS over the best ``n`` boxes keeps exactly the boxes that NMS
over all of them keeps among those ``n``: here torchvision's own kernel runs on
the best ``window`` boxes, and on twice as many while fewer than ``max_keep``
survive. Same answer as ``torchvision.ops.nms(...)[:max_keep]``, a fraction of
the work: see ``benchmarks/benchmark_nms.py``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

import torch

from ..errors import UsageError


def _torchvision_nms():
    """``torchvision::nms``. torchvision's compiled operators are loaded from its package folder
    without importing the package, whose import costs a second of start-up (see mobilenet.py);
    where that fails, the package is imported after all."""
    if not hasattr(torch.ops.torchvision, "nms"):
        try:
            _load_torchvision_operators()
        except (ImportError, OSError):
            import torchvision.ops  # noqa: F401  (registers the operators)
    if not hasattr(torch.ops.torchvision, "nms"):
        raise UsageError("torchvision's compiled operators do not load (a broken install?): "
                         "reinstall torchvision as pinned in pyproject.toml")
    return torch.ops.torchvision.nms


def _load_torchvision_operators() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed")
    finder = importlib.machinery.FileFinder(
        next(iter(spec.submodule_search_locations)),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    for name in ("_C_stable", "_C"):  # the name of torchvision 0.29 on, and of earlier versions
        found = finder.find_spec(name)
        if found is not None and found.origin:
            torch.ops.load_library(found.origin)
            return
    raise ImportError("torchvision's compiled operators were not found")


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int,
               window: int = 1024) -> torch.Tensor:
    """Indices (K,) of the boxes (N, 4) that greedy NMS keeps, best score first, K <= ``max_keep``.

    Equals ``torchvision.ops.nms(boxes, scores, iou_threshold)[:max_keep]``, on the CPU or CUDA
    (the kernel runs where the boxes are). ``window``: how many
    of the best boxes are looked at first (doubled while fewer than ``max_keep`` are kept).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if boxes.numel() == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    nms = _torchvision_nms()
    # The same stable order torchvision sorts by, so a prefix holds the same boxes, ties included.
    order = torch.sort(scores, descending=True, stable=True).indices
    # torchvision's kernel takes float32 or float64 (both the same); other types go to float32.
    dtype = boxes.dtype if boxes.dtype in (torch.float32, torch.float64) else torch.float32
    boxes, scores = boxes[order].to(dtype), scores[order].to(dtype)
    size = window
    while True:
        kept = nms(boxes[:size], scores[:size], float(iou_threshold))
        if kept.numel() >= max_keep or size >= order.numel():
            return order[kept[:max_keep]]
        size *= 2
