"""Loaders: registry files -> tensors (images) or strings (text).

Images come back as ``uint8`` tensors (``[N, H, W]`` grey, ``[N, 3, H, W]`` colour) with ``int64`` labels; text
as ``str``. Decoded results are kept in memory for the process, and slow decodes (CIFAR-10 JPEG) are also cached
on disk in the user cache, written atomically and keyed by the archive's sha256 (a copy of the archive elsewhere
shares the entry). An entry carries a manifest (shapes, dtypes, the sha256 of its arrays); one that cannot be
read or does not match it is discarded with a warning and decoded again.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, remove_orphan, sweep_orphans
from .registry import cache_dir, get_spec, resolve, resolve_file, where

PathLike = str | os.PathLike | None

_SPLITS = ("train", "test")


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _key(data_dir: PathLike) -> str | None:
    return None if data_dir is None else str(Path(data_dir).resolve())


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip-compressed) IDX file into a NumPy array of unsigned bytes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


@functools.lru_cache(maxsize=8)
def _idx_pair(dataset: str, split: str, key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    files = resolve(dataset, key, files=[f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"])
    images = read_idx(files[f"{prefix}-images-idx3-ubyte.gz"])
    labels = read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{dataset} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist(split: str = "train", data_dir: PathLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST: ``(images uint8 [N, 28, 28], labels int64 [N])``; N = 60,000 (train) or 10,000 (test).

    >>> x, y = load_mnist("test")  # doctest: +SKIP
    >>> x.shape, y[:5]             # doctest: +SKIP
    (torch.Size([10000, 28, 28]), tensor([7, 2, 1, 0, 4]))
    """
    return _idx_pair("mnist", _check_split(split), _key(data_dir))


