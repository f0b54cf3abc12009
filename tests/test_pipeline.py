"""The local pipeline streams: memory stays flat over a folder of thousands of images."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT

PEAK_SCRIPT = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_kib(folder, checkpoint, out):
    command = [sys.executable, "-c", PEAK_SCRIPT, sys.executable, "-m", "rpn_cli", "propose", str(folder),
               "-c", str(checkpoint), "--out", str(out), "-q", "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            check=True)
    return int(result.stdout.strip())


def test_memory_stays_flat_over_thousands_of_images(tmp_path, small_checkpoint):
    rng = np.random.default_rng(0)
    few, many = tmp_path / "few", tmp_path / "many"
    for folder, count in ((few, 60), (many, 1200)):
        folder.mkdir()
        for index in range(count):
            pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    peak_few = _peak_kib(few, small_checkpoint, tmp_path / "out-few")
    peak_many = _peak_kib(many, small_checkpoint, tmp_path / "out-many")
    assert len(list((tmp_path / "out-many").glob("*.json"))) == 1200
    # 20 times the images, at most 60 MiB more at the peak (nothing accumulates per image).
    assert peak_many - peak_few < 60 * 1024, (peak_few, peak_many)


def test_decode_workers_take_the_cores_the_network_leaves(monkeypatch):
    import torch

    from rpn_cli.devices import default_decode_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert default_decode_workers(torch.device("cpu")) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_decode_workers(torch.device("cpu")) == 4  # capped
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_decode_workers(torch.device("cpu")) == 0
    assert default_decode_workers(torch.device("cuda")) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_decode_workers(torch.device("cuda")) == 2
