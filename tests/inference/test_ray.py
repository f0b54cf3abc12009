"""The Ray Data engine gives the local engine's records, with errors as records, and resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SAMPLES, run_rpn

from rpn_cli.model.network import RegionProposalNetwork

pytest.importorskip("ray.data", reason="Ray is the optional ray extra")
# Each starts a local Ray (tens of seconds on 2 cores): in the heavy run, which CI runs too.
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def folder(tmp_path_factory, coco_dir):
    images = tmp_path_factory.mktemp("ray-images")
    for path in sorted((coco_dir / "images").glob("*.jpg"))[:10]:
        shutil.copy(path, images / path.name)
    (images / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return images


# Ray actors run torch on one thread and the local engine on all cores: the sums inside the convolutions
# are ordered differently, so the outputs agree to about 1e-6, not bit for bit (bit for bit only where
# both happen to round alike, e.g. in bfloat16). After the records' rounding (boxes to 0.01 px, scores
# to 1e-6) that is at most one step in the last digit; near-tied boxes may also swap ranks.
BOX_TOLERANCE = 0.011
SCORE_TOLERANCE = 2e-6


def assert_records_close(got, expected):
    """Same record but for boxes and scores, which match one to one within the tolerances above."""
    assert {k: v for k, v in got.items() if k not in ("boxes", "scores")} == \
        {k: v for k, v in expected.items() if k not in ("boxes", "scores")}
    assert len(got["boxes"]) == len(expected["boxes"]) == len(got["scores"])
    unmatched = list(range(len(expected["boxes"])))
    for box, score in zip(got["boxes"], got["scores"]):
        match = next((j for j in unmatched if abs(expected["scores"][j] - score) <= SCORE_TOLERANCE
                      and max(abs(a - b) for a, b in zip(expected["boxes"][j], box)) <= BOX_TOLERANCE), None)
        assert match is not None, f"{got['image']}: {box} {score} has no counterpart"
        unmatched.remove(match)


def _shard_records(out):
    records = []
    for shard in sorted(out.glob("part-*.jsonl")):
        records.extend(json.loads(line) for line in shard.read_text().splitlines() if line.strip())
    return records


def test_ray_records_equal_the_local_engine_and_resume(folder, small_checkpoint, tmp_path):
    local = run_rpn("propose", folder, "-c", small_checkpoint, "-q")
    assert local.returncode == 1  # the corrupt file
    expected = {r["image"]: r for r in map(json.loads, local.stdout.splitlines())}
    assert len(expected) == 10

    out = tmp_path / "out"
    first = sorted(folder.iterdir())[:4]
    listing = "".join(f"{path}\n" for path in first)
    run = run_rpn("propose", "-", "--engine", "ray", "--out", out, "-c", small_checkpoint, "--actors", "2", "-q",
                  input=listing)
    assert run.returncode == 0, run.stderr
    assert len(_shard_records(out)) == 4

    # The rest, resumed: only what is missing is processed, nothing twice.
    run = run_rpn("propose", folder, "--engine", "ray", "--out", out, "-c", small_checkpoint, "--actors", "2",
                  "--skip-existing")
    assert run.returncode == 1 and "7 images" in run.stderr and "4 skipped" in run.stderr
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["images"] == 7 and summary["failed"] == 1 and summary["skipped"] == 4

    records = _shard_records(out)
    images = [r["image"] for r in records]
    assert len(images) == len(set(images)) == 11
    # Ray may reorder: compare by image path.
    for record in records:
        if record["image"].endswith("zz_corrupt.jpg"):
            assert "cannot decode" in record["error"] and str(folder) in record["error"]
        else:
            assert_records_close(record, expected[record["image"]])


def test_ray_manifest_and_parquet(folder, small_checkpoint, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    manifest = tmp_path / "manifest.csv"
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")[:3]
    manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(paths)))
    out = tmp_path / "parquet"
    run = run_rpn("propose", "--manifest", manifest, "--engine", "ray", "--out", out, "--format", "parquet",
                  "-c", small_checkpoint, "--actors", "1", "--backend", "torch", "-q")
    assert run.returncode == 0, run.stderr
    table = pyarrow.concat_tables([parquet.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    assert sorted(table.column("image").to_pylist()) == [str(p) for p in paths]
    local = run_rpn("propose", *paths, "-c", small_checkpoint, "--backend", "torch", "-q", check=True)
    expected = {r["image"]: r for r in map(json.loads, local.stdout.splitlines())}
    for row in table.to_pylist():
        assert_records_close({"image": row["image"], "boxes": row["boxes"], "scores": row["scores"]},
                             {"image": row["image"], "boxes": expected[row["image"]]["boxes"],
                              "scores": expected[row["image"]]["scores"]})


def test_the_actors_run_the_backend_asked_for(small_checkpoint):
    from rpn_cli.errors import UsageError
    from rpn_cli.inference.ray_engine import _ProposalActor

    actor = _ProposalActor(str(small_checkpoint), "cpu", "float32", "torch", {}, None)
    assert isinstance(actor.proposer.model, RegionProposalNetwork)
    # They once chose auto whatever was asked: int8 would then have run ONNX Runtime's float32 here.
    with pytest.raises(UsageError, match="no int8 model was made from it"):
        _ProposalActor(str(small_checkpoint), "cpu", "auto", "onnxruntime-int8", {}, None)


def _actor_at_work() -> int | None:
    """The pid of a Ray worker running our model actor's batch, if one is at it now."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "MapBatches(_ProposalActor)).submit" in title:
                return int(entry)
    return None


