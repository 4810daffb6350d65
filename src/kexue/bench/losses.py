"""``kexue bench losses``: AM-Softmax and ArcFace forward+backward against pytorch-metric-learning.

Same centres, same embeddings, same scale and margin (PML stores ``W`` as ``[D, C]`` and takes the ArcFace
margin in degrees with a default scale of 64; we set both sides equal). Checks the loss values agree to 1e-5,
then times one forward+backward (interleaved) and measures peak memory with :func:`peak_memory`.
Targets: time <= 1.0x theirs, peak memory <= theirs.
"""

from __future__ import annotations

import math

import torch

from kexue.bench.base import BenchOptions, BenchRow, compare, peak_memory, register_bench
from kexue.losses import AMSoftmaxLoss, ArcFaceLoss

N, D = 512, 512
SCALE, AM_MARGIN, ARC_MARGIN_DEG = 64.0, 0.35, 28.6


def _peer_module(kind: str, c: int):
    from pytorch_metric_learning import losses as pml

    if kind == "am":
        return pml.CosFaceLoss(num_classes=c, embedding_size=D, margin=AM_MARGIN, scale=SCALE)
    return pml.ArcFaceLoss(num_classes=c, embedding_size=D, margin=ARC_MARGIN_DEG, scale=SCALE)


def _ours(kind: str, c: int):
    if kind == "am":
        return AMSoftmaxLoss(D, c, scale=SCALE, margin=AM_MARGIN)
    return ArcFaceLoss(D, c, scale=SCALE, margin=math.radians(ARC_MARGIN_DEG))


def _step(mod: torch.nn.Module, w: torch.nn.Parameter, z: torch.Tensor, y: torch.Tensor):
    def fn() -> float:
        z.grad = None
        w.grad = None
        loss = mod(z, y)
        loss.backward()
        return float(loss.detach())

    return fn


@register_bench("losses")
def run(opts: BenchOptions) -> list[BenchRow]:
    rows: list[BenchRow] = []
    classes = (1000,) if opts.quick else (1000, 100000)
    try:
        import pytorch_metric_learning  # noqa: F401

        have_peer = True
    except ImportError:
        have_peer = False
    for c in classes:
        g = torch.Generator().manual_seed(c)
        z = torch.randn(N, D, generator=g).to(opts.device).requires_grad_(True)
        y = torch.randint(0, c, (N,), generator=g).to(opts.device)
        repeats, rounds = opts.repeats, (3 if c <= 10000 else 2)
        for kind, name, peer_name in (("am", "AMSoftmaxLoss", "pml.CosFaceLoss"),
                                      ("arc", "ArcFaceLoss", "pml.ArcFaceLoss")):
            ours = _ours(kind, c).to(opts.device)
            ours_fn = _step(ours, ours.weight, z, y)
            case = f"{name} fwd+bwd N={N} D={D} C={c}"
            if not have_peer:
                t_ours, _ = compare(ours_fn, None, device=opts.device, repeats=repeats, rounds=1)
                rows.append(BenchRow(case, f"kexue.{name}", peer_name, t_ours, None, "<= 1.0x time, <= memory",
                                     {"note": "pytorch-metric-learning is not installed"}))
                continue
            peer = _peer_module(kind, c).to(opts.device)
            with torch.no_grad():
                ours.weight.copy_(peer.W.t())
            peer_fn = _step(peer, peer.W, z, y)
            l_ours, l_peer = ours_fn(), peer_fn()
            diff = abs(l_ours - l_peer)
            if c <= 10000:
                timing = compare(ours_fn, peer_fn, device=opts.device, repeats=repeats, rounds=rounds)
            else:  # seconds per call: one warm-up each, then single calls in ABBA order, paired
                timing = compare(ours_fn, peer_fn, device=opts.device, repeats=1, rounds=rounds, warmup=1,
                                 min_time=0.0)
            m_ours, m_peer = peak_memory(ours_fn, opts.device), peak_memory(peer_fn, opts.device)
            extra = {"loss_ours": round(l_ours, 6), "loss_peer": round(l_peer, 6), "abs_diff": f"{diff:.2e}",
                     "values_equal_1e-5": diff <= 1e-5 * max(1.0, abs(l_peer))}
            if m_ours is not None and m_peer is not None:
                extra.update({"peak_MB_ours": round(m_ours / 2**20, 1), "peak_MB_peer": round(m_peer / 2**20, 1),
                              "memory_ratio": round(m_ours / max(m_peer, 1), 3)})
            rows.append(BenchRow.of(case, f"kexue.{name}", peer_name, timing, "<= 1.0x time, <= memory", extra))
            del peer, peer_fn
        # NaN check at cos = 1 exactly (an embedding equal to its class centre), not timed
        if c == classes[0] and have_peer:
            rows.append(_nan_row(opts))
    return rows


def _nan_row(opts: BenchOptions) -> BenchRow:
    c, n = 10, 8
    peer = _peer_module("arc", c).to(opts.device)
    ours = _ours("arc", c).to(opts.device)
    with torch.no_grad():  # unit basis vectors as centres: the cosine is exactly 1 after normalisation
        peer.W.copy_(torch.eye(D, c))
        ours.weight.copy_(peer.W.t())
    res = {}
    for label, mod, w in (("ours", ours, ours.weight), ("peer", peer, peer.W)):
        z = torch.eye(D, c, device=opts.device).t()[:n].clone().requires_grad_(True)
        w.grad = None
        mod(z, torch.arange(n, device=opts.device)).backward()
        res[label] = bool(torch.isfinite(z.grad).all() and torch.isfinite(w.grad).all())
    return BenchRow("ArcFace grads finite at cos=1 (not timed)", "kexue.ArcFaceLoss", "pml.ArcFaceLoss", 0.0, None,
                    "finite", {"finite_ours": res["ours"], "finite_peer": res["peer"]})
