"""The benchmark timer's bookkeeping (no wall-clock assertions: the samples are scripted)."""

from __future__ import annotations

import statistics

import pytest

from kexue.bench import base
from kexue.bench.base import BenchRow, Comparison, compare


def _scripted(monkeypatch, calls_per_sample: dict[str, int], samples: dict[str, list[float]]):
    """Make _calibrate return the given loop counts and _sample pop the given times, recording the counts."""
    used: list[tuple[str, int]] = []
    monkeypatch.setattr(base, "_calibrate", lambda fn, device, warmup, min_time: calls_per_sample[fn.__name__])

    def sample(fn, n, device):
        used.append((fn.__name__, n))
        return samples[fn.__name__].pop(0)

    monkeypatch.setattr(base, "_sample", sample)
    return used


def ours():
    return None


def peer():
    return None


def test_compare_pairs_samples_abba_and_reports_the_median_paired_ratio(monkeypatch):
    # a machine that slows down 3x half way: the medians' ratio is thrown off, the paired ratio is not
    t_ours = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    t_peer = [1.2, 1.2, 1.2, 3.6, 3.6, 3.6]
    used = _scripted(monkeypatch, {"ours": 8, "peer": 8}, {"ours": list(t_ours), "peer": list(t_peer)})
    c = compare(ours, peer, repeats=3, rounds=2)
    assert [name for name, _ in used] == ["ours", "peer", "peer", "ours"] * 3     # ABBA
    o, p = c                                                                     # unpacks like a pair
    assert (o, p) == (statistics.median(t_ours), statistics.median(t_peer))
    assert c.ratio == pytest.approx(1.2)
    assert c.ratio_iqr == pytest.approx((1.2, 1.2))
    row = BenchRow.of("case", "a", "b", c, "target", {"k": "v"})
    assert row.speedup == pytest.approx(1.2) and row.extra["k"] == "v" and "speedup_iqr" in row.extra
    assert row.to_dict()["speedup"] == pytest.approx(1.2)


def test_compare_gives_both_sides_one_loop_count_when_they_are_close(monkeypatch):
    used = _scripted(monkeypatch, {"ours": 8, "peer": 16}, {"ours": [1.0] * 4, "peer": [1.0] * 4})
    compare(ours, peer, repeats=2, rounds=2)
    assert {n for _, n in used} == {16}
    used = _scripted(monkeypatch, {"ours": 4, "peer": 64}, {"ours": [1.0] * 4, "peer": [1.0] * 4})
    compare(ours, peer, repeats=2, rounds=2)                                     # 16x apart: each its own
    assert {name: n for name, n in used} == {"ours": 4, "peer": 64}


def test_row_without_a_paired_ratio_falls_back_to_the_medians():
    assert BenchRow("c", "a", "b", 2.0, 3.0).speedup == pytest.approx(1.5)
    assert BenchRow("c", "a", "b", 2.0, None).speedup is None
    single = Comparison(2.0, None)
    assert single.ratio is None and BenchRow.of("c", "a", "-", single).speedup is None
