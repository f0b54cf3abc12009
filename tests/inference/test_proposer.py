"""The public API: a Proposer gives the command line's records, from any kind of image."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES
from PIL import Image

import rpn_cli
from rpn_cli import cli
from rpn_cli.errors import UsageError
from rpn_cli.io.outputs import proposal_record

SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_the_proposer_answers_as_the_command_line(default_checkpoint, capsys, precision):
    status = cli.app.run(["propose", *map(str, SAMPLE_FILES), "-q", "--precision", precision])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    proposer = rpn_cli.Proposer(precision=precision)  # the shipped checkpoint, as the CLI's default
    assert proposer.checkpoint == default_checkpoint
    for path, line in zip(SAMPLE_FILES, lines):
        assert json.dumps(proposal_record(str(path), proposer(str(path)))) == line


def test_paths_images_arrays_and_tensors_give_the_same_proposals(small_checkpoint):
    proposer = rpn_cli.Proposer(small_checkpoint, precision="float32", top_k=50)
    path = SAMPLES / "coffee.jpg"
    expected = proposer(path)
    rgb = np.asarray(Image.open(path).convert("RGB")).copy()
    for image in (Image.open(path), rgb, torch.from_numpy(rgb).permute(2, 0, 1),
                  torch.from_numpy(rgb).permute(2, 0, 1).float() / 255):
        got = proposer(image)
        assert (got.width, got.height) == (expected.width, expected.height) == (rgb.shape[1], rgb.shape[0])
        assert torch.equal(got.boxes, expected.boxes) and torch.equal(got.scores, expected.scores)
    assert len(expected.scores) == 50 and bool((expected.scores[:-1] >= expected.scores[1:]).all())
    for wrong in (rgb[:, :, :2], rgb.astype(np.float32), torch.zeros(4, 8, 8), 42):
        with pytest.raises(UsageError):
            proposer(wrong)


def test_stream_keeps_the_input_order_and_reports_failures(small_checkpoint, tmp_path):
    proposer = rpn_cli.Proposer(small_checkpoint, precision="float32")
    missing = tmp_path / "missing.jpg"
    results = list(proposer.stream([SAMPLE_FILES[2], missing, SAMPLES], batch_size=2))
    assert [r.item.given for r in results] == [str(SAMPLE_FILES[2]), str(missing)] + [str(p) for p in SAMPLE_FILES]
    assert results[1].error is not None and "missing.jpg" in results[1].error and results[1].proposals is None
    single = proposer(SAMPLE_FILES[2])
    assert torch.equal(results[0].proposals.boxes, single.boxes)


def test_importing_the_package_does_not_import_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, rpn_cli; print('torch' in sys.modules, rpn_cli.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.split()[0] == "False"
