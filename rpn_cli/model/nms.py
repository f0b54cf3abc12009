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


# torchvision's batched_nms offsets boxes per class up to this many boxes on a GPU (one kernel, quadratic
# in the boxes); more are better done in several calls.
_BOXES_PER_CALL = 20000


def batched_greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
                       max_keep: int, groups: torch.Tensor | None = None, window: int = 1024) -> list[torch.Tensor]:
    """Greedy NMS on every image of a batch at once: for image ``b``, the indices (K_b,) into ``boxes[b]``
    that :func:`greedy_nms` keeps of its valid boxes, best first, K_b <= ``max_keep``.

    boxes: (B, N, 4); scores: (B, N); valid: (B, N) bool, the candidates; groups: (B, N) int64 or None,
    boxes of different groups of one image never suppress each other (per-level NMS). The best ``window``
    candidates of many images go through one kernel call, each image's boxes moved apart from the others'
    by an offset (torchvision's ``batched_nms`` trick: the offsets round coordinates by up to a few
    thousandths of a pixel, which can turn an IoU at the threshold the other way); an image that keeps
    fewer than ``max_keep`` of a window smaller than its candidates is finished on its own.
    """
    count, candidates = scores.shape
    if count == 0:
        return []
    nms = _torchvision_nms()
    device = boxes.device
    boxes = boxes.float()
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    size = min(window, candidates)
    valid_counts = valid.sum(dim=1).tolist()
    in_window = torch.arange(size, device=device)[None, :] < valid.sum(dim=1, keepdim=True)
    top = order[:, :size]
    kept_per_image: list[torch.Tensor] = []
    step = max(1, _BOXES_PER_CALL // max(size, 1))
    for first in range(0, count, step):
        chunk = slice(first, min(first + step, count))
        image = torch.arange(chunk.start, chunk.stop, device=device)[:, None].expand(-1, size)[in_window[chunk]]
        index = top[chunk][in_window[chunk]]
        chunk_boxes, chunk_scores = boxes[image, index], scores[image, index].float()
        group = image - chunk.start
        if groups is not None:
            group = group * (int(groups.max()) + 1) + groups[image, index]
        offsets = (group.to(torch.float32) * (chunk_boxes.max() + 1.0 if chunk_boxes.numel() else 1.0))[:, None]
        kept = nms(chunk_boxes + offsets, chunk_scores, float(iou_threshold))
        # A stable sort by image keeps each image's survivors in the kernel's order, best first.
        kept_image = image[kept]
        by_image = torch.sort(kept_image, stable=True).indices
        counts = torch.bincount(kept_image - chunk.start, minlength=chunk.stop - chunk.start).tolist()
        kept_per_image.extend(index[kept][by_image].split(counts))
    results = []
    for b, kept in enumerate(kept_per_image):
        if kept.numel() < max_keep and size < valid_counts[b]:
            results.append(_nms_one_image(boxes[b], scores[b], valid[b], None if groups is None else groups[b],
                                          iou_threshold, max_keep))
        else:
            results.append(kept[:max_keep])
    return results


def _nms_one_image(boxes, scores, valid, groups, iou_threshold, max_keep):
    """Indices into the row of what NMS keeps of its valid boxes, best first (the batch's rare slow case)."""
    candidates = valid.nonzero().squeeze(1)
    if groups is None:
        return candidates[greedy_nms(boxes[candidates], scores[candidates], iou_threshold, max_keep)]
    # Per group, as torchvision's batched_nms: NMS of each group alone, then all survivors by score.
    survivors = [candidates[groups[candidates] == g] for g in torch.unique(groups[candidates]).tolist()]
    kept = torch.cat([found[greedy_nms(boxes[found], scores[found], iou_threshold, found.numel())]
                      for found in survivors])
    return kept[torch.sort(scores[kept].float(), descending=True, stable=True).indices][:max_keep]
