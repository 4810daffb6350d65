"""Datasets: a registry (files, hashes, URLs), resolution (data dir -> cache -> download -> clear error), loaders.

>>> from kexue.data import load_fashion_mnist   # doctest: +SKIP
>>> x, y = load_fashion_mnist("train", data_dir="../shared/data")  # doctest: +SKIP
>>> x.dtype, x.shape, y.dtype                    # doctest: +SKIP
(torch.uint8, torch.Size([60000, 28, 28]), torch.int64)
"""

from .loaders import (
    CIFAR10_CLASSES,
    cifar10_source,
    load_arxiv_titles,
    load_att_faces,
    load_bbc_news,
    load_chinese_novels,
    load_cifar10,
    load_csl_titles,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_tinyshakespeare,
    load_us_speeches,
    read_idx,
)
from .registry import (
    DATASETS,
    CorruptFileError,
    DataNotFoundError,
    DatasetSpec,
    FileSpec,
    UnreadableFileError,
    cache_dir,
    get_spec,
    resolve,
    resolve_file,
    verify_file,
    where,
)
from .tokenizers import SPECIAL_TOKENS, CharTokenizer

__all__ = [
    "SPECIAL_TOKENS", "CharTokenizer",
    "CIFAR10_CLASSES", "DATASETS", "CorruptFileError", "DataNotFoundError", "DatasetSpec", "FileSpec",
    "UnreadableFileError",
    "cache_dir", "cifar10_source", "get_spec", "load_arxiv_titles", "load_att_faces", "load_bbc_news",
    "load_chinese_novels", "load_cifar10", "load_csl_titles", "load_digits", "load_fashion_mnist", "load_mnist",
    "load_tinyshakespeare", "load_us_speeches", "read_idx", "resolve", "resolve_file", "verify_file", "where",
]
