"""Restructuring the package changed nothing a user sees: the records of the sample photos are the same,
byte for byte, as those of the last version before it (run from the git history, same checkpoint: the
shipped weights with the proposal layer that version knows, without box voting and level offsets, which
came later)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import DEFAULT_CHECKPOINT, ROOT, SAMPLES, run_rpn

# main just before the package was cut into layers (model/, io/, inference/, ...).
BEFORE_LAYERS = "21e2fcc"


@pytest.fixture(scope="module")
def previous_version(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the project's git history (run from a clone)")
    folder = tmp_path_factory.mktemp("before-layers")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_LAYERS, "rpn_cli"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_LAYERS} is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


@pytest.fixture(scope="module")
def shipped_without_voting(tmp_path_factory):
    """The shipped checkpoint's weights and description, less the ``vote_iou`` and ``level_offsets`` that
    version cannot read."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rpn_cli.io.checkpoint import METADATA_KEY

    with safe_open(str(DEFAULT_CHECKPOINT), framework="pt") as handle:
        description = json.loads(handle.metadata()[METADATA_KEY])
    assert description["proposals"].pop("vote_iou") > 0
    assert any(description["proposals"].pop("level_offsets"))
    path = tmp_path_factory.mktemp("checkpoint") / "without-voting.safetensors"
    save_file(load_file(DEFAULT_CHECKPOINT), path, metadata={METADATA_KEY: json.dumps(description, sort_keys=True)})
    return path


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_the_sample_records_are_byte_for_byte_those_of_the_version_before(previous_version, shipped_without_voting,
                                                                          precision):
    photos = sorted(str(path) for path in SAMPLES.glob("*.jpg"))
    arguments = ["propose", *photos, "-c", str(shipped_without_voting), "--precision", precision, "--backend", "torch",
                 "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(previous_version)}
    before = subprocess.run([sys.executable, "-m", "rpn_cli", *arguments], capture_output=True, text=True,
                            cwd=previous_version, env=env, timeout=600)
    assert before.returncode == 0, before.stderr
    now = run_rpn(*arguments)
    assert now.returncode == 0, now.stderr
    assert len(now.stdout.splitlines()) == len(photos)
    assert now.stdout == before.stdout
