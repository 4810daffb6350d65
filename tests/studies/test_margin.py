"""Study ``margin``: a tiny end-to-end run on real Fashion-MNIST, resumable through ``cached_run``, that leaves
the global RNG alone."""

from __future__ import annotations

import json

import pytest
import torch

from kexue.studies import StudyContext
from kexue.studies import margin as study

TINY = dict(study.QUICK, losses=["softmax", "am", "arcface"], n_train=300, n_unseen=200, epochs=1, width=4,
            embedding_dim=16, batch_size=64, n_diameter=100, n_proj=50)


@pytest.mark.slow
def test_tiny_run_on_fashion_mnist_resumes_and_leaves_global_rng_alone(data_dir, tmp_path):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    ctx = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path / "f1", progress=False,
                       runs_dir=tmp_path / "runs")
    (tmp_path / "f1").mkdir()
    r = study.run_config(ctx, TINY)
    assert torch.equal(torch.get_rng_state(), state)  # the study did not reseed the global RNG
    assert r.verdict in ("partly holds", "does not hold")
    main = next(t for t in r.tables if t.name == "margin_retrieval")
    assert [row[1] for row in main.rows] == [study.LOSS_NAMES[lo] for lo in TINY["losses"]]
    assert all(0 <= row[3] <= 1 for row in main.rows)
    assert {f.name for f in ctx.figures} == {"margin_diameters", "margin_projection"}
    stored = sorted((tmp_path / "runs" / "margin").glob("*.json"))
    assert len(stored) == 3                                       # one record per training run
    json.loads(stored[0].read_text())
    # a second run with the same runs_dir reads the records back: same tables, no retraining
    ctx2 = StudyContext(mode="quick", data_dir=str(data_dir), fig_dir=tmp_path / "f2", progress=False,
                        runs_dir=tmp_path / "runs")
    (tmp_path / "f2").mkdir()
    r2 = study.run_config(ctx2, TINY)
    assert [t.rows for t in r2.tables] == [t.rows for t in r.tables]
    assert sorted((tmp_path / "runs" / "margin").glob("*.json")) == stored
