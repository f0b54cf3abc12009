"""Our checkpoint format, the seed-project import, and a hand-built model whose proposals are known."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES, run_rpn
from PIL import Image
from seed_reference import SeedHead, seed_extractor, seed_rpn_proposals
from torch import nn

from rpn_cli.errors import CheckpointError, UsageError
from rpn_cli.inference.predict import proposals_for_batch
from rpn_cli.io.checkpoint import load_checkpoint, read_spec, save_checkpoint
from rpn_cli.io.converters import convert_seed_project
from rpn_cli.model.backbones import SingleLevelBackbone, register_backbone
from rpn_cli.model.network import RegionProposalNetwork
from rpn_cli.model.preprocess import prepare_image, resized_size
from rpn_cli.model.spec import ModelSpec, default_mobilenet_spec


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RegionProposalNetwork(default_mobilenet_spec()).eval()
    model.spec.provenance = {"trained_by": "a test"}
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.spec.to_dict() == model.spec.to_dict()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_truncated_wrong_and_missing_files_are_one_line_errors(tmp_path):
    model = RegionProposalNetwork(default_mobilenet_spec())
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    for bad in (truncated, text, tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(bad)
        message = str(caught.value)
        assert str(bad) in message and "\n" not in message


def test_seed_project_import_matches_the_seed_algorithm(tmp_path):
    torch.manual_seed(0)
    extractor, rpn = seed_extractor().eval(), SeedHead().eval()
    # Non-trivial BatchNorm statistics, so a key mapped to the wrong layer shows.
    for module in extractor.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"extractor.{k}": v for k, v in extractor.state_dict().items()}
    state.update({f"rpn.{k}": v for k, v in rpn.state_dict().items()})
    state["head.cls_loc.weight"] = torch.zeros(4, 4)  # second stage: ignored
    source = tmp_path / "seed.pth"
    torch.save(state, source)
    converted = tmp_path / "seed.safetensors"
    convert_seed_project(source, converted)
    # Both sides in float64: the random head scores all lie near 0.5, so in float32 which near-ties NMS
    # keeps would move with the summation order (the thread count), in the seed's code and in ours alike.
    model = load_checkpoint(converted).double()
    extractor, rpn = extractor.double(), rpn.double()

    image = Image.open(SAMPLES / "coffee.jpg").convert("RGB")  # 600 x 400
    expected, expected_scores, (new_w, new_h) = seed_rpn_proposals(image, extractor, rpn)
    assert resized_size(image.width, image.height, model.spec.preprocess) == (new_w, new_h) == (900, 600)

    ours = proposals_for_batch(model, [prepare_image(image, model.spec.preprocess)], model.spec.proposal_layer())[0]
    assert ours.boxes.shape[0] == expected.shape[0] > 0
    scale_x, scale_y = new_w / image.width, new_h / image.height
    expected_original = expected / torch.tensor([scale_x, scale_y, scale_x, scale_y])
    torch.testing.assert_close(ours.boxes, expected_original.float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(ours.scores, expected_scores.float(), rtol=1e-4, atol=1e-5)


def test_seed_import_names_a_mis_shaped_key(tmp_path):
    state = {f"extractor.{k}": v for k, v in seed_extractor().state_dict().items()}
    state.update({f"rpn.{k}": v for k, v in SeedHead().state_dict().items()})
    state["rpn.loc.weight"] = torch.zeros(8, 512, 1, 1)
    source = tmp_path / "bad.pth"
    torch.save(state, source)
    with pytest.raises(CheckpointError, match=r"key rpn.loc.weight has shape \(8, 512, 1, 1\)"):
        convert_seed_project(source, tmp_path / "out.safetensors")
    del state["rpn.loc.weight"]
    torch.save(state, source)
    with pytest.raises(CheckpointError, match="missing key rpn.loc.weight"):
        convert_seed_project(source, tmp_path / "out.safetensors")


def test_a_conversion_never_replaces_its_source(tmp_path):
    state = {f"extractor.{k}": v for k, v in seed_extractor().state_dict().items()}
    state.update({f"rpn.{k}": v for k, v in SeedHead().state_dict().items()})
    source = tmp_path / "seed.pth"
    torch.save(state, source)
    before = source.read_bytes()
    (tmp_path / "seed.safetensors").symlink_to(source)
    with pytest.raises(UsageError, match=r"seed.pth: a checkpoint of ours is written to a .safetensors file"):
        convert_seed_project(source, source)
    with pytest.raises(UsageError, match=r"seed.safetensors: that is the file being read \(.*seed.pth\)"):
        convert_seed_project(source, tmp_path / "seed.safetensors")
    result = run_rpn("convert", source, source)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert source.read_bytes() == before
    convert_seed_project(source, tmp_path / "converted.safetensors")
    assert read_spec(tmp_path / "converted.safetensors").backbone.name == "resnet50-c4"


def test_pickled_objects_are_refused(tmp_path):
    source = tmp_path / "evil.pth"
    torch.save({"extractor.x": torch.zeros(1), "object": object()}, source)
    with pytest.raises(CheckpointError, match="evil.pth"):
        convert_seed_project(source, tmp_path / "out.safetensors")


# A hand-built model: features are the mean brightness of each 16x16 cell; one 32x32 anchor per
# cell, centred on it; its logit is large where a cell is bright, and the deltas are 0. So the
# proposals are exactly the bright cells' anchors, which the tests can compute by hand.
@register_backbone("test-brightness")
def _brightness_backbone(description):
    return SingleLevelBackbone(nn.Sequential(nn.AvgPool2d(16)), stride=16, channels=3)


def _bright_cell_model(tmp_path):
    spec = ModelSpec.from_dict({
        "backbone": {"name": "test-brightness"},
        "levels": [{"stride": 16, "anchors": [[-16.0, -16.0, 16.0, 16.0]]}],
        "head": {"mid_channels": 1},
        "preprocess": {"resize": "shorter_side", "size": 64, "max_size": None, "interpolation": "nearest",
                       "channel_order": "RGB", "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "anchor_offset": 0.5,
        "proposals": {"pre_nms_top_n": 3000, "post_nms_top_n": 300, "nms_iou": 0.99, "min_size": 1.0,
                      "min_score": 0.5, "nms_per_level": False},
    })
    model = RegionProposalNetwork(spec)
    with torch.no_grad():
        model.head.conv1.weight.zero_()
        model.head.conv1.weight[0, :, 1, 1] = 1.0  # sum of the cell's three channel means
        model.head.conv1.bias.zero_()
        model.head.score.weight.fill_(40.0)
        model.head.score.bias.fill_(-60.0)  # sigmoid > 0.5 only where the cell's channel sum > 1.5
        model.head.loc.weight.zero_()
        model.head.loc.bias.zero_()
    path = tmp_path / "bright.safetensors"
    save_checkpoint(model, path)
    return load_checkpoint(path)


@pytest.mark.parametrize("size,cell", [((96, 160), (2, 1)), ((200, 120), (1, 3)), ((12, 9), (0, 0))])
def test_bright_rectangle_maps_back_to_original_pixels(tmp_path, size, cell):
    """Landscape, portrait and tiny images: the proposal of the one bright cell, in original pixels."""
    model = _bright_cell_model(tmp_path)
    width, height = size
    new_w, new_h = resized_size(width, height, model.spec.preprocess)
    scale_x, scale_y = new_w / width, new_h / height
    array = np.zeros((height, width, 3), np.uint8)
    cx, cy = cell
    # The cell (cx, cy) of the resized image, drawn in original pixels (nearest-neighbour resize).
    x1, x2 = int(np.ceil(cx * 16 / scale_x)), int(np.ceil((cx + 1) * 16 / scale_x))
    y1, y2 = int(np.ceil(cy * 16 / scale_y)), int(np.ceil((cy + 1) * 16 / scale_y))
    array[y1:y2, x1:x2] = 255
    result = proposals_for_batch(model, [prepare_image(Image.fromarray(array), model.spec.preprocess)],
                                 model.spec.proposal_layer())[0]
    assert result.boxes.shape[0] == 1
    centre_x, centre_y = (cx + 0.5) * 16, (cy + 0.5) * 16
    resized_box = np.clip([centre_x - 16, centre_y - 16, centre_x + 16, centre_y + 16], 0, [new_w, new_h, new_w, new_h])
    expected = resized_box / np.array([scale_x, scale_y, scale_x, scale_y])
    np.testing.assert_allclose(result.boxes[0].numpy(), expected, atol=1e-3)
    assert (result.width, result.height) == (width, height)


def test_batch_clips_each_image_to_its_own_size(tmp_path):
    """Pitfall 6: a padded batch must not let the small image's boxes reach into the padding."""
    model = _bright_cell_model(tmp_path)
    wide = Image.fromarray(np.full((64, 256, 3), 255, np.uint8))
    small = Image.fromarray(np.full((64, 64, 3), 255, np.uint8))
    prepared = [prepare_image(image, model.spec.preprocess) for image in (wide, small)]
    results = proposals_for_batch(model, prepared, model.spec.proposal_layer())
    assert results[1].boxes.shape[0] == 16
    assert float(results[1].boxes[:, 2].max()) <= 64 and float(results[1].boxes[:, 3].max()) <= 64
    assert float(results[0].boxes[:, 2].max()) == 256


