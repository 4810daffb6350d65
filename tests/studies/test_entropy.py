"""The entropy study's verdict rule, checked on the article's own table and on cases that must fail."""

import json

import pytest

from kexue.studies.entropy import LENGTHS, claim_check

ARTICLE_O = [43.27, 36.53, 23.02, 15.12, 11.54]
ARTICLE_E = [43.11, 41.17, 34.04, 20.15, 13.58]


def test_article_table_satisfies_the_claim():
    assert tuple(LENGTHS) == (64, 128, 256, 512, 1024)
    c = claim_check(ARTICLE_O, ARTICLE_E)
    assert c["verdict"] == "holds" and c["at_train"] and c["ahead"] and c["gap256_ge_5"]
    gaps = [round(g, 2) for g in c["gaps"]]
    assert gaps == [-0.16, 4.64, 11.02, 5.03, 2.04]


def test_claim_fails_when_e_is_behind_or_hurts_the_training_length():
    assert claim_check(ARTICLE_O, ARTICLE_O)["verdict"] == "does not hold"   # no gain anywhere
    worse_at_64 = [ARTICLE_E[0] - 2.0] + ARTICLE_E[1:]
    assert claim_check(ARTICLE_O, worse_at_64)["verdict"] == "partly holds"   # ahead and big, but -2.16 at 64
    small_gain = [o + 1.0 for o in ARTICLE_O]
    c = claim_check(ARTICLE_O, small_gain)
    assert c["verdict"] == "partly holds" and not c["gap256_ge_5"]
    behind_at_1024 = ARTICLE_E[:-1] + [ARTICLE_O[-1] - 0.5]
    assert claim_check(ARTICLE_O, behind_at_1024)["verdict"] == "does not hold"


def test_seeds_verdict_needs_the_gain_beyond_the_seed_spread():
    from kexue.studies.entropy import aggregate, claim_check_seeds

    one = claim_check_seeds([ARTICLE_O], [ARTICLE_E])
    assert one == {**claim_check(ARTICLE_O, ARTICLE_E)} and one["gap_sd"] == [0.0] * 5 and one["beyond_spread"]
    # three seeds that agree: holds
    e_runs = [[e + d for e in ARTICLE_E] for d in (-0.2, 0.0, 0.2)]
    c = claim_check_seeds([ARTICLE_O] * 3, e_runs)
    assert c["verdict"] == "holds" and [round(g, 2) for g in c["gaps"]] == [-0.16, 4.64, 11.02, 5.03, 2.04]
    assert all(abs(s - 0.2) < 1e-9 for s in c["gap_sd"])
    # the same mean gaps but one seed far behind: ahead on average only -> partly holds
    e_runs = [[e + d for e in ARTICLE_E] for d in (-6.0, 3.0, 3.0)]
    c = claim_check_seeds([ARTICLE_O] * 3, e_runs)
    assert c["ahead"] and not c["beyond_spread"] and c["verdict"] == "partly holds"
    assert [round(g, 2) for g in c["per_seed"][0]] == [round(e - 6.0 - o, 2) for o, e in zip(ARTICLE_O, ARTICLE_E)]
    # aggregate keeps the per-seed runs and averages them
    def run(seed, shift):
        return {"seed": seed, "vocab_size": 5, "train_tokens": 10, "held_out_tokens": 2,
                **{s: {"acc": [a + shift * (s == "entropy") for a in ARTICLE_O], "entropy": [1.0] * 5,
                       "windows": [1] * 5, "masked": [9] * 5, "train_s": 1.0, "final_loss": 2.0, "params": 7}
                   for s in ("standard", "entropy")}}
    agg = aggregate([run(0, 1.0), run(1, 3.0)])
    assert agg["entropy"]["acc"] == pytest.approx([a + 2.0 for a in ARTICLE_O])
    assert agg["check"]["gaps"] == pytest.approx([2.0] * 5)
    assert agg["check"]["verdict"] == "partly holds" and [r["seed"] for r in agg["seeds"]] == [0, 1]
    with pytest.raises(ValueError, match="o_runs"):
        claim_check_seeds([], [])


def test_variants_study_end_to_end_on_a_tiny_model(data_dir, tmp_path, monkeypatch):
    import kexue.studies.entropy as E
    from kexue.studies import StudyContext, run_study

    tiny = dict(E.VARIANTS_QUICK, dim=16, depth=1, heads=1, steps=3, batch_size=2, eval_tokens=128,
                min_windows=1, entropy_windows=1, seeds=2)
    monkeypatch.setattr(E, "VARIANTS_QUICK", tiny)
    ctx = StudyContext(mode="quick", data_dir=str(data_dir), progress=False, fig_dir=tmp_path, runs_dir=tmp_path)
    r = run_study("entropy-variants", ctx)
    gap, acc = r.tables
    assert [row[0] for row in gap.rows] == list(E.VARIANTS)
    assert len(acc.rows) == 2 * len(E.VARIANTS) and all("±" in str(c) for c in gap.rows[0][1:6])
    assert r.verdict in ("holds", "partly holds", "does not hold")
    assert len(list(tmp_path.rglob("*.json"))) == 2 * len(E.VARIANTS)  # one stored run per variant and seed
    # each variant ran with its own configuration (stored with its run)
    stored = [json.loads(p.read_text())["blob"] for p in tmp_path.rglob("*.json")]
    assert any('"mask_prob": 0.3' in b for b in stored) and any('"rope_base": 1000.0' in b for b in stored)
