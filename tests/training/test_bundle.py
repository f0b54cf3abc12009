"""benchmarks/training_bundle.py: a training set with its labels resolved, photos shrunk, that `rpn train`
reads back as what it would have trained on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_rpn
from test_train import _synthetic_dataset

from rpn_cli.io.datasets import load_coco
from rpn_cli.training.loop import TrainConfig, training_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "training_bundle.py"


def _bundle(out: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *map(str, args)], capture_output=True, text=True)


def _by_name(samples) -> dict:
    return {sample.path.name.split(".")[0]: sample for sample in samples}


def _check_same_targets(original, bundled, sx, sy):
    """Each bundled photo trains on the original's boxes and ignore regions, scaled (COCO rounding: 0.01 px)."""
    original, bundled = _by_name(original), _by_name(bundled)
    assert bundled.keys() == original.keys()
    scale = np.array([sx, sy, sx, sy], np.float32)
    for name, sample in original.items():
        np.testing.assert_allclose(bundled[name].boxes, sample.boxes * scale, atol=0.02, err_msg=name)
        np.testing.assert_allclose(bundled[name].ignore, sample.ignore * scale, atol=0.02, err_msg=name)


def test_a_bundle_trains_on_what_its_data_would_train_on(tmp_path):
    data = _synthetic_dataset(tmp_path / "data", count=5, size=(161, 127))  # shrunk to 81 x 64: x and y scale apart
    coco = json.loads((data / "instances.json").read_text())
    coco["annotations"].append({"id": 100, "image_id": 2, "category_id": 1, "bbox": [100, 60, 40, 30], "area": 1200,
                                "iscrowd": 1})
    (data / "instances.json").write_text(json.dumps(coco))
    held_out = _synthetic_dataset(tmp_path / "held-out", count=1)  # 000.jpg (with a crowd box), also in data
    result = _bundle(tmp_path / "bundle", data / "instances.json", "--validation-set", held_out / "instances.json",
                     "--work-dir", tmp_path / "work", "--shorter-side", 64, "--quality", 90)
    assert result.returncode == 0, result.stderr
    assert "4 training photos" in result.stdout and "1 validation photos" in result.stdout
    config = TrainConfig(sources=[str(data / "instances.json")], work_dir=str(tmp_path / "work"),
                         validation_sets=[str(held_out / "instances.json")])
    original, validation = training_data(config, tmp_path / "work")
    bundled, _ = training_data(TrainConfig(sources=[str(tmp_path / "bundle" / "train" / "instances.json")],
                                           work_dir=str(tmp_path / "work"), validation_count=0), tmp_path / "work")
    assert sorted(sample.path.name for sample in bundled) == [f"00{i}.jpg.webp" for i in range(1, 5)]
    assert all(sample.path.stat().st_size > 0 for sample in bundled)
    sx, sy = 81 / 161, 64 / 127
    _check_same_targets(original, bundled, sx, sy)
    crowd = [100 * sx, 60 * sy, 140 * sx, 90 * sy]  # carried as a crowd box, so an ignore region
    np.testing.assert_allclose(_by_name(bundled)["001"].ignore, [crowd], atol=0.02)
    # The validation photo keeps its boxes and its crowd flags.
    (kept,) = load_coco(tmp_path / "bundle" / "validation" / "instances.json")
    np.testing.assert_allclose(kept.boxes, validation[0].boxes * [0.5, 0.5, 0.5, 0.5], atol=0.02)
    assert kept.crowd.tolist() == validation[0].crowd.tolist() and (kept.width, kept.height) == (80, 64)
    np.testing.assert_allclose(kept.areas, validation[0].areas * 0.25, rtol=1e-3)  # COCO's areas, scaled
    run = run_rpn("train", tmp_path / "bundle" / "train" / "instances.json", "--validation-set",
                  tmp_path / "bundle" / "validation" / "instances.json", "--work-dir", tmp_path / "run",
                  "--epochs", "1", "--batch-size", "2", "--train-sizes", "64", "--quiet")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "final.safetensors").is_file()


def test_a_bundle_carries_the_teachers_labels_of_a_partially_labelled_set(tmp_path, teacher_model):
    pytest.importorskip("onnxruntime")
    data = _synthetic_dataset(tmp_path / "data", count=3)
    options = ["--partial", data / "instances.json", "--teacher", teacher_model, "--teacher-threshold", "0.05",
               "--teacher-ignore-threshold", "0.01", "--work-dir", tmp_path / "work"]
    result = _bundle(tmp_path / "bundle", *options, "--shorter-side", 64)
    assert result.returncode == 0, result.stderr
    config = TrainConfig(sources=[], partial_sources=[str(data / "instances.json")], teacher=str(teacher_model),
                         teacher_threshold=0.05, teacher_ignore_threshold=0.01, work_dir=str(tmp_path / "work"),
                         validation_count=0)
    original, _ = training_data(config, tmp_path / "work")
    # Read back without a teacher: the bundle holds the merged boxes and the ignore regions.
    bundled, _ = training_data(TrainConfig(sources=[str(tmp_path / "bundle" / "train" / "instances.json")],
                                           work_dir=str(tmp_path / "work2"), validation_count=0), tmp_path / "work2")
    _check_same_targets(original, bundled, 0.5, 0.5)
