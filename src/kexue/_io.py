"""Atomic file writes, shared by checkpoints, reports, caches and vocabularies.

A writer fills a temporary file in the target's folder, which is flushed, fsynced and renamed over the target
with ``os.replace``; a crash at any moment leaves either the old file or the new one, never half of one.

The temporary file has a short name of its own, ``.kx-XXXXXXXX.tmp`` (16 characters, whatever the target is
called), so any target name the file system accepts can be written. The writer holds an advisory lock
(``flock``) on it until it is renamed; a temporary file of that pattern that is unlocked and more than a few
seconds old was left by a process that died mid-write, and the first write into that folder by a later
process deletes it. New files get the permissions of the user's umask, like any other output.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_PREFIX = ".kx-"
TMP_SUFFIX = ".tmp"
# tempfile's random part is 8 characters from [a-z0-9_]
_TMP_RE = re.compile(r"^\.kx-[a-z0-9_]{8}\.tmp$")
# An unlocked temporary file younger than this may belong to a writer that has created it and not yet locked
# it (microseconds); older than this and unlocked, its writer is gone. Without flock (Windows) only files older
# than a day are taken for orphans.
_ORPHAN_AGE_S = 10.0
_ORPHAN_AGE_NOLOCK_S = 86400.0
_SWEPT: set[str] = set()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (``/proc/self/status``).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def default_mode(*, directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file (0o666) or folder (0o777) under the umask.

    ``tempfile.mkstemp`` / ``mkdtemp`` create owner-only entries (0o600 / 0o700); a temporary that becomes the
    user's output is chmod-ed to this.

    >>> default_mode() & 0o600 == 0o600 and default_mode(directory=True) & 0o700 == 0o700
    True
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def printable(text: str) -> str:
    """``text`` made encodable as UTF-8: bytes of a path that is not UTF-8 (which Python carries as lone
    surrogates, ``os.fsdecode``) become ``\\xNN`` escapes, any other lone surrogate ``\\uXXXX``.

    >>> printable("rep_\\udcff"), printable("naïve")
    ('rep_\\\\xff', 'naïve')
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary-file names (``.kx-XXXXXXXX.tmp``).

    >>> is_tmp_name(".kx-ab12cd_9.tmp"), is_tmp_name("model.pt")
    (True, False)
    """
    return bool(_TMP_RE.match(name))


def _try_lock(fd: int) -> bool:
    """Take a non-blocking exclusive flock on ``fd``; True when taken (or when locks are unsupported there)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: treat as lockable, the age rule still applies
        return True
    return True


def remove_orphan(path: Path, *, min_age_s: float | None = None) -> bool:
    """Delete ``path`` if it is a temporary file left by a dead writer: unlocked and older than ``min_age_s``.

    Returns whether it was deleted. Used on our own temporary names only (:func:`is_tmp_name`, and the cache's
    own legacy names).
    """
    age = _ORPHAN_AGE_S if fcntl is not None else _ORPHAN_AGE_NOLOCK_S
    if min_age_s is not None:
        age = max(age, min_age_s)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < age:
            return False
        if not _try_lock(fd):
            return False            # a live writer holds it
        try:
            os.unlink(path)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


def sweep_orphans(folder: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Delete the temporary files (``.kx-XXXXXXXX.tmp``) that dead writers left in ``folder``.

    Runs once per folder per process unless ``force``; returns the paths deleted. Files of a live writer (it
    holds a lock on them) and very young files are left alone.

    >>> import tempfile, pathlib
    >>> sweep_orphans(tempfile.mkdtemp())
    []
    """
    folder = Path(folder)
    key = os.path.abspath(folder)
    if key in _SWEPT and not force:
        return []
    _SWEPT.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        if is_tmp_name(e.name) and remove_orphan(Path(e.path)):
            removed.append(Path(e.path))
    return removed


def check_target(path: str | os.PathLike) -> Path:
    """Check before any work that :func:`atomic_write` can put a file at ``path``, as far as names and folders
    go; raise ``ValueError`` saying what is wrong (a folder there, a file where a folder should be, a name
    longer than the file system allows, a folder that cannot be written). Returns ``Path(path)``.

    >>> import tempfile, pathlib
    >>> check_target(pathlib.Path(tempfile.mkdtemp()) / "new" / "history.json").name
    'history.json'
    >>> check_target(pathlib.Path(tempfile.mkdtemp()) / ("x" * 300))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...: the name is 300 bytes long; the file system allows at most 255
    """
    p = Path(path)
    shown = printable(str(p))
    if p.name in ("", ".", ".."):
        raise ValueError(f"{shown!r} names a folder, not a file")
    existing, missing = Path(os.path.abspath(p)), []
    while True:   # the nearest part of the path that exists (a name too long to look up does not)
        try:
            st = os.stat(existing)
            break
        except OSError:
            try:
                dangling = stat.S_ISLNK(os.lstat(existing).st_mode)
            except OSError:
                dangling = False
            if dangling:
                raise ValueError(f"{printable(str(existing))!r} is a symbolic link to nothing") from None
            if existing.parent == existing:
                raise ValueError(f"{shown!r}: no part of this path exists") from None
            missing.append(existing.name)
            existing = existing.parent
    if not missing:
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{shown!r} is a folder; give a file name")
        existing = existing.parent
    elif not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{printable(str(existing))!r} is a file, where a folder holding {shown!r} should be")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for part in [p.name, *missing]:
        n = len(os.fsencode(part))
        if n > name_max:
            raise ValueError(f"{shown!r}: the name is {n} bytes long; the file system allows at most {name_max}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{shown!r}: the folder {printable(str(existing))!r} cannot be written")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *,
                 check: Callable[[Path], Any] | None = None) -> Path:
    """Call ``write(f)`` on a binary temporary file beside ``path``, then move it into place atomically.

    The temporary file is ``.kx-XXXXXXXX.tmp`` in ``path``'s folder (so the target's name may be as long as
    the file system allows); it is locked while written, removed if ``write`` (or ``check``, called with the
    temporary file's path once it is written, e.g. to verify a hash) raises, and removed by a later write into
    the same folder if the process is killed. The new file's mode follows the umask.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = atomic_write(p, lambda f: f.write(b"hi")); p.read_bytes()
        b'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=path.parent)
    f = os.fdopen(fd, "wb")
    try:
        _try_lock(f.fileno())
        if hasattr(os, "fchmod"):
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), default_mode())
        write(f)
        f.flush()
        os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        if fcntl is None:  # pragma: no cover - Windows cannot rename an open file
            f.close()
        os.replace(tmp, path)  # renamed while still locked: a sweeper never sees it unlocked and finished
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        f.close()
    _fsync_dir(path.parent)
    return path
