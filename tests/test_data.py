"""Data layer: resolution order, hash checks, atomic download, clear errors, and the real loaders."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kexue import data
from kexue.data import registry


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """Register a one-file dataset served from a file:// URL, with an empty cache and no data dir."""
    payload = b"hello kexue\n" * 100
    src = tmp_path / "server" / "hello.txt"
    src.parent.mkdir()
    src.write_bytes(payload)
    spec = registry.DatasetSpec(
        name="fake", folder="fake-folder", description="test", source="test", licence="none", loader="",
        files=(registry.FileSpec("hello.txt", sha256=hashlib.sha256(payload).hexdigest(),
                                 urls=(src.as_uri(),)),),
    )
    monkeypatch.setitem(registry.DATASETS, "fake", spec)
    monkeypatch.setenv(registry.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(registry.ENV_DATA_DIR, raising=False)
    monkeypatch.delenv(registry.ENV_OFFLINE, raising=False)
    return spec, src, payload, tmp_path


def test_download_into_cache_verified_and_atomic(fake_dataset):
    spec, src, payload, tmp = fake_dataset
    path = data.resolve_file("fake", "hello.txt", progress=False)
    assert path == tmp / "cache" / "fake-folder" / "hello.txt"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["hello.txt"]  # no temporary left behind


def test_corrupt_download_leaves_nothing(fake_dataset):
    spec, src, payload, tmp = fake_dataset
    src.write_bytes(b"tampered")
    with pytest.raises(data.CorruptFileError, match="sha256"):
        data.resolve_file("fake", "hello.txt", progress=False)
    folder = tmp / "cache" / "fake-folder"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_data_dir_wins_over_cache_and_corrupt_file_is_reported(fake_dataset):
    spec, src, payload, tmp = fake_dataset
    d = tmp / "mydata" / "fake-folder"
    d.mkdir(parents=True)
    (d / "hello.txt").write_bytes(payload)
    assert data.resolve_file("fake", "hello.txt", tmp / "mydata") == d / "hello.txt"
    (d / "hello.txt").write_bytes(b"corrupt!")
    with pytest.raises(data.CorruptFileError, match="corrupt"):
        data.resolve_file("fake", "hello.txt", tmp / "mydata")


def test_env_data_dir_is_used(fake_dataset, monkeypatch):
    spec, src, payload, tmp = fake_dataset
    d = tmp / "envdata" / "fake-folder"
    d.mkdir(parents=True)
    (d / "hello.txt").write_bytes(payload)
    monkeypatch.setenv(registry.ENV_DATA_DIR, str(tmp / "envdata"))
    assert data.resolve_file("fake", "hello.txt") == d / "hello.txt"
    assert "KEXUE_DATA_DIR" in data.where("fake")


def test_missing_offline_names_files_and_places(fake_dataset, monkeypatch):
    spec, src, payload, tmp = fake_dataset
    monkeypatch.setenv(registry.ENV_OFFLINE, "1")
    with pytest.raises(data.DataNotFoundError) as info:
        data.resolve_file("fake", "hello.txt", tmp / "nowhere")
    msg = str(info.value)
    assert "hello.txt" in msg and "fake-folder" in msg and str(tmp / "nowhere") in msg and "cache" in msg


def test_failed_download_is_a_clear_error(fake_dataset):
    spec, src, payload, tmp = fake_dataset
    src.unlink()
    with pytest.raises(data.DataNotFoundError, match="Download attempts failed"):
        data.resolve_file("fake", "hello.txt", progress=False)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.get_spec("imagenet")
    with pytest.raises(ValueError, match="has no file"):
        data.resolve_file("mnist", "nope.gz")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("validation")


def test_read_idx_roundtrip_and_bad_header(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(header + arr.tobytes())
    np.testing.assert_array_equal(data.read_idx(p), arr)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([1, 2, 3, 4]) + b"\0" * 8)
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(bad)


def test_gz_content_hash_accepts_any_container(tmp_path, monkeypatch):
    content = b"same content"
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    with gzip.open(a, "wb", compresslevel=1) as fh:
        fh.write(content)
    with gzip.open(b, "wb", compresslevel=9) as fh:
        fh.write(content)
    spec = registry.FileSpec("x.gz", content_sha256=hashlib.sha256(content).hexdigest())
    registry.verify_file(a, spec)
    registry.verify_file(b, spec)
    a.write_bytes(b"not gzip at all")
    with pytest.raises(data.CorruptFileError):
        registry.verify_file(a, spec)


def test_registry_entries_are_complete():
    for name, spec in data.DATASETS.items():
        assert hasattr(data, spec.loader), name
        for f in spec.files:
            assert f.sha256 or f.content_sha256 or f.md5, (name, f.name)
            assert f.urls or spec.manual, (name, f.name)


# ---- real data (fails under CI=true when KEXUE_DATA_DIR is missing) ----------------------------------------

@pytest.mark.data
def test_mnist_and_fashion_real(data_dir):
    x, y = data.load_mnist("test", data_dir)
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = data.load_fashion_mnist("train", data_dir)
    assert x.shape == (60000, 28, 28) and y.bincount().tolist() == [6000] * 10


@pytest.mark.data
def test_att_faces_real(data_dir):
    x, y = data.load_att_faces(data_dir)
    assert x.shape == (400, 112, 92) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [10] * 40 and y[:10].eq(0).all()


@pytest.mark.data
def test_text_corpora_real(data_dir):
    assert len(data.load_tinyshakespeare(data_dir)) == 1115394
    speeches = data.load_us_speeches(data_dir)
    assert len(speeches) == 124 and "inaugural/1789-Washington.txt" in speeches
    novels = data.load_chinese_novels(data_dir)
    assert set(novels) == {"sanguo_yanyi", "shuihu_zhuan", "hongloumeng", "xiyouji"}
    assert "\r" not in novels["hongloumeng"] and "shuyaya" not in novels["xiyouji"]
    csl = data.load_csl_titles(data_dir)
    assert len(csl) == 4000 and all(a and t for a, t in csl) and len(csl[0][0]) > len(csl[0][1])
    arxiv = data.load_arxiv_titles(data_dir)
    assert len(arxiv) == 3397 and arxiv[0][1] == "Consistent line clustering using geometric hypergraphs"
    bbc = data.load_bbc_news(data_dir)
    assert len(bbc) == 2225 and {b["topic"] for b in bbc} == {"business", "entertainment", "politics", "sport",
                                                               "tech"}


@pytest.mark.data
@pytest.mark.slow
def test_cifar10_jpeg_real(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.ENV_CACHE_DIR, str(tmp_path / "cache"))
    assert data.cifar10_source(data_dir) == "cifar10-jpeg"
    x, y = data.load_cifar10("test", data_dir)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [1000] * 10
    # channel means of the train split match the known CIFAR-10 means (the data README's sanity check)
    xt, _ = data.load_cifar10("train", data_dir)
    means = xt.float().mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([125.3, 122.9, 113.9]), atol=0.6)
    assert any(Path(tmp_path / "cache" / "cifar10-jpeg").glob("decoded-*.npz"))
