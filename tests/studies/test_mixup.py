"""Study ``mixup``: the schedule scaling, and a tiny end-to-end run on real Fashion-MNIST."""

from __future__ import annotations

import pytest

from kexue.augment import SamplePairingSchedule
from kexue.studies import StudyContext
from kexue.studies import mixup as study


def test_scaled_sample_pairing_schedule():
    s = study.sample_pairing_schedule(12)
    assert (s.start, s.stop, s.on, s.off) == (1, 10, 4, 1)
    assert [s.active(e) for e in range(12)] == [False] + [True] * 4 + [False] + [True] * 4 + [False] * 2
    short = study.sample_pairing_schedule(3)
    assert isinstance(short, SamplePairingSchedule) and short.active(0) and not short.active(2)


def test_lowered_beyond_spread():
    assert study._lowered([0.30, 0.31, 0.32], [0.20, 0.21, 0.22])[0]
    assert not study._lowered([0.30, 0.35, 0.40], [0.28, 0.33, 0.38])[0]
    assert not study._lowered([0.20], [0.30])[0]


@pytest.mark.slow
def test_tiny_run_on_fashion_mnist(data_dir, tmp_path):
    cfg = dict(study.QUICK)
    cfg.update(settings=[{"dataset": "fashion_mnist", "n_train": 200, "net": "cnn", "width": 4}], epochs=2,
               batch_size=50, curve_test=100, final_test=200, gap_pairs=100, train_probe=100)
    ctx = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path, progress=False)
    r = study.run_config(ctx, cfg)
    assert r.verdict in ("holds", "does not hold", "partly holds")
    assert "mixup" in r.verdict_detail and "1 seed" in r.verdict_detail
    main = next(t for t in r.tables if t.name == "mixup_results")
    assert [row[1] for row in main.rows] == list(study.METHODS)
    runs = next(t for t in r.tables if t.name == "mixup_runs")
    for row in runs.rows:
        err, ece, gap = row[3], row[4], row[5]
        assert 0 <= err <= 1 and 0 <= ece <= 1 and 0 <= gap <= 2
    names = {f.name for f in ctx.figures}
    assert names == {"mixup_learning_curves", "mixup_examples", "mixup_gap_vs_error"}
    assert all((tmp_path / f"{n}.png").is_file() for n in names)
