"""attention() (SDPA fast path, per-row q pre-scale) against attention_reference(): values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kexue.attention import (
    LogNScale,
    and_masks,
    attention,
    attention_reference,
    causal,
    causal_mask,
    padding,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
    unilm,
    unilm_mask,
)

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _masks(B, L):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    am = (torch.arange(L)[None] < lengths[:, None]).long()
    src = torch.randint(0, L + 1, (B,), generator=g)
    seg = (torch.arange(L)[None] >= src[:, None]).long()
    return {
        "none": None,
        "causal_tensor": causal_mask(L),
        "padding": padding_mask(am),
        "unilm_pad": unilm_mask(seg, am),
        "prefix": prefix_lm_mask(L // 3, L),
        "predicate": and_masks(unilm(seg), padding(am)),
        "window": and_masks(causal(), sliding_window_mask(3)),
        "additive": torch.zeros(L, L).masked_fill(~causal_mask(L), float("-inf")),
        "user": unilm_mask(seg, am).clone(),                  # no counts attached: read from the mask
        # broadcast over the keys ([1, 1, L, 1]): a row sees every key or none (every 4th row from 1: none)
        "rows": (torch.arange(L) % 4 != 1)[None, None, :, None],
    }


SCALES = ["standard", "entropy", 0.37, "tensor", "lognscale"]


def _scale(name, B, H, L):
    if name == "tensor":
        return torch.rand(B, H, L, 1, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.1
    if name == "lognscale":
        m = LogNScale(H, learnable=True)
        with torch.no_grad():
            m.s.copy_(torch.linspace(0.5, 1.5, H))
        return m
    return name


def _run(fn, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    (out.float() * g.float()).sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_name", list(_masks(2, 9)))
def test_attention_matches_reference(dtype, mask_name):
    B, H, L, D = 2, 3, 9, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3))
    mask = _masks(B, L)[mask_name]
    for scale in SCALES:
        for is_causal in (False, True):
            kw = dict(mask=mask, scale=_scale(scale, B, H, L), is_causal=is_causal, min_n=4)
            got = _run(attention, q, k, v, **kw)
            want = _run(attention_reference, q, k, v, **kw)
            for a, b in zip(got, want):
                assert a.dtype == dtype
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, s=scale, c=is_causal: f"{s} "
                                           f"causal={c}: {m}")


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (5, 12), (12, 5), (33, 33)])
@pytest.mark.parametrize("scale", ["standard", "entropy"])
def test_shapes_and_cross_lengths(Lq, Lk, scale):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, Lq, 16, generator=g)
    k, v = torch.randn(1, 2, Lk, 16, generator=g), torch.randn(1, 2, Lk, 4, generator=g)
    for is_causal in (False, True):
        got = _run(attention, q, k, v, scale=scale, is_causal=is_causal, min_n=2)
        want = _run(attention_reference, q, k, v, scale=scale, is_causal=is_causal, min_n=2)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if Lk >= Lq:  # right-aligned cache mask
        m = causal_mask(Lq, Lk)
        got = _run(attention, q, k, v, mask=m, scale=scale)
        want = _run(attention_reference, q, k, v, mask=m, scale=scale)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reference_is_plain_softmax_attention():
    """The reference itself, against a per-row loop written from the formula."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = attention_reference(q, k, v, m, scale=0.5)
    for i in range(4):
        idx = m[i].nonzero().flatten()
        if len(idx) == 0:
            assert out[0, 0, i].abs().max() == 0
            continue
        w = torch.softmax(0.5 * (k[0, 0, idx] @ q[0, 0, i]), dim=0)
        torch.testing.assert_close(out[0, 0, i], w @ v[0, 0, idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", ["standard", "entropy"])
def test_fully_masked_rows_output_zero_without_nan(dtype, scale):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g).to(dtype) for _ in range(3))
    am = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    m = unilm_mask(seg, am)          # batch 1 has no visible key at all
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~m, float("-inf"))
    for mask in (m, additive):
        out, gq, gk, gv = _run(attention, q, k, v, mask=mask, scale=scale)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        for t in (out, gq, gk, gv):
            assert torch.isfinite(t).all()
        assert torch.equal(gq[1], torch.zeros_like(gq[1]))
        want = _run(attention_reference, q, k, v, mask=mask, scale=scale)
        for a, b in zip((out, gq, gk, gv), want):
            torch.testing.assert_close(a, b, **TOL[dtype])


def test_empty_lengths():
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 5)
    out = attention(q, k, v, scale="entropy")
    assert out.shape == (1, 1, 3, 5) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    q0 = torch.randn(1, 1, 0, 4)
    assert attention(q0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 5)).shape == (1, 1, 0, 5)


