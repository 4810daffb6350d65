"""Atomic checkpoint files: written to a temporary name in the same folder, flushed to disk, then renamed
over the target with ``os.replace``, so a run killed at any moment leaves either the previous complete
checkpoint or the new one, never a torn file.

Loading is safe and checked: the zip records' CRC-32s are verified before anything is unpickled (a flipped
byte anywhere in the file is refused, not resumed), and the payload is unpickled with ``weights_only=True``
(tensors and plain containers only: a crafted file cannot run code). Every failure is a
:class:`CheckpointError` naming the file. :func:`check_output_file` checks, before any work is done, that a
file can be written where a run will write it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import secrets
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from kexue._io import atomic_write

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "atomic_write_bytes", "check_output_file"]

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, truncated, corrupt, not a checkpoint, holding objects that are
    not plain data, or written by a different run. The message names the file."""


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


@contextlib.contextmanager
def _crc32_on():
    """Make ``torch.save`` compute the zip records' CRC-32s (it can be switched off globally; the loader
    checks them)."""
    cfg = None
    with contextlib.suppress(ImportError, AttributeError):
        import torch.utils.serialization as ser

        cfg = ser.config.save
        before = cfg.compute_crc32
    if cfg is None:
        yield
        return
    cfg.compute_crc32 = True
    try:
        yield
    finally:
        cfg.compute_crc32 = before


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically (with the zip records' CRC-32s); returns the path.

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
    with _crc32_on():
        atomic_write(path, lambda f: torch.save(state, f))
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _verify_zip(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete zip archive whose records all match their
    CRC-32 (``torch.load`` itself does not check them)."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {path} is not a complete checkpoint archive ({size} bytes, no zip "
                                  "directory at its end): truncated, or not a checkpoint")
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if not z.namelist():
                raise CheckpointError(f"checkpoint {path} is an empty archive")
    except CheckpointError:
        raise
    except PermissionError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error,
            NotImplementedError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({_first_line(exc)})") from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its record {bad!r} fails its CRC-32 check "
                              "(the file changed after it was written)")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors mapped to ``map_location``).

    The zip records' CRC-32s are checked first, then the payload is unpickled with ``weights_only=True``
    (tensors, plain Python containers, numbers and strings only: no code runs on load). A missing file raises
    ``FileNotFoundError``; anything else wrong with it (a folder, empty, truncated, garbled, a flipped byte,
    objects that are not plain data, not a dict) raises :class:`CheckpointError`; both name the path.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ck.pt"
        >>> _ = p.write_bytes(b"not a checkpoint")
        >>> try:
        ...     load_checkpoint(p)
        ... except CheckpointError as e:
        ...     print(str(e).endswith("truncated, or not a checkpoint"), str(p) in str(e))
        True True
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        if path.exists() or path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is not a regular file (or a link to one)")
        raise FileNotFoundError(f"no checkpoint at {path}")
    _verify_zip(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds Python objects other than tensors and plain containers, "
            f"which are not loaded because unpickling them can run code ({_first_line(exc)[:200]})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({_first_line(exc)[:300]})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_output_file(path: str | os.PathLike, *, what: str = "output file") -> Path:
    """Check, before any work is done, that a file can be written atomically at ``path``; return it.

    Refused with a ``ValueError`` naming the path and the reason: ``path`` is a folder (or not a regular
    file), a folder on its way is a file, the folder cannot be created or written, or the name is too long
    for the file system. The check writes and removes a probe file of the same name length beside ``path``
    through the same atomic writer (so its temporary name must fit too); folders it had to create are
    removed again. An existing file at ``path`` is left untouched.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_file(d / "sub" / "h.json").name, (d / "sub").exists()
        ('h.json', False)
        >>> try:
        ...     check_output_file(d, what="--history-json")
        ... except ValueError as e:
        ...     print(str(e) == f"--history-json {d} is a folder; a file is written there")
        True
    """
    path = Path(path)
    label = f"{what} {path}"
    if path.name in ("", ".", ".."):
        raise ValueError(f"{label} names a folder; a file is written there")

    def check_target() -> None:
        if path.is_dir():
            raise ValueError(f"{label} is a folder; a file is written there")
        if path.is_symlink() and not path.exists():
            raise ValueError(f"{label} is a broken symbolic link")
        if path.exists() and not path.is_file():
            raise ValueError(f"{label} exists and is not a regular file")

    try:
        check_target()
        missing: list[Path] = []
        folder = path.parent
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"{label}: {folder} is not a folder")
    except OSError as exc:  # e.g. a symlink loop, a permission error on the way
        raise ValueError(f"{label} cannot be checked ({exc.strerror or exc})") from exc
    limit = _name_max(folder)
    n = len(os.fsencode(path.name))
    if n > limit:
        raise ValueError(f"{label}: its name is {n} bytes long; this file system allows at most {limit}")
    width = max(n, 16)
    probe = path.parent / (".kexue-probe-" + secrets.token_hex(width))[:width]
    try:
        atomic_write(probe, lambda f: None)
        check_target()  # again, now that the folders exist (a path through "missing/.." resolves only now)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ValueError(f"{label}: its name ({n} bytes) is too long here: the file system allows {limit} "
                             "bytes, and the temporary file written beside it first must fit too") from exc
        raise ValueError(f"{label} cannot be written ({exc.strerror or exc})") from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
        for d in missing:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
    return path
