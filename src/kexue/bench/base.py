"""Benchmark plumbing: a registry and a side-by-side timer.

Each benchmark module registers ``run(opts) -> list[BenchRow]`` with :func:`register_bench`. Rows compare
"ours" with a peer measured in the same process, interleaved, so the printed ratio is fair even on a
noisy machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BenchOptions:
    """``only``: names of row groups to run (a bench that has groups skips the others; ``None``: all)."""

    device: str = "cpu"
    quick: bool = False
    repeats: int = 7
    only: tuple[str, ...] | None = None

    def wants(self, group: str) -> bool:
        return self.only is None or group in self.only


@dataclass
class BenchRow:
    """One comparison: our time against a peer's time, in seconds per call (median of repeats)."""

    case: str
    ours: str
    peer: str
    ours_s: float
    peer_s: float | None
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None

    @property
    def speedup(self) -> float | None:
        """peer time / our time (> 1 means we are faster): the paired ratio of :func:`compare` when the row
        was given one, else the ratio of the two medians."""
        if self.ratio is not None:
            return self.ratio
        if self.peer_s is None or self.ours_s <= 0:
            return None
        return self.peer_s / self.ours_s

    @classmethod
    def of(cls, case: str, ours: str, peer: str, timing: Comparison, target: str = "",
           extra: dict[str, Any] | None = None) -> BenchRow:
        """A row from a :func:`compare` result: its medians, its paired ratio and that ratio's quartiles."""
        extra = dict(extra or {})
        if timing.ratio_iqr is not None:
            lo, hi = timing.ratio_iqr
            extra.setdefault("speedup_iqr", f"{lo:.2f}-{hi:.2f} (paired samples)")
        return cls(case, ours, peer, timing[0], timing[1], target, extra, timing.ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "ours": self.ours, "peer": self.peer, "ours_s": self.ours_s,
                "peer_s": self.peer_s, "speedup": self.speedup, "target": self.target, **self.extra}


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _calibrate(fn: Callable[[], Any], device: str, warmup: int, min_time: float) -> int:
    """Run ``fn`` ``warmup`` times, then find how many calls one timing sample needs to last ``min_time``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        if time.perf_counter() - t0 >= min_time or n >= 1 << 16:
            return n
        n *= 2


def _sample(fn: Callable[[], Any], n: int, device: str) -> float:
    """Seconds per call of ``fn`` over one sample of ``n`` calls."""
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def time_call(fn: Callable[[], Any], *, device: str = "cpu", repeats: int = 7, warmup: int = 2,
              min_time: float = 0.02) -> float:
    """Median seconds per call of ``fn``; each sample loops until at least ``min_time`` has passed."""
    n = _calibrate(fn, device, warmup, min_time)
    return statistics.median(_sample(fn, n, device) for _ in range(repeats))


def time_once(fn: Callable[[], Any], *, device: str = "cpu") -> float:
    """Seconds taken by one call of ``fn`` (device-synchronised): for one-off costs such as a compile, which a
    bench reports beside its ratios, never as one.

    Example:
        >>> time_once(lambda: sum(range(10))) >= 0
        True
    """
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class Comparison(tuple):
    """``(ours_s, peer_s)``: median seconds per call of each side, as returned by :func:`compare`.

    It unpacks like a pair; ``ratio`` is the median over sample pairs of ``peer / ours`` taken back to back
    (None without a peer), and ``ratio_iqr`` the interquartile range of those paired ratios. Pairing cancels
    what the two samples of a pair share (a slower machine for a second), so the paired ratio is steadier
    than the ratio of the two medians when both sides take about the same time.
    """

    ratio: float | None
    ratio_iqr: tuple[float, float] | None

    def __new__(cls, ours_s: float, peer_s: float | None, ratio: float | None = None,
                ratio_iqr: tuple[float, float] | None = None) -> Comparison:
        obj = super().__new__(cls, (ours_s, peer_s))
        obj.ratio, obj.ratio_iqr = ratio, ratio_iqr
        return obj


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def compare(ours: Callable[[], Any], peer: Callable[[], Any] | None, *, device: str = "cpu",
            repeats: int = 7, rounds: int = 3, warmup: int = 2, min_time: float = 0.02) -> Comparison:
    """Median seconds per call of ``ours`` and of ``peer``, timed in alternation; also their paired ratio.

    ``repeats * rounds`` samples of each are taken sample by sample in ABBA order (ours, peer, peer, ours,
    ...), so a machine that speeds up or slows down during the measurement (turbo, another process, thermal
    limits) weighs on both alike; timing one function completely before the other turned such drifts into
    ratio errors of 10-20 % on a shared 2-core machine. Each sample loops until ``min_time`` has passed
    (calibrated once); when the two sides take about the same time per call (within 2x) they get the same
    loop count, so a cost paid once per sample (a cold first call) weighs on both alike.
    """
    if peer is None:
        return Comparison(time_call(ours, device=device, repeats=repeats * rounds, warmup=warmup,
                                    min_time=min_time), None)
    n_o = _calibrate(ours, device, warmup, min_time)
    n_p = _calibrate(peer, device, warmup, min_time)
    if max(n_o, n_p) <= 2 * min(n_o, n_p):
        n_o = n_p = max(n_o, n_p)
    t_ours: list[float] = []
    t_peer: list[float] = []
    for i in range(repeats * rounds):
        if i % 2 == 0:
            t_ours.append(_sample(ours, n_o, device))
            t_peer.append(_sample(peer, n_p, device))
        else:
            t_peer.append(_sample(peer, n_p, device))
            t_ours.append(_sample(ours, n_o, device))
    ratios = [p / o for o, p in zip(t_ours, t_peer) if o > 0]
    ratio = statistics.median(ratios) if ratios else None
    return Comparison(statistics.median(t_ours), statistics.median(t_peer), ratio,
                      _quartiles(ratios) if ratios else None)


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> int | None:
    """Peak bytes allocated by ``fn`` on a CUDA device, or peak traced CPU tensor bytes via the profiler."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    events = sorted((e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)),
                    key=lambda e: e.time_range.start)
    for e in events:
        current += e.cpu_memory_usage
        peak = max(peak, current)
    return peak