def test_dropout_with_generator_is_reproducible_and_zero_dropout_is_identity():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    a = attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(9))
    b = attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(9))
    c = attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # E[dropout output] = output: average of many draws approaches the dropout-free value
    g = torch.Generator().manual_seed(0)
    avg = torch.stack([attention(q, k, v, dropout_p=0.3, generator=g) for _ in range(200)]).mean(0)
    torch.testing.assert_close(avg, attention(q, k, v), rtol=0, atol=0.2)


def test_bad_inputs():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match="k must have shape"):
        attention(q, torch.randn(1, 2, 4, 7), q)
    with pytest.raises(ValueError, match="v must have shape"):
        attention(q, q, torch.randn(1, 2, 5, 8))
    with pytest.raises(TypeError, match="floating-point"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="scale must be"):
        attention(q, q, q, scale="logn")
    with pytest.raises(ValueError, match="scale must be > 0"):
        attention(q, q, q, scale=-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, q, q, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="min_n"):
        attention(q, q, q, scale="entropy", min_n=0)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)


@pytest.mark.parametrize("scale", ["standard", "entropy", 0.4])
def test_block_mask_path_matches_reference(scale):
    """attention(mask=BlockMask) runs flex_attention (forward only on CPU) and agrees with the reference."""
    import warnings

    from kexue.attention import to_block_mask

    B, H, L = 2, 2, 24
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, L, 8, generator=g) for _ in range(3))
    seg = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 21])
    am = torch.tensor([[1] * 20 + [0] * 4, [0] * L])        # batch 1: every key is padding
    mod = and_masks(unilm(seg), padding(am))
    bm = to_block_mask(mod, B, None, L, L, BLOCK_SIZE=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = attention(q, k, v, mask=bm, scale=scale, min_n=4)
    want = attention_reference(q, k, v, mask=mod, scale=scale, min_n=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    with torch.no_grad():                                   # traced too: one graph, the same values
        traced = _compiled(lambda q, k, v: attention(q, k, v, mask=bm, scale=scale, min_n=4))(q, k, v)
    torch.testing.assert_close(traced, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is_causal"):
        attention(q, k, v, mask=bm, is_causal=True)
    with pytest.raises(ValueError, match="built for"):
        attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], mask=bm)


@pytest.mark.parametrize("scale", ["standard", "entropy"])
def test_empty_row_guard_path(monkeypatch, scale):
    """Devices without SDPA's zero-for-empty-rows behaviour take the guard path; it must agree too."""
    import kexue.attention.core as core

    monkeypatch.setattr(core, "_EMPTY_ROWS_ZERO", {})
    core._clear_mask_stats_cache()
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    m = unilm_mask(torch.tensor([[0, 0, 0, 1, 1, 1]] * 2), torch.tensor([[1, 1, 0, 1, 1, 0], [0] * 6]))
    for mask in (m, torch.zeros(2, 1, 6, 6, dtype=torch.float64).masked_fill(~m, float("-inf"))):
        for is_causal in (False, True):
            for _ in range(2):                  # first sight, then served from the kept entry
                got = _run(attention, q, k, v, mask=mask, scale=scale, is_causal=is_causal)
                want = _run(attention_reference, q, k, v, mask=mask, scale=scale, is_causal=is_causal)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_additive_policy_hands_sdpa_a_float_mask_from_the_first_call(monkeypatch):
    """Devices marked "additive" (CUDA: cuDNN's bool-mask path leaves empty rows non-zero) must never see a bool
    mask: kept masks, predicates and masks too big to keep are all converted, and results still match."""
    import torch.nn.functional as F

    import kexue.attention.core as core

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append(None if kw.get("attn_mask") is None else kw["attn_mask"].dtype)
        return sdpa(*args, **kw)

    monkeypatch.setattr(core, "_EMPTY_ROWS_ZERO", {"cpu": "additive"})
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(core, "_ADDITIVE_MAX_ELEMENTS", 100)
    g = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    am = torch.tensor([[1, 1, 0, 1, 1, 0], [0] * 6])
    small, big = unilm_mask(seg, am), unilm_mask(seg, am).expand(2, 2, 6, 6)   # 72 / 144 elements
    for mask in (small, big, and_masks(unilm(seg), padding(am))):
        core._clear_mask_stats_cache()
        for scale in ("entropy", "standard", "entropy"):
            for is_causal in (False, True):
                seen.clear()
                torch.testing.assert_close(attention(q, k, v, mask, scale=scale, is_causal=is_causal),
                                           attention_reference(q, k, v, mask, scale=scale, is_causal=is_causal))
                assert seen == [torch.float32]
        if mask is small:                                    # converted once, on the first call, and kept
            assert core._mask_cache()["ready"][torch.float32].dtype == torch.float32
        if mask is big:                                      # too big to keep: nothing kept, converted per call
            assert torch.float32 not in core._mask_cache()["ready"]


def test_kept_mask_entry_serves_a_change_of_scale_and_dtype():
    """One mask object used with the standard scale first (no counts kept), then with the entropy scale, then
    in another dtype: each call must agree with the reference, on both empty-row paths."""
    import kexue.attention.core as core

    g = torch.Generator().manual_seed(15)
    m = unilm_mask(torch.tensor([[0, 0, 1, 1, 1]] * 2), torch.tensor([[1, 1, 1, 1, 0], [0] * 5]))
    plain = m.clone()                                             # no builder counts: read from the mask
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for policy in ({"cpu": "any"}, {}, {"cpu": "additive"}):
        core._EMPTY_ROWS_ZERO, saved = policy, core._EMPTY_ROWS_ZERO
        try:
            for mask in (m, plain):
                core._clear_mask_stats_cache()
                for scale, dt in [("standard", torch.float64), ("entropy", torch.float64),
                                  ("entropy", torch.float32), ("standard", torch.float32)]:
                    args = [t.to(dt) for t in (q, k, v)]
                    torch.testing.assert_close(attention(*args, mask=mask, scale=scale, min_n=1),
                                               attention_reference(*args, mask=mask, scale=scale, min_n=1))
        finally:
            core._EMPTY_ROWS_ZERO = saved


def test_mask_statistics_cache_follows_in_place_changes():
    from kexue.attention.core import _clear_mask_stats_cache

    _clear_mask_stats_cache()
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    m = causal_mask(8).clone()
    a1 = attention(q, k, v, m, scale="entropy", min_n=1)
    a2 = attention(q, k, v, m, scale="entropy", min_n=1)        # cached counts
    assert torch.equal(a1, a2)
    m[5:, :3] = False                                            # in place: the version counter moves
    torch.testing.assert_close(attention(q, k, v, m, scale="entropy", min_n=1),
                               attention_reference(q, k, v, m, scale="entropy", min_n=1))
    torch.testing.assert_close(attention(q, k, v, m, scale="entropy", min_n=1, is_causal=True),
                               attention_reference(q, k, v, m, scale="entropy", min_n=1, is_causal=True))


def test_cached_additive_mask_matches_the_bool_mask_and_follows_changes():
    import torch.nn.functional as F

    from kexue.attention import core

    core._clear_mask_stats_cache()
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g) for _ in range(3))
    m = torch.rand(2, 1, 9, 9, generator=g) > 0.4
    m[0, 0, 3] = False                                           # a fully masked row
    for scale in ("standard", "entropy"):
        core._clear_mask_stats_cache()
        first = attention(q, k, v, m, scale=scale)              # first sight: converted by us and kept
        kept = core._mask_cache()["ready"][torch.float32]
        assert kept.dtype == torch.float32
        assert torch.equal(kept, torch.zeros(()).masked_fill(~m, float("-inf")).expand_as(kept))
        again = attention(q, k, v, m, scale=scale)               # second: served from the cache
        assert core._mask_cache()["ready"][torch.float32] is kept
        assert torch.equal(first, again)
        if scale == "standard":                                  # same numbers as SDPA's own conversion
            assert torch.equal(first, F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        torch.testing.assert_close(first, attention_reference(q, k, v, m, scale=scale))
    m[1, 0, :, 2] = False                                        # in place: the cached float mask is stale
    torch.testing.assert_close(attention(q, k, v, m), attention_reference(q, k, v, m))
    qd, kd, vd = q.double(), k.double(), v.double()              # another dtype: a new float mask
    torch.testing.assert_close(attention(qd, kd, vd, m), attention_reference(qd, kd, vd, m))
    torch.testing.assert_close(attention(qd, kd, vd, m), attention_reference(qd, kd, vd, m))
    assert core._mask_cache()["ready"][torch.float64].dtype == torch.float64
    torch.testing.assert_close(attention(q, k, v, m, is_causal=True), attention_reference(q, k, v, m, is_causal=True))
    big = torch.ones(1, 1, 2049, 2049, dtype=torch.bool)         # above the size kept: converted per call
    big[0, 0, 5, :7] = False
    core._clear_mask_stats_cache()
    qb = torch.randn(1, 1, 2049, 4, generator=g)
    for _ in range(2):
        torch.testing.assert_close(attention(qb, qb, qb, big), F.scaled_dot_product_attention(qb, qb, qb, big))
        assert torch.float32 not in core._mask_cache()["ready"]


def test_fast_row_counts_match_sum():
    from kexue.attention.masks import _row_any, _row_counts

    g = torch.Generator().manual_seed(14)
    for shape in [(2, 3, 5, 16), (1, 1, 7, 13), (3, 64), (1, 1, 3, 1024), (2, 1, 4, 0)]:
        m = torch.rand(shape, generator=g) > 0.5
        views = [m, m.transpose(-1, -2), m[..., 1:9] if shape[-1] > 9 else m, m.expand(2, *m.shape)]
        for x in views:
            assert torch.equal(_row_counts(x), x.sum(-1)), (shape, x.stride())
            assert torch.equal(_row_any(x), x.any(-1))
    # the word-sum path: rows of 255 words (every byte lane at its 255 maximum when all True), a group plus a
    # remainder, several groups, 8-aligned slices and broadcast (stride-0) dims
    for n in (2040, 2048, 4104, 8 * 255 * 3 + 16):
        dense = torch.ones(2, 1, 3, n, dtype=torch.bool)
        rand = torch.rand(1, 2, 5, n, generator=g) > 0.3
        for x in (dense, rand, rand[..., 8:], rand[..., 16:n - 8], rand[..., ::1].expand(3, 2, 5, n), ~dense):
            assert torch.equal(_row_counts(x), x.sum(-1)), (n, x.shape, x.stride())


def test_one_pass_float_mask_and_counts_match_the_two_kernels():
    """masks._additive_counted (the float mask and the row counts from one integer copy of the bools) against
    torch.where and the bool sum: every float type (fp16/bf16 take the two kernels), contiguous, transposed,
    sliced and broadcast masks, hidden rows, a length not a multiple of 8, no keys at all."""
    from kexue.attention.masks import _additive_counted

    g = torch.Generator().manual_seed(15)
    m = torch.rand(2, 3, 6, 13, generator=g) > 0.5
    m[1, 2, 4] = False
    views = [m, m.transpose(-1, -2), m[..., 2:11], m[:, :1].expand(2, 5, 6, 13), causal_mask(517)[None, None],
             torch.ones(1, 1, 3, 0, dtype=torch.bool)]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for x in views:
            ready, counts = _additive_counted(x, dtype)
            want = torch.where(x, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))
            assert ready.dtype == dtype and torch.equal(ready, want), (dtype, x.shape, x.stride())
            assert counts.dtype == torch.int64 and torch.equal(counts, x.sum(-1)), (dtype, x.shape, x.stride())
    # the compiled-path op returns the same pair
    ready, counts = torch.ops.kexue.to_additive_counted(m, torch.float32)
    assert torch.equal(ready, _additive_counted(m, torch.float32)[0]) and torch.equal(counts, m.sum(-1))


