"""rpn: class-agnostic object proposals with a Region Proposal Network (Faster R-CNN's first stage)."""

__version__ = "0.1.0"
