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


# torchvision's batched_nms offsets boxes apart (one kernel, quadratic in the boxes) up to 100,000
# coordinates, 25,000 boxes, on a GPU, and calls the kernel per class beyond; so at most this many a call.
_BOXES_PER_CALL = 25_000


def batched_greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
                       max_keep: int, groups: torch.Tensor | None = None,
                       window: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS on every image of a batch at once: for image ``b``, what :func:`greedy_nms` keeps of
    its valid boxes (per group where ``groups`` is given, as torchvision's ``batched_nms``), best first,
    at most ``max_keep``.

    boxes: (B, N, 4) with 0 <= x1 <= x2 and 0 <= y1 <= y2 (offsets keep images apart); scores: (B, N);
    valid: (B, N) bool, the candidates; groups: (B, N) int64 or None: boxes of different groups of one
    image never suppress each other (per-level NMS). Returns ``image`` and ``index`` (K,) int64: the kept
    boxes are ``boxes[image, index]``, image by image, each image's best first.

    As :func:`greedy_nms`, NMS runs on each image's best ``window`` candidates, doubled for the images
    that keep fewer than ``max_keep`` while candidates remain; each round puts up to 25,000 boxes of
    several images through one kernel call, the images' boxes moved apart by an offset (torchvision's
    ``batched_nms`` trick: in float32 this rounds coordinates by up to a few thousandths of a pixel,
    which can turn an IoU at the threshold the other way).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    count, candidates = scores.shape
    device = boxes.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if count == 0 or candidates == 0 or max_keep <= 0:
        return empty, empty
    nms = _torchvision_nms()
    dtype = boxes.dtype if boxes.dtype in (torch.float32, torch.float64) else torch.float32
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    # Best first, the invalid after every valid candidate whatever their scores.
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~valid).gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    valid_counts = valid.sum(dim=1).tolist()
    group_count = int(groups.max()) + 1 if groups is not None else 1
    kept: dict[int, torch.Tensor] = {}
    pending, size = [b for b in range(count) if valid_counts[b] > 0], window
    while pending:
        size = min(size, candidates)
        per_call = max(1, _BOXES_PER_CALL // size)
        for first in range(0, len(pending), per_call):
            images = pending[first:first + per_call]
            found = _nms_round(boxes, scores, order, groups, group_count, images,
                               [min(size, valid_counts[b]) for b in images], iou_threshold, nms)
            kept.update(zip(images, found))
        pending = [b for b in pending if kept[b].numel() < max_keep and size < valid_counts[b]]
        size *= 2
    if not kept:
        return empty, empty
    per_image = [kept[b][:max_keep] for b in sorted(kept)]
    image = torch.repeat_interleave(torch.tensor(sorted(kept), device=device),
                                    torch.tensor([found.numel() for found in per_image], device=device))
    return image, torch.cat(per_image)


def _nms_round(boxes: torch.Tensor, scores: torch.Tensor, order: torch.Tensor, groups: torch.Tensor | None,
               group_count: int, images: list[int], sizes: list[int], iou_threshold: float,
               nms) -> list[torch.Tensor]:
    """One kernel call on the best ``sizes[i]`` candidates of each of ``images``; per image, the indices
    (into its row of ``boxes``) that NMS keeps, best first."""
    device = boxes.device
    lengths = torch.tensor(sizes, device=device)
    total = sum(sizes)
    # position: which of ``images`` each chosen box belongs to; rank: its place in that image's order.
    position = torch.repeat_interleave(torch.arange(len(images), device=device), lengths, output_size=total)
    rank = torch.arange(total, device=device) - (torch.cumsum(lengths, 0) - lengths)[position]
    image = torch.tensor(images, device=device)[position]
    index = order[image, rank]
    chosen = boxes[image, index]
    # Images (and groups within one) as consecutive blocks of coordinates, none overlapping another.
    block = position if groups is None else position * group_count + groups[image, index]
    offsets = block.to(chosen.dtype)[:, None] * (chosen.max() + 1)
    survivors = nms(chosen + offsets, scores[image, index], float(iou_threshold))
    # The kernel returns all images' survivors by score; a stable sort by image keeps each image's order.
    survivors = survivors[torch.sort(position[survivors], stable=True).indices]
    counts = torch.bincount(position[survivors], minlength=len(images)).tolist()
    return list(index[survivors].split(counts))