def _fresh_masks(n, B=2, L=12, seed=40):
    """n different bool masks of one shape (fully masked rows included), as a new mask per batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = torch.rand(B, 1, L, L, generator=g) > 0.5
        m[0, 0, 2] = False
        out.append(m)
    return out


def test_a_new_mask_per_call_matches_the_reference_with_and_without_grad():
    """A new bool mask every call (each replaces the kept entry and is converted to its float form here)."""
    from kexue.attention import core

    core._clear_mask_stats_cache()
    g = torch.Generator().manual_seed(41)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    for grad_mode in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        with grad_mode():
            for mask in _fresh_masks(3):
                for scale in ("entropy", "standard"):
                    torch.testing.assert_close(attention(q, k, v, mask, scale=scale),
                                               attention_reference(q, k, v, mask, scale=scale))


@pytest.mark.parametrize("order", ["grad first", "no-grad first"])
def test_a_float_mask_kept_for_backward_is_never_written_over(order):
    """A mask handed to SDPA while autograd records is saved for the backward: later calls with new masks (under
    no_grad too) must leave it as it was, or the backward would see another mask."""
    g = torch.Generator().manual_seed(42)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g, requires_grad=True) for _ in range(3))
    masks = _fresh_masks(4, seed=43)
    if order == "no-grad first":                 # a kept entry that the recorded call then replaces
        with torch.no_grad():
            attention(q, k, v, masks[3])
    out = attention(q, k, v, masks[0], scale="entropy")
    with torch.no_grad():
        for m in masks[1:3]:
            attention(q, k, v, m, scale="entropy")
    gout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), gout)
    ref = attention_reference(q, k, v, masks[0], scale="entropy")
    want = torch.autograd.grad(ref, (q, k, v), gout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_kept_entries_across_inference_mode_and_threads():
    """Each thread keeps its own entry (one thread replacing the kept mask never pulls it from under another)."""
    import threading

    from kexue.attention import core

    g = torch.Generator().manual_seed(44)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    masks = _fresh_masks(3, seed=45)
    core._clear_mask_stats_cache()
    with torch.inference_mode():                 # an entry made in inference mode, then used outside it
        attention(q, k, v, masks[0])
    for m in masks[1:]:
        torch.testing.assert_close(attention(q, k, v, m), attention_reference(q, k, v, m))
    errors = []

    def work(seed):
        try:
            for m in _fresh_masks(30, seed=seed):
                torch.testing.assert_close(attention(q, k, v, m, scale="entropy"),
                                           attention_reference(q, k, v, m, scale="entropy"))
        except Exception as exc:                 # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(50 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ------------------------------------------------------------------------------------------ torch.compile
def _compiled(fn, backend="aot_eager"):
    """``fn`` under torch.compile with ``fullgraph=True``: a graph break inside it is an error."""
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


COMPILE_CASES = [(name, "entropy", False, True) for name in _masks(2, 9)] + \
    [("unilm_pad", s, False, True) for s in SCALES if s != "entropy"] + \
    [("unilm_pad", "entropy", True, True), ("additive", "entropy", True, True), ("none", "entropy", True, True),
     ("none", "lognscale", True, True)] + \
    [(name, "entropy", causal_, False) for name, causal_ in (("unilm_pad", False), ("padding", True),
                                                             ("additive", True), ("predicate", False))]


@pytest.mark.parametrize("mask_name,scale_name,is_causal,cpu_kernels", COMPILE_CASES)
def test_attention_traces_as_one_graph_and_matches_eager(monkeypatch, mask_name, scale_name, is_causal,
                                                         cpu_kernels):
    """Under torch.compile, attention() takes its tensor-only path (no kept masks, no attached counts): no
    graph break, and the same values and gradients as the eager call and the reference. ``cpu_kernels``:
    the CPU's opaque count/convert ops, or the plain torch ops a GPU trace uses."""
    from kexue.attention import core

    monkeypatch.setattr(core, "_TRACED_CPU_KERNELS", cpu_kernels)
    B, H, L, D = 2, 3, 9, 4
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask = _masks(B, L)[mask_name]
    scale = _scale(scale_name, B, H, L)

    def fn(q, k, v):
        return attention(q, k, v, mask, scale=scale, is_causal=is_causal)

    got = _run(_compiled(fn), q, k, v)
    eager = _run(fn, q, k, v)
    ref = _run(attention_reference, q, k, v, mask=mask, scale=scale, is_causal=is_causal)
    for a, b, c in zip(got, eager, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        torch.testing.assert_close(a, c, **TOL[torch.float32])


@pytest.mark.parametrize("mask_name,is_causal", [("none", True), ("none", False), ("unilm_pad", False),
                                                  ("additive", True)])
def test_traced_entropy_multiplier_is_one_lookup_per_row_on_a_cpu(mask_name, is_causal):
    """While torch.compile traces ``scale="entropy"`` on a CPU, log n comes from the opaque table-lookup op
    (``kexue::logn_multiplier``, one value per row), not from a ``log`` in the graph: written as plain ops, the
    compiler inlined the float64 log into the q multiply and ran it per element of q (2x the multiply's time
    at B = 8, H = 12, L = 512). The values equal the eager call."""
    B, H, L, D = 2, 2, 9, 4
    g = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask = _masks(B, L)[mask_name]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(q, k, v):
        return attention(q, k, v, mask, scale="entropy", is_causal=is_causal)

    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, fn(q, k, v), **TOL[torch.float32])
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    if mask_name == "none" and not is_causal:
        assert not any("logn" in t or "log" == t.rsplit(".", 1)[-1] for t in targets), targets   # a scalar scale
        return
    assert sum("logn_multiplier" in t for t in targets) == 1, targets
    assert not any(t.rsplit(".", 1)[-1].rstrip(">'") in ("log", "log2", "log1p") for t in targets), targets


