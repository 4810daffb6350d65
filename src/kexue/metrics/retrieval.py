"""Retrieval metrics by cosine similarity: top-k accuracy, recall@k and mAP@R, chunked over queries.

The point of kexue.fm/archives/8656 is that classification is not ranking: an encoder trained as a
classifier is used by ranking a database by ``cos(z_query, z_db)``. These metrics measure that ranking.

* **top-k accuracy** (:func:`retrieval_topk`): a query is a hit when any of its ``k`` nearest database items
  has its label (what the deep-metric-learning papers call "Recall@K", and post 5743's "top-k acc");
* **recall@k** (:func:`recall_at_k`): the information-retrieval recall, the fraction of the query's ``R``
  relevant items (same label) found among its ``k`` nearest;
* **mAP@R** (:func:`map_at_r`, Musgrave et al. 2020): ``(1/R) sum_{i <= R} P(i) rel(i)`` over the top ``R``.

With no database the query set is its own database, leave-one-out (a query never retrieves itself).
Similarities are computed ``chunk_size`` queries at a time, so memory is ``O(chunk_size * N_db)``: 10k x 10k
runs in a few tens of MB. Queries with no relevant item in the database count as misses for top-k and are
left out of recall@k and mAP@R (which are NaN if no query has one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._checks import check_tensor, compute_dtype

__all__ = ["map_at_r", "recall_at_k", "retrieval_metrics", "retrieval_topk"]


def _prepare(query_emb, query_labels, db_emb, db_labels, ks, chunk_size):
    check_tensor("query_emb", query_emb, floating=True, dim=2)
    check_tensor("query_labels", query_labels, floating=False, dim=1)
    if query_labels.shape[0] != query_emb.shape[0]:
        raise ValueError(f"query_labels must have {query_emb.shape[0]} entries, got {query_labels.shape[0]}")
    if (db_emb is None) != (db_labels is None):
        raise ValueError("db_emb and db_labels must be given together (or both left out for leave-one-out)")
    loo = db_emb is None
    if loo:
        db_emb, db_labels = query_emb, query_labels
    else:
        check_tensor("db_emb", db_emb, floating=True, dim=2)
        check_tensor("db_labels", db_labels, floating=False, dim=1)
        if db_labels.shape[0] != db_emb.shape[0]:
            raise ValueError(f"db_labels must have {db_emb.shape[0]} entries, got {db_labels.shape[0]}")
        if db_emb.shape[1] != query_emb.shape[1]:
            raise ValueError(f"db_emb must have {query_emb.shape[1]} columns like query_emb, "
                             f"got {db_emb.shape[1]}")
    if query_emb.shape[0] == 0:
        raise ValueError("query_emb must hold at least one query")
    n_db = db_emb.shape[0] - (1 if loo else 0)
    if n_db < 1:
        raise ValueError("the database must hold at least one item (two for leave-one-out)")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return db_emb, db_labels, loo, n_db, ks


def _relevant_counts(query_labels, db_labels, loo):
    classes, counts = torch.unique(db_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
    r = torch.where(classes[pos] == query_labels, counts[pos], torch.zeros_like(counts[pos]))
    return r - 1 if loo else r


def _ranked_matches(query_emb, query_labels, db_emb, db_labels, loo, kk, chunk_size):
    """``[Nq, kk]`` bool: does the i-th nearest database item (by cosine) share the query's label?"""
    cdt = compute_dtype(query_emb.dtype)
    q = F.normalize(query_emb.to(cdt), dim=1)
    d = F.normalize(db_emb.to(cdt), dim=1)
    out = torch.empty(q.shape[0], kk, dtype=torch.bool, device=q.device)
    for i in range(0, q.shape[0], chunk_size):
        sim = q[i:i + chunk_size] @ d.t()
        if loo:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + i] = float("-inf")
        idx = sim.topk(kk, dim=1).indices
        out[i:i + chunk_size] = db_labels[idx] == query_labels[i:i + chunk_size, None]
        del sim, idx
    return out


