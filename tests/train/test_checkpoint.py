"""Checkpoint files: CRC-checked, pickle-free loading with errors that name the file, and the up-front check
that an output file can be written (kexue.train.checkpoint)."""

from __future__ import annotations

import os
import pickle
import shlex

import pytest
import torch

from kexue._io import atomic_write
from kexue.train.checkpoint import CheckpointError, check_output_file, load_checkpoint, save_checkpoint


def _saved(tmp_path, name="ck.pt"):
    w = torch.arange(1024, dtype=torch.float32)
    p = save_checkpoint(tmp_path / name, {"epoch": 3, "w": w, "rng": torch.get_rng_state()})
    return p, w


def test_a_flipped_byte_inside_a_weight_tensor_is_refused(tmp_path):
    p, w = _saved(tmp_path)
    data = bytearray(p.read_bytes())
    at = data.find(w.numpy().tobytes())
    assert at > 0
    data[at + 2001] ^= 0x04
    p.write_bytes(bytes(data))
    # torch.load alone does not notice: it returns the changed weights (what the old loader resumed from)
    assert not torch.equal(torch.load(p, weights_only=True)["w"], w)
    with pytest.raises(CheckpointError, match="CRC") as info:
        load_checkpoint(p)
    assert str(p) in str(info.value)


def _truncated(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _one_byte_short(p):
    p.write_bytes(p.read_bytes()[:-1])


def _empty(p):
    p.write_bytes(b"")


def _garbage(p):
    p.write_bytes(os.urandom(3000))


def _folder(p):
    p.unlink()
    p.mkdir()


@pytest.mark.parametrize("damage", [_truncated, _one_byte_short, _empty, _garbage, _folder])
def test_every_unusable_file_is_a_checkpoint_error_naming_the_path(tmp_path, damage):
    p, _ = _saved(tmp_path)
    damage(p)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(p)
    msg = str(info.value)
    assert str(p) in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "zipped.pt"
    torch.save({"model": _RunsCode(marker)}, zipped)       # a torch (zip) checkpoint carrying a shell command
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": _RunsCode(marker)}))  # a bare pickle
    for p in (zipped, raw):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(p)
        assert str(p) in str(info.value)
        assert "weights_only=False" not in str(info.value)  # no advice to load it unsafely
    assert not marker.exists()


def test_checkpoints_carry_crcs_even_when_torch_is_told_not_to_write_them(tmp_path):
    import torch.utils.serialization as ser

    before = ser.config.save.compute_crc32
    ser.config.save.compute_crc32 = False
    try:
        p, w = _saved(tmp_path)
    finally:
        ser.config.save.compute_crc32 = before
    assert torch.equal(load_checkpoint(p)["w"], w)
    assert ser.config.save.compute_crc32 == before


# ------------------------------------------------------------------------------------- check_output_file

def test_check_output_file_refuses_folders_and_files_in_the_way(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for target, why in ((tmp_path / "dir", "is a folder"), (tmp_path / "file" / "h.json", "is not a folder"),
                        (tmp_path / "file" / "sub" / "h.json", "is not a folder"),
                        (tmp_path / "new" / ".." / "dir", "is a folder")):
        with pytest.raises(ValueError, match=why) as info:
            check_output_file(target, what="--history-json")
        assert str(target) in str(info.value) and "--history-json" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_check_output_file_leaves_no_trace_and_keeps_an_existing_file(tmp_path):
    (tmp_path / "old.json").write_text("keep me")
    assert check_output_file(tmp_path / "old.json") == tmp_path / "old.json"
    assert check_output_file(tmp_path / "a" / "b" / "new.json").name == "new.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    assert (tmp_path / "old.json").read_text() == "keep me"


def test_check_output_file_predicts_whether_the_atomic_write_works(tmp_path):
    """Long names: the check passes exactly when the atomic writer can write the file (whatever the length of
    its temporary name), so a run refused up front is one that would have failed at the end."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for n in (200, limit - 20, limit - 14, limit - 13, limit - 1, limit, limit + 1):
        target = tmp_path / ("h" * (n - 5) + ".json")
        try:
            check_output_file(target)
            ok = True
        except ValueError as exc:
            ok = False
            assert "too long" in str(exc) and str(target) in str(exc)
        try:
            atomic_write(target, lambda f: f.write(b"{}"))
            wrote = True
        except OSError:
            wrote = False
        assert ok == wrote, n
        if n > limit:
            assert not ok
        if wrote:
            target.unlink()
    assert list(tmp_path.iterdir()) == []


def test_no_pickle_load_in_the_package():
    """Nothing in kexue unpickles: torch.load only with weights_only=True, no pickle.load(s), no
    numpy allow_pickle=True. The one exception is the CIFAR-10 python batches in data/loaders.py, which are
    read only after their checksum is verified."""
    import ast
    from pathlib import Path

    import kexue

    allowed_pickle = {Path("data") / "loaders.py"}
    root = Path(kexue.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not safe:
                    found.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
            elif owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads", "Unpickler"):
                if rel not in allowed_pickle:
                    found.append(f"{rel}:{node.lineno} {owner}.{node.func.attr}")
            elif "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                               and kw["allow_pickle"].value is False):
                found.append(f"{rel}:{node.lineno} allow_pickle")
    assert found == []
