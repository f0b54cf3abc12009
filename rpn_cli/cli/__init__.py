"""The ``rpn`` command line: each command parses its options, calls the library and reports.

:mod:`.base` holds the application and the one place where errors become a line and an exit code.
"""

from . import anchors, convert, evaluate, export, info, propose, train  # noqa: F401  (each registers its command)
from .base import app

__all__ = ["app"]
