"""attention() (SDPA fast path, per-row q pre-scale) and PreparedMask against attention_reference(): values and
gradients, for every mask kind, scale and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kexue.attention import (
    LogNScale,
    PreparedMask,
    RankMask,
    and_masks,
    attention,
    attention_reference,
    causal,
    causal_mask,
    padding,
    padding_mask,
    prefix_lm_mask,
    prepare_mask,
    render_mask,
    sliding_window,
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
        "window": and_masks(causal(), sliding_window(3)),
        "additive": torch.zeros(L, L).masked_fill(~causal_mask(L), float("-inf")),
        "rank": RankMask.unilm(seg, am),
        "prepared_unilm": ("prepared", unilm_mask(seg, am)),   # prepare_mask(...) per call (see _mask_arg)
        # broadcast over the keys ([1, 1, L, 1]): a row sees every key or none (every 4th row from 1: none)
        "rows": (torch.arange(L) % 4 != 1)[None, None, :, None],
    }


def _mask_arg(mask, B, H, L, is_causal):
    """A ("prepared", m) entry as the PreparedMask of m (with the causal flag folded in: a PreparedMask carries it),
    anything else as it is; returns (mask, is_causal) for the call."""
    if isinstance(mask, tuple):
        return prepare_mask(mask[1], q_len=L, batch=B, heads=H, is_causal=is_causal), False
    return mask, is_causal


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
    for scale in SCALES:
        for is_causal in (False, True):
            mask, causal_ = _mask_arg(_masks(B, L)[mask_name], B, H, L, is_causal)
            kw = dict(mask=mask, scale=_scale(scale, B, H, L), is_causal=causal_, min_n=4)
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
    import kexue.attention.prepared as core

    monkeypatch.setattr(core, "_ZERO_EMPTY_ROWS", set())
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    m = unilm_mask(torch.tensor([[0, 0, 0, 1, 1, 1]] * 2), torch.tensor([[1, 1, 0, 1, 1, 0], [0] * 6]))
    for mask in (m, torch.zeros(2, 1, 6, 6, dtype=torch.float64).masked_fill(~m, float("-inf"))):
        for is_causal in (False, True):
            got = _run(attention, q, k, v, mask=mask, scale=scale, is_causal=is_causal)
            want = _run(attention_reference, q, k, v, mask=mask, scale=scale, is_causal=is_causal)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ torch.compile
def _compiled(fn, backend="aot_eager"):
    """``fn`` under torch.compile with ``fullgraph=True``: a graph break inside it is an error."""
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


COMPILE_CASES = [(name, "entropy", False) for name in _masks(2, 9)] + \
    [("unilm_pad", s, False) for s in SCALES if s != "entropy"] + \
    [("unilm_pad", "entropy", True), ("additive", "entropy", True), ("none", "entropy", True),
     ("none", "lognscale", True), ("padding", "entropy", True), ("rank", "entropy", True)]


@pytest.mark.parametrize("mask_name,scale_name,is_causal", COMPILE_CASES)
def test_attention_traces_as_one_graph_and_matches_eager(mask_name, scale_name, is_causal):
    """Under torch.compile attention() traces to one graph (no graph break; the CPU kernels of _cpu step aside
    for plain torch ops while tracing), with the same values and gradients as the eager call and the reference."""
    B, H, L, D = 2, 3, 9, 4
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask, is_causal = _mask_arg(_masks(B, L)[mask_name], B, H, L, is_causal)
    scale = _scale(scale_name, B, H, L)

    def fn(q, k, v):
        return attention(q, k, v, mask, scale=scale, is_causal=is_causal)

    got = _run(_compiled(fn), q, k, v)
    eager = _run(fn, q, k, v)
    ref = _run(attention_reference, q, k, v, mask=mask, scale=scale, is_causal=is_causal)
    for a, b, c in zip(got, eager, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        torch.testing.assert_close(a, c, **TOL[torch.float32])


@pytest.mark.parametrize("policy", ["kernel zeroes empty rows", "guard"])
def test_compiled_attention_zeroes_fully_masked_rows(monkeypatch, policy):
    """Rows with no visible key output 0 with zero gradients: from the kernel (the CPU's policy), or, for a
    device without a known policy, by the guard (rows un-masked for the kernel, zeroed after)."""
    from kexue.attention import prepared as core

    if policy == "guard":
        monkeypatch.setattr(core, "_ZERO_EMPTY_ROWS", set())
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
    """A call in inference mode, then a training call with the same mask object: nothing from the first call
    is kept, so the second saves only its own (normal) tensors for backward."""
    L = 9
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
def test_a_float32_mask_with_half_inputs_hides_only_its_hidden_keys(dtype, scale):
    """A finite fp32 bias beyond the half type's range (-1e5 for fp16) saturates in the cast (the key stays
    visible, a row of them is not an empty row); the Hugging Face padding value finfo(float32).min and -inf hide
    their keys (issue 18.12), whatever the compute dtype."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g).to(dtype) for _ in range(3))
    fm = torch.zeros(6, 6)
    fm[:, 4:] = torch.finfo(torch.float32).min     # two padding keys (hidden)
    fm[1] = -1e5 if dtype == torch.float16 else -1e38   # a row of finite biases beyond / near the type's range
    fm[3, 0] = float("-inf")                        # a truly hidden key
    out = attention(q, k, v, fm, scale=scale)
    assert out[:, :, 1].abs().amax() > 0            # not zeroed as an empty row
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, fm, scale=scale).float(),
                               rtol=2e-2, atol=2e-2)
    hidden = fm <= torch.finfo(torch.float32).min
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, fm.masked_fill(hidden, float("-inf")),
                                                                scale=scale).float(), rtol=2e-2, atol=2e-2)


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


