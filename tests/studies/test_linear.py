"""Study ``linear-attention``: its verdict rule, its analytic parts, and a tiny end-to-end run on real Tiny
Shakespeare that resumes through ``cached_run`` and leaves the global RNG alone."""

from __future__ import annotations

import pytest
import torch

from kexue.studies import STUDIES, StudyContext, load_all
from kexue.studies import linear as study

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(study.QUICK, dim=16, depth=1, steps=3, batch_size=4, seq_len=16, eval_windows=4, mc_draws=40,
            mc_features=(2, 8), mc_pairs=2, rank_n=(12,), rank_d=(2,), rank_m=(4,), entropy_lengths=(16, 32),
            entropy_windows=1, window=4)


def _run(seed, gap_lm, gap_mlm):
    soft = {"lm": 50.0, "mlm": 40.0}
    runs = {("softmax", t): [{"acc": soft[t]}] * len(seed) for t in study.TASKS}
    for arm in study.LINEAR:
        runs[(arm, "lm")] = [{"acc": soft["lm"] - g} for g in gap_lm]
        runs[(arm, "mlm")] = [{"acc": soft["mlm"] - g} for g in gap_mlm]
    return study.claim_check(runs)


def test_claim_needs_the_mlm_gap_beyond_the_lm_gap_and_the_seed_spread():
    c = _run([0, 1, 2], gap_lm=[0.5, 1.0, 0.0], gap_mlm=[5.0, 6.0, 4.0])["exp"]
    assert c["holds"] and c["lm_gap"] == pytest.approx(0.5) and c["mlm_gap"] == pytest.approx(5.0)
    assert c["diff"] == pytest.approx(4.5) and c["per_seed"] == pytest.approx([4.5, 5.0, 4.0])
    c = _run([0, 1, 2], gap_lm=[1.0, 1.0, 1.0], gap_mlm=[2.5, -1.0, 4.0])["elu1"]      # ahead on average only
    assert c["diff"] > 0 and not c["holds"]
    assert not _run([0], gap_lm=[2.0], gap_mlm=[1.0])["favor"]["holds"]                 # LM gap larger


def test_rank_and_monte_carlo_parts():
    rows = study.rank_table((24,), (3,), (5, 30), torch.Generator().manual_seed(0))
    for n, d, r_qk, r_exp, m, r_lin, _, diag in rows:
        assert r_qk == d and r_exp == n and r_lin == min(m, n) and diag > 0
    mc = study.favor_errors(8, (4, 64), 400, 2, torch.Generator().manual_seed(0))
    assert mc["iid"][1] < mc["iid"][0] / 2.5                                    # ~ 1/sqrt(m): x 1/4 expected
    assert max(mc["iid_bias_z"] + mc["orthogonal_bias_z"]) < 5


def test_registered_in_article_order():
    load_all()
    spec = STUDIES["linear-attention"]
    assert spec.article == 5 and spec.quick_budget_s <= 180


@pytest.mark.slow
def test_tiny_run_on_tiny_shakespeare_resumes_and_leaves_global_rng_alone(data_dir, tmp_path):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    ctx = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path, progress=False,
                       runs_dir=tmp_path / "runs")
    r = study.run_config(ctx, TINY)
    assert torch.equal(torch.get_rng_state(), state)
    assert r.verdict in ("holds", "partly holds", "does not hold")
    names = {t.name for t in r.tables}
    assert {"linear_favor_mc", "linear_rank", "linear_lm_vs_mlm_tinyshakespeare", "linear_gaps_tinyshakespeare",
            "linear_entropy_tinyshakespeare", "linear_window_keysize_tinyshakespeare"} <= names
    main = next(t for t in r.tables if t.name == "linear_lm_vs_mlm_tinyshakespeare")
    assert [row[0] for row in main.rows] == [study.NAMES[a] for a in study.ARMS]
    assert {f.name for f in ctx.figures} == {"linear_favor_error", "linear_entropy_tinyshakespeare"}
    stored = sorted((tmp_path / "runs" / "linear").glob("*.json"))
    assert len(stored) == 8 + 1 + 2                          # 4 arms x 2 tasks, the window run, m = d and 2d
    ctx2 = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path, progress=False,
                        runs_dir=tmp_path / "runs")
    r2 = study.run_config(ctx2, TINY)
    assert [t.rows for t in r2.tables if t.name != "linear_training"] == \
        [t.rows for t in r.tables if t.name != "linear_training"]
    assert sorted((tmp_path / "runs" / "linear").glob("*.json")) == stored
