"""Retrieval metrics against a brute-force reference (full similarity matrix, per-query Python loop)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kexue.metrics.retrieval import map_at_r, recall_at_k, retrieval_metrics, retrieval_topk


def brute_force(q, ql, db=None, dbl=None, ks=(1, 5, 10)):
    loo = db is None
    if loo:
        db, dbl = q, ql
    sim = F.normalize(q.double(), dim=1) @ F.normalize(db.double(), dim=1).t()
    top = {k: [] for k in ks}
    rec = {k: [] for k in ks}
    aps = []
    for i in range(q.shape[0]):
        order = [j for j in torch.argsort(sim[i], descending=True).tolist() if not (loo and j == i)]
        rel = [bool(dbl[j] == ql[i]) for j in order]
        r = sum(rel)
        for k in ks:
            top[k].append(any(rel[:k]))
            if r:
                rec[k].append(sum(rel[:k]) / r)
        if r:
            hits, ap = 0, 0.0
            for pos in range(r):
                if rel[pos]:
                    hits += 1
                    ap += hits / (pos + 1)
            aps.append(ap / r)
    out = {f"top{k}": sum(top[k]) / len(top[k]) for k in ks}
    out.update({f"recall@{k}": (sum(rec[k]) / len(rec[k]) if rec[k] else math.nan) for k in ks})
    out["map@r"] = sum(aps) / len(aps) if aps else math.nan
    return out


def _data(n, d, c, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    z = centres[y] + 1.2 * torch.randn(n, d, generator=g)  # overlapping classes: metrics well inside (0, 1)
    return z.to(dtype), y


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_leave_one_out_matches_brute_force(chunk_size):
    z, y = _data(150, 8, 5, seed=0)
    ours = retrieval_metrics(z, y, ks=(1, 5, 10), chunk_size=chunk_size)
    ref = brute_force(z, y)
    assert 0.1 < ref["top1"] < 0.95 and 0.05 < ref["map@r"] < 0.9
    for key, v in ref.items():
        assert ours[key] == pytest.approx(v, abs=1e-9), key


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_separate_database_matches_brute_force(chunk_size):
    q, ql = _data(60, 6, 4, seed=1)
    db, dbl = _data(90, 6, 4, seed=1)
    dbl = torch.where(dbl == 3, torch.full_like(dbl, 7), dbl)  # label 3 queries have no relevant item
    ours = retrieval_metrics(q, ql, db, dbl, ks=(1, 3, 20), chunk_size=chunk_size)
    ref = brute_force(q, ql, db, dbl, ks=(1, 3, 20))
    for key, v in ref.items():
        assert ours[key] == pytest.approx(v, abs=1e-9), key
    assert retrieval_topk(q, ql, db, dbl, ks=(1, 3), chunk_size=chunk_size) == pytest.approx(
        {"top1": ref["top1"], "top3": ref["top3"]}, abs=1e-9)
    assert recall_at_k(q, ql, db, dbl, ks=(20,), chunk_size=chunk_size)["recall@20"] == pytest.approx(
        ref["recall@20"], abs=1e-9)
    assert map_at_r(q, ql, db, dbl, chunk_size=chunk_size) == pytest.approx(ref["map@r"], abs=1e-9)


def test_k_larger_than_database_and_low_precision():
    z, y = _data(12, 4, 3, seed=2)
    ours = retrieval_metrics(z, y, ks=(1, 50))
    ref = brute_force(z, y, ks=(1, 50))
    for key, v in ref.items():
        assert ours[key] == pytest.approx(v, abs=1e-9), key
    assert ours["top50"] == 1.0 and ours["recall@50"] == 1.0
    zb = z.to(torch.bfloat16)
    ours_b = retrieval_metrics(zb, y, ks=(1, 5))
    ref_b = brute_force(zb.float(), y, ks=(1, 5))
    assert ours_b["top5"] == pytest.approx(ref_b["top5"], abs=1e-9)


def test_perfect_and_self_excluded():
    # two tight clusters: leave-one-out must not count the query itself
    z = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1, 2])  # class 2 is a singleton: miss for top-k, left out of recall and mAP
    m = retrieval_metrics(z, y, ks=(1,))
    assert m["top1"] == pytest.approx(0.8)
    assert m["recall@1"] == 1.0 and m["map@r"] == 1.0


def test_bad_input():
    z, y = _data(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_topk(z, y[:5])
    with pytest.raises(ValueError, match="db_emb and db_labels"):
        retrieval_topk(z, y, z)
    with pytest.raises(ValueError, match="db_emb must have 4 columns"):
        retrieval_topk(z, y, torch.randn(3, 5), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="ks"):
        retrieval_topk(z, y, ks=(0,))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_topk(z, y, chunk_size=0)
    with pytest.raises(TypeError, match="query_labels"):
        retrieval_topk(z, y.float())
    with pytest.raises(ValueError, match="database"):
        retrieval_topk(z[:1], y[:1])


def test_ks_is_keyword_only():
    z, y = _data(10, 4, 2, seed=0)
    for fn in (retrieval_metrics, retrieval_topk, recall_at_k):
        with pytest.raises(TypeError, match="positional"):
            fn(z, y, z, y, (1,))
