"""Typed errors raised by the library; the CLI turns each into one line and an exit code."""


class RpnError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(RpnError):
    """An option or argument that cannot be used as given."""

    exit_code = 2


class CheckpointError(RpnError):
    """A checkpoint that is missing, unreadable or inconsistent."""

    exit_code = 3


class ImageError(RpnError):
    """An input image that cannot be read or decoded."""

    exit_code = 4


class DataError(RpnError):
    """An annotation file or dataset folder that cannot be used."""

    exit_code = 5


class OutputError(RpnError):
    """An output file that cannot be written."""

    exit_code = 6


class TrainingError(RpnError):
    """A training run that cannot go on (its loss is no longer a finite number)."""

    exit_code = 7
