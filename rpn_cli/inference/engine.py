"""The local proposal engine: decode and resize in worker threads while the model runs, in input order."""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import ImageError
from ..io.images import DEFAULT_MAX_PIXELS, load_image
from ..io.inputs import InputImage
from ..io.results import ImageResult
from ..model.network import RegionProposalNetwork
from ..model.preprocess import PreparedImage, prepare_image
from ..model.proposals import ProposalLayer
from ..model.spec import PreprocessSpec
from .predict import proposals_from_outputs, run_model
from .prefetch import DecodeAhead


@dataclass
class Timings:
    """Seconds spent per stage (decoding overlaps the model when workers > 0)."""

    decode: float = 0.0
    model: float = 0.0
    proposal_layer: float = 0.0
    images: int = 0
    failed: int = 0
    proposals: int = 0


def _prepare(item: InputImage, preprocess: PreprocessSpec, max_pixels: int | None,
             decoded_ahead: DecodeAhead | None) -> tuple[PreparedImage | None, str | None, float]:
    started = time.perf_counter()
    if item.problem:
        return None, f"{item.given}: {item.problem}", 0.0
    try:
        image = decoded_ahead.take(item) if decoded_ahead is not None else None
        prepared = prepare_image(image if image is not None else load_image(item.given, max_pixels), preprocess)
    except ImageError as error:
        return None, str(error), time.perf_counter() - started
    return prepared, None, time.perf_counter() - started


def propose_images(
    items: Sequence[InputImage],
    model: RegionProposalNetwork,
    proposal_layer: ProposalLayer,
    *,
    batch_size: int = 1,
    workers: int = 0,
    top_k: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    timings: Timings | None = None,
    decoded_ahead: DecodeAhead | None = None,
) -> Iterator[ImageResult]:
    """Yield one :class:`ImageResult` per item, in the order of ``items``.

    Images are decoded ``workers`` at a time (0: in this thread), at most a few
    batches ahead of the model, so memory stays flat on any number of images;
    those ``decoded_ahead`` has decoded are taken from it. A batch holds only
    consecutive images of the same size: padding one image to another's size
    would change the features near its border, and so its proposals.
    """
    timings = timings or Timings()
    preprocess = model.spec.preprocess
    divisible = preprocess.size_divisible
    pending: deque[tuple[InputImage, Future | tuple]] = deque()
    lookahead = max(1, batch_size) * (2 + workers)
    executor = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    queue = iter(items)

    def submit_next() -> bool:
        item = next(queue, None)
        if item is None:
            return False
        if executor is not None:
            pending.append((item, executor.submit(_prepare, item, preprocess, max_pixels, decoded_ahead)))
        else:
            pending.append((item, _prepare(item, preprocess, max_pixels, decoded_ahead)))
        return True

    try:
        while len(pending) < lookahead and submit_next():
            pass
        batch: list[tuple[InputImage, PreparedImage]] = []
        while pending:
            item, job = pending.popleft()
            submit_next()
            prepared, error, seconds = job.result() if isinstance(job, Future) else job
            timings.decode += seconds
            if error is not None:
                # Flush what is batched first, so results stay in input order.
                yield from _run_batch(batch, model, proposal_layer, top_k, timings)
                batch = []
                timings.failed += 1
                yield ImageResult(item, error=error)
                continue
            if batch and _padded_size(batch[0][1], divisible) != _padded_size(prepared, divisible):
                yield from _run_batch(batch, model, proposal_layer, top_k, timings)
                batch = []
            batch.append((item, prepared))
            if len(batch) >= batch_size:
                yield from _run_batch(batch, model, proposal_layer, top_k, timings)
                batch = []
        yield from _run_batch(batch, model, proposal_layer, top_k, timings)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _padded_size(image: PreparedImage, divisible: int) -> tuple[int, int]:
    """The (H, W) an image is padded to when it runs alone (see :func:`pad_batch`)."""
    return tuple(math.ceil(side / divisible) * divisible for side in image.tensor.shape[1:])


def _run_batch(batch, model, proposal_layer, top_k, timings: Timings) -> Iterator[ImageResult]:
    if not batch:
        return
    prepared = [image for _, image in batch]
    started = time.perf_counter()
    levels = run_model(model, prepared)
    timings.model += time.perf_counter() - started
    started = time.perf_counter()
    results = proposals_from_outputs(levels, prepared, proposal_layer, top_k)
    timings.proposal_layer += time.perf_counter() - started
    for (item, _), proposals in zip(batch, results):
        timings.images += 1
        timings.proposals += int(proposals.scores.numel())
        yield ImageResult(item, proposals)
