"""The test-mode proposal layer against the seed's ProposalCreator, and the documented fixes."""

import pytest
import torch
from seed_reference import (
    enumerate_shifted_anchor,
    generate_anchor_base,
    seed_proposal_layer,
)

from rpn_cli.errors import UsageError
from rpn_cli.model.anchors import grid_anchors, seed_project_anchor_shapes
from rpn_cli.model.proposals import ProposalSettings, proposals_for_image


def _random_head_output(seed, height, width, anchors=9, spread=0.3):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(height * width * anchors, generator=generator)
    locs = torch.randn(height * width * anchors, 4, generator=generator) * spread
    return scores, locs


@pytest.mark.parametrize("seed,height,width,image", [(0, 38, 50, (600, 800)), (1, 50, 38, (800, 600)), (2, 20, 20, (320, 320))])
def test_equals_the_seed_on_random_inputs(seed, height, width, image):
    scores, locs = _random_head_output(seed, height, width)
    anchors = enumerate_shifted_anchor(generate_anchor_base(), 16, height, width)
    expected_boxes, expected_scores = seed_proposal_layer(locs.clone(), scores.clone(), anchors, image)
    boxes, ours = proposals_for_image([scores], [locs], [torch.from_numpy(anchors)], image[0], image[1])
    assert boxes.shape[0] == expected_boxes.shape[0] > 0
    torch.testing.assert_close(boxes, expected_boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(ours, expected_scores)


def test_training_limits_are_the_seeds():
    settings = ProposalSettings.training()
    assert (settings.pre_nms_top_n, settings.post_nms_top_n) == (12000, 600)
    scores, locs = _random_head_output(3, 40, 60)
    anchors = enumerate_shifted_anchor(generate_anchor_base(), 16, 40, 60)
    expected, _ = seed_proposal_layer(locs.clone(), scores.clone(), anchors, (640, 960), 12000, 600)
    boxes, _ = proposals_for_image([scores], [locs], [torch.from_numpy(anchors)], 640, 960, settings)
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-3)


def test_non_finite_boxes_are_dropped_and_no_padding():
    anchors = grid_anchors(seed_project_anchor_shapes(), 16, 2, 2)
    scores = torch.linspace(0.1, 0.9, anchors.shape[0])
    locs = torch.zeros(anchors.shape[0], 4)
    locs[:, 2:] = 300.0  # exp overflows without the clamp
    locs[0, 0] = float("nan")
    boxes, kept = proposals_for_image([scores], [locs], [anchors], 64, 64)
    assert torch.isfinite(boxes).all()
    assert 0 < boxes.shape[0] < 300
    assert torch.all(kept[:-1] >= kept[1:])


def test_no_box_survives_gives_an_empty_answer():
    anchors = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    boxes, scores = proposals_for_image([torch.tensor([0.9])], [torch.zeros(1, 4)], [anchors], 100, 100)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_limits_min_score_and_determinism():
    scores, locs = _random_head_output(4, 30, 30)
    anchors = torch.from_numpy(enumerate_shifted_anchor(generate_anchor_base(), 16, 30, 30))
    settings = ProposalSettings(pre_nms_top_n=500, post_nms_top_n=50, nms_iou=0.5, min_size=32, min_score=0.5)
    first = proposals_for_image([scores], [locs], [anchors], 480, 480, settings)
    second = proposals_for_image([scores], [locs], [anchors], 480, 480, settings)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    boxes, kept = first
    assert boxes.shape[0] <= 50 and bool((kept >= 0.5).all())
    assert bool(((boxes[:, 2] - boxes[:, 0]) >= 32).all() and ((boxes[:, 3] - boxes[:, 1]) >= 32).all())


def test_float16_inputs_are_decoded_in_float32():
    scores, locs = _random_head_output(5, 38, 50)
    anchors = torch.from_numpy(enumerate_shifted_anchor(generate_anchor_base(), 16, 38, 50))
    boxes, kept = proposals_for_image([scores.half()], [locs.half()], [anchors], 600, 800)
    assert boxes.dtype == torch.float32 and kept.dtype == torch.float32


def test_settings_validation():
    with pytest.raises(UsageError):
        ProposalSettings(nms_iou=1.5).validated()
    with pytest.raises(UsageError):
        ProposalSettings(post_nms_top_n=0).validated()
    with pytest.raises(UsageError, match="voting IoU must be in"):
        ProposalSettings(vote_iou=1.5).validated()
    for min_size in (-1.0, float("inf"), float("nan")):  # inf and nan would silently keep no box at all
        with pytest.raises(UsageError, match="min size must be a number of pixels >= 0"):
            ProposalSettings(min_size=min_size).validated()
    for offsets in ((0.0, float("nan")), ("0.5",), (True, 0.0), 0.5, (0.0, 1e39), {0.0, -1.0}, iter([0.0])):
        with pytest.raises(UsageError, match="level_offsets .*: expected a list of numbers from -50 to 50, one a "
                                             "pyramid level"):
            ProposalSettings(level_offsets=offsets).validated()
    # JSON's list, numpy's and torch's arrays: plain floats in level order.
    import numpy as np

    for given in ([0, 0.5], np.array([0.0, 0.5], np.float32), torch.tensor([0.0, 0.5]), (np.float32(0), 0.5)):
        offsets = ProposalSettings(level_offsets=given).validated().level_offsets
        assert offsets == (0.0, 0.5) and all(type(value) is float for value in offsets)


