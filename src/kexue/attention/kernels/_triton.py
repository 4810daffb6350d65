"""Triton kernels of :mod:`kexue.attention.kernels.fused`: flash-style attention whose mask and per-row scale are
worked out inside the kernel from O(L) numbers.

Imported only when the fused path runs (it needs ``triton``). Under ``TRITON_INTERPRET=1`` the same kernels run
on CPU tensors in Triton's interpreter (numpy): that is how the test suite checks them without a GPU.

Notation (one program handles ``BLOCK_M`` query rows of one (batch, head), or ``BLOCK_N`` keys in dK/dV):

* key ``j`` is visible to query ``i`` iff ``j < K`` and

  - ``k_rank[j] <= q_rank[i]``            (``HAS_RANK``: UniLM cumsum, prefix-LM, permutation order, padding)
  - ``k_group[j] == q_group[i]``          (``HAS_GROUP``: packed documents)
  - ``j <= i + causal_offset``            (``IS_CAUSAL``: top-left with offset 0, kv-cache with ``K - Q``)

* the logits of row ``i`` are ``c_i * q_i . k_j`` with ``c_i = sm_scale * log_base(max(n_i, min_n)) * mult_i``:
  the log factor when ``ENTROPY`` (``n_i`` = visible keys, read from ``COUNTS`` when ``HAS_COUNTS``, else
  counted here), ``mult_i`` when ``HAS_MULT`` (any per-row or per-head multiplier, differentiable).
* the forward keeps ``lse2_i = log2 sum_j exp2(c_i log2(e) q_i . k_j)`` (``+inf`` for a row that sees no key,
  whose output is 0) and ``cb_i = c_i / mult_i`` for the backward.

Each program first scans the ranks / groups of the other side (1024 at a time) for the first and the last block that
some of its rows may see (``_key_range``, ``_query_range``), then loops over that range with no branch around its
loads, so that Triton software-pipelines them (asynchronous copies; an ``if`` around the loads, as the first version
had, keeps the pipeliner out -- tests/attention/kernels/test_fused_compile.py checks the compiled loops). Blocks
outside the range are never read; a block inside it that no row may see is masked element-wise like any partly
visible one. For every mask of article 3 the range is exact (the visible keys are a prefix in rank order, documents
are contiguous), so a UniLM or prefix-LM mask costs only its visible blocks and an L x L mask is never read. """

from __future__ import annotations

import triton
import triton.language as tl

# (globals a kernel reads must be constexpr in compiled Triton; the interpreter does not check it)
LOG2E = tl.constexpr(1.4426950408889634)
BIG = tl.constexpr(1 << 30)          # rank given to hidden keys; also the "minus infinity" of rank ranges


@triton.jit
def _visible(offs_m, offs_n, qr, kr, qg, kg, Lk, causal_offset,
             IS_CAUSAL: tl.constexpr, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr):
    vis = (offs_n[None, :] < Lk) & (offs_m[:, None] >= 0)
    if IS_CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_RANK:
        vis = vis & (kr[None, :] <= qr[:, None])
    if HAS_GROUP:
        vis = vis & (kg[None, :] == qg[:, None])
    return vis


@triton.jit
def _load_rows(QR, QG, b, offs_m, row_ok, sqrb, sqrm, sqgb, sqgm,
               HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr):
    """Query ranks / groups of a row block and their ranges (rows past the end: rank -BIG, group range empty).
    Without ranks / groups the returned values are placeholders (tensors, which every Triton version returns
    from a function; the compiler drops them as unused)."""
    zero = tl.max(offs_m, 0) * 0
    qr = offs_m
    qr_min = zero
    qr_max = zero
    qg = offs_m
    qg_min = zero
    qg_max = zero
    if HAS_RANK:
        qr = tl.load(QR + b * sqrb + offs_m * sqrm, mask=row_ok, other=-BIG)
        qr_min = tl.min(tl.where(row_ok, qr, BIG), 0)
        qr_max = tl.max(qr, 0)
    if HAS_GROUP:
        qg = tl.load(QG + b * sqgb + offs_m * sqgm, mask=row_ok, other=0)
        qg_min = tl.min(tl.where(row_ok, qg, BIG), 0)
        qg_max = tl.max(tl.where(row_ok, qg, -BIG), 0)
    return qr, qr_min, qr_max, qg, qg_min, qg_max


