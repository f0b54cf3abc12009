"""The early-stopping NMS equals torchvision's greedy NMS."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torchvision.ops import nms

from rpn_cli.model.nms import greedy_nms


def _random_boxes(generator, count, spread=600.0, size=200.0):
    xy = torch.rand(count, 2, generator=generator) * spread
    wh = torch.rand(count, 2, generator=generator) * size + 1
    return torch.cat((xy, xy + wh), 1)


def _clustered_boxes(generator, count):
    """Many near-copies of a few objects: the case where NMS suppresses most boxes."""
    centres = _random_boxes(generator, 12)
    picks = centres[torch.randint(0, 12, (count,), generator=generator)]
    return picks + torch.randn(count, 4, generator=generator) * 6


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("threshold,max_keep", [(0.7, 300), (0.5, 50), (0.3, 3000)])
def test_equals_torchvision(seed, kind, threshold, max_keep):
    generator = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(generator, 3000) if kind == "random" else _clustered_boxes(generator, 3000)
    scores = torch.rand(3000, generator=generator)
    expected = nms(boxes, scores, threshold)[:max_keep]
    assert torch.equal(greedy_nms(boxes, scores, threshold, max_keep), expected)


def test_ties_keep_torchvisions_order():
    generator = torch.Generator().manual_seed(7)
    boxes = _clustered_boxes(generator, 1000)
    scores = torch.randint(0, 5, (1000,), generator=generator).float() / 4  # five distinct values only
    for max_keep in (10, 100, 1000):
        assert torch.equal(greedy_nms(boxes, scores, 0.7, max_keep), nms(boxes, scores, 0.7)[:max_keep])
    identical = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4 + [[20.0, 20.0, 30.0, 30.0]])
    same = torch.ones(5)
    assert torch.equal(greedy_nms(identical, same, 0.5, 10), nms(identical, same, 0.5))


def test_empty_input():
    assert greedy_nms(torch.zeros(0, 4), torch.zeros(0), 0.7, 300).numel() == 0


@pytest.mark.parametrize("window", [1, 7, 64])
def test_small_windows_give_the_same_answer(window):
    """Boxes suppressed by boxes kept in earlier windows: the path where the window grows."""
    generator = torch.Generator().manual_seed(3)
    boxes = _clustered_boxes(generator, 2000)
    scores = torch.rand(2000, generator=generator)
    for threshold, max_keep in ((0.7, 300), (0.5, 2000)):
        expected = nms(boxes, scores, threshold)[:max_keep]
        assert torch.equal(greedy_nms(boxes, scores, threshold, max_keep, window=window), expected)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.7])
def test_an_overlap_equal_to_the_threshold_in_float32(threshold):
    """IoU 0.3 (or 0.6) in float32 is above the double 0.3 (0.6): torchvision suppresses, so must we."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 10.0 * threshold, 1.0]])
    scores = torch.tensor([1.0, 0.5])
    assert torch.equal(greedy_nms(boxes, scores, threshold, 10), nms(boxes, scores, threshold))


def test_a_window_below_one_is_refused():
    with pytest.raises(ValueError, match="window"):
        greedy_nms(torch.zeros(1, 4), torch.zeros(1), 0.7, 10, window=0)