def _two_level_case(score_kind):
    """Two levels of one anchor each, far apart, zero deltas: level 0 scores logit 2, level 1 logit 1."""
    from rpn_cli.model.network import LevelOutput

    levels = []
    for logit, anchor in ((2.0, [0.0, 0.0, 32.0, 32.0]), (1.0, [64.0, 64.0, 128.0, 128.0])):
        logits = torch.tensor([[logit]])
        if score_kind == "softmax":  # a pair whose softmax is sigmoid(logit)
            logits = torch.tensor([[[0.5, 0.5 + logit]]])
        levels.append(LevelOutput(logits, torch.zeros((1, 1, 4)), torch.tensor([anchor]), 1, 1))
    return levels


@pytest.mark.parametrize("score_kind", ["sigmoid", "softmax"])
def test_level_offsets_rerank_the_levels_and_shift_their_scores(score_kind):
    import math
    from dataclasses import replace

    from rpn_cli.model.proposals import ProposalLayer

    def sigmoid(x):  # written out
        return 1 / (1 + math.exp(-x))

    levels = _two_level_case(score_kind)
    plain = ProposalLayer(ProposalSettings(min_size=0.0), score_kind)
    boxes, scores = plain(levels, 0, 200, 200)
    assert boxes[:, 0].tolist() == [0.0, 64.0]
    assert scores.tolist() == pytest.approx([sigmoid(2.0), sigmoid(1.0)], rel=1e-6)
    shifted = replace(plain, settings=replace(plain.settings, level_offsets=(-1.5, 0.0)))
    boxes, scores = shifted(levels, 0, 200, 200)
    assert boxes[:, 0].tolist() == [64.0, 0.0]  # level 0's box now ranks second
    assert scores.tolist() == pytest.approx([sigmoid(1.0), sigmoid(0.5)], rel=1e-6)
    one = replace(shifted, settings=replace(shifted.settings, post_nms_top_n=1))
    assert one(levels, 0, 200, 200)[0][:, 0].tolist() == [64.0]
    batch_boxes, batch_scores, counts = shifted.for_batch(levels, torch.tensor([[200, 200]]))
    assert counts == [2] and batch_boxes[:, 0].tolist() == [64.0, 0.0]
    torch.testing.assert_close(batch_scores, scores)
    with pytest.raises(UsageError, match="level_offsets has 3 values for a network of 2 levels"):
        replace(plain, settings=replace(plain.settings, level_offsets=(0.0, 0.0, 0.0)))(levels, 0, 200, 200)
    # Ranked by log-odds, so an offset that pushes probabilities to 1.0 in float32 keeps the order.
    high = replace(plain, settings=replace(plain.settings, level_offsets=(40.0, 40.0)))
    assert high(levels, 0, 200, 200)[0][:, 0].tolist() == [0.0, 64.0]


def test_zero_level_offsets_leave_every_record_as_it_was(sample_batch):
    from dataclasses import replace

    levels, sizes, layer = sample_batch
    for index, (height, width) in enumerate(sizes.tolist()):
        expected = replace(layer, settings=replace(layer.settings, level_offsets=()))(levels, index, height, width)
        zero = replace(layer, settings=replace(layer.settings, level_offsets=(0.0, 0.0, 0.0)))(levels, index, height,
                                                                                               width)
        assert torch.equal(zero[0], expected[0]) and torch.equal(zero[1], expected[1])


@pytest.fixture(scope="module")
def sample_batch(default_checkpoint):
    """The default checkpoint's outputs for the sample photos run as one padded batch (sizes differ)."""
    from conftest import SAMPLES

    from rpn_cli import Proposer
    from rpn_cli.inference.predict import run_model

    proposer = Proposer(default_checkpoint, device="cpu", backend="torch", precision="float32")
    prepared = [proposer.prepare(path) for path in sorted(SAMPLES.glob("*.jpg"))]
    assert len({image.resized_size for image in prepared}) > 1
    sizes = torch.tensor([[image.resized_size[1], image.resized_size[0]] for image in prepared])
    return run_model(proposer.model, prepared), sizes, proposer.proposal_layer


def _ties_in_coordinate_order(boxes, scores):
    """The boxes sorted by score, high to low, those of exactly equal score by their coordinates: which
    of two tied boxes comes first may differ between the layers."""
    order = torch.arange(boxes.shape[0])
    for column in (3, 2, 1, 0):
        order = order[torch.sort(boxes[order, column], stable=True).indices]
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    return boxes[order], scores[order]


