"""``kexue bench``: our pieces against the peers a user would otherwise pick, timed side by side."""

from __future__ import annotations

import importlib

from .base import BENCHES, BenchOptions, BenchRow, compare, format_rows, register_bench, time_call

BENCH_MODULES = ("augment", "attention", "linalg", "losses")


def load_all() -> dict:
    """Import every benchmark module that exists so all are registered."""
    for mod in BENCH_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise
    return BENCHES


__all__ = ["BENCHES", "BenchOptions", "BenchRow", "compare", "format_rows", "load_all", "register_bench",
           "time_call"]