# ------------------------------------------------------------------------------------------------ PreparedMask
def _brute_counts(allowed, L):
    return allowed.expand(*allowed.shape[:2], L, allowed.shape[-1]).sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "padding_causal", "rank", "rank_padding",
                                  "rank_causal", "dense", "dense_padding_causal", "float", "predicate",
                                  "cache_causal"])
def test_prepared_mask_counts_and_forms_equal_the_brute_force(kind):
    """Every way a PreparedMask works out its counts (O(L) from the structure, or read from the mask) and its
    additive form agree with the rendered mask, and attention with it equals the reference."""
    B, H, L = 2, 2, 7
    K = L + 3 if kind == "cache_causal" else L
    am = torch.tensor([[1] * K, [1] * (K - 2) + [0] * 2])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    dense = unilm_mask(seg)
    kw = {"none": {}, "causal": {"is_causal": True}, "padding": {"attention_mask": am},
          "padding_causal": {"attention_mask": am, "is_causal": True},
          "rank": {"mask": RankMask.unilm(seg)}, "rank_padding": {"mask": RankMask.unilm(seg), "attention_mask": am},
          "rank_causal": {"mask": RankMask.permutation(torch.tensor([3, 1, 0, 2, 6, 5, 4])), "is_causal": True},
          "dense": {"mask": dense}, "dense_padding_causal": {"mask": dense, "attention_mask": am, "is_causal": True},
          "float": {"mask": torch.zeros(B, 1, L, L).masked_fill(~dense, torch.finfo(torch.float32).min)},
          "predicate": {"mask": and_masks(unilm(seg), padding(am))},
          "cache_causal": {"attention_mask": am, "is_causal": True, "causal_offset": K - L}}[kind]
    pm = prepare_mask(q_len=L, k_len=K, batch=B, heads=H, **kw)
    assert isinstance(pm, PreparedMask)
    allowed = pm.allowed()
    if allowed is None:
        allowed = torch.ones(1, 1, L, K, dtype=torch.bool)
    # the allowed mask from the definitions
    want = torch.ones(B, 1, L, K, dtype=torch.bool)
    if "mask" in kw:
        m = kw["mask"]
        want &= (m.to_dense(L) if isinstance(m, RankMask) else render_mask(m, B, 1, L, K) if callable(m)
                 else (m > torch.finfo(m.dtype).min if m.is_floating_point() else m))
    if "attention_mask" in kw:
        want &= am.bool()[:, None, None, :]
    if kw.get("is_causal"):
        want &= causal_mask(L, K) if K > L or kw.get("causal_offset") else causal_mask(L)
    want = want.expand(B, H, L, K)
    assert torch.equal(allowed.expand(B, H, L, K), want)
    torch.testing.assert_close(pm.counts().expand(B, H, L, 1), _brute_counts(want, L), rtol=0, atol=0)
    add = pm.additive(torch.float64)
    if add is not None:
        assert torch.equal(add.expand(B, H, L, K) > float("-inf"), want)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, L, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, K, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for scale in ("standard", "entropy"):
        torch.testing.assert_close(attention(q, k, v, pm, scale=scale, min_n=1),
                                   attention_reference(q, k, v, want, scale=scale, min_n=1))
    if kind in ("none", "causal", "padding", "padding_causal", "rank", "rank_padding", "cache_causal"):
        assert pm.counts_known()                            # worked out without reading an L x L mask
        rm = pm.ranks()
        got = torch.ones(1, 1, L, K, dtype=torch.bool) if rm is None else rm.to_dense(L)
        assert torch.equal(got.expand(B, H, L, K), want)