def test_the_traced_cpu_ops_pass_opcheck():
    """Schema and fake (meta) kernels of the opaque ops a CPU trace calls, checked by torch.library.opcheck, and
    the multiplier op's values: log_base(max(n, min_n)) in the requested dtype."""
    g = torch.Generator().manual_seed(17)
    m = torch.rand(2, 1, 5, 7, generator=g) > 0.4
    counts = torch.tensor([[0, 1, 16, 17, 64, 512, 700]])
    ops = torch.ops.kexue
    for op, args in ((ops.row_counts.default, (m,)), (ops.to_additive.default, (m, torch.float32)),
                     (ops.to_additive_counted.default, (m, torch.bfloat16)),
                     (ops.logn_multiplier.default, (counts, 700, 16.0, 512.0, torch.float32))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = ops.logn_multiplier(counts, 700, 16.0, 512.0, dtype)
        want = (torch.log(counts.double().clamp_min(16)) / math.log(512)).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want), dtype
    assert ops.logn_multiplier(counts, 700, 16.0, 512.0, torch.float32)[0, 5] == 1.0    # n = 512: exactly 1


@pytest.mark.parametrize("policy", ["kernel zeroes empty rows", "guard"])
def test_compiled_attention_zeroes_fully_masked_rows(monkeypatch, policy):
    """Rows with no visible key output 0 with zero gradients: from the kernel (the CPU's policy), or, for a
    device without a known policy, by the guard (rows un-masked for the kernel, zeroed after)."""
    from kexue.attention import core

    if policy == "guard":
        monkeypatch.setattr(core, "_EMPTY_ROWS_ZERO", {})
    B, H, L, D = 2, 2, 6, 4
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    bool_mask = padding_mask(torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))   # batch row 1: no key
    float_mask = torch.zeros(L, L).masked_fill(~causal_mask(L), float("-inf"))
    float_mask[2] = float("-inf")                                                     # query row 2: no key
    for mask in (bool_mask, float_mask):
        for scale in ("entropy", "standard"):
            def fn(q, k, v, mask=mask, scale=scale):
                return attention(q, k, v, mask, scale=scale)

            out, *grads = _run(_compiled(fn), q, k, v)
            ref, *ref_grads = _run(attention_reference, q, k, v, mask=mask, scale=scale)
            assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
            torch.testing.assert_close(out, ref, **TOL[torch.float32])
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert (_compiled(lambda q, k, v: attention(q, k, v, bool_mask))(q, k, v)[1] == 0).all()


