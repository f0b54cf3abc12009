"""Box voting against detectron's ``box_voting`` rule written out box by box, and in the proposal layer."""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from rpn_cli.model.proposals import ProposalSettings, proposals_for_image
from rpn_cli.model.voting import overlapping, vote_boxes


def _random_boxes(generator, count, size=600.0):
    corner = torch.rand(count, 2, generator=generator) * size
    return torch.cat([corner, corner + torch.rand(count, 2, generator=generator) * 150 + 4], dim=1)


def _vote_by_hand(kept, candidates, weights, threshold):
    """Each kept box: the weighted mean of the candidates with IoU >= threshold (detectron's
    ``box_voting`` with ``scoring_method='ID'``), plain Python floats."""
    out = []
    for box in kept.tolist():
        total, summed = 0.0, [0.0] * 4
        for other, weight in zip(candidates.tolist(), weights.tolist()):
            ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
            iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
            union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - ix * iy
            if ix * iy / union >= threshold:
                total += weight
                summed = [s + weight * v for s, v in zip(summed, other)]
        out.append([v / total for v in summed] if total > 0 else box)
    return torch.tensor(out)


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_overlapping_is_torchvisions_iou_over_the_threshold(threshold):
    generator = torch.Generator().manual_seed(0)
    boxes, others = _random_boxes(generator, 40), _random_boxes(generator, 70)
    others[::3] = boxes[:24] + torch.randn(24, 4, generator=generator) * 8  # near copies: IoU around 0.7
    iou = box_iou(boxes, others)
    assert 0 < (iou >= threshold).sum() < iou.numel()
    away_from_threshold = (iou - threshold).abs() > 1e-5  # float rounding decides the exact ties
    assert torch.equal(overlapping(boxes, others, threshold)[away_from_threshold], (iou >= threshold)[away_from_threshold])
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert not overlapping(degenerate, degenerate, threshold).item()  # an empty box overlaps nothing


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_voting_is_the_weighted_mean_of_the_overlapping_candidates(threshold):
    generator = torch.Generator().manual_seed(1)
    centres = _random_boxes(generator, 30)
    # Candidates jittered around the kept boxes, so that many overlap them by the threshold or more.
    candidates = torch.cat([centres + torch.randn(30, 4, generator=generator) * 6 for _ in range(8)])
    weights = torch.rand(candidates.shape[0], generator=generator)
    kept = torch.cat([centres[:20], torch.tensor([[2000.0, 2000.0, 2010.0, 2010.0]])])  # the last: no neighbour
    voted = vote_boxes(kept, candidates, weights, threshold, max_candidates=10_000)
    expected = _vote_by_hand(kept, candidates, weights, threshold)
    torch.testing.assert_close(voted, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(voted[-1], kept[-1])
    assert (voted[:-1] - kept[:-1]).abs().max() > 1.0  # it did move them


def test_only_the_best_candidates_vote():
    generator = torch.Generator().manual_seed(2)
    kept = _random_boxes(generator, 10)
    candidates = torch.cat([kept + torch.randn(10, 4, generator=generator) * 5 for _ in range(12)])
    weights = torch.rand(candidates.shape[0], generator=generator)
    best = weights.topk(50).indices
    torch.testing.assert_close(vote_boxes(kept, candidates, weights, 0.6, max_candidates=50),
                               _vote_by_hand(kept, candidates[best], weights[best], 0.6), rtol=1e-5, atol=1e-3)


def test_a_candidate_that_does_not_vote_cannot_spoil_the_vote():
    kept = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    candidates = torch.tensor([[12.0, 10.0, 52.0, 50.0], [float("nan"), 10.0, 50.0, 50.0]])
    voted = vote_boxes(kept, candidates, torch.tensor([0.5, 0.0]), 0.7)
    torch.testing.assert_close(voted, _vote_by_hand(kept, candidates[:1], torch.tensor([0.5]), 0.7))


def test_a_batch_votes_image_by_image_and_zero_weights_do_not_vote():
    generator = torch.Generator().manual_seed(3)
    kept = torch.stack([_random_boxes(generator, 6) for _ in range(3)])
    candidates = torch.stack([torch.cat([k + torch.randn(6, 4, generator=generator) * 5 for _ in range(5)]) for k in kept])
    weights = torch.rand(3, 30, generator=generator)
    weights[1, ::2] = 0.0
    voted = vote_boxes(kept, candidates, weights, 0.7)
    for image in range(3):
        torch.testing.assert_close(voted[image], vote_boxes(kept[image], candidates[image], weights[image], 0.7))
    used = weights[1] > 0
    torch.testing.assert_close(voted[1], _vote_by_hand(kept[1], candidates[1][used], weights[1][used], 0.7),
                               rtol=1e-5, atol=1e-3)


def test_the_proposal_layer_votes_among_the_boxes_that_entered_nms():
    generator = torch.Generator().manual_seed(4)
    anchors = _random_boxes(generator, 400, size=500.0)
    scores = torch.rand(400, generator=generator)
    deltas = torch.randn(400, 4, generator=generator) * 0.05
    settings = ProposalSettings(pre_nms_top_n=400, post_nms_top_n=50, min_size=0.0)
    plain_boxes, plain_scores = proposals_for_image([scores], [deltas], [anchors], 700, 700, settings)
    boxes, voted_scores = proposals_for_image([scores], [deltas], [anchors], 700, 700,
                                              ProposalSettings(**{**settings.to_dict(), "vote_iou": 0.7}))
    assert torch.equal(voted_scores, plain_scores)  # same boxes kept, same order: only positions move
    # The candidates: every decoded, clipped box (none is filtered out here), with its score.
    from rpn_cli.model.boxes import clip_boxes, decode_deltas

    candidates = clip_boxes(decode_deltas(anchors, deltas), 700, 700)
    expected = _vote_by_hand(plain_boxes, candidates, scores, 0.7)
    torch.testing.assert_close(boxes, expected, rtol=1e-5, atol=1e-3)
    assert not torch.equal(boxes, plain_boxes)
    assert np.isfinite(boxes.numpy()).all()
