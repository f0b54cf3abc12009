"""The Ray Data engine: the local engine's records for very many images, on one machine or a cluster.

Stages: read and decode/resize on CPU tasks, the network and the proposal layer
on an actor pool (one model per actor, loaded once; one GPU per actor where the
cluster has GPUs), and the driver writing JSON Lines (or Parquet) shards
atomically as results stream in. Each record is exactly what ``rpn propose``
writes for that image locally; an image that fails is a record with an
``error`` field. Ray is optional: ``pip install "rpn-cli[ray]"``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from ..errors import ImageError, OutputError, UsageError
from ..io.files import atomic_write_bytes, check_writable_folder
from ..io.inputs import InputImage

if TYPE_CHECKING:  # the driver need not import torch
    from ..model.spec import PreprocessSpec

SUMMARY_NAME = "_SUCCESS"
SHARD_RECORDS = 1000


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise UsageError('--engine ray needs Ray Data: pip install "rpn-cli[ray]"') from error
    return ray


@dataclass
class RayRunSummary:
    images: int = 0
    failed: int = 0
    skipped: int = 0
    proposals: int = 0
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def done_images(out_dir: Path) -> set[str]:
    """Images that already have a record (result or error) in the shards of ``out_dir``."""
    done: set[str] = set()
    for shard in sorted(out_dir.glob("part-*.jsonl")):
        for line in shard.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["image"])
    for shard in sorted(out_dir.glob("part-*.parquet")):
        import pyarrow.parquet as parquet

        done.update(parquet.read_table(shard, columns=["image"]).column("image").to_pylist())
    return done


def _decode(batch: dict, preprocess: PreprocessSpec, max_pixels: int | None) -> dict:
    """CPU task: decode and resize a batch of paths (errors become rows with an error text)."""
    from ..io.images import load_image
    from ..model.preprocess import prepare_image

    tensors, widths, heights, errors = [], [], [], []
    for given, problem in zip(batch["image"], batch["problem"]):
        tensor, size, error = None, (0, 0), problem or None
        if error is None:
            try:
                prepared = prepare_image(load_image(given, max_pixels), preprocess)
                tensor, size = prepared.tensor.numpy(), prepared.original_size
            except ImageError as failure:
                error = str(failure)
        else:
            error = f"{given}: {problem}"
        tensors.append(tensor if tensor is not None else np.zeros((3, 1, 1), np.float32))
        widths.append(size[0])
        heights.append(size[1])
        errors.append(error or "")
    return {"image": list(batch["image"]), "tensor": tensors, "width": widths, "height": heights, "error": errors}


class _ProposalActor:
    """One model per actor, loaded once; runs the network and the proposal layer on decoded images."""

    def __init__(self, checkpoint: str, device: str, precision: str, backend: str, limits: dict, top_k: int | None,
                 trust_torchscript: bool = False):
        from .proposer import Proposer

        self.proposer = Proposer(checkpoint, device=device, precision=precision, backend=backend,
                                 trust_torchscript=trust_torchscript, top_k=top_k, **limits)

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..io.outputs import proposal_record
        from ..model.preprocess import PreparedImage

        records = []
        for given, tensor, width, height, error in zip(batch["image"], batch["tensor"], batch["width"],
                                                       batch["height"], batch["error"]):
            if error:
                records.append(json.dumps({"image": given, "error": error}))
                continue
            tensor = torch.from_numpy(np.asarray(tensor, np.float32))
            prepared = PreparedImage(tensor, (int(width), int(height)), (tensor.shape[2], tensor.shape[1]))
            result = self.proposer.propose_prepared([prepared])[0]
            records.append(json.dumps(proposal_record(given, result)))
        return {"record": records}


def propose_with_ray(
    items: list[InputImage],
    checkpoint: Path,
    out_dir: Path,
    limits: dict,
    preprocess: PreprocessSpec,
    *,
    output_format: str = "jsonl",
    address: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    actors: int | None = None,
    top_k: int | None = None,
    max_pixels: int | None = None,
    skip_existing: bool = False,
    num_cpus: int | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    trust_torchscript: bool = False,
) -> RayRunSummary:
    """Run the proposals of ``items`` on Ray and write shards and a summary into ``out_dir``. ``limits``:
    the proposal layer's overrides (``Proposer``'s keywords, None for the checkpoint's)."""
    ray = _import_ray()
    if output_format not in ("jsonl", "parquet"):
        raise UsageError(f"--engine ray writes jsonl or parquet, not {output_format}")
    check_writable_folder(out_dir, "--engine ray writes its shards")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot write ({error.strerror or error})") from error
    summary = RayRunSummary()
    started = time.perf_counter()
    if skip_existing:
        done = done_images(out_dir)
        remaining = [item for item in items if item.given not in done]
        summary.skipped = len(items) - len(remaining)
        items = remaining
    # Ray Data's own progress bars and INFO lines would interleave with ours on stderr.
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pool = actors or max(1, gpus or min(cpus // 2, 8))
    run_id = uuid.uuid4().hex[:8]
    if items:
        rows = [{"image": item.given, "problem": item.problem or ""} for item in items]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), cpus * 4)))
        dataset = dataset.map_batches(_decode, fn_kwargs={"preprocess": preprocess, "max_pixels": max_pixels},
                                      batch_size=4, num_cpus=1)
        dataset = dataset.map_batches(
            _ProposalActor, fn_constructor_kwargs={"checkpoint": str(checkpoint), "device": device,
                                                   "precision": precision, "backend": backend, "limits": limits,
                                                   "top_k": top_k, "trust_torchscript": trust_torchscript},
            batch_size=4, concurrency=pool, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        )
        shard: list[str] = []
        for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
            for text in batch["record"]:
                record = json.loads(str(text))
                summary.images += 1
                if "error" in record:
                    summary.failed += 1
                else:
                    summary.proposals += len(record["scores"])
                shard.append(str(text))
                if len(shard) >= SHARD_RECORDS:
                    summary.shards.append(_write_shard(out_dir, run_id, len(summary.shards), shard, output_format))
                    shard = []
            progress(summary.images, len(items))
        if shard:
            summary.shards.append(_write_shard(out_dir, run_id, len(summary.shards), shard, output_format))
    summary.seconds = round(time.perf_counter() - started, 2)
    text = json.dumps(summary.to_dict(), indent=2) + "\n"
    atomic_write_bytes(out_dir / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(text))
    return summary


def _write_shard(out_dir: Path, run_id: str, index: int, lines: Iterable[str], output_format: str) -> str:
    """One shard, written atomically: ``part-<run>-<index>.jsonl`` (or ``.parquet``)."""
    name = f"part-{run_id}-{index:05d}.{output_format}"
    lines = list(lines)
    if output_format == "jsonl":
        text = "\n".join(lines) + "\n"
        atomic_write_bytes(out_dir / name, lambda tmp: Path(tmp).write_text(text))
    else:
        import pyarrow as arrow
        import pyarrow.parquet as parquet

        records = [json.loads(line) for line in lines]
        table = arrow.table({
            "image": [r["image"] for r in records],
            "width": [r.get("width") for r in records],
            "height": [r.get("height") for r in records],
            "boxes": [r.get("boxes") for r in records],
            "scores": [r.get("scores") for r in records],
            "error": [r.get("error") for r in records],
        })
        atomic_write_bytes(out_dir / name, lambda tmp: parquet.write_table(table, tmp))
    return name
