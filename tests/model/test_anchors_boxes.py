"""Anchors and box coding against the seed's own functions (tests/seed_reference.py)."""

import math

import numpy as np
import pytest
import torch
from seed_reference import (
    SEED_PRINTED_ANCHOR_BASE,
    enumerate_shifted_anchor,
    generate_anchor_base,
    loc2bbox,
)

from rpn_cli.model.anchors import (
    anchor_shapes,
    cached_grid_anchors,
    describe_anchor_shapes,
    grid_anchors,
    seed_project_anchor_shapes,
)
from rpn_cli.model.boxes import (
    DEFAULT_DELTA_CLAMP,
    clip_boxes,
    decode_deltas,
    encode_boxes,
    scale_boxes,
    valid_box_mask,
)


def test_seed_reference_reproduces_the_printed_anchor_base():
    np.testing.assert_allclose(generate_anchor_base(), SEED_PRINTED_ANCHOR_BASE, rtol=0, atol=1e-4)


def test_seed_project_order_equals_the_seed_anchor_base():
    np.testing.assert_allclose(seed_project_anchor_shapes().numpy(), SEED_PRINTED_ANCHOR_BASE, atol=1e-4)


def test_our_anchors_are_x1y1x2y2_with_ratio_height_over_width():
    shapes = anchor_shapes(16, (0.5, 1, 2), (8, 16, 32))
    # Pitfall 1: ours are the transpose of the seed's rows.
    np.testing.assert_allclose(shapes.numpy(), SEED_PRINTED_ANCHOR_BASE[:, [1, 0, 3, 2]], atol=1e-4)
    rows = describe_anchor_shapes(shapes)
    for row, (ratio, scale) in zip(rows, [(r, s) for r in (0.5, 1, 2) for s in (8, 16, 32)]):
        assert row["ratio"] == pytest.approx(ratio, rel=1e-5)
        assert row["width"] * row["height"] == pytest.approx((16 * scale) ** 2, rel=1e-5)


@pytest.mark.parametrize("height,width", [(1, 1), (3, 5), (38, 50)])
def test_grid_anchors_equal_the_seeds_shifted_anchors(height, width):
    base = generate_anchor_base()
    expected = enumerate_shifted_anchor(base, 16, height, width)
    ours = grid_anchors(torch.from_numpy(base), 16, height, width)
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_grid_offset_moves_centres_by_half_a_cell():
    shapes = torch.tensor([[-8.0, -8.0, 8.0, 8.0]])
    np.testing.assert_array_equal(grid_anchors(shapes, 16, 1, 2, offset=0.5).numpy(), [[0, 0, 16, 16], [16, 0, 32, 16]])


def test_cached_grid_is_reused_and_equal():
    shapes = anchor_shapes()
    first = cached_grid_anchors(shapes, 16, 7, 9, 0.0, torch.device("cpu"))
    again = cached_grid_anchors(shapes, 16, 7, 9, 0.0, torch.device("cpu"))
    assert first is again
    assert torch.equal(first, grid_anchors(shapes, 16, 7, 9))


def test_decode_equals_seed_loc2bbox_for_moderate_deltas():
    generator = torch.Generator().manual_seed(1)
    anchors = torch.from_numpy(enumerate_shifted_anchor(generate_anchor_base(), 16, 10, 12))
    deltas = torch.randn(anchors.shape[0], 4, generator=generator) * 0.5
    torch.testing.assert_close(decode_deltas(anchors, deltas), loc2bbox(anchors, deltas), rtol=1e-5, atol=1e-3)


def test_decode_clamps_dw_dh_where_the_seed_overflows():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    assert not torch.isfinite(loc2bbox(anchors, deltas)).all()
    boxes = decode_deltas(anchors, deltas)
    assert torch.isfinite(boxes).all()
    side = 16 * math.exp(DEFAULT_DELTA_CLAMP)
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(side), rtol=1e-5, atol=1e-3)


def test_encode_then_decode_gives_the_boxes_back():
    generator = torch.Generator().manual_seed(2)
    anchors = torch.rand(500, 2, generator=generator) * 300
    anchors = torch.cat((anchors, anchors + 8 + torch.rand(500, 2, generator=generator) * 200), 1)
    boxes = torch.rand(500, 2, generator=generator) * 300
    boxes = torch.cat((boxes, boxes + 4 + torch.rand(500, 2, generator=generator) * 300), 1)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        back = decode_deltas(anchors, encode_boxes(anchors, boxes, weights), weights)
        torch.testing.assert_close(back, boxes, rtol=1e-5, atol=1e-3)


def test_clip_valid_and_scale():
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 30.0], [10.0, 10.0, 12.0, 40.0], [float("nan"), 0, 5, 5]])
    clipped = clip_boxes(boxes, 20, 40)
    assert clipped[0].tolist() == [0.0, 0.0, 40.0, 20.0]
    assert valid_box_mask(clipped, 16).tolist() == [True, False, False]
    assert scale_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), 2.0, 4.0).tolist() == [[5.0, 5.0, 15.0, 10.0]]