def test_masks_built_inside_a_compiled_function():
    """A builder called inside the compiled region attaches nothing (a trace has no Python attributes);
    attention() counts the rows from the mask instead. The builders' input checks may split the graph."""
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    q = torch.randn(2, 2, 7, 4, generator=torch.Generator().manual_seed(13))

    def fn(q, seg, am):
        return attention(q, q, q, unilm_mask(seg, am), scale="entropy")

    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager")(q, seg, am)
    torch.testing.assert_close(got, attention_reference(q, q, q, unilm_mask(seg, am), scale="entropy"),
                               **TOL[torch.float32])


@pytest.mark.slow
def test_transformer_compiles_to_one_graph_with_inductor():
    """The whole model under the default backend (inductor, C++ on a CPU): one graph, and the same logits and
    gradients as eager within float32 rounding."""
    from kexue.nn import Transformer

    torch.manual_seed(0)
    model = Transformer(50, dim=32, depth=2, heads=2, attention_scale="entropy")
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(14))
    seg = (torch.arange(16) >= torch.tensor([[5], [9]])).long()
    mask = unilm_mask(seg, (torch.arange(16) < torch.tensor([[16], [13]])).long())
    compiled = _compiled(model, backend="inductor")
    results = []
    for m in (compiled, model):
        model.zero_grad()
        logits = m(ids, mask=mask).logits
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (lc, gc), (le, ge) = results
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-4)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("scale", ["entropy", "standard", "learnable"])
def test_a_transformer_prepares_its_mask_once_per_forward(monkeypatch, scale):
    """A Transformer hands its layers one mask wrapper (core._MaskMemo): the float mask (and the row counts)
    are made by the first layer and reused by the others -- also in a compiled inference graph, where nothing
    is kept between calls. Counted by calls of the CPU kernels; the logits, gradients and entropies equal a
    copy of the model whose attention objects are not plain SoftmaxAttention (so it gets the bare mask)."""
    import kexue.attention.masks as masks_mod
    from kexue.attention import core
    from kexue.nn import SoftmaxAttention, Transformer

    class Other(SoftmaxAttention):       # same computation, but its own forward: it gets the bare mask
        def forward(self, q, k, v, *, mask=None, is_causal=False):
            assert mask is None or isinstance(mask, torch.Tensor)
            return super().forward(q, k, v, mask=mask, is_causal=is_causal)

    torch.manual_seed(0)
    model = Transformer(40, dim=32, depth=3, heads=2, attention_scale=scale)
    other = Transformer(40, dim=32, depth=3, heads=2, attention_scale=scale)
    other.load_state_dict(model.state_dict())
    for blk in other.blocks:
        old = blk.attn
        blk.attn = Other(old.scale, old.min_n, old.base)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    seg = (torch.arange(12) >= torch.tensor([[4], [7]])).long()
    mask = unilm_mask(seg, (torch.arange(12) < torch.tensor([[12], [10]])).long()).clone()   # no counts

    calls = {"n": 0, "mult": 0}
    for mod, name, key in ((masks_mod, "_additive_counted", "n"), (masks_mod, "_additive", "n"),
                           (core, "_logn_lookup", "mult")):    # (the last: the log n multiplier, "entropy")
        real = getattr(mod, name)

        def counted(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)
        monkeypatch.setattr(mod, name, counted)
    with torch.no_grad():
        for m, want in ((model, 1), (other, 3)):
            compiled = _compiled(m)
            calls["n"] = calls["mult"] = 0
            compiled(ids, mask=mask)
            assert calls["n"] == want, (m is model, calls["n"])
            assert calls["mult"] == (want if scale == "entropy" else 0), (m is model, calls["mult"])
        torch.testing.assert_close(_compiled(model)(ids, mask=mask).logits, other(ids, mask=mask).logits)
    outs = []
    for m in (model, other):
        m.zero_grad()
        out = m(ids, mask=mask, return_entropy=True)
        out.logits.square().mean().backward()
        outs.append((out.logits, out.entropies, [p.grad for p in m.parameters()]))
    (la, ea, ga), (lb, eb, gb) = outs
    torch.testing.assert_close(la, lb)
    for a, b in zip(ea + ga, eb + gb):
        torch.testing.assert_close(a, b)


