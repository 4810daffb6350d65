"""Study ``gan`` (article 2): its analysis rules, the checks table, and a tiny end-to-end run on real
Fashion-MNIST that resumes from its stored runs."""

from __future__ import annotations

import time

import pytest

from kexue.studies import STUDIES, StudyContext, load_all
from kexue.studies import gan as study

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_article_2():
    from kexue.studies import STUDY_MODULES

    load_all()
    assert STUDIES["gan"].article == 2 and STUDIES["gan"].quick_budget_s <= 180
    assert STUDY_MODULES.index("gan") == 1  # in article order, after mixup


def _run(dataset, arm, kids, step=100, final=None):
    curve = [{"step": step * (i + 1), "kid": k, "kid_se": 0.01, "time": float(i)} for i, k in enumerate(kids)]
    return {"dataset": dataset, "arm": arm, "curve": curve, "final": {"kid": kids[-1] if final is None else final}}


def test_steps_to_target_and_the_selfmod_rule():
    assert study._steps_to(_run("d", study.BN, [0.9, 0.5, 0.2])["curve"], 0.5) == 200
    assert study._steps_to(_run("d", study.BN, [0.9, 0.8])["curve"], 0.5) is None
    # SELF-MOD gets to the target in half the steps, consistently over 3 seeds: holds
    runs = [_run("d", study.BN, [1.0, 0.9, 0.6, 0.4, 0.3, 0.2]) for _ in range(3)]
    runs += [_run("d", study.SM, [0.9, 0.3, 0.25, 0.2, 0.2, 0.2]) for _ in range(3)]
    a = study._selfmod_analysis(runs, "d", 600)
    assert a["target"] == pytest.approx(0.3) and a["bn"] == [500] * 3 and a["sm"] == [200] * 3
    assert a["holds"] and a["ratio"] == pytest.approx(0.4)
    # faster on average but within the seed spread: does not hold
    runs = [_run("d", study.BN, k) for k in ([0.9, 0.3, 0.2], [0.9, 0.8, 0.2], [0.9, 0.8, 0.2])]
    runs += [_run("d", study.SM, k) for k in ([0.3, 0.2, 0.2], [0.9, 0.8, 0.2], [0.9, 0.8, 0.2])]
    a = study._selfmod_analysis(runs, "d", 300)
    assert a["m_sm"] < a["m_bn"] and not a["holds"]
    # never reaching the target counts as one step past the end
    runs = [_run("d", study.BN, [0.9, 0.9], final=0.1), _run("d", study.SM, [0.1, 0.1])]
    a = study._selfmod_analysis(runs, "d", 200)
    assert a["bn"] == [201] and a["sm"] == [100] and a["holds"]
    assert study._selfmod_analysis([_run("d", study.BN, [0.5])], "d", 100) is None


def test_width_matching_reaches_the_parameter_count():
    from kexue.nn.gan import ResNetGenerator, count_parameters

    def make(w):
        return ResNetGenerator(16, 16, 1, w, init="default")

    w = study._match_width(make, 20000)
    got = count_parameters(make(w))
    assert abs(got - 20000) <= min(abs(count_parameters(make(v)) - 20000) for v in (w - 1, w + 1))


def test_checks_table_passes():
    rows = study._checks(StudyContext(progress=False))
    assert len(rows) == 9
    assert all(r[3] for r in rows), [r for r in rows if not r[3]]
    assert rows[0][1] == 0 and rows[2][1] < 1e-5 and rows[3][1] > 0.1


TINY = dict(study.QUICK)
TINY.update(settings=[{"dataset": "fashion_mnist", "arms": list(study.ARMS), "steps": 10}],
            width=4, d_width=4, resnet_width=4, z_dim=16, eval_every=5, eval_fake=64, eval_real=128,
            final_fake=64, checker_n=64, classifier={"n_train": 400, "width": 4, "pool": 1, "epochs": 1},
            timing={"dataset": "fashion_mnist", "width": 4, "steps": 1, "warmup": 1})


@pytest.mark.slow
def test_tiny_run_on_fashion_mnist_resumes(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KEXUE_CACHE_DIR", str(tmp_path / "cache"))  # the feature classifier is cached there
    ctx = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path / "fig", progress=False,
                       runs_dir=tmp_path / "runs")
    t0 = time.perf_counter()
    r = study.run_config(ctx, TINY)
    first = time.perf_counter() - t0
    assert r.verdict in ("holds", "does not hold", "partly holds")
    assert "One seed" in r.verdict_detail and "SELF-MOD reaches" in r.verdict_detail
    names = {t.name for t in r.tables}
    assert names == {"gan_architecture_cost", "gan_results", "gan_selfmod", "gan_checks", "gan_runs"}
    runs = next(t for t in r.tables if t.name == "gan_runs").rows
    assert [(row[0], row[1]) for row in runs] == [("fashion_mnist", a) for a in study.ARMS]
    assert [row[3] for row in runs] == [10, 10, 5, 10, 10]  # ResNet: resnet_steps_ratio of the steps, on the grid
    cost = next(t for t in r.tables if t.name == "gan_architecture_cost").rows
    counts = [row[2] for row in cost]
    assert max(counts) / min(counts) < 1.15  # equal parameter count, within a width step
    figs = {f.name for f in ctx.figures}
    assert figs == {"gan_kid_vs_steps", "gan_kid_vs_time", "gan_samples"}
    assert all((tmp_path / "fig" / f"{n}.png").is_file() for n in figs)
    assert r.data["fashion_mnist"].startswith("fashion-mnist (28 x 28 zero-padded")
    assert len(list((tmp_path / "runs" / "gan").glob("*.json"))) == 6  # five training runs and the timing
    assert len(list((tmp_path / "cache" / "feature-classifiers").glob("*.pt"))) == 1

    ctx2 = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path / "fig2", progress=False,
                        runs_dir=tmp_path / "runs")
    t0 = time.perf_counter()
    again = study.run_config(ctx2, TINY)
    assert time.perf_counter() - t0 < first
    assert next(t for t in again.tables if t.name == "gan_runs").rows == runs  # read back, not retrained
