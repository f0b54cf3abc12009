"""rpn: class-agnostic object proposals with a Region Proposal Network (Faster R-CNN's first stage).

The public API::

    from rpn_cli import Proposer
    proposer = Proposer()                 # the shipped checkpoint; device and precision "auto", as the CLI
    result = proposer("photo.jpg")        # boxes (K, 4) x1y1x2y2 in the photo's pixels, scores (K,), best first
    for result in proposer.stream(["photos/"], batch_size=4):
        ...                               # an ImageResult per image, in order: .item, .proposals or .error

``Proposer`` is imported on first use, so ``import rpn_cli`` stays light (no PyTorch).
"""

from .version import __version__

__all__ = ["Proposer", "ImageProposals", "ImageResult", "RpnError", "__version__"]


def __getattr__(name: str):
    if name == "Proposer":
        from .inference.proposer import Proposer

        return Proposer
    if name == "ImageProposals":
        from .model.proposals import ImageProposals

        return ImageProposals
    if name == "ImageResult":
        from .io.results import ImageResult

        return ImageResult
    if name == "RpnError":
        from .errors import RpnError

        return RpnError
    raise AttributeError(f"module 'rpn_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