@triton.jit
def _load_cols(KR, KG, b, offs_n, col_ok, skrb, skgb, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr):
    """Key ranks / groups of a key block and their ranges (keys past the end: hidden); placeholders as above."""
    zero = tl.max(offs_n, 0) * 0
    kr = offs_n
    kr_min = zero
    kr_max = zero
    kg = offs_n
    kg_min = zero
    kg_max = zero
    if HAS_RANK:
        kr = tl.load(KR + b * skrb + offs_n, mask=col_ok, other=BIG)
        kr_min = tl.min(kr, 0)
        kr_max = tl.max(tl.where(col_ok, kr, -BIG), 0)
    if HAS_GROUP:
        kg = tl.load(KG + b * skgb + offs_n, mask=col_ok, other=0)
        kg_min = tl.min(tl.where(col_ok, kg, BIG), 0)
        kg_max = tl.max(tl.where(col_ok, kg, -BIG), 0)
    return kr, kr_min, kr_max, kg, kg_min, kg_max


@triton.jit
def _block_live(qr_max, qg_min, qg_max, kr_min, kg_min, kg_max, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr):
    """Whether some row of the query block may see some key of the key block (a necessary condition); for one pair
    of blocks or, with vectors on one side, for each block of a scanned chunk."""
    live = True
    if HAS_RANK:
        live = kr_min <= qr_max
    if HAS_GROUP:
        overlap = (kg_min <= qg_max) & (kg_max >= qg_min)
        if HAS_RANK:
            live = live & overlap
        else:
            live = overlap
    return live


@triton.jit
def _chunk_ranges(R, G, sr_b, sr, sg_b, sg, b, offs, ok, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr,
                  NB: tl.constexpr, BLOCK: tl.constexpr):
    """Min / max rank and group of each of the ``NB`` blocks of a scanned chunk (positions past the end left out:
    min BIG, max -BIG); placeholders for what the mask lacks."""
    r_min = tl.zeros([NB], tl.int32)
    r_max = r_min
    g_min = r_min
    g_max = r_min
    if HAS_RANK:
        r = tl.reshape(tl.load(R + b * sr_b + offs * sr, mask=ok, other=0), (NB, BLOCK))
        r_ok = tl.reshape(ok, (NB, BLOCK))
        r_min = tl.min(tl.where(r_ok, r, BIG), 1)
        r_max = tl.max(tl.where(r_ok, r, -BIG), 1)
    if HAS_GROUP:
        g = tl.reshape(tl.load(G + b * sg_b + offs * sg, mask=ok, other=0), (NB, BLOCK))
        g_ok = tl.reshape(ok, (NB, BLOCK))
        g_min = tl.min(tl.where(g_ok, g, BIG), 1)
        g_max = tl.max(tl.where(g_ok, g, -BIG), 1)
    return r_min, r_max, g_min, g_max


