"""``kexue bench linear-attention``: :func:`kexue.attention.linear_attention` against the peers (article 5).

Shapes: B = 1, H = 8, d = 64, fp32, L in {1024, 4096, 16384} ({1024, 4096} with ``--quick``), forward passes under
``no_grad``. Rows (each a paired ABBA ratio from :func:`kexue.bench.base.compare`, peer time / our time):

1. ``favor``: FAVOR+ with m = 256 orthogonal features, causal (our chunked form) and non-causal, against
   performer-pytorch's ``FastAttention(causal=...)`` (its non-CUDA causal path on a CPU). Our map gets performer's
   projection matrix, so both compute the same attention. Targets at L = 4096: causal >= 20x with <= 1/5 of its
   peak memory (:func:`kexue.bench.base.peak_memory`: traced CPU tensor bytes); non-causal >= 1x. At L = 16384
   performer's causal path takes minutes per call: it is timed once (:func:`~kexue.bench.base.time_once`).
2. ``elu``: elu+1 features, causal, against SDPA causal (target >= 4x at L = 4096) and against fla's pure-torch
   ``naive_chunk_linear_attn`` (``normalize=True``; fla's ``fla.ops`` package imports triton, so its
   ``fla/ops/linear_attn/naive.py`` is loaded by file path; the row is skipped when it will not load). fla gets its
   inputs already mapped by elu+1 and in its ``[B, T, H, D]`` layout, outside its timed call; ours maps inside.
   Target: no slower than fla (>= 1x). Non-causal elu+1 against SDPA non-causal for orientation.
3. ``decode``: one token of recurrent decoding (:func:`~kexue.attention.linear_attention_step`, FAVOR+ m = 256)
   after a prefix of L tokens, against SDPA attending from one query over a kv-cache of L keys; ours should not
   grow with L.
4. ``rate``: the machine's fp32 GEMM rate (a 2048^3 ``torch.mm``) beside the GFLOP/s of our chunked causal path
   (useful FLOPs: feature projections, intra-chunk ``QK^T`` and ``AV``, inter-chunk ``QS`` and the state updates).

Every output of ours -- and fla's and performer's -- is checked in the same run against
:func:`~kexue.attention.linear_attention_reference` on the first and the last 256 query rows (the reference is
O(L^2); the last rows see every key); the max abs differences are in ``extra``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from kexue.attention import FavorPlus, linear_attention, linear_attention_reference, linear_attention_step
from kexue.attention.linear import LinearAttentionState
from kexue.bench.base import (
    BenchOptions,
    BenchRow,
    Comparison,
    compare,
    peak_memory,
    register_bench,
    time_call,
    time_once,
)

B, H, D, M = 1, 8, 64, 256
CHECK_ROWS = 256


def _qkv(L: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) for _ in range(3))


def _check(out: torch.Tensor, q, k, v, fm, causal: bool) -> float:
    """Max |out - reference| over the first and the last ``CHECK_ROWS`` query rows (float64 reference)."""
    L = q.shape[2]
    r = min(CHECK_ROWS, L)
    fm64 = fm
    if isinstance(fm, torch.nn.Module):
        import copy

        fm64 = copy.deepcopy(fm).double()
    q, k, v = q.double(), k.double(), v.double()
    errs = []
    if causal:
        first = linear_attention_reference(q[:, :, :r], k[:, :, :r], v[:, :, :r], feature_map=fm64, causal=True)
        last = linear_attention_reference(q[:, :, L - r:], k, v, feature_map=fm64, causal=True)
    else:
        first = linear_attention_reference(q[:, :, :r], k, v, feature_map=fm64)
        last = linear_attention_reference(q[:, :, L - r:], k, v, feature_map=fm64)
    errs.append(float((out[:, :, :r].double() - first).abs().max()))
    errs.append(float((out[:, :, L - r:].double() - last).abs().max()))
    return max(errs)


def _performer(causal: bool):
    """performer-pytorch's FastAttention (m = 256), or None when it is not installed."""
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):         # it prints that the CUDA causal kernel is missing
        return FastAttention(D, nb_features=M, causal=causal).eval()