def test_spec_json_is_complete(tmp_path):
    _bright_cell_model(tmp_path)
    data = read_spec(tmp_path / "bright.safetensors").to_dict()
    for key in ("backbone", "levels", "head", "score", "anchor_offset", "preprocess", "provenance", "box_weights"):
        assert key in data
    assert json.loads(json.dumps(data)) == data


def test_a_checkpoint_written_before_the_typed_description_reads_back_unchanged(tmp_path):
    # The description the dict-based version wrote into the fourth stage's default checkpoint (its
    # provenance cut short): it must come back key for key.
    from safetensors.torch import save_file

    from rpn_cli.io.checkpoint import METADATA_KEY, read_spec

    stored = json.loads((Path(__file__).parent / "data" / "description_before_typed_spec.json").read_text())
    save_file({"unused": torch.zeros(1)}, tmp_path / "old.safetensors", metadata={METADATA_KEY: json.dumps(stored)})
    spec = read_spec(tmp_path / "old.safetensors")
    assert spec.preprocess.size == stored["preprocess"]["size"] and spec.levels[0].stride == stored["levels"][0]["stride"]
    now = spec.to_dict()
    assert set(now) == set(stored)
    for key, value in stored.items():
        if not isinstance(value, dict):
            assert now[key] == value, key
            continue
        assert {k: now[key][k] for k in value} == value, key  # nothing lost or changed
        added = {k: v for k, v in now[key].items() if k not in value}
        defaults = {"head": {"conv_depth": 1}, "preprocess": {"size_divisible": 1},
                    "proposals": {"top_n_before_filtering": False, "vote_iou": 0.0}}  # fields newer than the file
        assert added == defaults.get(key, {}), key
    assert ModelSpec.from_dict(now).to_dict() == now