def test_torchvision_operators_load_without_importing_the_package(tmp_path):
    """What ``rpn propose`` does: torchvision's kernel, registered from its compiled library alone."""
    generator = torch.Generator().manual_seed(0)
    boxes, scores = _clustered_boxes(generator, 2000), torch.rand(2000, generator=generator)
    torch.save({"boxes": boxes, "scores": scores}, tmp_path / "boxes.pt")
    script = ("import sys, torch\n"
              "from rpn_cli.model.nms import greedy_nms\n"
              f"data = torch.load({str(tmp_path / 'boxes.pt')!r})\n"
              "print(greedy_nms(data['boxes'], data['scores'], 0.5, 100, window=64).tolist())\n"
              "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torchvision'))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    kept, imported = result.stdout.strip().splitlines()
    assert imported == "[]"
    assert json.loads(kept) == nms(boxes, scores, 0.5)[:100].tolist()


def test_float64_boxes_are_suppressed_in_float64():
    # The second box overlaps the first by 0.5 + 1e-12: above 0.5 in float64, exactly 0.5 in float32.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5 + 1e-12, 1.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8], dtype=torch.float64)
    assert nms(boxes.float(), scores.float(), 0.5).tolist() == [0, 1]
    assert greedy_nms(boxes, scores, 0.5, 10).tolist() == nms(boxes, scores, 0.5).tolist() == [0]


def _batch(seed, images=3, count=400):
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.stack([_clustered_boxes(generator, count).clamp(min=0) for _ in range(images)])
    boxes[..., 2:] = torch.maximum(boxes[..., 2:], boxes[..., :2] + 1)  # x1 < x2 and y1 < y2, as clipped boxes are
    scores = torch.rand(images, count, generator=generator)
    valid = torch.rand(images, count, generator=generator) > 0.2
    valid[-1] = False  # an image without a candidate
    return boxes, scores, valid


def _per_image(image, index, images):
    return [index[image == b] for b in range(images)]


# window 1024: all 400 at once; 64: a window enough for 10 kept; 16: some images need bigger windows.
@pytest.mark.parametrize("window,max_keep", [(1024, 30), (64, 10), (16, 30)])
@pytest.mark.parametrize("boxes_per_call", [25_000, 100])  # one kernel call, or several a round
def test_batched_nms_equals_torchvision_image_by_image(monkeypatch, window, max_keep, boxes_per_call):
    from rpn_cli.model import nms as nms_module

    monkeypatch.setattr(nms_module, "_BOXES_PER_CALL", boxes_per_call)
    boxes, scores, valid = _batch(0)
    kept = _per_image(*nms_module.batched_greedy_nms(boxes, scores, valid, 0.5, max_keep, window=window), 3)
    assert kept[-1].numel() == 0
    for image in range(2):
        candidates = valid[image].nonzero().squeeze(1)
        expected = candidates[nms(boxes[image, candidates], scores[image, candidates], 0.5)[:max_keep]]
        assert torch.equal(kept[image], expected)


@pytest.mark.parametrize("window", [1024, 16])
def test_batched_nms_per_group_equals_torchvisions_batched_nms(window):
    from torchvision.ops import batched_nms

    from rpn_cli.model.nms import batched_greedy_nms

    boxes, scores, valid = _batch(1)
    groups = torch.randint(0, 3, scores.shape, generator=torch.Generator().manual_seed(2))
    kept = _per_image(*batched_greedy_nms(boxes, scores, valid, 0.6, 40, groups=groups, window=window), 3)
    for image in range(2):
        candidates = valid[image].nonzero().squeeze(1)
        expected = candidates[batched_nms(boxes[image, candidates], scores[image, candidates],
                                          groups[image, candidates], 0.6)[:40]]
        assert torch.equal(kept[image], expected)


def test_batched_nms_never_keeps_an_invalid_candidate():
    """Invalid boxes stay out even where valid scores are -inf (they tie with the masked ones)."""
    from rpn_cli.model.nms import batched_greedy_nms

    boxes, scores, valid = _batch(3, images=2)
    scores[0, :200] = float("-inf")
    image, index = batched_greedy_nms(boxes, scores, valid, 0.5, 1000, window=8)
    assert image.numel() > 0 and bool(valid[image, index].all())


def test_batched_nms_on_nothing():
    from rpn_cli.model.nms import batched_greedy_nms

    image, index = batched_greedy_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool),
                                      0.5, 10, groups=torch.zeros(2, 0, dtype=torch.int64))
    assert image.numel() == index.numel() == 0