def _one_pass_and_per_image(levels, sizes, layer):
    boxes, scores, counts = layer.for_batch(levels, sizes)
    per_image = [layer(levels, index, int(height), int(width)) for index, (height, width) in enumerate(sizes.tolist())]
    return list(zip(boxes.split(counts), scores.split(counts))), per_image


# Above the best score the shipped file gives one sample photo (rocket.jpg, 0.9948) and below the
# others' (0.9976 and more), so that some images of the batch keep no box.
EMPTYING_MIN_SCORE = 0.996


@pytest.mark.parametrize("settings", [
    ProposalSettings(),
    ProposalSettings(nms_per_level=True),
    ProposalSettings(top_n_before_filtering=True),
    ProposalSettings(post_nms_top_n=2000, min_score=0.4),
    ProposalSettings(min_score=EMPTYING_MIN_SCORE),
    ProposalSettings(vote_iou=0.7),
    ProposalSettings(vote_iou=0.7, min_score=EMPTYING_MIN_SCORE),
    ProposalSettings(vote_iou=0.7, level_offsets=(0.5, 0.0, -0.75)),
], ids=["seed-order", "nms-per-level", "top-n-first", "many-kept", "some-images-empty", "voting", "voting-some-empty",
        "level-offsets"])
@pytest.mark.parametrize("score_kind", ["sigmoid", "softmax"])
def test_a_batch_in_one_pass_equals_image_by_image(sample_batch, settings, score_kind):
    """The GPU's one-pass proposal layer against the per-image one, each image clipped to its own size:
    in float32 the same boxes in the same order, up to float rounding and the order of exactly tied
    scores (two boxes of the shipped file tie at 0.63120580 on astronaut.jpg)."""
    from dataclasses import replace

    levels, sizes, layer = sample_batch
    layer = replace(layer, settings=settings, score_kind=score_kind)
    if score_kind == "softmax":  # logits (N, M, 2) whose softmax is the sigmoid of the real ones
        levels = [replace(level, logits=torch.stack((torch.zeros_like(level.logits), level.logits), -1))
                  for level in levels]
    one_pass, per_image = _one_pass_and_per_image(levels, sizes, layer)
    assert sum(expected.shape[0] > 0 for expected, _ in per_image) >= 1
    for (boxes, scores), (expected_boxes, expected_scores) in zip(one_pass, per_image):
        assert boxes.shape == expected_boxes.shape
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)
        boxes, scores = _ties_in_coordinate_order(boxes, scores)
        expected_boxes, expected_scores = _ties_in_coordinate_order(expected_boxes, expected_scores)
        torch.testing.assert_close(boxes, expected_boxes, rtol=0, atol=1e-3)
    if settings.min_score == EMPTYING_MIN_SCORE:
        assert any(expected.shape[0] == 0 for expected, _ in per_image)
    if settings.vote_iou:  # voting moved the boxes, in both layers
        unvoted = _one_pass_and_per_image(levels, sizes, replace(layer, settings=replace(settings, vote_iou=0.0)))[1]
        assert any(not torch.equal(voted, plain) for (voted, _), (plain, _) in zip(per_image, unvoted) if len(plain))


def test_infinite_logits_in_one_pass_as_image_by_image(sample_batch):
    """A logit of +inf (probability 1) is a proposal and -inf (probability 0) one at min score 0, in both."""
    from dataclasses import replace

    levels, sizes, layer = sample_batch
    layer = replace(layer, settings=ProposalSettings(top_n_before_filtering=True))
    logits = levels[1].logits.clone()
    logits[:, 100], logits[:, 200] = float("inf"), float("-inf")
    levels = [levels[0], replace(levels[1], logits=logits), *levels[2:]]
    one_pass, per_image = _one_pass_and_per_image(levels, sizes, layer)
    for (boxes, scores), (expected_boxes, expected_scores) in zip(one_pass, per_image):
        assert float(expected_scores[0]) == 1.0 and boxes.shape == expected_boxes.shape
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)


def test_bfloat16_logits_in_one_pass_keep_equally_good_boxes(sample_batch):
    """Rounded to bfloat16 many scores tie, and which of the tied boxes are kept may differ (then so do
    the boxes NMS suppresses after them): the stated tolerance is the same number of boxes, at least 85% of
    each image's found by the other at IoU 0.9 (93-100% on these photos with the shipped file, 89-100% with
    the ninth stage's, 97-100% with the eighth's, whose scores tied less), and scores at each rank within
    0.005 on average (at most 0.0043 here)."""
    from dataclasses import replace

    from torchvision.ops import box_iou

    levels, sizes, layer = sample_batch
    levels = [replace(level, logits=level.logits.to(torch.bfloat16)) for level in levels]
    one_pass, per_image = _one_pass_and_per_image(levels, sizes, layer)
    for (boxes, scores), (expected_boxes, expected_scores) in zip(one_pass, per_image):
        assert boxes.shape == expected_boxes.shape
        assert float((box_iou(boxes, expected_boxes).max(dim=1).values >= 0.9).float().mean()) >= 0.85
        assert float((scores - expected_scores).abs().mean()) < 0.005
