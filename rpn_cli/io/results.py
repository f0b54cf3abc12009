"""What became of one input: its proposals or an error line."""

from __future__ import annotations

from dataclasses import dataclass

from ..io.inputs import InputImage
from ..model.proposals import ImageProposals


@dataclass
class ImageResult:
    """The outcome for one input: ``proposals`` or an ``error`` line."""

    item: InputImage
    proposals: ImageProposals | None = None
    error: str | None = None
