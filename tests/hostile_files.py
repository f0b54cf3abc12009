"""Files an attacker might hand to rpn. TorchScript compiles from source, so the class lives in a file."""

import warnings
from pathlib import Path
from typing import Tuple

import torch


class _WritesOnLoad(torch.nn.Module):
    """A scripted module whose ``__setstate__`` (run by ``torch.jit.load``) maps ``marker`` as a shared
    file: loading it creates that file, as a real attack would write any file the user can."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.mapped = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(self.marker, True, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Carrier(torch.nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.inner = _WritesOnLoad(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def write_code_running_torchscript(path: Path, marker: Path) -> None:
    """A TorchScript file that creates ``marker`` when loaded (and not before)."""
    with warnings.catch_warnings():  # torch.jit is deprecated: that is part of the point
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_Carrier(str(marker))), str(path))
    marker.unlink(missing_ok=True)
