"""kexue._io.atomic_write: short temporary names, umask permissions, orphans of killed writers cleaned up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kexue import _io
from kexue._io import atomic_write, is_tmp_name, printable, sweep_orphans

_IO_FILE = Path(_io.__file__)


def _age(path: Path, seconds: float = 3600.0) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_target_name_of_255_characters_is_written(tmp_path):
    """Issue 18, defect 8: the temporary name was 14 characters longer than the target's, so a legal
    255-character name failed after the work was done."""
    try:
        limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    target = tmp_path / ("h" * (limit - 5) + ".json")
    assert len(target.name) == limit
    atomic_write(target, lambda f: f.write(b"{}"))
    assert target.read_bytes() == b"{}"
    assert os.listdir(tmp_path) == [target.name]


def test_the_temporary_file_is_short_hidden_and_beside_the_target(tmp_path):
    seen = []

    def write(f):
        seen.extend(n for n in os.listdir(tmp_path) if n.startswith("."))
        f.write(b"x")

    atomic_write(tmp_path / "out.bin", write)
    assert len(seen) == 1 and is_tmp_name(seen[0]) and len(seen[0]) == 16
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.bin", lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError())))
    assert os.listdir(tmp_path) == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"x"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Issue 18: outputs were owner-only (mkstemp's 0600) whatever the umask."""
    old = os.umask(umask)
    try:
        p = atomic_write(tmp_path / "f.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_current_umask_reads_without_changing_it():
    old = os.umask(0o027)
    try:
        assert _io.current_umask() == 0o027 and _io.default_mode(directory=True) == 0o750
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


_KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("kx_io", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
def write(f):
    f.write(b"partial" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
m.atomic_write(sys.argv[2], write)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_writer_leaves_no_target_and_its_orphan_is_removed_next_time(tmp_path):
    """Issue 18: a kill during a write left its temporary file forever (185 MB for the CIFAR decode cache)."""
    target = tmp_path / "big.npz"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(_IO_FILE), str(target)], timeout=60)
    assert proc.returncode == -9
    orphans = os.listdir(tmp_path)
    assert not target.exists() and len(orphans) == 1 and is_tmp_name(orphans[0])
    orphan = tmp_path / orphans[0]
    assert not _io.remove_orphan(orphan)        # too young to tell from a writer that has not locked it yet
    _age(orphan)
    atomic_write(tmp_path / "other.txt", lambda f: f.write(b"x"))   # the first write into the folder sweeps it
    assert sorted(os.listdir(tmp_path)) == ["other.txt"]


@pytest.mark.skipif(_io.fcntl is None, reason="needs flock")
def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    live = tmp_path / ".kx-abcdefgh.tmp"
    fd = os.open(live, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        _io.fcntl.flock(fd, _io.fcntl.LOCK_EX | _io.fcntl.LOCK_NB)
        _age(live)
        foreign = [tmp_path / ".kx-notours.tmp", tmp_path / "kx-abcdefgh.tmp", tmp_path / ".kx-abcdefgh.tmp.bak"]
        for p in foreign:
            p.write_text("the user's")
            _age(p)
        assert sweep_orphans(tmp_path, force=True) == []
        assert live.exists() and all(p.exists() for p in foreign)
    finally:
        os.close(fd)
    assert sweep_orphans(tmp_path, force=True) == [live]     # its writer is gone now


def test_printable_escapes_only_what_is_not_utf8():
    assert printable("plain ü 中") == "plain ü 中"
    assert printable(os.fsdecode(b"rep_\xff\xfe")) == "rep_\\xff\\xfe"
    assert printable("a\ud800b") == "a\\ud800b"
    printable(os.fsdecode(b"\x80")).encode("utf-8")


def test_check_target_names_what_is_wrong_before_any_work(tmp_path):
    from kexue._io import check_target

    assert check_target(tmp_path / "a" / "b" / "h.json") == tmp_path / "a" / "b" / "h.json"
    assert not (tmp_path / "a").exists()                        # checking creates nothing
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    for bad, what in [(tmp_path / "dir", "is a folder"), (tmp_path / "file" / "h.json", "is a file, where"),
                      (tmp_path / ("n" * 256), "256 bytes long"), (tmp_path / ("n" * 300) / "h.json", "300 bytes"),
                      (tmp_path / "dir" / "..", "names a folder")]:
        with pytest.raises(ValueError, match=what):
            check_target(bad)
    check_target(tmp_path / ("n" * 255))


def test_check_runs_on_the_written_file_before_the_rename(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    seen = []

    def bad(p: Path) -> None:
        seen.append((is_tmp_name(p.name), p.read_bytes()))
        raise ValueError("hash mismatch")

    with pytest.raises(ValueError, match="hash mismatch"):
        atomic_write(target, lambda f: f.write(b"new"), check=bad)
    assert seen == [(True, b"new")] and target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    atomic_write(target, lambda f: f.write(b"new"), check=lambda p: None)
    assert target.read_bytes() == b"new"
