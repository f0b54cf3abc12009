"""The local proposal engine, in input order: decode and resize in worker threads while the model runs, or, on
a CPU, several images at once in lanes, each in a thread of its own from decoding to proposals."""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Iterator, Sequence

import torch

from ..errors import ImageError
from ..io.images import DEFAULT_MAX_PIXELS, load_image
from ..io.inputs import InputImage
from ..io.results import ImageResult
from ..model.network import RegionProposalNetwork
from ..model.preprocess import PreparedImage, prepare_image
from ..model.proposals import ProposalLayer
from ..model.spec import PreprocessSpec
from .devices import cpu_cores
from .predict import proposals_from_outputs, run_model
from .prefetch import DecodeAhead


@dataclass
class Timings:
    """Seconds spent per stage (decoding overlaps the model when workers > 0; with lanes, each stage's
    seconds are summed over the lanes, so they add up to more than the time the run took)."""

    decode: float = 0.0
    model: float = 0.0
    proposal_layer: float = 0.0
    images: int = 0
    failed: int = 0
    proposals: int = 0
    lanes: int = 1  # images run at once


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
    lanes: int = 1,
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

    ``lanes`` > 1, on a CPU with batches of one image and more than one image: see :func:`_propose_in_lanes`
    (``workers`` then plays no part).
    """
    timings = timings or Timings()
    lanes = min(lanes, len(items))
    if lanes > 1 and batch_size == 1 and getattr(model, "runs_on_cpu", model.device.type == "cpu"):
        yield from _propose_in_lanes(items, model, proposal_layer, lanes, top_k, max_pixels, timings, decoded_ahead)
        return
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


def _propose_in_lanes(items, model, proposal_layer, lanes, top_k, max_pixels, timings: Timings,
                      decoded_ahead) -> Iterator[ImageResult]:
    """``lanes`` images at once, each decoded, run through the network and the proposal layer in a thread of
    its own, the network on an equal share of the cores; at most two images a lane queued, one held.

    Why: one image at a time leaves cores idle while it is decoded and goes through the proposal layer,
    and the network gains less than a core a thread (measured on 2 cores, ONNX Runtime int8: 0.075 s an
    image in 2 lanes, 0.096 s one at a time, the same records; README "Performance"). ONNX Runtime
    networks get a session of their own a lane (``with_threads``); for PyTorch networks the process-wide
    thread count is set to the share for the run and restored when the stream ends or is closed.
    """
    threads = max(1, cpu_cores() // lanes)
    with_threads = getattr(model, "with_threads", None)
    runners = with_threads(threads, lanes) if with_threads is not None else None
    torch_threads = None  # PyTorch's thread count, where this run changes it
    if runners is None:
        runners, torch_threads = [model] * lanes, torch.get_num_threads()
        torch.set_num_threads(threads)
    timings.lanes = lanes
    free = SimpleQueue()  # a runner a running lane: ONNX Runtime sessions then never share their threads
    for runner in runners:
        free.put(runner)
    preprocess = model.spec.preprocess
    executor = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="rpn-lane")
    pending: deque[tuple[InputImage, Future]] = deque()
    queue = iter(items)

    def submit_next() -> None:
        item = next(queue, None)
        if item is not None:
            pending.append((item, executor.submit(_propose_one, item, free, proposal_layer, preprocess, top_k,
                                                  max_pixels, decoded_ahead)))

    try:
        for _ in range(2 * lanes):
            submit_next()
        while pending:
            item, job = pending.popleft()
            result, (decode, network, layer) = job.result()
            submit_next()
            timings.decode += decode
            timings.model += network
            timings.proposal_layer += layer
            if result.error is not None:
                timings.failed += 1
            else:
                timings.images += 1
                timings.proposals += int(result.proposals.scores.numel())
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)


def _propose_one(item, free_runners: SimpleQueue, proposal_layer, preprocess, top_k, max_pixels,
                 decoded_ahead) -> tuple[ImageResult, tuple[float, float, float]]:
    """One image from its file to its proposals, the network run by a runner taken from ``free_runners``
    and given back; the seconds of decoding, network and proposal layer."""
    prepared, error, decode = _prepare(item, preprocess, max_pixels, decoded_ahead)
    if error is not None:
        return ImageResult(item, error=error), (decode, 0.0, 0.0)
    started = time.perf_counter()
    runner = free_runners.get()
    try:
        levels = run_model(runner, [prepared])
    finally:
        free_runners.put(runner)
    network = time.perf_counter() - started
    started = time.perf_counter()
    proposals = proposals_from_outputs(levels, [prepared], proposal_layer, top_k)[0]
    return ImageResult(item, proposals), (decode, network, time.perf_counter() - started)
