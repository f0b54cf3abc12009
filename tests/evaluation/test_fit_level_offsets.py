"""benchmarks/fit_level_offsets.py: the offsets it picks are the best of its grid as `rpn eval` scores them,
and the checkpoint it writes carries them."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.io.checkpoint import read_spec

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fit_level_offsets.py"


def _subset(coco_dir: Path, out: Path, names: list[str]) -> Path:
    data = json.loads((coco_dir / "instances.json").read_text())
    images = [{**image, "file_name": str(coco_dir / "images" / image["file_name"])}
              for image in data["images"] if image["file_name"] in names]
    ids = {image["id"] for image in images}
    out.write_text(json.dumps({"images": images, "categories": data["categories"],
                               "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return out


def _eval(annotations: Path, checkpoint: Path, offsets: str | None = None) -> dict:
    arguments = ["eval", str(annotations), "-c", str(checkpoint), "--backend", "torch", "--precision", "float32",
                 "--json", "-q"]
    result = CliRunner().invoke(cli.app, arguments + (["--level-offsets", offsets] if offsets else []))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_fit_picks_its_grids_best_as_rpn_eval_scores_it(coco_dir, default_checkpoint, tmp_path):
    names = sorted(json.loads((coco_dir / "instances.json").read_text())["images"],
                   key=lambda image: image["id"])
    names = [image["file_name"] for image in names]
    fit = _subset(coco_dir, tmp_path / "fit.json", names[:8])
    left_out = _subset(coco_dir, tmp_path / "left-out.json", names[:2])
    out = tmp_path / "fitted.safetensors"
    run = subprocess.run([sys.executable, str(SCRIPT), str(default_checkpoint), str(fit), "--exclude", str(left_out),
                          "--values=-1,0", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "fit on 6 photos" in run.stdout
    spec = read_spec(out)
    chosen = spec.proposals.level_offsets
    before = ",".join(f"{value:g}" for value in read_spec(default_checkpoint).proposals.level_offsets) or "none"
    assert spec.provenance["after_training"]["change"].endswith(f"(before: {before})")
    assert len(chosen) == 3 and chosen[0] == 0.0 and set(chosen[1:]) <= {-1.0, 0.0}
    fitted_on = spec.provenance["after_training"]["fitted_on"]
    assert fitted_on["photos"] == 6
    # rpn eval, through the Proposer, on the photos fitted on: the file's figures, and the best of the grid.
    fit_only = _subset(coco_dir, tmp_path / "fit-only.json", names[2:8])
    assert _eval(fit_only, out)["AR@100"] == pytest.approx(fitted_on["AR@100"], abs=1e-9)
    totals = {}
    for rest in itertools.product((-1.0, 0.0), repeat=2):
        figures = _eval(fit_only, default_checkpoint, ",".join(f"{v:g}" for v in (0.0, *rest)))
        totals[(0.0, *rest)] = figures["AR@100"] + figures["AR@300"]
    assert totals[chosen] == pytest.approx(max(totals.values()), abs=1e-9)
    assert _eval(fit_only, default_checkpoint, "0,0,0")["AR@100"] == pytest.approx(
        fitted_on["without_offsets"]["AR@100"], abs=1e-9)
    refused = subprocess.run([sys.executable, str(SCRIPT), str(default_checkpoint), str(fit), "--out", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "exists; choose a new file" in refused.stderr
    refused = subprocess.run([sys.executable, str(SCRIPT), str(default_checkpoint), str(fit), "--values=0,nan"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "expected comma-separated numbers from -50 to 50" in refused.stderr