def test_transformer_exports():
    """torch.export traces the whole model (its output dataclass is a pytree node) and the exported program
    gives the eager logits and entropies, for a UniLM mask with padding and for the causal flag."""
    from kexue.nn import Transformer

    torch.manual_seed(0)
    model = Transformer(40, dim=32, depth=2, heads=2, attention_scale="entropy").eval()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(4))
    seg = (torch.arange(12) >= torch.tensor([[4], [7]])).long()
    mask = unilm_mask(seg, (torch.arange(12) < torch.tensor([[12], [9]])).long())
    for kwargs in ({"mask": mask, "return_entropy": True}, {"is_causal": True}):
        program = torch.export.export(model, (ids,), kwargs)
        if "mask" in kwargs:    # the layers share one prepared mask (core._MaskMemo) in the exported graph too
            ops = [n for n in program.graph.nodes if "to_additive" in str(n.target)]
            assert len(ops) == 1, ops
        got, want = program.module()(ids, **kwargs), model(ids, **kwargs)
        torch.testing.assert_close(got.logits, want.logits, **TOL[torch.float32])
        for a, b in zip(got.entropies or [], want.entropies or []):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("is_causal,dtype", [(True, torch.float32), (False, torch.float64)])
def test_a_learnt_float_mask_gets_its_gradient_on_every_call(is_causal, dtype):
    """A float mask that requires grad (a learnt attention bias) whose conversion attention() would keep (it
    is made causal, or cast to q's dtype): converted per call instead, so a no-grad call first, or two training
    steps in a row, still give the bias its gradient -- equal to the reference's every time."""
    g = torch.Generator().manual_seed(22)
    q = torch.randn(1, 2, 6, 4, generator=g).to(dtype)
    bias = torch.nn.Parameter(torch.randn(1, 1, 6, 6, generator=g))
    with torch.no_grad():
        attention(q, q, q, bias, is_causal=is_causal, scale="entropy")
    for _ in range(2):
        bias.grad = None
        out = attention(q, q, q, bias, is_causal=is_causal, scale="entropy")
        assert out.requires_grad
        out.square().sum().backward()
        got = bias.grad.clone()
        bias.grad = None
        attention_reference(q, q, q, bias, is_causal=is_causal, scale="entropy").square().sum().backward()
        torch.testing.assert_close(got, bias.grad, **TOL[torch.float32])


