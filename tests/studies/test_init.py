"""Study ``init``: a tiny run of every part (generated data, no download)."""

from __future__ import annotations

import torch

from kexue.studies import StudyContext
from kexue.studies import init as study

TINY = dict(study.QUICK, ns=[16, 32], trials=1, square_n=40, tall_n=10, depth=12, width=32, batch=8,
            networks_per_curve=1, rect_widths=[8, 32])


def test_tiny_run(tmp_path):
    state = torch.get_rng_state()
    ctx = StudyContext(mode="quick", fig_dir=tmp_path, progress=False)
    r = study.run_config(ctx, TINY)
    assert torch.equal(torch.get_rng_state(), state)
    assert r.verdict in ("holds", "partly holds", "does not hold")
    assert [t.name for t in r.tables] == ["init_orthogonality_error", "init_singular_values",
                                          "init_signal_propagation", "init_rectangular"]
    assert [row[0] for row in r.tables[0].rows] == [16, 32]
    assert r.config["tall"] == [80, 10] and r.config["depth"] == 12
    assert {f.name for f in ctx.figures} == {"init_orth_error", "init_singular_values", "init_signal_propagation"}
    assert set(study.QUICK) == set(study.FULL)