def test_a_prepared_mask_works_its_forms_out_once():
    """The additive form and the counts are worked out once and then served: every layer of a model gets them
    from the one object the model holds for the forward pass."""
    import kexue.attention._cpu as cpu

    calls = []
    real = cpu.to_additive_counted

    def spy(*a):
        calls.append(1)
        return real(*a)

    pm = prepare_mask(unilm_mask(torch.tensor([[0, 0, 1, 1]])).clone(), q_len=4)
    q = torch.randn(1, 2, 4, 8)
    cpu.to_additive_counted, saved = spy, cpu.to_additive_counted
    try:
        outs = [attention(q, q, q, pm, scale="entropy") for _ in range(3)]
    finally:
        cpu.to_additive_counted = saved
    assert len(calls) == 1
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_prepared_mask_bad_input():
    pm = prepare_mask(q_len=4, is_causal=True)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="is_causal=True with a PreparedMask"):
        attention(q, q, q, pm, is_causal=True)
    with pytest.raises(ValueError, match="PreparedMask is for"):
        attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], pm)
    with pytest.raises(ValueError, match="attention_mask must be"):
        prepare_mask(q_len=4, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="causal_offset must be an int"):
        prepare_mask(q_len=4, is_causal=True, causal_offset=1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        prepare_mask(torch.ones(3, 4, dtype=torch.bool), q_len=4)
    with pytest.raises(ValueError, match="RankMask is for"):
        prepare_mask(RankMask.causal(5), q_len=4)
    with pytest.raises(ValueError, match="dense part"):
        prepare_mask(causal_mask(4), q_len=4).ranks()
    with pytest.raises(TypeError, match="already a PreparedMask"):
        prepare_mask(pm, q_len=4)

# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
CUDA = "cuda"
# The GPU kernels accumulate in fp32 but round the inputs and output; fp16 keeps 3 more mantissa bits than bf16.
CUDA_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float16: dict(rtol=5e-3, atol=5e-3),
            torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _cuda_masks(B, L):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    am = (torch.arange(L)[None] < lengths[:, None]).long()
    am[-1] = 0                                               # one sequence with no visible key at all
    src = torch.randint(0, L + 1, (B,), generator=g)
    seg = (torch.arange(L)[None] >= src[:, None]).long()
    return {
        "none": None,
        "causal_tensor": causal_mask(L),
        "padding_empty_rows": padding_mask(am),
        "unilm_pad_empty_rows": unilm_mask(seg, am),
        "prefix": prefix_lm_mask(L // 3, L),
        "additive": torch.zeros(L, L).masked_fill(~causal_mask(L), float("-inf")),
    }


def _to(mask, dev):
    return mask.to(dev) if isinstance(mask, torch.Tensor) else mask


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_name", list(_cuda_masks(3, 40)))
@pytest.mark.parametrize("scale", ["standard", "entropy", 0.3])
def test_attention_on_cuda_matches_reference(dtype, mask_name, scale):
    """Values and gradients, causal or not, against the fp32 reference; fully masked rows output exactly 0."""
    B, H, L, D = 3, 4, 40, 64                       # D = 64: the flash / memory-efficient kernels' sizes
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(CUDA, dtype) for _ in range(3))
    mask = _to(_cuda_masks(B, L)[mask_name], CUDA)
    for is_causal in (False, True):
        kw = dict(mask=mask, scale=scale, is_causal=is_causal, min_n=4)
        got = _run(attention, q, k, v, **kw)
        want = _run(attention_reference, q, k, v, **kw)
        for a, b in zip(got, want):
            assert a.device.type == "cuda" and a.dtype == dtype
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, **CUDA_TOL[dtype])
        if mask_name.endswith("empty_rows"):
            assert torch.equal(got[0][-1], torch.zeros_like(got[0][-1]))
            assert torch.equal(got[1][-1], torch.zeros_like(got[1][-1]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_attention_on_cuda_matches_reference(dtype):
    """torch.compile (inductor, one graph): the traced path on the GPU kernels, empty rows included."""
    B, H, L, D = 3, 4, 40, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(CUDA, dtype) for _ in range(3))
    for mask_name, mask in _cuda_masks(B, L).items():
        mask = _to(mask, CUDA)
        for is_causal in (False, True):
            kw = dict(mask=mask, scale="entropy", is_causal=is_causal, min_n=4)
            torch._dynamo.reset()                    # one compile per case, never the recompile limit
            fn = torch.compile(lambda q, k, v, kw=kw: attention(q, k, v, **kw), fullgraph=True)
            got = _run(fn, q, k, v)
            want = _run(attention_reference, q, k, v, **kw)
            for a, b in zip(got, want):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, **CUDA_TOL[dtype])
            if mask_name.endswith("empty_rows"):
                assert torch.equal(got[0][-1], torch.zeros_like(got[0][-1]))


