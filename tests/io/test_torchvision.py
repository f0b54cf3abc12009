"""torchvision Faster R-CNN checkpoints: our proposals equal ``model.rpn``'s in test mode."""

import pytest
import torch
from conftest import SAMPLES
from PIL import Image
from torchvision.models import detection
from torchvision.transforms.functional import to_tensor
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.errors import CheckpointError
from rpn_cli.inference.predict import proposals_for_batch
from rpn_cli.inference.runtime import load_model
from rpn_cli.io.checkpoint import load_checkpoint
from rpn_cli.io.converters import convert_torchvision
from rpn_cli.model.backbones import TORCHVISION_ARCHS
from rpn_cli.model.folding import fold_batchnorm
from rpn_cli.model.preprocess import prepare_image

# A square photo and a landscape one; the second is also turned to portrait.
IMAGES = ["astronaut.jpg", "rocket.jpg"]


def _torchvision_proposals(detector, image: Image.Image) -> torch.Tensor:
    """model.rpn's test-mode proposals, mapped from torchvision's resized image back to the original's pixels."""
    with torch.no_grad():
        images, _ = detector.transform([to_tensor(image)])
        features = detector.backbone(images.tensors)
        boxes = detector.rpn(images, features)[0][0]
    resized_h, resized_w = images.image_sizes[0]
    scale = torch.tensor([resized_w / image.width, resized_h / image.height] * 2)
    return boxes / scale


# The ResNet-50 detectors take most of this file's time: the heavy run checks them, the default run the
# MobileNetV3 ones (the same conversion code).
@pytest.fixture(scope="module", params=[
    pytest.param(arch, marks=[pytest.mark.heavy] if "resnet50" in arch else []) for arch in sorted(TORCHVISION_ARCHS)])
def converted(request, tmp_path_factory):
    arch = request.param
    torch.manual_seed(0)
    detector = getattr(detection, arch)(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for module in detector.modules():  # statistics as a trained model has them, not the identity
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp(arch)
    torch.save(detector.state_dict(), folder / "detector.pth")
    convert_torchvision(folder / "detector.pth", folder / "rpn.safetensors", arch)
    return arch, detector, folder


def test_proposals_equal_torchvision(converted):
    arch, detector, folder = converted
    model = load_model(folder / "rpn.safetensors", "cpu", "float32")  # as rpn propose --precision float32 loads it
    photos = [Image.open(SAMPLES / name).convert("RGB") for name in IMAGES]
    photos.append(photos[1].transpose(Image.Transpose.ROTATE_90))
    for photo in photos:
        expected = _torchvision_proposals(detector, photo)
        ours = proposals_for_batch(model, [prepare_image(photo, model.spec.preprocess)], model.spec.proposal_layer())[0]
        assert ours.boxes.shape == expected.shape and expected.shape[0] > 0, arch
        torch.testing.assert_close(ours.boxes, expected, rtol=0, atol=1e-3)


def test_reduced_precision_folds_batchnorm(converted):
    arch, _, folder = converted

    def norms(model):
        return sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())

    full = load_model(folder / "rpn.safetensors", "cpu", "float32")
    assert norms(full) > 0  # kept in float32, for parity with torchvision
    folded = load_checkpoint(folder / "rpn.safetensors", "cpu")
    assert fold_batchnorm(folded) == norms(full)
    images = prepare_image(Image.open(SAMPLES / "coffee.jpg").convert("RGB"), full.spec.preprocess).tensor[None]
    with torch.inference_mode():
        for exact, approx in zip(full.raw_outputs(images), folded.raw_outputs(images)):
            torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-4)
    reduced = load_model(folder / "rpn.safetensors", "cpu", "bfloat16")
    assert norms(reduced) == 0 and reduced.precision == "bfloat16"  # no normalisation runs in bfloat16
    assert all(parameter.dtype == torch.bfloat16 for parameter in reduced.parameters())


def test_propose_and_anchors_work_on_a_converted_checkpoint(converted, tmp_path):
    arch, _, folder = converted
    runner = CliRunner()
    result = runner.invoke(cli.app, ["propose", str(SAMPLES / "coffee.jpg"), "-c", str(folder / "rpn.safetensors"),
                                     "--out", str(tmp_path), "--format", "json,png", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "coffee.json").exists() and (tmp_path / "coffee.png").exists()
    picture = tmp_path / "anchors.png"
    result = runner.invoke(cli.app, ["anchors", "-c", str(folder / "rpn.safetensors"), "--out", str(picture)])
    assert result.exit_code == 0 and picture.exists()
    assert result.stdout.count("\n") > 5


def test_missing_or_mis_shaped_keys_are_named(tmp_path):
    torch.manual_seed(0)
    state = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).state_dict()
    broken = dict(state)
    del broken["rpn.head.bbox_pred.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing key rpn.head.bbox_pred.weight"):
        convert_torchvision(tmp_path / "missing.pth", tmp_path / "out.safetensors", "fasterrcnn_mobilenet_v3_large_320_fpn")
    broken = dict(state)
    broken["backbone.fpn.inner_blocks.0.0.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"backbone.fpn.inner_blocks.0.0.weight has shape \(3, 3\)"):
        convert_torchvision(tmp_path / "shape.pth", tmp_path / "out.safetensors", "fasterrcnn_mobilenet_v3_large_320_fpn")
    result = CliRunner().invoke(cli.app, ["convert", "--from", "torchvision", str(tmp_path / "shape.pth"),
                                          str(tmp_path / "out.safetensors"), "--arch", "fasterrcnn_mobilenet_v3_large_320_fpn"])
    assert result.exit_code == 3 and "inner_blocks.0.0.weight" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_old_layout_and_frozen_batchnorm_files_convert(tmp_path):
    """torchvision's hosted COCO weights: keys saved before Conv2dNormActivation (``rpn.head.conv.weight``,
    ``fpn.inner_blocks.0.weight``) and frozen BatchNorm without ``num_batches_tracked``."""
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    state = getattr(detection, arch)(weights=None, weights_backbone=None).state_dict()
    torch.save(state, tmp_path / "current.pth")
    old = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for blocks in ("inner_blocks", "layer_blocks"):
            for index in range(3):
                key = key.replace(f"fpn.{blocks}.{index}.0.", f"fpn.{blocks}.{index}.")
        old[key] = value
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.0.weight" in old
    torch.save(old, tmp_path / "old.pth")
    convert_torchvision(tmp_path / "current.pth", tmp_path / "current.safetensors", arch)
    convert_torchvision(tmp_path / "old.pth", tmp_path / "old.safetensors", arch)
    expected = load_checkpoint(tmp_path / "current.safetensors").state_dict()
    actual = load_checkpoint(tmp_path / "old.safetensors").state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