def load_fashion_mnist(split: str = "train", data_dir: PathLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST: ``(images uint8 [N, 28, 28], labels int64 [N])``, same layout as MNIST."""
    return _idx_pair("fashion-mnist", _check_split(split), _key(data_dir))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _decode_cifar_jpeg(archive: Path) -> dict[str, np.ndarray]:
    from PIL import Image
    from tqdm.auto import tqdm

    out: dict[str, list] = {f"{s}_{k}": [] for s in _SPLITS for k in ("x", "y", "name")}
    cls_index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tqdm(tar, desc="decode CIFAR-10 JPEG", total=60000, leave=False, unit="img"):
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = member.name.split("/")
            split, cls = parts[-3], parts[-2]
            if split not in _SPLITS or cls not in cls_index:
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
            out[f"{split}_x"].append(img.transpose(2, 0, 1))
            out[f"{split}_y"].append(cls_index[cls])
            out[f"{split}_name"].append(f"{cls}/{parts[-1]}")
    arrays: dict[str, np.ndarray] = {}
    for s in _SPLITS:
        # a fixed order that does not depend on the archive's member order: class, then file name
        order = np.argsort(np.array(out[f"{s}_name"]), kind="stable")
        arrays[f"{s}_x"] = np.stack(out[f"{s}_x"])[order]
        arrays[f"{s}_y"] = np.array(out[f"{s}_y"], dtype=np.int64)[order]
    return arrays


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch and nothing else: dicts, lists, bytes and NumPy arrays only (the
    archive's sha256 is checked first; this also refuses any other callable a tampered batch could name)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which a batch never holds")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]   # numpy's own _reconstruct, whatever its module
        return super().find_class(module, name)


def _read_cifar_python(archive: Path) -> dict[str, np.ndarray]:
    xs: dict[str, list] = {"train": [], "test": []}
    ys: dict[str, list] = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            split = "train" if base.startswith("data_batch_") else "test" if base == "test_batch" else None
            if split is None or not member.isfile():
                continue
            batch = _CifarUnpickler(tar.extractfile(member), encoding="bytes").load()  # type: ignore[arg-type]
            xs[split].append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys[split].append(np.asarray(batch[b"labels"], dtype=np.int64))
    return {f"{s}_x": np.concatenate(xs[s]) for s in _SPLITS} | {f"{s}_y": np.concatenate(ys[s]) for s in _SPLITS}


_DECODE_CACHE_VERSION = 2
_CIFAR_KEYS = tuple(f"{s}_{k}" for s in _SPLITS for k in ("x", "y"))
# names of earlier versions' entries (keyed by the archive's size and mtime) and of their temporary files
_LEGACY_ENTRY = re.compile(r"^decoded-\d+-\d+\.npz$")
_LEGACY_TMP = re.compile(r"^\.decoded-.*\.npz\.[a-z0-9_]{8}\.tmp$")


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _check_cifar_arrays(arrays: dict[str, np.ndarray]) -> None:
    for s in _SPLITS:
        x, y = arrays[f"{s}_x"], arrays[f"{s}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(f"{s}_x is {x.dtype} {x.shape}, expected uint8 [N, 3, 32, 32]")
        if y.dtype != np.int64 or y.shape != (x.shape[0],):
            raise ValueError(f"{s}_y is {y.dtype} {y.shape}, expected int64 [{x.shape[0]}]")
        if y.size and not (0 <= y.min() and y.max() < len(CIFAR10_CLASSES)):
            raise ValueError(f"{s}_y holds labels outside 0..9")


def _save_decoded(path: Path, arrays: dict[str, np.ndarray], archive_sha256: str) -> None:
    """Write a decode-cache entry atomically: the arrays and a manifest of what they must be."""
    manifest = {"version": _DECODE_CACHE_VERSION, "archive_sha256": archive_sha256,
                "shapes": {k: list(v.shape) for k, v in arrays.items()},
                "dtypes": {k: v.dtype.str for k, v in arrays.items()}, "sha256": _arrays_sha256(arrays)}
    blob = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, manifest=blob, **arrays))


def _load_decoded(path: Path, archive_sha256: str) -> dict[str, np.ndarray]:
    """Read a decode-cache entry; raises (anything) unless it is whole and matches its manifest."""
    with np.load(path, allow_pickle=False) as z:
        if set(z.files) != {"manifest", *_CIFAR_KEYS}:
            raise ValueError(f"holds {sorted(z.files)}, expected manifest and {', '.join(_CIFAR_KEYS)}")
        manifest = json.loads(z["manifest"].tobytes().decode("utf-8"))
        arrays = {k: z[k] for k in _CIFAR_KEYS}
    if manifest.get("version") != _DECODE_CACHE_VERSION or manifest.get("archive_sha256") != archive_sha256:
        raise ValueError("written for another archive or cache version")
    for k, a in arrays.items():
        if list(a.shape) != manifest["shapes"][k] or a.dtype.str != manifest["dtypes"][k]:
            raise ValueError(f"{k} is {a.dtype.str} {list(a.shape)}, the manifest says "
                             f"{manifest['dtypes'][k]} {manifest['shapes'][k]}")
    _check_cifar_arrays(arrays)
    if _arrays_sha256(arrays) != manifest["sha256"]:
        raise ValueError("its arrays do not match the sha256 in its manifest")
    return arrays


def _tidy_decode_cache(folder: Path, keep: Path) -> None:
    """Delete what earlier runs left in the decode-cache folder: temporary files of a writer that was killed
    (ours, and earlier versions'), and entries of earlier versions, which were keyed by the archive's path."""
    sweep_orphans(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        if e.name == keep.name:
            continue
        if _LEGACY_TMP.match(e.name):
            remove_orphan(Path(e.path), min_age_s=600.0)   # those writers held no lock: only long-untouched ones
        elif _LEGACY_ENTRY.match(e.name) and e.is_file(follow_symlinks=False):
            try:
                os.unlink(e.path)
            except OSError:
                pass


def _decoded_cifar_jpeg(archive: Path, archive_sha256: str) -> dict[str, np.ndarray]:
    """The decoded JPEG archive, from the decode cache when it holds a good entry for this content."""
    folder = cache_dir() / "cifar10-jpeg"
    cached = folder / f"decoded-{archive_sha256[:16]}-v{_DECODE_CACHE_VERSION}.npz"
    _tidy_decode_cache(folder, cached)
    if os.path.lexists(cached):
        try:
            return _load_decoded(cached, archive_sha256)
        except Exception as exc:  # noqa: BLE001 - any failure to read an entry is a miss
            warnings.warn(f"kexue: the CIFAR-10 decode cache {cached} is damaged or unreadable "
                          f"({type(exc).__name__}: {exc}); discarding it and decoding the archive again",
                          RuntimeWarning, stacklevel=3)
            if not cached.is_dir() or cached.is_symlink():
                try:
                    cached.unlink()
                except OSError:
                    pass
    arrays = _decode_cifar_jpeg(archive)
    _check_cifar_arrays(arrays)
    try:
        _save_decoded(cached, arrays, archive_sha256)
    except OSError:
        pass  # a read-only cache only costs the decode next time
    return arrays


def _archive_sha256(dataset: str, filename: str, path: Path) -> str:
    """The sha256 of a resolved archive: the registry's (resolution has verified the file against it)."""
    fspec = next(f for f in get_spec(dataset).files if f.name == filename)
    if fspec.sha256:
        return fspec.sha256
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _cifar(key: str | None, source: str) -> dict[str, np.ndarray]:
    if source == "cifar10":
        return _read_cifar_python(resolve_file("cifar10", "cifar-10-python.tar.gz", key))
    archive = resolve_file("cifar10-jpeg", "cifar10_jpeg.tar.gz", key)
    return _decoded_cifar_jpeg(archive, _archive_sha256("cifar10-jpeg", "cifar10_jpeg.tar.gz", archive))


def cifar10_source(data_dir: PathLike = None) -> str:
    """Which CIFAR-10 copy :func:`load_cifar10` will read: ``"cifar10"`` (canonical) or ``"cifar10-jpeg"``."""
    if not where("cifar10", data_dir).startswith("missing"):
        return "cifar10"
    if not where("cifar10-jpeg", data_dir).startswith("missing"):
        return "cifar10-jpeg"
    return "cifar10"


def load_cifar10(split: str = "train", data_dir: PathLike = None,
                 source: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``, N = 50,000 / 10,000.

    Reads the canonical python archive when present, else the JPEG copy (lossy, quality 75); pass
    ``source="cifar10"`` or ``"cifar10-jpeg"`` to choose. Labels follow CIFAR-10's ids (:data:`CIFAR10_CLASSES`).
    """
    _check_split(split)
    src = source or cifar10_source(data_dir)
    if src not in ("cifar10", "cifar10-jpeg"):
        raise ValueError(f"source must be 'cifar10' or 'cifar10-jpeg', got {src!r}")
    arrays = _cifar(_key(data_dir), src)
    return torch.from_numpy(arrays[f"{split}_x"]), torch.from_numpy(arrays[f"{split}_y"])


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled 8x8 digits: ``(images float32 [1797, 8, 8] in [0, 1], labels int64)``. No download."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from exc
    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


@functools.lru_cache(maxsize=2)
def _att(key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    archive = resolve_file("att-faces", "att_faces.tar.gz", key)
    images, labels = [], []
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pgm")]

        def order(m: tarfile.TarInfo) -> tuple[int, int]:
            subject, image = m.name.split("/")[-2:]
            return int(subject[1:]), int(image.split(".")[0])

        for m in sorted(members, key=order):
            subject, _ = order(m)
            img = Image.open(io.BytesIO(tar.extractfile(m).read()))  # type: ignore[union-attr]
            images.append(np.asarray(img.convert("L"), dtype=np.uint8))
            labels.append(subject - 1)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def load_att_faces(data_dir: PathLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AT&T / ORL faces: ``(images uint8 [400, 112, 92], labels int64 [400])``; label k is person ``s{k+1}``,
    ordered by person then image number."""
    return _att(_key(data_dir))


def _read_text(path: Path) -> str:
    text = path.read_bytes().decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_tinyshakespeare(data_dir: PathLike = None) -> str:
    """Tiny Shakespeare as one string (~1.1 M characters)."""
    return _read_text(resolve_file("tinyshakespeare", "input.txt", data_dir))


def load_us_speeches(data_dir: PathLike = None) -> dict[str, str]:
    """US presidential speeches: ``{"state_union/1945-Truman.txt": text, "inaugural/1789-Washington.txt": ...}``,
    sorted by name."""
    files = resolve("us-speeches", data_dir)
    out: dict[str, str] = {}
    for path in files.values():
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.endswith(".txt"):
                    continue
                raw = zf.read(info)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                out[info.filename] = text.replace("\r\n", "\n").replace("\r", "\n")
    return dict(sorted(out.items()))


_WATERMARK = "小^说^无广告的~顶点*小说~网www.shuyaya.com"


def load_chinese_novels(data_dir: PathLike = None) -> dict[str, str]:
    """The four classic novels: ``{"sanguo_yanyi": text, "shuihu_zhuan": ..., "hongloumeng": ..., "xiyouji": ...}``
    with LF line endings and the one web watermark in ``xiyouji`` removed."""
    files = resolve("chinese-novels", data_dir)
    return {Path(n).stem: _read_text(p).replace(_WATERMARK, "") for n, p in files.items()}


def load_csl_titles(data_dir: PathLike = None) -> list[tuple[str, str]]:
    """CSL abstract -> title pairs, 4,000 of them: ``[(abstract, title), ...]`` (benchmark files first)."""
    files = resolve("csl-titles", data_dir)
    pairs: list[tuple[str, str]] = []
    for name in ("csl_benchmark_ts_dev.tsv", "csl_benchmark_ts_test.tsv", "clge_csl_val.tsv", "clge_csl_test.tsv"):
        for line in _read_text(files[name]).split("\n"):
            if not line.strip():
                continue
            cols = line.split("\t")
            if name.startswith("csl_benchmark"):
                if len(cols) < 3:
                    raise ValueError(f"{files[name]}: expected 3 tab-separated columns, got {len(cols)}")
                pairs.append((cols[1].strip(), cols[2].strip()))
            else:
                if len(cols) < 2:
                    raise ValueError(f"{files[name]}: expected 2 tab-separated columns, got {len(cols)}")
                pairs.append((cols[1].strip(), cols[0].strip()))
    return pairs


def load_arxiv_titles(data_dir: PathLike = None) -> list[tuple[str, str]]:
    """arXiv abstract -> title pairs: ``[(abstract, title), ...]`` (3,397 rows, file order)."""
    path = resolve_file("arxiv-titles", "arxiv_data.csv", data_dir)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [(" ".join(r["abstract"].split()), " ".join(r["title"].split())) for r in rows]


def load_bbc_news(data_dir: PathLike = None) -> list[dict[str, str]]:
    """BBC News: ``[{"topic": ..., "title": first line, "body": rest}, ...]`` (2,225 articles, sorted by path)."""
    archive = resolve_file("bbc-news", "bbc_fulltext.tar.gz", data_dir)
    out = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")),
                        key=lambda m: m.name):
            parts = m.name.split("/")
            if len(parts) < 3:
                continue
            raw = tar.extractfile(m).read()  # type: ignore[union-attr]
            text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
            title, _, body = text.partition("\n")
            out.append({"topic": parts[-2], "title": title.strip(), "body": body.strip()})
    return out
