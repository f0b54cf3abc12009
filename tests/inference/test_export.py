"""ONNX and TorchScript exports: the same network outputs and the same proposals as the checkpoint."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES, run_rpn
from torchvision.models import detection
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.errors import CheckpointError
from rpn_cli.inference.runtime import load_model
from rpn_cli.io.checkpoint import save_checkpoint
from rpn_cli.io.converters import convert_torchvision
from rpn_cli.io.images import load_image
from rpn_cli.model.network import RegionProposalNetwork
from rpn_cli.model.preprocess import pad_batch, prepare_image
from rpn_cli.model.spec import default_mobilenet_spec, seed_project_spec

pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the onnx extra")
pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (onnx extra)")


# The shipped checkpoint, the seed's single-level ResNet-50 C4 (ceil-mode pooling: its feature size is
# not a plain multiple of the image size), a converted torchvision FPN detector (five levels) and
# EfficientNet-Lite0 + FPN (fixed asymmetric padding before its stride-2 convolutions).
MODELS = ["default", "resnet50-c4", "torchvision-fpn", "efficientnet_lite0_fpn"]


def _checkpoint_for(name: str, folder, default_checkpoint):
    if name == "default":
        return default_checkpoint
    torch.manual_seed(0)
    path = folder / f"{name}.safetensors"
    if name == "resnet50-c4":
        save_checkpoint(RegionProposalNetwork(seed_project_spec()), path)
    elif name == "efficientnet_lite0_fpn":
        save_checkpoint(RegionProposalNetwork(default_mobilenet_spec(backbone=name)), path)
    else:
        arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
        detector = getattr(detection, arch)(weights=None, weights_backbone=None)
        torch.save(detector.state_dict(), folder / "detector.pth")
        convert_torchvision(folder / "detector.pth", path, arch)
    return path


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory, default_checkpoint):
    folder = tmp_path_factory.mktemp(f"export-{request.param}")
    checkpoint = _checkpoint_for(request.param, folder, default_checkpoint)
    runner = CliRunner()
    for name, fmt in (("model.onnx", "onnx"), ("model.pt", "torchscript")):
        result = runner.invoke(cli.app, ["export", str(checkpoint), str(folder / name), "--format", fmt])
        assert result.exit_code == 0, result.output
    return checkpoint, folder


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["model.onnx", "model.pt"])
def test_outputs_equal_pytorch_on_real_images(exported, name):
    checkpoint, folder = exported
    reference, model = load_model(checkpoint), load_model(folder / name, trust_torchscript=True)
    assert model.spec.to_dict() == reference.spec.to_dict()
    photos = [prepare_image(load_image(SAMPLES / sample), reference.spec.preprocess).tensor
              for sample in ("rocket.jpg", "chelsea.jpg")]
    # Two sizes, then both in one padded batch: the exported graph's image size and batch are dynamic.
    for batch in (pad_batch(photos[:1]), pad_batch(photos[1:]), pad_batch(photos)):
        with torch.inference_mode():
            expected = reference.raw_outputs(batch)
        actual = model.raw_outputs(batch)
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["model.onnx", "model.pt"])
def test_propose_with_an_exported_file_gives_the_same_proposals(exported, name):
    checkpoint, folder = exported
    images = [SAMPLES / "astronaut.jpg", SAMPLES / "coffee.jpg"]
    expected = [json.loads(line) for line in
                run_rpn("propose", *images, "-c", checkpoint, "-q", "--precision", "float32",
                      check=True).stdout.splitlines()]
    actual = [json.loads(line) for line in
              run_rpn("propose", *images, "-c", folder / name, "-q", "--trust-torchscript",
                      check=True).stdout.splitlines()]
    for ours, theirs in zip(actual, expected):
        assert len(ours["boxes"]) == len(theirs["boxes"])
        # Outputs agree to ~1e-5; boxes whose scores nearly tie may swap places, nothing else moves.
        np.testing.assert_allclose(ours["scores"], theirs["scores"], atol=1e-4)
        matched = np.isclose(np.array(ours["boxes"]), np.array(theirs["boxes"]), atol=0.02).all(axis=1)
        assert matched.mean() >= 0.98


def test_export_errors(tmp_path):
    result = CliRunner().invoke(cli.app, ["export", str(tmp_path / "none.safetensors"), str(tmp_path / "m.onnx")])
    assert result.exit_code == 3 and "none.safetensors" in result.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_model(junk)
