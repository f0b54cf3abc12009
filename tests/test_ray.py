"""The Ray Data engine gives the local engine's records, with errors as records, and resumes."""

import json
import shutil

import pytest

from conftest import run_rpn

pytest.importorskip("ray.data", reason="Ray is the optional ray extra")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, coco_dir):
    images = tmp_path_factory.mktemp("ray-images")
    for path in sorted((coco_dir / "images").glob("*.jpg"))[:10]:
        shutil.copy(path, images / path.name)
    (images / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return images


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
            assert record == expected[record["image"]]


def test_ray_manifest_and_parquet(folder, small_checkpoint, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    manifest = tmp_path / "manifest.csv"
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")[:3]
    manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(paths)))
    out = tmp_path / "parquet"
    run = run_rpn("propose", "--manifest", manifest, "--engine", "ray", "--out", out, "--format", "parquet",
                  "-c", small_checkpoint, "--actors", "1", "-q")
    assert run.returncode == 0, run.stderr
    table = pyarrow.concat_tables([parquet.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    assert sorted(table.column("image").to_pylist()) == [str(p) for p in paths]
    local = run_rpn("propose", *paths, "-c", small_checkpoint, "-q", check=True)
    expected = {r["image"]: r for r in map(json.loads, local.stdout.splitlines())}
    for row in table.to_pylist():
        assert row["boxes"] == expected[row["image"]]["boxes"] and row["scores"] == expected[row["image"]]["scores"]
