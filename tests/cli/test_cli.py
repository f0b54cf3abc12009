"""The command line, through Typer's runner and as a subprocess, on real files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLES, run_rpn, run_rpn_process
from images_for_tests import write_test_images
from PIL import Image
from seed_reference import SEED_PRINTED_ANCHOR_BASE
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.inference.predict import proposals_for_batch
from rpn_cli.io.checkpoint import load_checkpoint
from rpn_cli.io.images import load_image
from rpn_cli.model.network import parameter_count
from rpn_cli.model.preprocess import prepare_image

runner = CliRunner()
SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    files = write_test_images(folder)
    return folder, files


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_propose_jsonl_matches_the_library_in_original_pixels(checkpoint):
    result = run_rpn("propose", *SAMPLE_FILES, "--checkpoint", checkpoint, "--quiet", "--precision", "float32",
                     check=True)
    records = _records(result.stdout)
    assert [r["image"] for r in records] == [str(p) for p in SAMPLE_FILES]
    model = load_checkpoint(checkpoint)
    for record, path in zip(records, SAMPLE_FILES):
        with Image.open(path) as image:
            assert (record["width"], record["height"]) == image.size
        boxes, scores = np.array(record["boxes"]).reshape(-1, 4), np.array(record["scores"])
        assert 0 < len(scores) <= 300 and len(boxes) == len(scores)
        assert np.all(np.diff(scores) <= 0) and scores.min() >= 0 and scores.max() <= 1
        assert boxes[:, [0, 2]].max() <= record["width"] and boxes[:, [1, 3]].max() <= record["height"]
        assert boxes.min() >= 0 and np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
        expected = proposals_for_batch(model, [prepare_image(load_image(path), model.spec.preprocess)],
                                       model.spec.proposal_layer())[0]
        np.testing.assert_allclose(boxes, expected.boxes.numpy(), atol=0.006)
        np.testing.assert_allclose(scores, expected.scores.numpy(), atol=1e-6)


def test_options_limit_the_output(checkpoint):
    result = run_rpn("propose", SAMPLE_FILES[0], "-c", checkpoint, "-q", "--top-k", "7", check=True)
    assert len(_records(result.stdout)[0]["boxes"]) == 7
    result = run_rpn("propose", SAMPLE_FILES[0], "-c", checkpoint, "-q", "--post-nms-top-n", "20", "--nms-iou", "0.5",
                     "--min-size", "40", "--pre-nms-top-n", "100", check=True)
    record = _records(result.stdout)[0]
    boxes = np.array(record["boxes"])
    assert len(boxes) <= 20
    scale = 256 / min(record["width"], record["height"])
    assert np.all((boxes[:, 2] - boxes[:, 0]) * scale >= 40 - 0.05)
    result = run_rpn("propose", SAMPLE_FILES[0], "-c", checkpoint, "-q", "--min-score", "0.999", check=True)
    assert all(s >= 0.999 for s in _records(result.stdout)[0]["scores"])
    plain, voted = (_records(run_rpn("propose", SAMPLE_FILES[0], "-c", checkpoint, "-q", "--vote-iou", iou,
                                     check=True).stdout)[0] for iou in ("0", "0.7"))
    assert voted["scores"] == plain["scores"] and voted["boxes"] != plain["boxes"]  # voting moves boxes only


def test_out_folder_json_png_and_coco(checkpoint, tmp_path):
    out = tmp_path / "out"
    stdout = run_rpn("propose", *SAMPLE_FILES, "-c", checkpoint, "-q", check=True).stdout
    run_rpn("propose", *SAMPLE_FILES, "-c", checkpoint, "-q", "--out", out, "--format", "json,png", check=True)
    for record, path in zip(_records(stdout), SAMPLE_FILES):
        written = json.loads((out / f"{path.stem}.json").read_text())
        assert written == record
        with Image.open(out / f"{path.stem}.png") as overlay:  # the photo, and a legend strip below it
            assert overlay.width == record["width"] and record["height"] < overlay.height < record["height"] * 1.2
    assert not list(out.glob(".*tmp"))
    coco_file = tmp_path / "results.json"
    run_rpn("propose", *SAMPLE_FILES, "-c", checkpoint, "-q", "--out", coco_file, "--format", "coco", check=True)
    results = json.loads(coco_file.read_text())
    first = _records(stdout)[0]
    mine = [r for r in results if r["image_id"] == 1]  # names that are no numbers: 1..N in input order
    assert len(mine) == len(first["boxes"]) and all(r["category_id"] == 1 for r in mine)
    x1, y1, x2, y2 = first["boxes"][0]
    assert mine[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.011)


def test_bad_inputs_are_reported_and_the_run_goes_on(checkpoint, bad_folder):
    folder, files = bad_folder
    result = run_rpn("propose", folder, files["jpeg"], folder / "absent.jpg", "-c", checkpoint)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    for kind in ("empty", "text", "truncated", "corrupt", "huge"):
        assert any(str(files[kind]) in line for line in errors), kind
    assert any("absent.jpg: no such file" in line for line in errors)
    assert len(errors) == 6 and "Traceback" not in result.stderr
    good = {"jpeg", "png", "bmp", "tiff", "webp", "grey", "palette", "rgba", "16bit", "exif"}
    assert len(_records(result.stdout)) == len(good) + 1
    assert "11 images" in result.stderr and "6 failed" in result.stderr


def test_fail_fast_stops_at_the_first_failure(checkpoint, bad_folder):
    _, files = bad_folder
    result = run_rpn("propose", files["jpeg"], files["empty"], files["png"], "-c", checkpoint, "--fail-fast", "-q")
    assert result.returncode == 1
    assert len(_records(result.stdout)) == 1 and "empty file" in result.stderr


# auto is onnxruntime on CPUs without bfloat16: its note on a first build must not come before the error.
@pytest.mark.parametrize("backend", ["auto", "torch", "onnxruntime"])
def test_checkpoint_errors_are_one_line(tmp_path, backend):
    missing = run_rpn("propose", SAMPLE_FILES[0], "-c", tmp_path / "nope.safetensors", "--backend", backend)
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1 and "nope.safetensors" in missing.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    result = run_rpn("propose", SAMPLE_FILES[0], "-c", junk, "--backend", backend)
    assert result.returncode == 3 and str(junk) in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_no_default_checkpoint_says_so(monkeypatch, tmp_path):
    from rpn_cli.cli import base

    monkeypatch.setattr(base, "DEFAULT_CHECKPOINT", tmp_path / "absent.safetensors")
    result = runner.invoke(cli.app, ["propose", str(SAMPLE_FILES[0])])
    assert result.exit_code == 2 and "no default checkpoint" in result.output


def test_skip_existing_resumes_a_folder_run(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in SAMPLE_FILES:
        shutil.copy(path, images / path.name)
    out = tmp_path / "out"
    run_rpn("propose", images, "-c", checkpoint, "--out", out, "-q", check=True)
    kept = out / "astronaut.json"
    before = kept.stat().st_mtime_ns
    (out / "coffee.json").unlink()
    result = run_rpn("propose", images, "-c", checkpoint, "--out", out, "--skip-existing", check=True)
    assert "1 images" in result.stderr and "3 skipped" in result.stderr
    assert (out / "coffee.json").exists() and kept.stat().st_mtime_ns == before


def test_closed_stdout_ends_quietly(checkpoint, tmp_path):
    command = (f"printf '%s\\n' {' '.join(str(p) for p in SAMPLE_FILES * 5)} | "
               f"{sys.executable} -m rpn_cli propose - -c {checkpoint} -q | head -n 1; echo \"status ${{PIPESTATUS[1]}}\" >&2")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout)["image"] == str(SAMPLE_FILES[0])
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
    assert result.stderr.strip().endswith("status 141")


def test_two_runs_give_identical_output_in_input_order(checkpoint):
    order = [SAMPLE_FILES[2], SAMPLE_FILES[0], SAMPLE_FILES[3], SAMPLE_FILES[1]]
    first = run_rpn("propose", *order, "-c", checkpoint, "-q", "--workers", "3", check=True).stdout
    second = run_rpn("propose", *order, "-c", checkpoint, "-q", "--workers", "0", check=True).stdout
    assert first == second
    assert [r["image"] for r in _records(first)] == [str(p) for p in order]


def test_stdin_list_and_glob(checkpoint):
    listed = run_rpn("propose", "-", "-c", checkpoint, "-q", input=f"{SAMPLE_FILES[1]}\n{SAMPLE_FILES[0]}\n", check=True)
    assert [r["image"] for r in _records(listed.stdout)] == [str(SAMPLE_FILES[1]), str(SAMPLE_FILES[0])]
    globbed = run_rpn("propose", str(SAMPLES / "c*.jpg"), "-c", checkpoint, "-q", check=True)
    assert [r["image"] for r in _records(globbed.stdout)] == [str(SAMPLES / "chelsea.jpg"), str(SAMPLES / "coffee.jpg")]


def test_anchors_table_with_seed_defaults_and_png(tmp_path):
    out = tmp_path / "anchors.png"
    result = runner.invoke(cli.app, ["anchors", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    # The seed's rows are (-h/2, -w/2, h/2, w/2): the heights its loop meant are columns 2 - 0.
    seed_heights = SEED_PRINTED_ANCHOR_BASE[:, 2] - SEED_PRINTED_ANCHOR_BASE[:, 0]
    assert [round(r["height"], 2) for r in rows] == [round(float(v), 2) for v in seed_heights]
    assert [round(r["ratio"], 3) for r in rows] == [0.5] * 3 + [1.0] * 3 + [2.0] * 3
    with Image.open(out) as picture:
        assert picture.size == (800, 600)
    table = runner.invoke(cli.app, ["anchors", "--ratios", "1", "--scales", "2", "--stride", "8"])
    assert table.exit_code == 0 and "16.0" in table.stdout


def test_anchors_of_a_checkpoint_over_an_image(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(cli.app, ["anchors", "-c", str(checkpoint), "--image", str(SAMPLE_FILES[0]), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted({r["stride"] for r in rows}) == [8, 16, 32]
    with Image.open(out) as picture:
        assert min(picture.size) == 256  # drawn on the image as the checkpoint resizes it


def test_anchors_refuses_options_it_would_ignore_and_prints_nothing_before_an_error(checkpoint, tmp_path):
    cases = [
        (["-c", str(checkpoint), "--ratios", "1"], 2, "--ratios: not with --checkpoint"),
        (["-c", str(checkpoint), "--scales", "4", "--stride", "8"], 2, "--scales, --stride: not with --checkpoint"),
        (["--image", str(SAMPLE_FILES[0])], 2, "--image: the grid is drawn over it in a PNG; name that file with --out"),
        (["--image", str(tmp_path / "none.jpg"), "--out", str(tmp_path / "g.png")], 4, "none.jpg"),
    ]
    for args, code, message in cases:
        result = runner.invoke(cli.app, ["anchors", *args])
        assert result.exit_code == code and message in result.stderr, (args, result.output)
        assert result.stdout == "" and result.stderr.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_info_prints_description_and_parameters(checkpoint):
    result = runner.invoke(cli.app, ["info", str(checkpoint), "--json"])
    assert result.exit_code == 0
    described = json.loads(result.stdout)
    assert described["parameters"] == parameter_count(load_checkpoint(checkpoint))
    assert described["backbone"]["name"] == "mobilenet_v2_fpn"
    human = runner.invoke(cli.app, ["info", str(checkpoint)])
    assert "parameters" in human.stdout and "mobilenet_v2_fpn" in human.stdout
    assert "head         1 3x3 convolution of 128 channels, then the outputs\n" in human.stdout


def test_info_names_a_deeper_head(checkpoint, tmp_path):
    from rpn_cli.io.checkpoint import save_checkpoint
    from rpn_cli.model.network import deepened_head

    save_checkpoint(deepened_head(load_checkpoint(checkpoint), 3), tmp_path / "deeper.safetensors")
    human = runner.invoke(cli.app, ["info", str(tmp_path / "deeper.safetensors")])
    assert human.exit_code == 0
    assert "head         3 3x3 convolutions of 128 channels, then the outputs\n" in human.stdout


def test_usage_errors(checkpoint, tmp_path):
    result = runner.invoke(cli.app, ["propose", str(SAMPLE_FILES[0]), "-c", str(checkpoint), "--format", "png"])
    assert result.exit_code == 2 and "--out" in result.output
    result = runner.invoke(cli.app, ["propose", str(SAMPLE_FILES[0]), "-c", str(checkpoint), "--nms-iou", "3"])
    assert result.exit_code == 2 and "IoU" in result.output
    result = runner.invoke(cli.app, ["propose", str(SAMPLE_FILES[0]), "-c", str(checkpoint), "--vote-iou", "-0.1"])
    assert result.exit_code == 2 and "error: voting IoU must be in [0, 1] (0: no voting), got -0.1" in result.output
    result = runner.invoke(cli.app, ["propose", str(tmp_path), "-c", str(checkpoint)])
    assert result.exit_code == 2 and "no images" in result.output
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(SAMPLE_FILES[0], tmp_path / "a" / "x.jpg")
    shutil.copy(SAMPLE_FILES[1], tmp_path / "b" / "x.jpg")
    result = runner.invoke(cli.app, ["propose", str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.jpg"),
                                     "-c", str(checkpoint), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "both write" in result.output


def test_the_rpn_script_and_python_m_rpn_cli_behave_the_same():
    """Both entry points, as processes: the same output and exit codes (one-line usage errors included)."""
    import os

    script = Path(sys.executable).parent / "rpn"
    if not script.is_file():
        pytest.skip(f"no rpn script beside {sys.executable} (the package is not installed in this environment)")
    for arguments in (["--version"], ["propose", "--bogus"], ["anchors", "--stride", "0"]):
        module = run_rpn_process(*arguments)
        console = subprocess.run([str(script), *arguments], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert (module.returncode, module.stdout, module.stderr) == (console.returncode, console.stdout,
                                                                     console.stderr)
    assert module.returncode == 2 and module.stderr.count("\n") == 1 and "Traceback" not in module.stderr


def test_overlay_colours_by_rank_and_a_contact_sheet(checkpoint, tmp_path, capsys):
    from rpn_cli.io.visualize import RANK_COLOURS

    out, sheet = tmp_path / "out", tmp_path / "sheet.png"
    status = cli.app.run(["propose", *map(str, SAMPLE_FILES), "-c", str(checkpoint), "-q", "--out", str(out),
                          "--format", "png", "--sheet", str(sheet)])
    assert status == 0, capsys.readouterr().err
    for path in SAMPLE_FILES:
        with Image.open(out / f"{path.stem}.png") as overlay, Image.open(path) as photo:
            pixels = np.asarray(overlay.convert("RGB"))[: photo.height]
            changed = (pixels != np.asarray(photo.convert("RGB"))).any(axis=2)
            # The best box is drawn in the first rank colour, under it a dark outline.
            assert changed.any() and (pixels == RANK_COLOURS[0]).all(axis=2).sum() > 50
    with Image.open(sheet) as picture:  # 4 thumbnails of at most 200 px in one row
        assert 4 * 200 < picture.width < 4 * 230 and 200 < picture.height < 260
