"""The local pipeline streams: memory stays flat over a folder of thousands of images."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SAMPLES
from PIL import Image

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


@pytest.mark.heavy
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

    from rpn_cli.inference.devices import default_decode_workers

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


def _inputs(paths):
    from rpn_cli.io.inputs import expand_inputs

    return expand_inputs([str(path) for path in paths], False, None)


def test_decode_ahead_hands_over_what_load_image_gives(tmp_path):
    from rpn_cli.errors import ImageError
    from rpn_cli.inference.prefetch import DecodeAhead
    from rpn_cli.io.images import load_image

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = _inputs([SAMPLES / "astronaut.jpg", broken, SAMPLES / "chelsea.jpg", SAMPLES / "coffee.jpg"])
    ahead = DecodeAhead(items, max_images=3)
    try:
        ahead.wait()
        first = ahead.take(items[0])
        np.testing.assert_array_equal(np.asarray(first), np.asarray(load_image(items[0].given)))
        assert ahead.take(items[0]) is None  # handed over once
        with pytest.raises(ImageError, match="broken.jpg"):
            ahead.take(items[1])
        np.testing.assert_array_equal(np.asarray(ahead.take(items[2])), np.asarray(load_image(items[2].given)))
        assert ahead.take(items[3]) is None  # past max_images: the engine decodes it itself
    finally:
        ahead.close()


def test_decode_ahead_stops_at_its_pixel_budget():
    from rpn_cli.inference.prefetch import DecodeAhead

    items = _inputs(sorted(SAMPLES.glob("*.jpg")))
    ahead = DecodeAhead(items, pixel_budget=1)
    try:
        ahead.wait()
        assert ahead.take(items[0]) is not None  # decoded while nothing was held
        assert all(ahead.take(item) is None for item in items[1:])
    finally:
        ahead.close()


def test_an_image_not_yet_decoded_ahead_is_handed_back_at_once(tmp_path):
    """Several decoding threads must not queue behind the one thread decoding ahead."""
    from rpn_cli.inference.prefetch import DecodeAhead

    for index in range(40):
        (tmp_path / f"{index:02d}.jpg").write_bytes((SAMPLES / "astronaut.jpg").read_bytes())
    items = _inputs(sorted(tmp_path.glob("*.jpg")))
    ahead = DecodeAhead(items)
    try:
        assert ahead.take(items[-1]) is None  # 39 images ahead of it in the queue: not started
    finally:
        ahead.close()


def test_the_engine_gives_the_same_proposals_with_images_decoded_ahead(small_checkpoint):
    import torch

    from rpn_cli.inference.engine import propose_images
    from rpn_cli.inference.prefetch import DecodeAhead
    from rpn_cli.inference.runtime import load_model

    model = load_model(small_checkpoint, "cpu")
    proposal_layer = model.spec.proposal_layer()
    items = _inputs(sorted(SAMPLES.glob("*.jpg")) + [SAMPLES / "missing.jpg"])
    plain = list(propose_images(items, model, proposal_layer))
    ahead = DecodeAhead(items, max_images=2)
    try:
        early = list(propose_images(items, model, proposal_layer, decoded_ahead=ahead))
    finally:
        ahead.close()
    assert [r.item.given for r in early] == [r.item.given for r in plain]
    assert early[-1].error == plain[-1].error and "missing.jpg" in early[-1].error
    for a, b in zip(plain[:-1], early[:-1]):
        assert torch.equal(a.proposals.boxes, b.proposals.boxes) and torch.equal(a.proposals.scores, b.proposals.scores)


def test_decoding_ahead_does_not_import_torch():
    code = "import sys, rpn_cli.inference.prefetch, rpn_cli.io.inputs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_batching_changes_speed_not_answers(small_checkpoint, tmp_path, precision):
    """Mixed sizes, with runs of the same size that do get batched together."""
    import shutil

    import torch

    from rpn_cli.inference.engine import propose_images
    from rpn_cli.inference.runtime import load_model

    order = ["chelsea", "chelsea", "astronaut", "coffee", "coffee", "coffee", "chelsea", "rocket", "rocket"]
    paths = []
    for index, name in enumerate(order):
        paths.append(tmp_path / f"{index}-{name}.jpg")
        shutil.copy(SAMPLES / f"{name}.jpg", paths[-1])
    model = load_model(small_checkpoint, "cpu", precision)
    proposal_layer = model.spec.proposal_layer()
    one = list(propose_images(_inputs(paths), model, proposal_layer, batch_size=1))
    four = list(propose_images(_inputs(paths), model, proposal_layer, batch_size=4))
    assert [r.item.given for r in four] == [str(p) for p in paths]
    for a, b in zip(one, four):
        assert torch.equal(a.proposals.boxes, b.proposals.boxes) and torch.equal(a.proposals.scores, b.proposals.scores)


# In lanes the network runs on fewer threads an image than one image at a time does. PyTorch then sums
# inside its convolutions in another order (outputs equal to about 1e-6, as in tests/inference/test_ray.py);
# ONNX Runtime's int8 kernels gave the very same numbers on the CPUs measured. Boxes are matched one to one,
# since boxes of nearly equal score may swap ranks.
LANE_BOX_TOLERANCE = 1e-3
LANE_SCORE_TOLERANCE = 1e-5


def _assert_same_proposals(got, expected):
    import torch

    assert got.boxes.shape == expected.boxes.shape
    unmatched = torch.ones(len(expected.scores), dtype=torch.bool)
    for box, score in zip(got.boxes, got.scores):
        close = (unmatched & ((expected.scores - score).abs() <= LANE_SCORE_TOLERANCE)
                 & ((expected.boxes - box).abs().amax(dim=1) <= LANE_BOX_TOLERANCE))
        assert close.any(), f"{box.tolist()} {float(score)} has no counterpart"
        unmatched[int(close.nonzero()[0])] = False


@pytest.mark.parametrize("backend", ["onnxruntime-int8", "torch"])
def test_lanes_change_speed_not_answers(default_checkpoint, tmp_path, backend, monkeypatch):
    import shutil
    import threading

    import torch

    from rpn_cli.inference import engine
    from rpn_cli.inference.engine import Timings, propose_images
    from rpn_cli.inference.runtime import load_model

    seen = []  # (thread, PyTorch threads, network) of each network call
    run_model = engine.run_model

    def recording_run_model(model, images):
        seen.append((threading.current_thread().name, torch.get_num_threads(), id(model)))
        return run_model(model, images)

    monkeypatch.setattr(engine, "run_model", recording_run_model)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # a lane a core

    paths = []
    for index, name in enumerate(["chelsea", "astronaut", "missing", "coffee", "rocket", "chelsea", "coffee"]):
        paths.append(tmp_path / f"{index}-{name}.jpg")
        if name != "missing":
            shutil.copy(SAMPLES / f"{name}.jpg", paths[-1])
    model = load_model(default_checkpoint, "cpu", "float32", backend=backend)
    proposal_layer = model.spec.proposal_layer()
    threads = torch.get_num_threads()
    one = list(propose_images(_inputs(paths), model, proposal_layer))
    assert {name for name, _, _ in seen} == {threading.current_thread().name}
    seen.clear()
    timings = Timings()
    laned = list(propose_images(_inputs(paths), model, proposal_layer, lanes=3, timings=timings))
    assert torch.get_num_threads() == threads  # a PyTorch network's run gives the threads back
    assert len(seen) == 6 and all(name.startswith("rpn-lane") for name, _, _ in seen)
    if backend == "torch":
        assert {(count, network) for _, count, network in seen} == {(1, id(model))}
    else:  # a session a lane, none of them the one-at-a-time session, PyTorch's threads untouched
        assert len({network for _, _, network in seen}) > 1 and id(model) not in {n for _, _, n in seen}
        assert {count for _, count, _ in seen} == {threads}
    assert [r.item.given for r in laned] == [str(p) for p in paths]
    assert laned[2].error == one[2].error and "2-missing.jpg" in laned[2].error
    assert (timings.images, timings.failed) == (6, 1) and timings.proposals == sum(
        len(r.proposals.scores) for r in one if r.error is None)
    for a, b in zip(laned, one):
        if b.error is None:
            _assert_same_proposals(a.proposals, b.proposals)
            if backend != "torch":
                assert torch.equal(a.proposals.boxes, b.proposals.boxes)
    # Closed half-way, as a reader that stops early does: the threads still come back.
    stream = propose_images(_inputs(paths), model, proposal_layer, lanes=2)
    next(stream)
    stream.close()
    assert torch.get_num_threads() == threads


def test_lanes_by_default_only_where_onnxruntime_runs_the_network(monkeypatch, default_checkpoint):
    from rpn_cli.inference.devices import default_lanes
    from rpn_cli.inference.runtime import load_model

    int8 = load_model(default_checkpoint, "cpu", backend="onnxruntime-int8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_lanes(int8) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_lanes(int8) == 8  # capped: each lane holds an image's activations
    assert default_lanes(load_model(default_checkpoint, "cpu", "float32", backend="torch")) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert default_lanes(int8) == 6  # of 2 threads each: every core used
    # A session a lane, built once for each thread count.
    lanes = int8.with_threads(1, 2)
    assert int8.with_threads(1, 2) == lanes and int8.with_threads(1, 1) == lanes[:1]
    assert len({id(lane.session) for lane in lanes} | {id(int8.session)}) == 3
    assert all(lane.session.get_session_options().intra_op_num_threads == 1 for lane in lanes)
    assert lanes[0].spec == int8.spec and lanes[0].precision == "int8" and lanes[0].runs_on_cpu