# ---------------------------------------------------------------- regressions found by the twelfth session's audit
@pytest.mark.parametrize("kind", ["no_mask", "builder_mask", "rank_mask", "user_mask"])
def test_a_call_in_inference_mode_leaves_nothing_that_breaks_training(kind):
    """What attention() keeps between calls (the causal log n table, the converted mask, its counts and
    multiplier, a RankMask's dense form) must not be inference tensors: a later call with grad saves them."""
    from kexue.attention import RankMask
    from kexue.attention.core import _causal_logn_table, _clear_mask_stats_cache

    _causal_logn_table.cache_clear()
    _clear_mask_stats_cache()
    L = 9                                # a length no other test uses, so the tables are made here
    mask = {"no_mask": None, "builder_mask": causal_mask(L), "rank_mask": RankMask.causal(L),
            "user_mask": torch.ones(L, L, dtype=torch.bool).tril()}[kind]
    q = torch.randn(1, 2, L, 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        attention(q, q, q, mask, scale="entropy", is_causal=mask is None)
    qg = q.clone().requires_grad_()
    out = attention(qg, q, q, mask, scale="entropy", is_causal=mask is None)
    out.sum().backward()
    ref = attention_reference(q.clone().requires_grad_(), q, q, mask, scale="entropy", is_causal=mask is None)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("builder", ["causal", "padding", "unilm"])
def test_a_builder_mask_broadcast_over_the_keys_counts_every_key(builder):
    """A one-key builder mask used with K keys (its key dim broadcasts): each row sees K keys, not the one the
    builder counted."""
    mask = {"causal": lambda: causal_mask(1), "padding": lambda: padding_mask(torch.tensor([[1]])),
            "unilm": lambda: unilm_mask(torch.tensor([0]))}[builder]()
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 5, 4, generator=g,
                                                                                   dtype=torch.float64)
    out = attention(q, k, k, mask, scale="entropy", min_n=1)
    torch.testing.assert_close(out, attention_reference(q, k, k, mask, scale="entropy", min_n=1),
                               **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["standard", "entropy"])
