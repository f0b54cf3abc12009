"""Our MobileNetV2 trunk and feature pyramid against torchvision's modules, the import they spare,
and BatchNorm folding for inference."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLES
from torchvision.models import mobilenet_v2
from torchvision.ops import FeaturePyramidNetwork

from rpn_cli.io.converters import load_imagenet_weights
from rpn_cli.io.images import load_image
from rpn_cli.model.backbones import build_backbone
from rpn_cli.model.folding import fold_batchnorm
from rpn_cli.model.mobilenet import FeaturePyramid, mobilenet_v2_features
from rpn_cli.model.network import RegionProposalNetwork
from rpn_cli.model.preprocess import prepare_image
from rpn_cli.model.spec import (
    BackboneSpec,
    default_mobilenet_spec,
    imagenet_preprocess,
    seed_project_spec,
)


def _photo() -> torch.Tensor:
    return prepare_image(load_image(SAMPLES / "chelsea.jpg"), imagenet_preprocess(320, 640)).tensor[None]


def test_mobilenet_v2_features_equal_torchvision():
    torch.manual_seed(0)
    reference = mobilenet_v2(weights=None).features.eval()
    ours = mobilenet_v2_features().eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    # Random BatchNorm statistics, so that a misplaced BatchNorm or ReLU6 shows.
    state = {key: torch.rand_like(value) + 0.5 if value.is_floating_point() and "running_var" in key
             else torch.randn_like(value) * 0.1 if value.is_floating_point() else value
             for key, value in reference.state_dict().items()}
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    image = _photo()
    with torch.no_grad():
        for index in (7, 14, 18, 19):
            torch.testing.assert_close(ours[:index](image), reference[:index](image), rtol=0, atol=0)


def test_feature_pyramid_equals_torchvision():
    torch.manual_seed(0)
    channels = [32, 96, 320]
    reference = FeaturePyramidNetwork(channels, 64)
    ours = FeaturePyramid(channels, 64)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    # Odd sizes: the upsampled map must take the lateral map's size, not twice its own.
    features = [torch.randn(1, 32, 41, 55), torch.randn(1, 96, 21, 28), torch.randn(1, 320, 11, 14)]
    expected = list(reference({str(i): f for i, f in enumerate(features)}).values())
    with torch.no_grad():
        for a, b in zip(ours(features), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_imagenet_weights_load_into_our_trunk(tmp_path):
    torch.manual_seed(1)
    reference = mobilenet_v2(weights=None)
    torch.save(reference.state_dict(), tmp_path / "mobilenet_v2.pth")
    backbone = build_backbone(BackboneSpec("mobilenet_v2_fpn", fpn_channels=64))
    load_imagenet_weights(backbone, BackboneSpec("mobilenet_v2_fpn"), tmp_path / "mobilenet_v2.pth")
    stage_two = backbone.stages[1].state_dict()
    assert stage_two and all(torch.equal(value, reference.state_dict()[f"features.{key}"])
                             for key, value in stage_two.items())


def test_resnet50_imagenet_weights_fill_the_c4_trunk(tmp_path):
    from torchvision.models import resnet50

    from rpn_cli.errors import CheckpointError

    torch.manual_seed(2)
    reference = resnet50(weights=None).eval()
    with torch.no_grad():  # statistics unlike a fresh model's, so that loading them shows
        for bn in (reference.bn1, reference.layer3[5].bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    backbone = build_backbone(BackboneSpec("resnet50-c4")).eval()
    load_imagenet_weights(backbone, BackboneSpec("resnet50-c4"), tmp_path / "resnet50.pth")
    layer3 = backbone.body[6]
    assert torch.equal(layer3[5].conv3.weight, reference.layer3[5].conv3.weight)
    assert torch.equal(layer3[5].bn3.running_var, reference.layer3[5].bn3.running_var)
    assert torch.equal(backbone.body[1].running_var, reference.bn1.running_var)
    # The stem takes RGB / 255 (the seed project's input) and gives what torchvision's gives on the
    # ImageNet-normalised image, except where the 7x7 kernel reaches into the padding.
    image = torch.rand(1, 3, 64, 80)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = backbone.body[1](backbone.body[0](image))
        expected = reference.bn1(reference.conv1((image - mean) / std))
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours[..., 0, :], expected[..., 0, :], atol=1e-3)
    # MobileNetV2 weights are not ResNet-50 weights: the error names the file and a missing key.
    torch.save(mobilenet_v2(weights=None).state_dict(), tmp_path / "mobilenet_v2.pth")
    with pytest.raises(CheckpointError, match=r"mobilenet_v2\.pth \(torchvision ResNet-50 ImageNet weights\): "
                                              r"missing key conv1\.weight \(and \d+ more\)"):
        load_imagenet_weights(backbone, BackboneSpec("resnet50-c4"), tmp_path / "mobilenet_v2.pth")
    (tmp_path / "text.pth").write_text("not a state dict")
    with pytest.raises(CheckpointError, match=r"text\.pth: not a readable PyTorch state dict"):
        load_imagenet_weights(backbone, BackboneSpec("resnet50-c4"), tmp_path / "text.pth")


def test_propose_with_our_checkpoints_does_not_import_torchvision(tmp_path):
    # A fresh interpreter, the command run in-process (the entry point would exit before we look).
    script = ("import sys\n"
              "from typer.testing import CliRunner\n"
              "from rpn_cli.cli import app\n"
              f"result = CliRunner().invoke(app, ['propose', {str(SAMPLES / 'coffee.jpg')!r}, '-q', '--out', "
              f"{str(tmp_path)!r}, '--format', 'json,png,coco'])\n"
              "assert result.exit_code == 0, result.output\n"
              "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torchvision'))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == "[]", result.stdout
    assert (tmp_path / "coffee.png").exists()


@pytest.mark.parametrize("spec", [default_mobilenet_spec, seed_project_spec,
                                  lambda: default_mobilenet_spec(backbone="efficientnet_lite0_fpn")],
                         ids=["mobilenet_v2_fpn", "resnet50-c4", "efficientnet_lite0_fpn"])
def test_folding_batchnorm_keeps_the_outputs(spec):
    torch.manual_seed(0)
    model = RegionProposalNetwork(spec())
    for layer in model.modules():  # BatchNorm statistics far from identity, so that folding matters
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.data.uniform_(0.5, 1.5)
    model.eval()
    norms = sum(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())
    image = _photo()
    with torch.no_grad():
        expected = model.raw_outputs(image)
        assert fold_batchnorm(model) == norms
        assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())
        for a, b in zip(model.raw_outputs(image), expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