def test_a_description_with_a_key_this_version_does_not_know_still_loads():
    from rpn_cli.model.spec import ModelSpec, default_mobilenet_spec

    data = default_mobilenet_spec().to_dict()
    data["head"]["from_the_future"] = 1
    data["levels"][0]["also_new"] = "x"
    spec = ModelSpec.from_dict(data)
    assert spec.head.mid_channels == 128 and spec.to_dict() == default_mobilenet_spec().to_dict()


def test_level_offsets_are_saved_with_the_checkpoint_and_left_out_when_there_are_none(tmp_path):
    from dataclasses import replace

    from rpn_cli.io.checkpoint import read_spec, save_checkpoint
    from rpn_cli.model.network import RegionProposalNetwork
    from rpn_cli.model.spec import default_mobilenet_spec

    model = RegionProposalNetwork(default_mobilenet_spec(shorter_side=128, max_size=160))
    assert "level_offsets" not in model.spec.to_dict()["proposals"]  # files without offsets are as before
    model.spec.proposals = replace(model.spec.proposals, level_offsets=(0.0, 0.25, -0.75))
    save_checkpoint(model, tmp_path / "offsets.safetensors")
    spec = read_spec(tmp_path / "offsets.safetensors")
    assert spec.proposals.level_offsets == (0.0, 0.25, -0.75)
    assert spec.to_dict()["proposals"]["level_offsets"] == [0.0, 0.25, -0.75]
    with pytest.raises(UsageError, match="level offsets 1,2: expected 3, one a pyramid level of this model"):
        spec.proposal_layer(level_offsets=(1.0, 2.0))