def test_a_float32_hugging_face_mask_with_half_inputs_hides_no_extra_key(dtype, scale):
    """A finite fp32 mask value beyond the half type's range (-1e5 for fp16; finfo(float32).min, the Hugging
    Face padding value, for bf16) overflowed to -inf in the cast; the cast must saturate, so such keys still
    count (only -inf hides a key) and a row of them is not taken for an empty row."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g).to(dtype) for _ in range(3))
    big = -1e5 if dtype == torch.float16 else torch.finfo(torch.float32).min
    fm = torch.zeros(6, 6)
    fm[:, 4:] = big                                 # two padding keys
    fm[1] = big                                     # a row that sees only such keys
    fm[3, 0] = float("-inf")                        # a truly hidden key
    out = attention(q, k, v, fm, scale=scale)
    assert out[:, :, 1].abs().amax() > 0            # not zeroed as an empty row
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, fm, scale=scale).float(),
                               rtol=2e-2, atol=2e-2)


def test_the_reference_casts_a_float64_mask_without_making_infinities():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 4, 8, generator=g)
    fm = torch.zeros(4, 4, dtype=torch.float64)
    fm[1] = -1e300                                  # finite in fp64, beyond fp32's range
    out = attention_reference(q, q, q, fm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention(q, q, q, fm), **TOL[torch.float32])


@pytest.mark.parametrize("bad", ["no", None, 1, torch.tensor(True)])
def test_is_causal_must_be_a_bool(bad):
    from kexue.attention import attention_entropy, keys_per_row

    q = torch.randn(1, 1, 4, 4)
    for call in (lambda: attention(q, q, q, causal_mask(4), is_causal=bad),
                 lambda: attention(q, q, q, is_causal=bad),
                 lambda: attention_reference(q, q, q, is_causal=bad),
                 lambda: attention_entropy(q, q, is_causal=bad),
                 lambda: keys_per_row(None, 4, 4, is_causal=bad)):
        with pytest.raises(TypeError, match="is_causal"):
            call()


def test_q_is_checked_before_a_rank_mask_is_rendered():
    from kexue.attention import RankMask

    k = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError, match="q"):
        attention(None, k, k, RankMask.causal(4))


def test_in_inference_mode_the_converted_mask_is_still_kept_as_a_normal_tensor():
    """Calls in inference mode keep the converted mask between calls like any other (one conversion for many
    layers), made as a normal tensor that a later training call can save for backward."""
    from kexue.attention.core import _clear_mask_stats_cache, _mask_cache

    _clear_mask_stats_cache()
    q = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    m = causal_mask(8)
    with torch.inference_mode():
        attention(q, q, q, m, scale="entropy")
        kept = dict(_mask_cache()["ready"])
        attention(q, q, q, m, scale="entropy")
        assert kept and all(_mask_cache()["ready"][d] is t for d, t in kept.items())
    assert not any(t.is_inference() for t in kept.values())
