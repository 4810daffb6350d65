"""``kexue bench``: our pieces against the peers a user would otherwise pick, timed side by side."""

from __future__ import annotations

from .._checks import import_modules
from .base import (
    BENCH_GROUPS,
    BENCHES,
    BenchOptions,
    BenchRow,
    compare,
    format_header,
    format_row,
    format_rows,
    register_bench,
    time_call,
)

BENCH_MODULES = ("augment", "attention", "linalg", "linear", "losses", "gan", "seq2seq")


def load_all() -> dict:
    """Import every benchmark module so all are registered; return the registry."""
    import_modules(__name__, BENCH_MODULES)
    return BENCHES


__all__ = ["BENCH_GROUPS", "BENCHES", "BenchOptions", "BenchRow", "compare", "format_header", "format_row",
           "format_rows", "load_all", "register_bench", "time_call"]
