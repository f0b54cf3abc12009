"""Decoding the first images of a run while the rest of the program loads.

Importing PyTorch keeps one core busy for over a second (1.3 s on the 2-core machine of the README)
and leaves the others idle; ``rpn propose`` starts this before that import, so a short run finds
its first images already decoded (a 50-photo run 0.25 s shorter, ``benchmarks/benchmark_propose.py``).
This module must not import torch.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Sequence

from PIL import Image

from ..errors import ImageError
from ..io.images import DEFAULT_MAX_PIXELS, load_image
from ..io.inputs import InputImage


class DecodeAhead:
    """Decodes the first ``max_images`` of ``items`` in one background thread, in order, until it has
    decoded ``pixel_budget`` pixels (which bounds the memory it holds); :meth:`take` hands each one
    over once."""

    def __init__(self, items: Sequence[InputImage], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_images: int = 64, pixel_budget: int = 50_000_000):
        self._max_pixels = max_pixels
        self._budget = pixel_budget
        self._decoded_pixels = 0  # only the decoding thread touches it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rpn-decode-ahead")
        self._jobs: dict[int, tuple[InputImage, Future]] = {}
        for item in items[:max_images]:
            if not item.problem:
                self._jobs[id(item)] = (item, self._executor.submit(self._decode, item))

    def _decode(self, item: InputImage) -> Image.Image | ImageError | None:
        if self._decoded_pixels >= self._budget:
            return None
        try:
            image = load_image(item.given, self._max_pixels)
        except ImageError as error:
            return error
        self._decoded_pixels += image.width * image.height
        return image

    def take(self, item: InputImage) -> Image.Image | None:
        """The decoded image of ``item`` (waiting for it if it is being decoded), or None when it was
        not decoded ahead or its decoding had not started. Raises the :class:`ImageError` that
        decoding it raised."""
        job = self._jobs.pop(id(item), None)  # the item is held beside its job, so its id stays its own
        if job is None or job[1].cancel():
            # Not started yet: the caller (maybe one of several decoding threads) decodes it now
            # rather than wait for this one thread to reach it.
            return None
        result = job[1].result()
        if isinstance(result, ImageError):
            raise result
        return result

    def wait(self) -> None:
        """Block until the thread has dealt with every image it was given."""
        wait_for([future for _, future in self._jobs.values()])

    def close(self) -> None:
        """Stop decoding ahead and let go of what was not taken."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._jobs.clear()
