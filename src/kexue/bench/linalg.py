"""``kexue bench linalg``: the orthogonal map a -> b against the dense matmul and the peers a user would pick.

Rows (ratio = peer time / our time, measured interleaved in one run):

1. Apply the map to N vectors in O(d) each vs ``x @ T.T`` with T already materialised (d = N = 4096; 2048 in
   quick mode). Target >= 20x at equal accuracy; the relative error of both against float64 is reported.
2. Apply the Householder reflection H(a - b) with our map vs ``torch.ormqr`` (the LAPACK way to apply a
   reflector without forming it), and materialise it with ``m.matrix()`` vs ``torch.linalg.householder_product``.
3. d = 3: the rotation taking a to b vs ``scipy.spatial.transform.Rotation.align_vectors`` -- for one pair, and
   for 1000 pairs (scipy has no batched one-rotation-per-pair call, so a user loops). Note the argument order:
   ``align_vectors(x, y)`` returns the rotation taking y to x, so we call ``align_vectors([b], [a])``.
"""

from __future__ import annotations

import torch

from kexue.bench.base import BenchOptions, BenchRow, compare, register_bench
from kexue.linalg import orthogonal_map


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def _apply_vs_dense(opts: BenchOptions) -> BenchRow:
    d = n = 2048 if opts.quick else 4096
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    a, b, x = a.to(opts.device), b.to(opts.device), x.to(opts.device)
    m = orthogonal_map(a, b, kind="rotation")
    T = m.matrix()
    with torch.no_grad():
        ref = orthogonal_map(a.double(), b.double(), kind="rotation")(x.double())
        err_ours, err_dense = _rel(m(x), ref), _rel(x @ T.T, ref)
        timing = compare(lambda: m(x), lambda: x @ T.T, device=opts.device, repeats=min(opts.repeats, 3), rounds=2)
    return BenchRow.of(f"rotation a->b, apply to {n} vectors, d={d}", "OrthogonalMap(x)", "x @ T.T (T prebuilt)",
                       timing, ">= 20x, equal accuracy",
                       {"rel_err_ours": f"{err_ours:.2e}", "rel_err_dense": f"{err_dense:.2e}",
                        "dtype": "float32", "threads": torch.get_num_threads()})


def _householder_rows(opts: BenchOptions) -> list[BenchRow]:
    d = 1024 if opts.quick else 4096
    n = 1024 if opts.quick else 4096
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    a, b = a / a.norm(), b / b.norm()
    if float(a @ b) > 0:  # keep H(a - b) well conditioned (the reflector's first entry scaled to 1 below)
        b = -b
    x = torch.randn(n, d, generator=g)
    a, b, x = a.to(opts.device), b.to(opts.device), x.to(opts.device)
    m = orthogonal_map(a, b, kind="householder")
    # LAPACK form: H = I - tau v v^T with v[0] = 1
    v = a - b
    v = v / v[0]
    tau1 = (2.0 / (v @ v)).reshape(1)
    A1 = v.reshape(d, 1)  # ormqr applies the single reflector
    rows = []
    with torch.no_grad():
        ref = orthogonal_map(a.double(), b.double(), kind="householder")(x.double())
        peer_apply = torch.ormqr(A1, tau1, x.T).T
        err_ours, err_peer = _rel(m(x), ref), _rel(peer_apply, ref)
        timing = compare(lambda: m(x), lambda: torch.ormqr(A1, tau1, x.T), device=opts.device, repeats=opts.repeats)
    rows.append(BenchRow.of(f"Householder H(a-b), apply to {n} vectors, d={d}", "OrthogonalMap(x)",
                            "torch.ormqr", timing, ">= 1x",
                            {"rel_err_ours": f"{err_ours:.2e}", "rel_err_peer": f"{err_peer:.2e}"}))
    # materialising: householder_product returns a matrix shaped like A, so a full k x k Q needs k columns
    # (tau = 0 for the identity reflectors after the first); it is O(k^3), so a smaller k
    k = 1024 if opts.quick else 2048
    ak, bk = a[:k] / a[:k].norm(), b[:k] / b[:k].norm()
    mk = orthogonal_map(ak, bk, kind="householder")
    vk = ak - bk
    vk = vk / vk[0]
    A = torch.zeros(k, k, device=vk.device)
    A[:, 0] = vk
    tau = torch.cat([(2.0 / (vk @ vk)).reshape(1), torch.zeros(k - 1, device=vk.device)])
    with torch.no_grad():
        H_ref = orthogonal_map(ak.double(), bk.double(), kind="householder").matrix()
        H_peer = torch.linalg.householder_product(A, tau)
        e_ours = float((mk.matrix().double() - H_ref).norm() / H_ref.norm())
        e_peer = float((H_peer.double() - H_ref).norm() / H_ref.norm())
        timing = compare(lambda: mk.matrix(), lambda: torch.linalg.householder_product(A, tau),
                         device=opts.device, repeats=2, rounds=1)
    rows.append(BenchRow.of(f"Householder H(a-b), materialise d x d, d={k}", "OrthogonalMap.matrix()",
                            "torch.linalg.householder_product", timing, ">= 1x",
                            {"rel_err_ours": f"{e_ours:.2e}", "rel_err_peer": f"{e_peer:.2e}"}))
    return rows


