"""Errors raised while loading a checkpoint. Each names the file, and the tensor where one is at fault."""

from __future__ import annotations

from pathlib import Path


class WeightLoadError(ValueError):
    """A checkpoint could not be loaded: the message says which file, which tensor and why."""

    def __init__(self, file: str | Path, reason: str, tensor: str | None = None) -> None:
        self.file = str(file)
        self.tensor = tensor
        self.reason = reason
        where = f"{self.file}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"cannot load {where}: {reason}")