def test_a_killed_ray_worker_is_replaced_and_every_record_is_written_once(tmp_path, small_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(60):
        shutil.copy(SAMPLES / ("coffee.jpg", "rocket.jpg", "chelsea.jpg")[index % 3], images / f"{index:03d}.jpg")
    local = run_rpn("propose", images, "-c", small_checkpoint, "-q", check=True)
    expected = {r["image"]: r for r in map(json.loads, local.stdout.splitlines())}

    out = tmp_path / "out"
    command = [sys.executable, "-m", "rpn_cli", "propose", str(images), "--engine", "ray", "--out", str(out),
               "-c", str(small_checkpoint), "--actors", "1", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    killed = None
    deadline = time.time() + 300
    while killed is None and process.poll() is None and time.time() < deadline:
        killed = _actor_at_work()
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    stderr = process.communicate(timeout=600)[1]
    assert killed is not None, "the run ended before its model actor could be killed"
    assert process.returncode == 0, stderr
    records = _shard_records(out)
    assert sorted(r["image"] for r in records) == sorted(expected)  # every image once: none lost, none twice
    for record in records:
        assert_records_close(record, expected[record["image"]])


def test_an_out_that_is_a_file_is_refused_before_ray_starts(tmp_path, small_checkpoint):
    (tmp_path / "taken").write_text("")
    for out, message in ((tmp_path / "taken", "a file, where --engine ray writes its shards into a folder"),
                         (tmp_path / "taken" / "shards", "taken is a file, not a folder")):
        result = run_rpn("propose", SAMPLES / "chelsea.jpg", "-c", small_checkpoint, "--engine", "ray",
                         "--out", out)
        assert result.returncode == 6 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("option, refusal", [
    (("--precision", "bfloat16"), "an exported file runs as it was exported, not in --precision bfloat16"),
    (("--backend", "torch"), "an exported file runs in ONNX Runtime, not --backend torch"),
])
def test_what_an_exported_file_cannot_do_is_refused_before_ray_starts(tmp_path, option, refusal):
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"never read: the refusal comes first")
    result = run_rpn("propose", SAMPLES / "chelsea.jpg", "-c", exported, "--engine", "ray", "--out", tmp_path / "o",
                     *option)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert refusal in result.stderr
    assert not (tmp_path / "o").exists()
