"""A head made deeper from a trained checkpoint computes what the checkpoint did, then trains on."""

import pytest
import torch
from conftest import SAMPLES

from rpn_cli.io.checkpoint import load_checkpoint
from rpn_cli.io.images import load_image
from rpn_cli.model.network import deepened_head
from rpn_cli.model.preprocess import prepare_image


def test_a_deepened_head_gives_the_checkpoints_very_outputs_on_a_photo(default_checkpoint):
    model = load_checkpoint(default_checkpoint).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    deeper = deepened_head(model, 3).eval()
    assert deeper.spec.head.conv_depth == 3 and len(deeper.head.more_convs) == 2
    assert model.spec.head.conv_depth == 1  # the source is left as it was
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())

    image = prepare_image(load_image(SAMPLES / "coffee.jpg"), model.spec.preprocess).tensor[None]
    with torch.no_grad():
        expected, got = model.raw_outputs(image), deeper.raw_outputs(image)
        assert len(got) == len(expected) == 6
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        # The added convolutions are on the path: moving one moves the outputs.
        deeper.head.more_convs[-1].bias.fill_(0.5)
        assert (deeper.raw_outputs(image)[0] - expected[0]).abs().max() > 1e-2


def test_a_deepened_head_keeps_the_sources_mode_and_is_never_made_shallower(default_checkpoint):
    model = load_checkpoint(default_checkpoint)
    assert deepened_head(model.eval(), 2).training is False
    deeper = deepened_head(model.train(), 2)
    assert deeper.training is True
    assert deepened_head(deeper, 2).spec.head.conv_depth == 2  # as deep already: unchanged
    with pytest.raises(ValueError, match="a head of 2 convolutions cannot be made 1 deep"):
        deepened_head(deeper, 1)
