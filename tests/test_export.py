"""ONNX and TorchScript exports: the same network outputs and the same proposals as the checkpoint."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.errors import CheckpointError
from rpn_cli.export import load_model
from rpn_cli.images import load_image
from rpn_cli.preprocess import pad_batch, prepare_image

from conftest import SAMPLES, run_rpn

pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the onnx extra")
pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (onnx extra)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_checkpoint):
    folder = tmp_path_factory.mktemp("export")
    runner = CliRunner()
    for name, fmt in (("model.onnx", "onnx"), ("model.pt", "torchscript")):
        result = runner.invoke(cli.app, ["export", str(default_checkpoint), str(folder / name), "--format", fmt])
        assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("name", ["model.onnx", "model.pt"])
def test_outputs_equal_pytorch_on_real_images(exported, default_checkpoint, name):
    reference, model = load_model(default_checkpoint), load_model(exported / name)
    assert model.spec.to_dict() == reference.spec.to_dict()
    for sample in ("rocket.jpg", "chelsea.jpg"):  # two sizes: the exported graph's image size is dynamic
        prepared = prepare_image(load_image(SAMPLES / sample), reference.spec.preprocess)
        batch = pad_batch([prepared.tensor])
        with torch.inference_mode():
            expected = reference.raw_outputs(batch)
        actual = model.raw_outputs(batch)
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["model.onnx", "model.pt"])
def test_propose_with_an_exported_file_gives_the_same_proposals(exported, default_checkpoint, name):
    images = [SAMPLES / "astronaut.jpg", SAMPLES / "coffee.jpg"]
    expected = [json.loads(line) for line in
                run_rpn("propose", *images, "-c", default_checkpoint, "-q", "--precision", "float32",
                      check=True).stdout.splitlines()]
    actual = [json.loads(line) for line in
              run_rpn("propose", *images, "-c", exported / name, "-q", check=True).stdout.splitlines()]
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
