"""Study ``orthogonal``: a tiny run (generated data), its speed table timed by the paired ABBA timer."""

from __future__ import annotations

from kexue.studies import StudyContext
from kexue.studies import orthogonal as study

TINY = dict(study.QUICK, d=8, pairs_per_case=10, speed_dims=[8, 16], speed_vectors=32)


def test_tiny_run(tmp_path):
    ctx = StudyContext(mode="quick", fig_dir=tmp_path, progress=False)
    r = study.run_config(ctx, TINY)
    assert r.verdict == "holds"                       # the closed forms are right on generic pairs
    assert r.config == TINY
    speed = next(t for t in r.tables if t.name == "orthogonal_speed")
    assert [row[0] for row in speed.rows] == [8, 16]
    assert all(row[5] is not None and row[5] > 0 for row in speed.rows)   # the paired ratio
    assert {f.name for f in ctx.figures} == {"orthogonal_speed"}
    assert set(study.QUICK) == set(study.FULL)