def _scipy_rows(opts: BenchOptions) -> list[BenchRow]:
    try:
        import numpy as np
        from scipy.spatial.transform import Rotation
    except ImportError:
        return [BenchRow("rotation a->b, d=3", "orthogonal_map(kind='rotation')", "scipy Rotation.align_vectors",
                         0.0, None, extra={"note": "scipy is not installed (pip install kexue[bench])"})]
    g = torch.Generator().manual_seed(2)
    pairs = 100 if opts.quick else 1000
    a = torch.randn(pairs, 3, generator=g, dtype=torch.float64)
    b = torch.randn(pairs, 3, generator=g, dtype=torch.float64)
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    a_np, b_np = an.numpy(), bn.numpy()

    def scipy_one(i: int = 0) -> np.ndarray:
        # align_vectors(x, y) rotates y onto x: pass (b, a) to get the rotation taking a to b
        rot, _ = Rotation.align_vectors(b_np[i:i + 1], a_np[i:i + 1])
        return rot.as_matrix()

    def scipy_all() -> np.ndarray:
        return np.stack([scipy_one(i) for i in range(pairs)])

    rows = []
    with torch.no_grad():
        Rs = torch.from_numpy(scipy_all())
        ours_all = orthogonal_map(an, bn, kind="rotation").matrix()
        map_err_scipy = float((Rs @ an.unsqueeze(-1)).squeeze(-1).sub(bn).norm(dim=-1).max())
        map_err_ours = float((ours_all @ an.unsqueeze(-1)).squeeze(-1).sub(bn).norm(dim=-1).max())
        same = float((Rs - ours_all).abs().max())
        t1 = compare(lambda: orthogonal_map(an[0], bn[0], kind="rotation").matrix(), scipy_one, repeats=opts.repeats)
        tn = compare(lambda: orthogonal_map(an, bn, kind="rotation").matrix(), scipy_all,
                     repeats=min(opts.repeats, 3), rounds=2)
    extra = {"max_map_err_ours": f"{map_err_ours:.1e}", "max_map_err_scipy": f"{map_err_scipy:.1e}",
             "max_abs_diff_ours_vs_scipy": f"{same:.1e}", "dtype": "float64"}
    rows.append(BenchRow.of("rotation a->b, d=3, 1 pair", "orthogonal_map(..).matrix()", "Rotation.align_vectors",
                            t1, ">= 1x", extra))
    rows.append(BenchRow.of(f"rotation a->b, d=3, {pairs} pairs", "orthogonal_map (batched)",
                            "align_vectors in a loop", tn, ">= 1x",
                            {"note": "scipy has no one-rotation-per-pair batch call"}))
    return rows


@register_bench("linalg")
def run(opts: BenchOptions) -> list[BenchRow]:
    return [_apply_vs_dense(opts), *_householder_rows(opts), *_scipy_rows(opts)]