BENCHES: dict[str, Callable[[BenchOptions], list[BenchRow]]] = {}


BENCH_GROUPS: dict[str, tuple[str, ...]] = {}


def register_bench(name: str, groups: Iterable[str] = ()) -> Callable:
    """Decorator registering ``run(opts)`` as benchmark ``name``: it returns its rows as a list, or yields them
    one by one (``kexue bench`` then prints each row as soon as it is measured). ``groups``: the row groups
    it asks :meth:`BenchOptions.wants` about (what ``kexue bench --only`` may name)."""

    def deco(fn: Callable[[BenchOptions], Iterable[BenchRow]]) -> Callable[[BenchOptions], Iterable[BenchRow]]:
        BENCHES[name] = fn
        BENCH_GROUPS[name] = tuple(groups)
        return fn

    return deco


def format_header(name: str) -> str:
    """The title and column heads of a bench table (rows follow from :func:`format_row`)."""
    head = f"{'case':<44} {'ours':<26} {'peer':<30} {'ours ms':>10} {'peer ms':>10} {'speedup':>8}  target"
    return "\n".join([f"== kexue bench {name}", head, "-" * len(head)])


def format_row(r: BenchRow) -> str:
    """One row of a bench table, with its extra fields on the lines below it."""
    peer_ms = f"{r.peer_s * 1e3:10.3f}" if r.peer_s is not None else f"{'-':>10}"
    sp = f"{r.speedup:7.2f}x" if r.speedup is not None else f"{'-':>8}"
    out = [f"{r.case:<44} {r.ours:<26} {r.peer:<30} {r.ours_s * 1e3:10.3f} {peer_ms} {sp}  {r.target}"]
    out.extend(f"{'':<44} {k}: {v}" for k, v in r.extra.items())
    return "\n".join(out)


def format_rows(name: str, rows: Iterable[BenchRow]) -> str:
    """A plain-text table of rows with the ratio column."""
    return "\n".join([format_header(name), *(format_row(r) for r in rows)])
