"""Study ``mixup``: the schedule scaling, the learning-curve analysis on hand-made curves, and tiny end-to-end
runs on real Fashion-MNIST in the short-training (quick) and the long-training (full) configuration."""

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
    long = study.sample_pairing_schedule(100)
    assert (long.start, long.stop, long.on, long.off) == (10, 80, 4, 1)


def test_lowered_beyond_spread():
    assert study._lowered([0.30, 0.31, 0.32], [0.20, 0.21, 0.22])[0]
    assert not study._lowered([0.30, 0.35, 0.40], [0.28, 0.33, 0.38])[0]
    assert not study._lowered([0.20], [0.30])[0]


def _run(loss, err):
    return [{"epoch": e, "clean_train_loss": lo, "test_error": er} for e, (lo, er) in enumerate(zip(loss, err))]


def test_erm_regime_fit_best_and_plateau():
    n = 40
    loss = [1.0 / (e + 1) for e in range(n)]  # <= 0.1 from epoch 10 (1-based), 0.025 at the end
    err = [0.30 - 0.01 * e if e < 15 else 0.15 + 0.0001 * (e - 15) for e in range(n)]  # lowest at epoch 16
    r = study.erm_regime([_run(loss, err), _run(loss, err)])
    assert (r["epochs"], r["fit_epoch"], r["best_epoch"]) == (40, 10, 16)
    assert r["best_error"] == pytest.approx(0.15) and r["final_error"] == pytest.approx(0.1524)
    assert r["end_clean_loss"] == pytest.approx(0.025)
    # windows centred on epoch 30 (0-based) and on the last five (mean 37): 7 epochs apart, 0.01 pt per epoch worse
    assert r["last_quarter_gain_pt"] == pytest.approx(-0.07)
    assert r["reached"]
    # still improving over the last quarter: not the over-fitting regime
    falling = [0.30 - 0.005 * e for e in range(n)]
    assert not study.erm_regime([_run(loss, falling)])["reached"]
    # never fitted: no fit epoch, not reached
    r = study.erm_regime([_run([0.5] * n, err)])
    assert r["fit_epoch"] is None and not r["reached"]


def test_advantage_and_growth_are_paired_by_seed():
    n = 20
    erm = [_run([0.0] * n, [0.20] * n), _run([0.0] * n, [0.30] * n)]
    # seed 0: level with ERM until epoch 10, then 2 pt better; seed 1: always 1 pt worse, then 3 pt better
    mix = [_run([0.0] * n, [0.20] * 10 + [0.18] * 10), _run([0.0] * n, [0.31] * 10 + [0.27] * 10)]
    assert study.advantage(erm, mix, 0).tolist() == pytest.approx([0.0, -1.0])
    assert study.advantage(erm, mix, n - 1).tolist() == pytest.approx([2.0, 3.0])
    g = study.growth(erm, mix, 1)
    assert g["at_fit"] == pytest.approx(-0.5) and g["at_end"] == pytest.approx(2.5)
    assert g["growth"] == pytest.approx(3.0) and g["growth_sd"] == pytest.approx(2 ** 0.5) and g["grows"]
    # the same advantage throughout does not grow; without a fit epoch growth is not judged
    assert not study.growth(erm, erm, 1)["grows"]
    assert study.growth(erm, mix, None)["grows"] is None


def _check_report(r, ctx, tmp_path, epochs):
    assert r.verdict in ("holds", "does not hold", "partly holds")
    assert "mixup" in r.verdict_detail and "grow" in r.verdict_detail and "Regime" in r.verdict_detail
    tables = {t.name: t for t in r.tables}
    assert set(tables) == {"mixup_results", "mixup_verdict", "mixup_final_vs_best", "mixup_erm_regime",
                           "mixup_advantage", "mixup_runs"}
    assert [row[1] for row in tables["mixup_results"].rows] == list(study.METHODS)
    for row in tables["mixup_runs"].rows:
        assert row[3] == epochs
        err, ece, gap, best_err, best_ep = row[4], row[5], row[6], row[9], row[10]
        assert 0 <= err <= 1 and 0 <= ece <= 1 and 0 <= gap <= 2 and 0 <= best_err <= 1 and 1 <= best_ep <= epochs
    assert [row[1] for row in tables["mixup_advantage"].rows] == list(study.METHODS[1:])
    names = {f.name for f in ctx.figures}
    assert names == {"mixup_learning_curves", "mixup_advantage_curves", "mixup_examples", "mixup_gap_vs_error"}
    assert all((tmp_path / f"{n}.png").is_file() for n in names)


@pytest.mark.slow
def test_tiny_run_on_fashion_mnist(data_dir, tmp_path):
    cfg = dict(study.QUICK)
    cfg.update(settings=[{"dataset": "fashion_mnist", "n_train": 200, "net": "cnn", "width": 4}], epochs=2,
               batch_size=50, curve_test=100, final_test=200, gap_pairs=100, train_probe=100)
    ctx = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path, progress=False)
    r = study.run_config(ctx, cfg)
    _check_report(r, ctx, tmp_path, 2)
    assert "1 seed" in r.verdict_detail and "under-fitted" in r.verdict_detail


@pytest.mark.slow
def test_tiny_long_regime_configuration(data_dir, tmp_path):
    """The full (long-training) configuration's structure at toy size: a per-setting epoch count, two seeds."""
    cfg = dict(study.FULL)
    setting = dict(study.FULL["settings"][0], n_train=200, width=4, epochs=2)
    cfg.update(settings=[setting], seeds=2, curve_test=100, final_test=200, gap_pairs=100, train_probe=100,
               batch_size=100)
    ctx = StudyContext(mode="full", data_dir=str(data_dir), fig_dir=tmp_path, progress=False)
    r = study.run_config(ctx, cfg)
    _check_report(r, ctx, tmp_path, 2)
    assert "over-fitting" in r.verdict_detail and "2 seed(s)" in r.verdict_detail
    assert r.config["regime"] == study.FULL["regime"]
    regime = next(t for t in r.tables if t.name == "mixup_erm_regime").rows
    assert len(regime) == 1 and regime[0][:2] == ["fashion_mnist 200", 2]