@torch.no_grad()
def retrieval_metrics(query_emb: torch.Tensor, query_labels: torch.Tensor, db_emb: torch.Tensor | None = None,
                      db_labels: torch.Tensor | None = None, *, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024, map_r: bool = True) -> dict[str, float]:
    """All retrieval metrics in one chunked pass: ``top{k}``, ``recall@{k}`` for each ``k`` and ``map@r``.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> m = retrieval_metrics(z, torch.tensor([0, 0, 1, 1]), ks=(1,))
        >>> m["top1"], m["recall@1"], m["map@r"]
        (1.0, 1.0, 1.0)
    """
    db_emb, db_labels, loo, n_db, ks = _prepare(query_emb, query_labels, db_emb, db_labels, ks, chunk_size)
    r = _relevant_counts(query_labels, db_labels, loo)
    kk = max(ks)
    if map_r:
        kk = max(kk, int(r.max()))
    kk = min(kk, n_db)
    match = _ranked_matches(query_emb, query_labels, db_emb, db_labels, loo, kk, chunk_size)
    has = r > 0
    out: dict[str, float] = {}
    cum = match.cumsum(1)
    for k in ks:
        kc = min(k, kk)
        out[f"top{k}"] = float(cum[:, kc - 1].gt(0).double().mean())
    for k in ks:
        kc = min(k, kk)
        rec = cum[has, kc - 1].double() / r[has].double()
        out[f"recall@{k}"] = float(rec.mean()) if has.any() else float("nan")
    if map_r:
        ranks = torch.arange(1, kk + 1, device=match.device, dtype=torch.float64)
        prec = cum.double() / ranks
        within = ranks.unsqueeze(0) <= r.unsqueeze(1).double()
        ap = (prec * match.double() * within).sum(1)
        out["map@r"] = float((ap[has] / r[has].double()).mean()) if has.any() else float("nan")
    return out


def retrieval_topk(query_emb: torch.Tensor, query_labels: torch.Tensor, db_emb: torch.Tensor | None = None,
                   db_labels: torch.Tensor | None = None, *, ks: Sequence[int] = (1, 5, 10),
                   chunk_size: int = 1024) -> dict[str, float]:
    """Top-k retrieval accuracy by cosine similarity: a hit if any of the ``k`` nearest has the query's label.

    The evaluation of kexue.fm/archives/8656 (and its companion post 5743's table): rank the database by
    ``cos(z_query, z_db)``. Without ``db_emb``/``db_labels`` it is leave-one-out over the queries. Returns
    ``{"top1": ..., "top5": ..., ...}``.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> retrieval_topk(z, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
        {'top1': 1.0, 'top2': 1.0}
    """
    m = retrieval_metrics(query_emb, query_labels, db_emb, db_labels, ks=ks, chunk_size=chunk_size, map_r=False)
    return {f"top{k}": m[f"top{k}"] for k in ks}


def recall_at_k(query_emb: torch.Tensor, query_labels: torch.Tensor, db_emb: torch.Tensor | None = None,
                db_labels: torch.Tensor | None = None, *, ks: Sequence[int] = (1, 5, 10),
                chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k: the mean fraction of a query's relevant database items found among its ``k`` nearest.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
        >>> recall_at_k(z, torch.tensor([0, 0, 0, 1]), torch.tensor([[1.0, 0.05], [0.95, 0.2]]),
        ...             torch.tensor([0, 0]), ks=(1, 2))
        {'recall@1': 0.5, 'recall@2': 1.0}
    """
    m = retrieval_metrics(query_emb, query_labels, db_emb, db_labels, ks=ks, chunk_size=chunk_size, map_r=False)
    return {f"recall@{k}": m[f"recall@{k}"] for k in ks}


def map_at_r(query_emb: torch.Tensor, query_labels: torch.Tensor, db_emb: torch.Tensor | None = None,
             db_labels: torch.Tensor | None = None, *, chunk_size: int = 1024) -> float:
    """mAP@R: mean over queries of ``(1/R) sum_{i<=R} P(i) rel(i)``, ``R`` = the query's number of relevant items.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
        >>> map_at_r(z, torch.tensor([0, 0, 1, 1]))
        0.0
    """
    return retrieval_metrics(query_emb, query_labels, db_emb, db_labels, ks=(1,), chunk_size=chunk_size)["map@r"]