@triton.jit
def _key_range(KR, KG, b, skrb, skgb, hi, Lk, qr_max, qg_min, qg_max,
               HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[lo, hi)``: from the first key block some row of the query block may see to one past the last one (within
    the causal end ``hi``; empty when there is none), read from the key ranks / groups alone.

    The main loops then run over this range with no data-dependent branch around their loads -- which is what
    lets Triton software-pipeline them (it does not pipeline a load under an ``if``) -- and mask the dead blocks
    inside it element-wise (``_partial`` flags them). For the masks of article 3 the range is exact: the keys a
    UniLM, prefix-LM or padding row sees are a prefix in rank order, and packed documents are contiguous."""
    lo = 0
    if HAS_RANK or HAS_GROUP:
        NB: tl.constexpr = 1024 // BLOCK_N            # blocks scanned a step
        first = hi * 0 + BIG
        last = hi * 0 - 1
        for start in range(0, hi, NB * BLOCK_N):
            offs = start + tl.arange(0, NB * BLOCK_N)
            kr_min, kr_max, kg_min, kg_max = _chunk_ranges(KR, KG, skrb, 1, skgb, 1, b, offs, offs < Lk,
                                                           HAS_RANK, HAS_GROUP, NB, BLOCK_N)
            idx = start // BLOCK_N + tl.arange(0, NB)
            live = _block_live(qr_max, qg_min, qg_max, kr_min, kg_min, kg_max, HAS_RANK, HAS_GROUP)
            live = live & (idx * BLOCK_N < hi)
            first = tl.minimum(first, tl.min(tl.where(live, idx, BIG), 0))
            last = tl.maximum(last, tl.max(tl.where(live, idx, -1), 0))
        lo = tl.where(last >= 0, first, 0) * BLOCK_N
        hi = (last + 1) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(QR, QG, b, sqrb, sqrm, sqgb, sqgm, lo, Lq, kr_min, kg_min, kg_max,
                 HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """``[lo, hi)`` of the query blocks (from ``lo``, the causal start) that may see some key of a key block:
    :func:`_key_range` seen from the keys, for the dK/dV pass."""
    hi = Lq
    if HAS_RANK or HAS_GROUP:
        NB: tl.constexpr = 1024 // BLOCK_M
        first = Lq * 0 + BIG
        last = Lq * 0 - 1
        for start in range(lo, Lq, NB * BLOCK_M):
            offs = start + tl.arange(0, NB * BLOCK_M)
            qr_min, qr_max, qg_min, qg_max = _chunk_ranges(QR, QG, sqrb, sqrm, sqgb, sqgm, b, offs, offs < Lq,
                                                           HAS_RANK, HAS_GROUP, NB, BLOCK_M)
            starts = start + tl.arange(0, NB) * BLOCK_M
            live = _block_live(qr_max, qg_min, qg_max, kr_min, kg_min, kg_max, HAS_RANK, HAS_GROUP)
            live = live & (starts < Lq)
            first = tl.minimum(first, tl.min(tl.where(live, starts, BIG), 0))
            last = tl.maximum(last, tl.max(tl.where(live, starts, -1), 0))
        hi = tl.where(last >= 0, last + BLOCK_M, lo)
        lo = tl.where(last >= 0, first, lo)
    return lo, hi


@triton.jit
def _partial(start_m, start_n, Lk, causal_offset, qr_min, kr_max, qg_min, qg_max, kg_min, kg_max,
             IS_CAUSAL: tl.constexpr, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether some (row, key) pair of a block is hidden, i.e. the element-wise mask is needed there (always true
    of a block no row may see). Most visited blocks are whole (below the causal diagonal; source keys for target
    rows under UniLM) and skip it."""
    part = start_n + BLOCK_N > Lk
    if IS_CAUSAL:
        part = part | (start_n + BLOCK_N - 1 > start_m + causal_offset)
    if HAS_RANK:
        part = part | (kr_max > qr_min)
    if HAS_GROUP:       # whole only with one group on each side, the same one
        part = part | (kg_min != kg_max) | (qg_min != qg_max) | (kg_min != qg_min)
    return part


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    # Triton's interpreter cannot multiply bf16 operands (it stores them as uint16): there they are widened to
    # fp32 after the same rounding the GPU applies, so the arithmetic matches up to accumulation order
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _tile(PTR, b, h, offs_r, offs_c, sb, sh, sr, sc, n_rows, n_cols, UPCAST: tl.constexpr):
    """A ``[rows, cols]`` tile of a ``[B, H, L, D]`` tensor (zeros past the ends)."""
    x = tl.load(PTR + b * sb + h * sh + offs_r[:, None] * sr + offs_c[None, :] * sc,
                mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols), other=0.0)
    return _operand(x, UPCAST)


@triton.jit
def _store_tile(PTR, x, b, h, offs_r, offs_c, sb, sh, sr, sc, n_rows, n_cols):
    tl.store(PTR + b * sb + h * sh + offs_r[:, None] * sr + offs_c[None, :] * sc, x.to(PTR.dtype.element_ty),
             mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols))


@triton.jit
def _row_scale(CB, MULT, row, b, h, offs_m, row_ok, smb, smh, smm, HAS_MULT: tl.constexpr):
    """``c_i``: the base scale the forward kept, times the multiplier."""
    c = tl.load(CB + row, mask=row_ok, other=0.0)
    if HAS_MULT:
        c = c * tl.load(MULT + b * smb + h * smh + offs_m * smm, mask=row_ok, other=1.0).to(tl.float32)
    return c