@pytest.mark.cuda
def test_cuda_matches_cpu_with_one_mask_on_both_devices():
    """fp32 on the GPU gives the CPU's numbers, one mask object used on both devices in turn."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 33, 16, generator=g) for _ in range(3))
    seg = torch.tensor([[0] * 10 + [1] * 23, [0] * 30 + [1] * 3])
    m_cpu = unilm_mask(seg, torch.tensor([[1] * 31 + [0] * 2, [1] * 33]))
    m_gpu = m_cpu.to(CUDA)
    for _ in range(2):
        for scale in ("entropy", "standard"):
            a = attention(q, k, v, m_cpu, scale=scale)
            b = attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), m_gpu, scale=scale)
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_empty_rows_of_the_cuda_kernels_are_handled():
    """Whatever the GPU kernels return for a query with no visible key (torch releases differ), attention()
    returns 0 there with zero gradients, and the rest of the batch is untouched."""
    q, k, v = (torch.randn(2, 2, 8, 64, device=CUDA, dtype=torch.float16) for _ in range(3))
    m = torch.ones(2, 1, 8, 8, dtype=torch.bool, device=CUDA)
    m[0, 0, 3] = False
    m[1] = False
    out, gq, gk, gv = _run(attention, q, k, v, mask=m, scale="entropy")
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(gq[1], torch.zeros_like(gq[1]))
    for t in (out, gq, gk, gv):
        assert torch.isfinite(t).all()
    want = _run(attention_reference, q, k, v, mask=m, scale="entropy")
    for a, b in zip((out, gq, gk, gv), want):
        torch.testing.assert_close(a, b, **CUDA_TOL[torch.float16])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["MATH", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_sdpa_backends_zero_empty_rows_under_additive_masks(dtype, backend):
    """What "cuda" in kexue.attention.prepared._ZERO_EMPTY_ROWS relies on: with an additive (-inf) float
    mask every CUDA backend that takes a mask returns 0 and zero gradients for a row with no visible key, so
    attention() needs no extra pass or host synchronisation there. (cuDNN's bool-mask path does not: it returns
    a finite non-zero row on torch 2.11, which is why bool masks are converted first.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kexue.attention import prepared as core

    if "cuda" not in core._ZERO_EMPTY_ROWS:
        pytest.skip("this torch release takes the guard path on CUDA")
    g = torch.Generator(device=CUDA).manual_seed(0)
    for L, D in [(8, 64), (300, 64), (77, 128)]:
        q, k, v = (torch.randn(2, 4, L, D, device=CUDA, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        m = torch.ones(2, 1, L, L, dtype=torch.bool, device=CUDA)
        m[0, 0, 3] = False
        m[1] = False
        additive = torch.zeros(m.shape, device=CUDA, dtype=dtype).masked_fill(~m, float("-inf"))
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
                (out.float() * torch.randn(out.shape, device=CUDA, generator=g)).sum().backward()
        except RuntimeError as e:
            if "No available kernel" in str(e):
                pytest.skip(f"{backend} takes no {dtype} with a mask here")
            raise
        for t in (out, q.grad, k.grad, v.grad):
            assert torch.isfinite(t).all()
        for t in (out, q.grad):
            assert torch.equal(t[1], torch.zeros_like(t[1])) and torch.equal(t[0, :, 3], torch.zeros_like(t[0, :, 3]))
