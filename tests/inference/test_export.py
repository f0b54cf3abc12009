"""ONNX and TorchScript exports: the same network outputs and the same proposals as the checkpoint."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES, run_rpn, run_rpn_process
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


def _unchanged(path, before: bytes) -> bool:
    return path.read_bytes() == before


def test_an_export_never_replaces_its_checkpoint_or_lands_where_rpn_cannot_read_it(tmp_path, small_checkpoint):
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(small_checkpoint.read_bytes())
    before = mine.read_bytes()
    (tmp_path / "a-file").write_text("")
    link = tmp_path / "link.onnx"
    link.symlink_to(mine)
    cases = [
        # One path that is a checkpoint: the destination was forgotten, not meant to be that file.
        (["export", mine], 2, "a checkpoint is what rpn export reads"),
        (["export", mine, mine], 2, "an onnx export is written to a .onnx file"),
        (["export", mine, tmp_path / "m.txt"], 2, "an onnx export is written to a .onnx file"),
        (["export", mine, tmp_path / "m.onnx", "--format", "torchscript"], 2, "a .pt, .torchscript or .ts file"),
        (["export", mine, tmp_path / "m.pt", "--format", "onnx-int8", "--calibration", SAMPLES], 2,
         "an onnx-int8 export is written to a .onnx file"),
        # A destination that is the checkpoint under another name (a link to it).
        (["export", mine, link], 2, "that is the file being read"),
        # Refused before the export runs, in words that say why.
        (["export", mine, tmp_path / "a-file" / "m.onnx"], 6, "a-file is a file, not a folder"),
    ]
    for args, code, message in cases:
        result = run_rpn(*args)
        assert result.returncode == code and message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _unchanged(mine, before) and link.resolve() == mine and not (tmp_path / "a-file").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "link.onnx", "mine.safetensors"]


@pytest.mark.heavy
def test_exporting_the_seed_trunk_prints_only_what_it_wrote(tmp_path):
    # PyTorch's shape solver logs warnings with tracebacks while exporting this trunk: a process shows them.
    torch.manual_seed(0)
    checkpoint = tmp_path / "seed.safetensors"
    save_checkpoint(RegionProposalNetwork(seed_project_spec()), checkpoint)
    result = run_rpn_process("export", checkpoint, tmp_path / "seed.onnx")
    assert result.returncode == 0 and result.stderr == f"wrote {tmp_path / 'seed.onnx'} (onnx)\n", result.stderr


def test_export_errors(tmp_path):
    result = CliRunner().invoke(cli.app, ["export", str(tmp_path / "none.safetensors"), str(tmp_path / "m.onnx")])
    assert result.exit_code == 3 and "none.safetensors" in result.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_model(junk)
