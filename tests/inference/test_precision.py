"""Reduced precision: the network in bfloat16 stays within tolerance of float32 on real photos."""

import pytest
import torch
from conftest import SAMPLES
from torchvision.ops import box_iou

from rpn_cli.errors import UsageError
from rpn_cli.inference.devices import resolve_precision
from rpn_cli.inference.predict import proposals_for_batch
from rpn_cli.inference.runtime import load_model
from rpn_cli.io.images import load_image
from rpn_cli.model.preprocess import prepare_image


def test_bfloat16_proposals_stay_close_to_float32(default_checkpoint):
    full = load_model(default_checkpoint, "cpu", "float32")
    reduced = load_model(default_checkpoint, "cpu", "bfloat16")
    proposal_layer = full.spec.proposal_layer()
    for sample in sorted(SAMPLES.glob("*.jpg")):
        prepared = prepare_image(load_image(sample), full.spec.preprocess)
        exact = proposals_for_batch(full, [prepared], proposal_layer)[0]
        approx = proposals_for_batch(reduced, [prepared], proposal_layer)[0]
        assert approx.boxes.dtype == torch.float32  # decoding and NMS stay float32
        top = exact.boxes[:100]
        overlap, match = box_iou(top, approx.boxes).max(dim=1)
        # NMS lets a few near-ties fall the other way; the rest keep their box.
        assert float((overlap >= 0.7).float().mean()) >= 0.95, sample.name
        close = overlap >= 0.9
        score_gap = (exact.scores[:100][close] - approx.scores[match[close]]).abs().mean()
        assert float(score_gap) < 0.03, sample.name


def test_precision_choices():
    assert resolve_precision("float32", torch.device("cpu")) == "float32"
    assert resolve_precision("auto", torch.device("cpu")) in ("float32", "bfloat16")
    with pytest.raises(UsageError, match="--precision"):
        resolve_precision("int4", torch.device("cpu"))
