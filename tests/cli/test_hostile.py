"""Hostile and broken inputs: one line, the documented exit code, no traceback, nothing written outside
--out, inputs unchanged, and nothing in a file runs code without the user's say-so."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SAMPLES
from hostile_files import write_code_running_torchscript
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from rpn_cli import cli
from rpn_cli.io.checkpoint import METADATA_KEY

SAMPLE = SAMPLES / "chelsea.jpg"


def _coco(images, annotations=()):
    return {"images": images, "annotations": list(annotations), "categories": [{"id": 1, "name": "thing"}]}


def _description_variant(source, path, change):
    """A copy of checkpoint ``source`` whose model description is edited by ``change(dict)``."""
    with safe_open(str(source), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        description = json.loads(handle.metadata()[METADATA_KEY])
    change(description)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(description)})


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, small_checkpoint):
    """Every hostile file in one folder, whose contents no failed command may change."""
    folder = tmp_path_factory.mktemp("hostile")
    shutil.copy(SAMPLE, folder / "photo.jpg")
    (folder / "latin1.txt").write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    (folder / "corrupt.parquet").write_bytes(b"PAR1 this is no parquet PAR1")
    good_image = {"id": 1, "file_name": "photo.jpg", "width": 451, "height": 300}
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500}
    broken = {
        "no-id": _coco([{"file_name": "photo.jpg", "width": 451, "height": 300}]),
        "no-file-name": _coco([{"id": 1, "width": 451, "height": 300}]),
        "image-string": _coco(["photo.jpg"]),
        "images-dict": {"images": {"1": good_image}, "annotations": []},
        "bbox-2": _coco([good_image], [{**box, "bbox": [10, 10]}]),
        "bbox-strings": _coco([good_image], [{**box, "bbox": ["a", "b", "c", "d"]}]),
        "bbox-missing": _coco([good_image], [{k: v for k, v in box.items() if k != "bbox"}]),
        "width-string": _coco([{**good_image, "width": "wide"}], [box]),
    }
    for name, content in broken.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    (folder / "binary.json").write_bytes(bytes(range(256)) * 4)
    (folder / "train.json").write_text(json.dumps(_coco([good_image], [box])))
    states = {"random": os.urandom(4096), "no-model": None, "pickle": None}
    for name, content in states.items():
        (folder / f"work-{name}").mkdir()
    (folder / "work-random" / "last.pt").write_bytes(states["random"])
    torch.save({"epoch": 1}, folder / "work-no-model" / "last.pt")
    with open(folder / "work-pickle" / "last.pt", "wb") as handle:
        pickle.dump({"model": shutil.copy}, handle)  # a global a plain unpickler would import
    (folder / "work-torchscript").mkdir()
    write_code_running_torchscript(folder / "work-torchscript" / "last.pt", folder / "marker-train")
    write_code_running_torchscript(folder / "evil.pt", folder / "marker")
    variants = {
        "levels-string": lambda d: d.update(levels="many"),
        "size-negative": lambda d: d["preprocess"].update(size=-512),
        "size-absurd": lambda d: d["preprocess"].update(size=100000),
        "feature-scale-negative": lambda d: d["backbone"].update(feature_scale=-0.1),
        "level-offsets-count": lambda d: d["proposals"].update(level_offsets=[0.5]),
        "level-offsets-strings": lambda d: d["proposals"].update(level_offsets=["a", "b", "c"]),
    }
    for name, change in variants.items():
        _description_variant(small_checkpoint, folder / f"{name}.safetensors", change)
    (folder / "inputs" / "sub").mkdir(parents=True)
    shutil.copy(SAMPLE, folder / "inputs" / "sub" / "photo.jpg")
    (folder / "outside").mkdir()
    (folder / "out-linked").mkdir()
    (folder / "out-linked" / "sub").symlink_to(folder / "outside", target_is_directory=True)
    (folder / "pngs").mkdir()
    Image.open(SAMPLE).save(folder / "pngs" / "photo.png")
    shutil.copy(small_checkpoint, folder / "mine.safetensors")
    torch.save({"weight": torch.zeros(2)}, folder / "state.pth")
    (folder / "export.onnx").write_bytes(b"not an ONNX model")
    (folder / "folder.onnx").mkdir()
    return folder


# (name, arguments, exit code, text of the one stderr line). {d}: the hostile folder; {c}: a small checkpoint.
CASES = [
    ("manifest not UTF-8", ["propose", "--manifest", "{d}/latin1.txt", "-c", "{c}"], 2, "must be UTF-8"),
    ("corrupt Parquet manifest", ["propose", "--manifest", "{d}/corrupt.parquet", "-c", "{c}"], 2,
     "not a readable Parquet file"),
    *[(f"eval: {name}", ["eval", f"{{d}}/{name}.json", "-c", "{c}"], 5, message) for name, message in (
        ("no-id", "images[0] needs an 'id' and a 'file_name'"),
        ("no-file-name", "images[0] needs an 'id' and a 'file_name'"),
        ("image-string", "images[0] needs an 'id' and a 'file_name'"),
        ("images-dict", "needs 'images' and 'annotations' lists"),
        ("bbox-2", "annotations[0] needs a 'bbox' of 4 numbers"),
        ("bbox-strings", "annotations[0] needs a 'bbox' of 4 numbers"),
        ("bbox-missing", "annotations[0] needs a 'bbox' of 4 numbers"),
        ("width-string", "images[0] needs a whole-number 'width' and 'height'"),
        ("binary", "not a readable COCO JSON file"),
    )],
    *[(f"train: last.pt {name}", ["train", "{d}/train.json", "--work-dir", f"{{d}}/work-{name}", "--init", "{c}",
                                  "--validation", "0", "--epochs", "1", "-q"], 3, message) for name, message in (
        ("random", "not a readable training state written by rpn train"),
        ("pickle", "not a readable training state written by rpn train"),
        ("torchscript", "a TorchScript archive"),
        ("no-model", "no model weights"),
    )],
    *[(f"checkpoint: {name}", ["propose", "{d}/photo.jpg", "-c", f"{{d}}/{name}.safetensors"], 3, message)
      for name, message in (("levels-string", "levels must be a non-empty list"),
                            ("size-negative", "preprocess.size must be a number of pixels from 16 to 8192"),
                            ("size-absurd", "preprocess.size must be a number of pixels from 16 to 8192"),
                            ("feature-scale-negative", "backbone.feature_scale must be a number above 0, got -0.1"),
                            ("level-offsets-count", "proposals.level_offsets must be none or 3 numbers from -50 to 50"),
                            ("level-offsets-strings", "proposals.level_offsets must be none or 3 numbers"))],
    ("--level-offsets: too few", ["propose", "{d}/photo.jpg", "-c", "{c}", "--level-offsets", "0,1"], 2,
     "level offsets 0,1: expected 3, one a pyramid level of this model"),
    ("--nms-iou 2, refused before the ONNX model is built", ["propose", "{d}/photo.jpg", "-c", "{d}/mine.safetensors",
                                                          "--backend", "onnxruntime", "--nms-iou", "2"], 2,
     "NMS IoU must be in (0, 1], got 2.0"),
    ("--level-offsets: not numbers", ["eval", "{d}/train.json", "-c", "{c}", "--level-offsets", "a,b,c"], 2,
     "--level-offsets a,b,c: expected comma-separated numbers, one a pyramid level"),
    ("--level-offsets: an empty field", ["propose", "{d}/photo.jpg", "-c", "{c}", "--level-offsets", "0,,-1,0.5"], 2,
     "--level-offsets 0,,-1,0.5: expected one number a pyramid level, none left empty"),
    ("--level-offsets: over 50", ["propose", "{d}/photo.jpg", "-c", "{c}", "--level-offsets", "1e39,0,0"], 2,
     "expected a list of numbers from -50 to 50"),
    ("--level-offsets: infinite", ["propose", "{d}/photo.jpg", "-c", "{c}", "--level-offsets", "0,inf,0"], 2,
     "--level-offsets 0,inf,0: expected finite numbers, one a pyramid level"),
    ("convert: random bytes", ["convert", "{d}/work-random/last.pt", "{d}/never.safetensors"], 3,
     "not a readable PyTorch state dict"),
    ("anchors: stride 0", ["anchors", "--stride", "0"], 2, "Invalid value for '--stride'"),
    ("anchors: negative stride", ["anchors", "--stride", "-16"], 2, "Invalid value for '--stride'"),
    ("anchors: huge scales", ["anchors", "--scales", "1e308", "--json"], 2, "anchors too large or too thin"),
    ("max-pixels 0", ["propose", "{d}/photo.jpg", "-c", "{c}", "--max-pixels", "0"], 2, "Invalid value for '--max-pixels'"),
    ("max-pixels negative", ["propose", "{d}/photo.jpg", "-c", "{c}", "--max-pixels", "-5"], 2,
     "Invalid value for '--max-pixels'"),
    ("symlinked folder inside --out", ["propose", "{d}/inputs", "-r", "--out", "{d}/out-linked", "-c", "{c}"], 2,
     "out-linked/sub: a symbolic link inside --out"),
    ("manifest is a folder", ["propose", "--manifest", "{d}/inputs", "-c", "{c}"], 2, "a folder, not a manifest"),
    ("--out under a file", ["propose", "{d}/photo.jpg", "-c", "{c}", "--out", "{d}/photo.jpg/x.json"], 6,
     "photo.jpg is a file, not a folder"),
    ("info: a PyTorch state dict", ["info", "{d}/state.pth"], 3, "a PyTorch file: rpn convert imports"),
    ("info: an ONNX file", ["info", "{d}/export.onnx"], 3, "an ONNX export runs with rpn propose or rpn eval"),
    ("export: the checkpoint alone", ["export", "{d}/mine.safetensors"], 2, "a checkpoint is what rpn export reads"),
    ("export: to a checkpoint's name", ["export", "{d}/mine.safetensors", "{d}/mine.safetensors"], 2,
     "an onnx export is written to a .onnx file"),
    ("convert: over its source", ["convert", "{d}/state.pth", "{d}/state.pth"], 2,
     "a checkpoint of ours is written to a .safetensors file"),
    ("export: to a folder", ["export", "{d}/mine.safetensors", "{d}/folder.onnx"], 6, "folder.onnx: a folder"),
    ("anchors: empty ratios", ["anchors", "--ratios", ""], 2, "--ratios : expected positive numbers"),
    ("anchors: --out under a file", ["anchors", "--out", "{d}/photo.jpg/a.png"], 6, "photo.jpg is a file, not a folder"),
    ("anchors: ratios beside a checkpoint", ["anchors", "-c", "{c}", "--ratios", "1"], 2, "--ratios: not with --checkpoint"),
    ("overlay would replace its input", ["propose", "{d}/pngs", "--out", "{d}/pngs", "--format", "png", "-c", "{c}"],
     2, "would replace the input"),
    *[(f"TorchScript without opt-in: {command[0]}", [*command], 3, message) for command, message in (
        (["propose", "{d}/photo.jpg", "-c", "{d}/evil.pt"], "runs code it carries when it is loaded"),
        (["eval", "{d}/train.json", "-c", "{d}/evil.pt"], "runs code it carries when it is loaded"),
        (["info", "{d}/evil.pt"], "evil.pt"),
        (["export", "{d}/evil.pt", "{d}/never.onnx"], "evil.pt"),
        (["convert", "{d}/evil.pt", "{d}/never.safetensors"], "a TorchScript archive"),
        (["anchors", "-c", "{d}/evil.pt"], "evil.pt"),
    )],
]


def _tree(folder):
    """Every path under ``folder`` (links not followed) with its size and modification time."""
    state = {}
    for base, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(base, name)
            info = os.lstat(path)
            state[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns)
    return state


@pytest.mark.parametrize("name, arguments, code, message", CASES, ids=[case[0] for case in CASES])
def test_hostile_case_is_one_line_with_its_exit_code(hostile, small_checkpoint, capsys, name, arguments, code, message):
    arguments = [a.replace("{d}", str(hostile)).replace("{c}", str(small_checkpoint)) for a in arguments]
    before = _tree(hostile)
    status = cli.app.run(arguments)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == code, captured.err
    assert len(lines) == 1 and message in lines[0], captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    assert "weights_only" not in captured.err  # never the advice to load a file's code
    assert _tree(hostile) == before  # nothing written, nothing replaced, inside the folder or beside it
    assert not (hostile / "marker").exists() and not (hostile / "marker-train").exists()


def test_torchscript_runs_only_with_the_opt_in(hostile, capsys):
    """The crafted file does write its marker when loaded: the opt-in is the only way to get there."""
    status = cli.app.run(["propose", str(hostile / "photo.jpg"), "-c", str(hostile / "evil.pt"), "--trust-torchscript"])
    capsys.readouterr()
    assert status == 3  # it is no rpn model, but loading it ran its code
    assert (hostile / "marker").exists()
    (hostile / "marker").unlink()


def test_output_folder_equal_to_the_input_folder_keeps_the_inputs(tmp_path, small_checkpoint, capsys):
    shutil.copy(SAMPLE, tmp_path / "photo.jpg")
    Image.open(SAMPLE).save(tmp_path / "other.png")
    inputs = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    status = cli.app.run(["propose", str(tmp_path), "--out", str(tmp_path), "-c", str(small_checkpoint), "-q"])
    assert status == 0, capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name in inputs} == inputs
    assert json.loads((tmp_path / "photo.json").read_text())["image"] == str(tmp_path / "photo.jpg")
    assert (tmp_path / "other.json").exists()


def test_a_named_pipe_is_skipped_with_one_line(tmp_path, small_checkpoint, capsys):
    os.mkfifo(tmp_path / "pipe.jpg")
    shutil.copy(SAMPLE, tmp_path / "photo.jpg")
    status = cli.app.run(["propose", str(tmp_path / "pipe.jpg"), str(tmp_path / "photo.jpg"), "-c",
                          str(small_checkpoint), "-q"])
    captured = capsys.readouterr()
    assert status == 1  # an input failed; the rest ran
    assert captured.err.strip() == f"error: {tmp_path / 'pipe.jpg'}: not a regular file (a pipe, device or socket)"
    assert [json.loads(line)["image"] for line in captured.out.splitlines()] == [str(tmp_path / "photo.jpg")]
    # A folder scan passes over it without a word.
    status = cli.app.run(["propose", str(tmp_path), "-c", str(small_checkpoint), "-q"])
    captured = capsys.readouterr()
    assert status == 0 and captured.err == "" and len(captured.out.splitlines()) == 1


def test_eval_says_which_images_are_missing_and_strict_refuses(tmp_path, small_checkpoint, capsys):
    shutil.copy(SAMPLE, tmp_path / "photo.jpg")
    images = [{"id": 1, "file_name": "photo.jpg", "width": 451, "height": 300},
              {"id": 2, "file_name": "gone.jpg", "width": 451, "height": 300}]
    boxes = [{"id": n, "image_id": n, "category_id": 1, "bbox": [100, 0, 300, 280], "area": 56000} for n in (1, 2)]
    (tmp_path / "ann.json").write_text(json.dumps(_coco(images, boxes)))
    status = cli.app.run(["eval", str(tmp_path / "ann.json"), "-c", str(small_checkpoint), "--json", "-q"])
    captured = capsys.readouterr()
    assert status == 0
    assert captured.err.count("\n") == 1 and "gone.jpg" in captured.err and "left out of the figures" in captured.err
    report = json.loads(captured.out)
    assert report["images"] == 1 and report["boxes"] == 1 and report["unreadable_images"] == 1
    status = cli.app.run(["eval", str(tmp_path / "ann.json"), "-c", str(small_checkpoint), "--strict"])
    captured = capsys.readouterr()
    assert status == 5 and captured.err.count("\n") == 1 and "gone.jpg" in captured.err and "--strict" in captured.err


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_unwritable_stdout_is_exit_6(small_checkpoint):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "rpn_cli", "propose", str(SAMPLE), "-c", str(small_checkpoint)],
                                stdout=full, stderr=subprocess.PIPE, text=True, env=_env(), timeout=300)
    assert result.returncode == 6
    assert result.stderr.strip() == "error: standard output: cannot write (No space left on device)"


def test_sigterm_exits_143_without_temporaries_and_a_resume_completes(tmp_path, small_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(60):
        shutil.copy(SAMPLES / "astronaut.jpg", images / f"{index:03d}.jpg")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rpn_cli", "propose", str(images), "--out", str(out), "--format", "json,png",
               "-c", str(small_checkpoint), "-q"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not list(out.glob("*.png")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143 and stderr.strip() == "terminated"
    assert not list(out.glob(".*.tmp"))
    written = len(list(out.glob("*.png")))
    assert 0 < written < 60
    # A temporary file left by a harder kill (SIGKILL cannot be handled) is swept when resuming.
    stale = out / ".059.png.k3j9x_2a.tmp"
    stale.write_bytes(b"half a png")
    resumed = subprocess.run([*command, "--skip-existing"], capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists() and len(list(out.glob("*.png"))) == 60 and len(list(out.glob("*.json"))) == 60


@pytest.mark.parametrize("step", ["close", "chmod", "replace"])
def test_a_stop_at_any_step_of_a_write_leaves_no_temporary(tmp_path, monkeypatch, step):
    """SIGTERM and Ctrl-C are raised between any two steps of the program: whichever step they land on,
    the temporary file goes with them (the test above hits such a step only by chance)."""
    from rpn_cli.cli.base import Terminated
    from rpn_cli.io import files

    real = getattr(os, step)

    def stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise Terminated()

    monkeypatch.setattr(files.os, step, stopped)
    with pytest.raises(Terminated):
        files.atomic_write_bytes(tmp_path / "a.json", lambda tmp: open(tmp, "w").write("{}"))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a.json"] if step == "replace" else [])


def test_odd_file_names_and_a_sheet_over_an_input(tmp_path, small_checkpoint, capsys):
    """Brackets in a path print as they are; a contact sheet may not replace an input; a bare `rpn`
    shows the help; tiny boxes draw (a 40-px photo's 8-px proposals are about 1 px)."""
    (tmp_path / "d[").mkdir()
    odd = tmp_path / "d[" / "x].jpg"  # its path holds "[/x]", a closing tag to a markup parser
    shutil.copy(SAMPLE, odd)
    status = cli.app.run(["propose", str(odd), "-c", str(tmp_path / "d[" / "x]-[red]none.safetensors")])
    assert status == 3 and "d[/x]-[red]none.safetensors: no such checkpoint" in capsys.readouterr().err
    status = cli.app.run(["propose", str(odd), "-c", str(small_checkpoint), "--sheet", str(odd)])
    assert status == 2 and "would replace an input" in capsys.readouterr().err
    assert odd.read_bytes() == SAMPLE.read_bytes()
    assert cli.app.run([]) == 2 and "Usage: rpn" in capsys.readouterr().err
    Image.open(SAMPLE).resize((40, 27)).save(tmp_path / "tiny.png")
    status = cli.app.run(["propose", str(tmp_path / "tiny.png"), "-c", str(small_checkpoint), "--out",
                          str(tmp_path / "out"), "--format", "png", "--draw-top", "300", "--min-size", "0",
                          "--sheet", str(tmp_path / "sheet.png"), "-q"])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "tiny.png").exists() and (tmp_path / "sheet.png").exists()
