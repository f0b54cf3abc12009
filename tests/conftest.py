import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
COCO_DIR = SHARED / "data" / "coco-train2017"
TEACHER = SHARED / "teachers" / "yolox-nano" / "yolox_nano.onnx"
SAMPLES = ROOT / "samples"
DEFAULT_CHECKPOINT = ROOT / "rpn_cli" / "weights" / "rpn_mobilenet_v2_fpn.safetensors"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Built files (the ONNX Runtime backend's exports) go to a folder of this run, not ~/.cache."""
    os.environ["RPN_CACHE_DIR"] = str(tmp_path_factory.mktemp("rpn-cache"))


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    if not (COCO_DIR / "instances.json").is_file():
        pytest.skip(f"the shared COCO data is absent ({COCO_DIR}); these tests read real annotated photos from it")
    return COCO_DIR


@pytest.fixture(scope="session")
def teacher_model() -> Path:
    if not TEACHER.is_file():
        pytest.skip(f"the shared teacher model is absent ({TEACHER})")
    return TEACHER


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.fail(f"the shipped checkpoint {DEFAULT_CHECKPOINT} is missing")
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A small untrained model: what the CLI's plumbing does cannot depend on what the weights learnt."""
    import torch

    from rpn_cli.io.checkpoint import save_checkpoint
    from rpn_cli.model.network import RegionProposalNetwork
    from rpn_cli.model.spec import default_mobilenet_spec

    torch.manual_seed(0)
    model = RegionProposalNetwork(default_mobilenet_spec(shorter_side=256, max_size=427))
    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    save_checkpoint(model, path)
    return path


def run_rpn(*args, input=None, cwd=None, check=False):
    """``rpn ARGS`` in this process (``app.run``: the entry point's own error handling and exit codes),
    with stdin, stdout and stderr captured; Ray runs go to a process of their own (``run_rpn_process``)."""
    import contextlib
    import io
    import subprocess

    arguments = [str(arg) for arg in args]
    if "--engine" in arguments and "ray" in arguments or cwd is not None:
        return run_rpn_process(*arguments, input=input, cwd=cwd, check=check)
    from rpn_cli import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.app.run(arguments)
    finally:
        sys.stdin = saved_stdin
    result = subprocess.CompletedProcess(["rpn", *arguments], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"rpn {' '.join(arguments)} failed ({code}): {result.stderr}")
    return result


def run_rpn_process(*args, input=None, cwd=None, check=False):
    """``python -m rpn_cli ARGS`` as a subprocess, as a user runs it: for what only a process shows."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "rpn_cli", *map(str, args)], input=input, capture_output=True,
                            text=True, cwd=cwd, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"rpn {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
    return result
