"""Restructuring the package changed nothing a user sees: the records of the sample photos are the same,
byte for byte, as those of the last version before it (run from the git history, same checkpoint)."""

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


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_the_sample_records_are_byte_for_byte_those_of_the_version_before(previous_version, precision):
    photos = sorted(str(path) for path in SAMPLES.glob("*.jpg"))
    arguments = ["propose", *photos, "-c", str(DEFAULT_CHECKPOINT), "--precision", precision, "--backend", "torch",
                 "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(previous_version)}
    before = subprocess.run([sys.executable, "-m", "rpn_cli", *arguments], capture_output=True, text=True,
                            cwd=previous_version, env=env, timeout=600)
    assert before.returncode == 0, before.stderr
    now = run_rpn(*arguments)
    assert now.returncode == 0, now.stderr
    assert len(now.stdout.splitlines()) == len(photos)
    assert now.stdout == before.stdout