@triton.jit
def _bwd_probs(qk, c2, lse, start_m, start_n, offs_m, offs_n, qr, qr_min, qg, qg_min, qg_max,
               kr, kr_max, kg, kg_min, kg_max, Lk, causal_offset,
               IS_CAUSAL: tl.constexpr, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward's probabilities of a block, recomputed from the kept log2-sum-exp (0 where hidden; rows past
    the end have lse = inf, hence 0)."""
    p = tl.exp2(qk * c2[:, None] - lse[:, None])
    if _partial(start_m, start_n, Lk, causal_offset, qr_min, kr_max, qg_min, qg_max, kg_min, kg_max,
                IS_CAUSAL, HAS_RANK, HAS_GROUP, BLOCK_M, BLOCK_N):
        vis = _visible(offs_m, offs_n, qr, kr, qg, kg, Lk, causal_offset, IS_CAUSAL, HAS_RANK, HAS_GROUP)
        p = tl.where(vis, p, 0.0)
    return p


@triton.jit
def _causal_end(pid_m, Lk, causal_offset, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key a row block may see."""
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + causal_offset)
    return hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CB, COUNTS, QR, KR, QG, KG, MULT,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                scb, scm, sqrb, sqrm, skrb, sqgb, sqgm, skgb, smb, smh, smm,
                H, Lq, Lk, D, DV, sm_scale, inv_log2_base, min_n, causal_offset,
                IS_CAUSAL: tl.constexpr, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr,
                ENTROPY: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_MULT: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = _tile(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, Lq, D, UPCAST)
    qr, qr_min, qr_max, qg, qg_min, qg_max = _load_rows(QR, QG, b, offs_m, row_ok, sqrb, sqrm, sqgb, sqgm,
                                                        HAS_RANK, HAS_GROUP)
    lo, hi = _key_range(KR, KG, b, skrb, skgb, _causal_end(pid_m, Lk, causal_offset, IS_CAUSAL, BLOCK_M), Lk,
                        qr_max, qg_min, qg_max, HAS_RANK, HAS_GROUP, BLOCK_N)

    # ---- the per-row scale c_i
    cb = tl.full([BLOCK_M], 1.0, tl.float32) * sm_scale
    if ENTROPY:
        if HAS_COUNTS:
            n = tl.load(COUNTS + b * scb + offs_m * scm, mask=row_ok, other=0).to(tl.float32)
        elif HAS_RANK or HAS_GROUP:
            cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kr, kr_min, kr_max, kg, kg_min, kg_max = _load_cols(KR, KG, b, offs_n, offs_n < Lk, skrb, skgb,
                                                                    HAS_RANK, HAS_GROUP)
                if _partial(start_m, start_n, Lk, causal_offset, qr_min, kr_max, qg_min, qg_max, kg_min, kg_max,
                            IS_CAUSAL, HAS_RANK, HAS_GROUP, BLOCK_M, BLOCK_N):
                    vis = _visible(offs_m, offs_n, qr, kr, qg, kg, Lk, causal_offset, IS_CAUSAL, HAS_RANK, HAS_GROUP)
                    cnt += tl.sum(vis.to(tl.int32), 1)
                else:
                    cnt += BLOCK_N
            n = cnt.to(tl.float32)
        elif IS_CAUSAL:
            n = tl.minimum(tl.maximum(offs_m + 1 + causal_offset, 0), Lk).to(tl.float32)
        else:
            n = tl.full([BLOCK_M], 1.0, tl.float32) * Lk
        cb = cb * (tl.log2(tl.maximum(n, min_n)) * inv_log2_base)
    c = cb
    if HAS_MULT:
        c = cb * tl.load(MULT + b * smb + h * smh + offs_m * smm, mask=row_ok, other=1.0).to(tl.float32)
    c2 = c * LOG2E

    # ---- online softmax over the visible key blocks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kr, kr_min, kr_max, kg, kg_min, kg_max = _load_cols(KR, KG, b, offs_n, offs_n < Lk, skrb, skgb,
                                                            HAS_RANK, HAS_GROUP)
        k = _tile(K, b, h, offs_n, offs_d, skb, skh, skn, skd, Lk, D, UPCAST)
        v = _tile(V, b, h, offs_n, offs_dv, svb, svh, svn, svd, Lk, DV, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c2[:, None]
        if _partial(start_m, start_n, Lk, causal_offset, qr_min, kr_max, qg_min, qg_max, kg_min, kg_max,
                    IS_CAUSAL, HAS_RANK, HAS_GROUP, BLOCK_M, BLOCK_N):
            vis = _visible(offs_m, offs_n, qr, kr, qg, kg, Lk, causal_offset, IS_CAUSAL, HAS_RANK, HAS_GROUP)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _operand(p.to(V.dtype.element_ty), UPCAST)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    _store_tile(O, acc / l_safe[:, None], b, h, offs_m, offs_dv, sob, soh, som, sod, Lq, DV)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    tl.store(LSE + row, tl.where(empty, float("inf"), m_i + tl.log2(l_safe)), mask=row_ok)
    tl.store(CB + row, cb, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV_, LSE, CB, DELTA, QR, KR, QG, KG, MULT,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                     sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                     sqrb, sqrm, skrb, sqgb, sqgm, skgb, smb, smh, smm,
                     H, Lq, Lk, D, DV, causal_offset,
                     IS_CAUSAL: tl.constexpr, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr,
                     HAS_MULT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _tile(K, b, h, offs_n, offs_d, skb, skh, skn, skd, Lk, D, UPCAST)
    v = _tile(V, b, h, offs_n, offs_dv, svb, svh, svn, svd, Lk, DV, UPCAST)
    kr, kr_min, kr_max, kg, kg_min, kg_max = _load_cols(KR, KG, b, offs_n, offs_n < Lk, skrb, skgb,
                                                        HAS_RANK, HAS_GROUP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:   # the first query that may see this block's first key: i >= start_n - causal_offset
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    lo, hi = _query_range(QR, QG, b, sqrb, sqrm, sqgb, sqgm, lo, Lq, kr_min, kg_min, kg_max, HAS_RANK, HAS_GROUP,
                          BLOCK_M)
    row_base = pid_bh.to(tl.int64) * Lq
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        qr, qr_min, qr_max, qg, qg_min, qg_max = _load_rows(QR, QG, b, offs_m, row_ok, sqrb, sqrm, sqgb, sqgm,
                                                            HAS_RANK, HAS_GROUP)
        q = _tile(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, Lq, D, UPCAST)
        do = _tile(DO, b, h, offs_m, offs_dv, sdob, sdoh, sdom, sdod, Lq, DV, UPCAST)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        c = _row_scale(CB, MULT, row_base + offs_m, b, h, offs_m, row_ok, smb, smh, smm, HAS_MULT)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = _bwd_probs(qk, c * LOG2E, lse, start_m, start_n, offs_m, offs_n, qr, qr_min, qg, qg_min, qg_max,
                       kr, kr_max, kg, kg_min, kg_max, Lk, causal_offset, IS_CAUSAL, HAS_RANK, HAS_GROUP,
                       BLOCK_M, BLOCK_N)
        pt = _operand(tl.trans(p).to(DO.dtype.element_ty), UPCAST)
        dv += tl.dot(pt, do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])                   # d loss / d logits
        dst = _operand(tl.trans(ds * c[:, None]).to(Q.dtype.element_ty), UPCAST)
        dk += tl.dot(dst, q, input_precision=PRECISION)
    _store_tile(DK, dk, b, h, offs_n, offs_d, sdkb, sdkh, sdkn, sdkd, Lk, D)
    _store_tile(DV_, dv, b, h, offs_n, offs_dv, sdvb, sdvh, sdvn, sdvd, Lk, DV)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, DC, LSE, CB, DELTA, QR, KR, QG, KG, MULT,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                   sdqb, sdqh, sdqm, sdqd,
                   sqrb, sqrm, skrb, sqgb, sqgm, skgb, smb, smh, smm,
                   H, Lq, Lk, D, DV, causal_offset,
                   IS_CAUSAL: tl.constexpr, HAS_RANK: tl.constexpr, HAS_GROUP: tl.constexpr,
                   HAS_MULT: tl.constexpr, GRAD_C: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = _tile(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, Lq, D, UPCAST)
    do = _tile(DO, b, h, offs_m, offs_dv, sdob, sdoh, sdom, sdod, Lq, DV, UPCAST)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    c = _row_scale(CB, MULT, row, b, h, offs_m, row_ok, smb, smh, smm, HAS_MULT)
    c2 = c * LOG2E
    qr, qr_min, qr_max, qg, qg_min, qg_max = _load_rows(QR, QG, b, offs_m, row_ok, sqrb, sqrm, sqgb, sqgm,
                                                        HAS_RANK, HAS_GROUP)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dc = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, hi = _key_range(KR, KG, b, skrb, skgb, _causal_end(pid_m, Lk, causal_offset, IS_CAUSAL, BLOCK_M), Lk,
                        qr_max, qg_min, qg_max, HAS_RANK, HAS_GROUP, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kr, kr_min, kr_max, kg, kg_min, kg_max = _load_cols(KR, KG, b, offs_n, offs_n < Lk, skrb, skgb,
                                                            HAS_RANK, HAS_GROUP)
        k = _tile(K, b, h, offs_n, offs_d, skb, skh, skn, skd, Lk, D, UPCAST)
        v = _tile(V, b, h, offs_n, offs_dv, svb, svh, svn, svd, Lk, DV, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = _bwd_probs(qk, c2, lse, start_m, start_n, offs_m, offs_n, qr, qr_min, qg, qg_min, qg_max,
                       kr, kr_max, kg, kg_min, kg_max, Lk, causal_offset, IS_CAUSAL, HAS_RANK, HAS_GROUP,
                       BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_operand(ds.to(K.dtype.element_ty), UPCAST), k, input_precision=PRECISION)
        if GRAD_C:
            dc += tl.sum(ds * qk, 1)
    _store_tile(DQ, dq * c[:, None], b, h, offs_m, offs_d, sdqb, sdqh, sdqm, sdqd, Lq, D)
    if GRAD_C:
        tl.store(DC + row, dc, mask=row_ok)
