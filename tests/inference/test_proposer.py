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


def test_an_image_in_memory_reads_as_a_file_of_its_mode_does(small_checkpoint, tmp_path):
    proposer = rpn_cli.Proposer(small_checkpoint, precision="float32", top_k=20)
    grey = np.asarray(Image.open(SAMPLES / "coffee.jpg").convert("L"), np.uint16) * 257
    rgba = np.asarray(Image.open(SAMPLES / "coffee.jpg").convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 2, 3] = 0  # the left half transparent
    made = {"i16.png": Image.fromarray(grey), "rgba.png": Image.fromarray(rgba, "RGBA")}
    for name, image in made.items():
        image.save(tmp_path / name)
        from_file, in_memory = proposer(tmp_path / name), proposer(Image.open(tmp_path / name))
        assert torch.equal(in_memory.boxes, from_file.boxes) and torch.equal(in_memory.scores, from_file.scores)
    # The 16-bit photo reads as its 8-bit self, not as white (Pillow's own convert("RGB") clips it).
    eight_bit = proposer(Image.fromarray((grey // 257).astype(np.uint8)))
    torch.testing.assert_close(proposer(made["i16.png"]).scores, eight_bit.scores)


@pytest.mark.parametrize("wrong, message", [
    (torch.full((3, 8, 8), 200.0), r"a float tensor image must hold values in \[0, 1\], not 200 to 200"),
    (torch.full((3, 8, 8), float("nan")), "it holds nan"),
    (torch.zeros((3, 8, 8), dtype=torch.int64), "must be uint8, or float in"),
    (torch.zeros((3, 8, 8), dtype=torch.bool), "must be uint8, or float in"),
    (np.zeros((0, 0, 3), np.uint8), "an image of 0x0 pixels has nothing to propose on"),
    (Image.new("RGB", (0, 4)), "an image of 0x4 pixels"),
    ("", "an empty path: give an image file"),  # Path("") is the current folder
])
def test_images_in_memory_that_cannot_be_read_as_meant_are_refused(small_checkpoint, wrong, message):
    proposer = rpn_cli.Proposer(small_checkpoint, precision="float32")
    with pytest.raises(UsageError, match=message):
        proposer(wrong)


@pytest.mark.parametrize("options, message", [
    ({"top_k": 0}, "top_k 0: expected a whole number from 1 up, or None"),
    ({"top_k": -1}, "top_k -1: expected a whole number"),  # a slice would have kept all but one
    ({"top_k": 2.5}, "top_k 2.5: expected a whole number"),
    ({"max_pixels": 0}, "max_pixels 0: expected a whole number"),
    ({"nms_iou": "0.5"}, "nms_iou '0.5': expected a number"),
    ({"post_nms_top_n": 10.0}, "post_nms_top_n 10.0: expected a whole number"),
])
def test_proposer_options_are_checked_when_it_is_made(small_checkpoint, options, message):
    with pytest.raises(UsageError, match=message):
        rpn_cli.Proposer(small_checkpoint, **options)


def test_stream_takes_paths_and_sane_settings(small_checkpoint):
    proposer = rpn_cli.Proposer(small_checkpoint, precision="float32", top_k=np.int64(5))
    assert len(proposer(SAMPLE_FILES[0]).scores) == 5
    # numpy integers count as whole numbers, as for top_k.
    assert len(list(proposer.stream(SAMPLE_FILES[:2], batch_size=np.int64(2), workers=np.int32(0),
                                    lanes=np.int64(1)))) == 2
    assert repr(proposer).startswith(f"Proposer({small_checkpoint}, mobilenet_v2_fpn, float32 on cpu")
    for entries, options, message in (([Image.open(SAMPLE_FILES[0])], {}, "not a JpegImageFile; call the proposer"),
                                      ([None], {}, "not a NoneType"),
                                      ([SAMPLES], {"batch_size": 0}, "batch_size 0: expected 1 or more"),
                                      ([SAMPLES], {"workers": -1}, "workers -1: expected 0 or more"),
                                      ([SAMPLES], {"batch_size": 2.0}, "batch_size 2.0: expected 1 or more"),
                                      ([SAMPLES], {"lanes": 0}, "lanes 0: expected 1 or more"),
                                      ([SAMPLES], {"lanes": True}, "lanes True: expected 1 or more"),
                                      ([""], {}, "an empty path: give a file, a folder or a glob")):
        with pytest.raises(UsageError, match=message):
            list(proposer.stream(entries, **options))


def test_stream_keeps_the_input_order_and_reports_failures(small_checkpoint, tmp_path):
    proposer = rpn_cli.Proposer(small_checkpoint, precision="float32")
    missing = tmp_path / "missing.jpg"
    results = list(proposer.stream([SAMPLE_FILES[2], missing, SAMPLES], batch_size=2))
    assert [r.item.given for r in results] == [str(SAMPLE_FILES[2]), str(missing)] + [str(p) for p in SAMPLE_FILES]
    assert results[1].error is not None and "missing.jpg" in results[1].error and results[1].proposals is None
    single = proposer(SAMPLE_FILES[2])
    assert torch.equal(results[0].proposals.boxes, single.boxes)


def test_the_public_names_are_listed():
    assert {"Proposer", "ImageProposals", "ImageResult", "RpnError"} <= set(dir(rpn_cli))


def test_importing_the_package_does_not_import_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, rpn_cli; print('torch' in sys.modules, rpn_cli.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.split()[0] == "False"
