"""Atomic checkpoint files: written to a temporary name in the same folder, flushed to disk, then renamed
over the target with ``os.replace``, so a run killed at any moment leaves either the previous complete
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kexue._io import atomic_write

__all__ = ["CHECKPOINT_NAME", "checkpoint_path", "save_checkpoint", "load_checkpoint", "atomic_write_bytes"]

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> Path:
    """The file :func:`kexue.train.fit` writes inside ``checkpoint_dir``.

    Example:
        >>> checkpoint_path("runs/a").name
        'checkpoint.pt'
    """
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write_bytes(p, b"hi"); p.read_bytes()
        b'hi'
    """
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically; returns the path.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ck.pt"
        >>> _ = save_checkpoint(p, {"epoch": 1, "w": torch.ones(2)})
        >>> load_checkpoint(p)["epoch"]
        1
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors mapped to ``map_location``).

    Checkpoints hold only tensors and plain Python containers/numbers/strings, so they load with
    ``weights_only=True`` (no arbitrary code runs on load).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