def _fla_naive() -> tuple[Callable | None, str]:
    """fla's ``naive_chunk_linear_attn`` loaded by file path (``fla.ops`` itself imports triton)."""
    try:
        spec = importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            return None, "fla-core is not installed"
        path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "linear_attn" / "naive.py"
        mspec = importlib.util.spec_from_file_location("_kexue_bench_fla_naive", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod.naive_chunk_linear_attn, str(path)
    except Exception as exc:                                 # any failure to load: the row is skipped
        return None, f"fla's naive.py did not load ({type(exc).__name__}: {exc})"


def _timing(L: int, opts: BenchOptions, slow: bool = False) -> dict:
    if slow:                                                 # a peer taking seconds per call
        return {"repeats": 3, "rounds": 1, "warmup": 1, "min_time": 0.0}
    if L >= 16384:
        return {"repeats": 3, "rounds": 1, "warmup": 1}
    return {"repeats": 5 if opts.quick else max(opts.repeats, 7), "rounds": 1 if opts.quick else 2}


def _flops_causal(L: int, m: int, chunk: int, projected: bool) -> float:
    """Useful FLOPs of the chunked causal path per call (B * H heads)."""
    e = D + 1
    per_head = 2 * L * chunk * m + 2 * L * chunk * e + 2 * 2 * L * m * e
    if projected:
        per_head += 2 * 2 * L * D * m
    return float(B * H * per_head)


def gemm_rate(device: str = "cpu") -> float:
    """fp32 GEMM GFLOP/s of this machine: a 2048 x 2048 by 2048 x 2048 ``torch.mm``."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / time_call(lambda: torch.mm(a, b), device=device, repeats=5) / 1e9


@register_bench("linear-attention", groups=("favor", "elu", "decode", "rate"))
def run(opts: BenchOptions) -> Iterator[BenchRow]:
    if opts.device != "cpu":
        raise ValueError("kexue bench linear-attention runs on the CPU (its peers have no GPU path here)")
    rate = None
    if opts.wants("rate"):
        rate = gemm_rate()
        yield BenchRow("fp32 GEMM 2048^3 (machine rate)", "torch.mm", "-", 2 * 2048 ** 3 / rate / 1e9, None,
                       "report only", {"gflops": f"{rate:.1f}"})
    with torch.no_grad():
        for L in (1024, 4096) if opts.quick else (1024, 4096, 16384):
            yield from _rows(L, opts, rate)


def _rows(L: int, opts: BenchOptions, rate: float | None) -> Iterator[BenchRow]:
    q, k, v = _qkv(L)
    tk = _timing(L, opts)
    if opts.wants("favor"):
        yield from _favor_rows(L, q, k, v, opts, rate)
    if opts.wants("elu"):
        yield from _elu_rows(L, q, k, v, opts, tk, rate)
    if opts.wants("decode") and L in (1024, 16384):
        yield _decode_row(L, q, k, v, tk)


def _favor_rows(L, q, k, v, opts, rate) -> Iterator[BenchRow]:
    for causal in (True, False):
        yield _favor_row(L, causal, q, k, v, opts, rate)


def _favor_row(L, causal, q, k, v, opts, rate) -> BenchRow:
    perf = _performer(causal)
    fm = FavorPlus(D, num_features=M, generator=torch.Generator().manual_seed(1))
    if perf is not None:
        fm.omega.copy_(perf.projection_matrix)                 # the same features on both sides
    ours = lambda: linear_attention(q, k, v, feature_map=fm, causal=causal)  # noqa: E731
    extra = {"max_abs_diff": f"{_check(ours(), q, k, v, fm, causal):.2e}"}
    mode = "causal" if causal else "non-causal"
    target = "report only" if L != 4096 else ">= 20x, <= 1/5 peak memory" if causal else ">= 1x"
    case = f"FAVOR+ m={M} {mode} L={L}"
    if perf is None:
        return BenchRow.of(case, "linear_attention", "performer-pytorch (missing)",
                           compare(ours, None, **_timing(L, opts)), target, extra)
    peer = lambda: perf(q, k, v)  # noqa: E731
    extra["peer_max_abs_diff"] = f"{_check(peer(), q, k, v, fm, causal):.2e} (its eps=1e-4 in the features)"
    if causal and L <= 4096:
        mo, mp = peak_memory(ours), peak_memory(peer)
        extra["peak_mib"] = f"{mo / 2**20:.0f} vs {mp / 2**20:.0f} ({mo / mp:.2f} of the peer's)"
    if causal and L > 4096:
        # performer's causal path takes minutes per call here (~4 min at L = 16384 on 2 busy cores): one call
        t_peer = time_once(peer)
        t_ours = time_call(ours, repeats=3, warmup=1)
        extra["timing"] = "performer timed once (minutes per call); ours: median of 3"
        timing = Comparison(t_ours, t_peer)
    else:
        timing = compare(ours, peer, **_timing(L, opts, slow=causal))
    if causal and rate:
        extra["gflops"] = f"{_flops_causal(L, M, 64, True) / timing[0] / 1e9:.1f} (machine GEMM {rate:.1f})"
    return BenchRow.of(case, "linear_attention", f"performer FastAttention {mode}", timing, target, extra)


def _elu_rows(L, q, k, v, opts, tk, rate) -> Iterator[BenchRow]:
    ours_c = lambda: linear_attention(q, k, v, feature_map="elu1", causal=True)  # noqa: E731
    err = _check(ours_c(), q, k, v, "elu1", True)
    timing = compare(ours_c, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), **tk)
    extra = {"max_abs_diff": f"{err:.2e}"}
    if rate:
        extra["gflops"] = f"{_flops_causal(L, D, 64, False) / timing[0] / 1e9:.1f} (machine GEMM {rate:.1f})"
    yield BenchRow.of(f"elu+1 causal L={L}", "linear_attention", "SDPA is_causal (softmax)", timing,
                      ">= 4x" if L == 4096 else "report only", extra)
    naive, where = _fla_naive()
    if naive is None:
        yield BenchRow(f"elu+1 causal L={L}", "linear_attention", "fla naive_chunk (skipped)", float("nan"), None,
                       ">= 1x", {"skipped": where})
    else:
        qf, kf = ((F.elu(t) + 1).transpose(1, 2).contiguous() for t in (q, k))
        vf = v.transpose(1, 2).contiguous()
        peer = lambda: naive(qf, kf, vf, normalize=True)  # noqa: E731
        perr = _check(peer().transpose(1, 2), q, k, v, "elu1", True)
        yield BenchRow.of(f"elu+1 causal L={L}", "linear_attention", "fla naive_chunk_linear_attn",
                          compare(ours_c, peer, **tk), ">= 1x",
                          {"max_abs_diff": f"{err:.2e}", "peer_max_abs_diff": f"{perr:.2e}",
                           "note": "fla gets elu+1 features in its layout, made outside its timed call"})
    ours_n = lambda: linear_attention(q, k, v, feature_map="elu1")  # noqa: E731
    yield BenchRow.of(f"elu+1 non-causal L={L}", "linear_attention", "SDPA (softmax)",
                      compare(ours_n, lambda: F.scaled_dot_product_attention(q, k, v), **tk), "report only",
                      {"max_abs_diff": f"{_check(ours_n(), q, k, v, 'elu1', False):.2e}"})


def _decode_row(L, q, k, v, tk) -> BenchRow:
    fm = FavorPlus(D, num_features=M, generator=torch.Generator().manual_seed(1))
    _, state = linear_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], feature_map=fm, causal=True,
                                return_state=True)
    qt, kt, vt = q[:, :, -1:], k[:, :, -1:], v[:, :, -1:]
    out, _ = linear_attention_step(qt, kt, vt, state, feature_map=fm)
    full = linear_attention(q, k, v, feature_map=fm, causal=True)
    assert isinstance(state, LinearAttentionState)
    ours = lambda: linear_attention_step(qt, kt, vt, state, feature_map=fm)  # noqa: E731
    peer = lambda: F.scaled_dot_product_attention(qt, k, v)  # noqa: E731
    return BenchRow.of(f"decode 1 token after L={L}", f"linear_attention_step (FAVOR+ m={M})",
                       "SDPA over a kv-cache of L", compare(ours, peer, **tk), "ours flat in L",
                       {"max_abs_diff_vs_full_pass": f"{float((out - full[:, :, -1:]).abs().max()):.2e}"})
