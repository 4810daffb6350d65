"""The fused Triton kernel (kexue.attention.kernels) against attention_reference: outputs and gradients of q, k,
v and of learnable scales, for every mask of article 3 as a RankMask or a PreparedMask, every scale, fp32 /
fp16 / bf16, odd shapes, fully masked rows and unequal block sizes.

Without a GPU the kernels run in Triton's interpreter (this folder's conftest sets TRITON_INTERPRET=1 before the
kernels are first imported): the same kernel code, emulated on CPU tensors. On a GPU machine the same tests run
the compiled kernels. The group is marked ``kernels`` and runs with ``pytest -m kernels`` (not in the default run).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kexue.attention import (
    LogNScale,
    RankMask,
    attention,
    attention_reference,
    prepare_mask,
    unilm,
    unilm_mask,
)

if importlib.util.find_spec("triton") is None:        # CI installs it with the test extra: there this must fail
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError("triton is missing: the test extra installs it (pip install -e '.[test]')")
    pytest.skip("triton is not installed", allow_module_level=True)

from kexue.attention.kernels import fused as fused_mod  # noqa: E402
from kexue.attention.kernels import fused_attention, fused_available  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: full fp32 products. fp16/bf16: p and dS are rounded to the input type before their products (as in
# FlashAttention), the reference computes in fp32 from the same rounded inputs.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def _run(fn, q, k, v, scale="standard", **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    params = [q, k, v]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().clone().requires_grad_(True)
        params.append(scale)
    elif isinstance(scale, LogNScale):
        params.append(scale.s)
        scale.s.grad = None
    out = fn(q, k, v, scale=scale, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    (out.float() * g.float()).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in params]
    return [out, *grads]


def _qkv(B, H, Lq, Lk, D, dtype, Dv=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, Dv or D, generator=g)
    return (t.to(DEV, dtype) for t in (q, k, v))


def _check(dtype, got, want, what=""):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}: gradient {i} present on one side only"
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"{what}: output {i} not finite"
        if i >= 4 and dtype != torch.float32:
            # a scale's gradient sums dS * qk over a row, where dS sums to zero: it cancels, and the rounding of
            # the half-precision output (which dS is made from, in any flash-style backward) shows at ~1-1.5 % of
            # its largest entry in bf16 -- SDPA's path through the same reference shows 0.5-1.2 %
            err, top = (a.float() - b.float()).abs().max(), b.float().abs().max()
            assert err <= 0.03 * top, f"{what} [{i}]: max error {err:.3g} > 3 % of max |grad| {top:.3g}"
            continue
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m, i=i: f"{what} [{i}]: {m}")


def _masks(B, L):
    """Every structured mask the kernel takes, with edge cases: padding inside the source and the target, an
    empty source, an empty target, a batch row that is all padding (no visible key at all)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([L, L - 5, 0][:B])
    am = (torch.arange(L)[None] < lengths[:, None]).long()
    src = torch.tensor([L // 3, 0, L][:B])
    seg = (torch.arange(L)[None] >= src[:, None]).long()
    docs = torch.cumsum(torch.rand(B, L, generator=g) < 0.15, -1)
    return {
        "none": None,
        "causal": RankMask.causal(L),
        "padding": RankMask.padding(am),
        "unilm_ranks": RankMask.unilm(seg, am),
        "unilm_no_padding": RankMask.unilm(seg),
        "prefix": RankMask.prefix_lm(torch.tensor([3, 0, L][:B]), L),
        "permutation": RankMask.permutation(torch.stack([torch.randperm(L, generator=g) for _ in range(B)])),
        "documents_causal": RankMask.documents(docs, causal=True),
        "documents": RankMask.documents(docs).with_key_padding(am),
    }


@pytest.mark.parametrize("mask_name", list(_masks(3, 8)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_matches_reference_fp32(mask_name, is_causal):
    B, H, L, D = 3, 2, 47, 24           # (47: the last key block of 16 overhangs by one column)
    q, k, v = _qkv(B, H, L, L, D, torch.float32)
    mask = _masks(B, L)[mask_name]
    for scale in ("standard", "entropy", 0.3):
        kw = dict(mask=mask, is_causal=is_causal, min_n=4)
        _check(torch.float32, _run(fused_attention, q, k, v, scale, **kw),
               _run(attention_reference, q, k, v, scale, **kw), f"{mask_name} {scale}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_name", ["none", "unilm_ranks", "documents_causal"])
def test_fused_matches_reference_half(dtype, mask_name):
    B, H, L, D = 3, 2, 37, 32
    q, k, v = _qkv(B, H, L, L, D, dtype)
    mask = _masks(B, L)[mask_name]
    for scale in ("standard", "entropy"):
        for is_causal in (False, True):
            kw = dict(mask=mask, is_causal=is_causal)
            _check(dtype, _run(fused_attention, q, k, v, scale, **kw),
                   _run(attention_reference, q, k, v, scale, **kw), f"{mask_name} {scale} causal={is_causal}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learnable_scales_get_their_gradients(dtype):
    """A per-head LogNScale (the log factor in the kernel, s_h as a multiplier) and a per-row scale tensor: their
    gradients come from the kernel's d loss / d c_i."""
    B, H, L, D = 2, 3, 29, 16
    q, k, v = _qkv(B, H, L, L, D, dtype)
    seg = (torch.arange(L)[None] >= torch.tensor([[9], [20]])).long()
    for mask in (RankMask.unilm(seg), None):
        ln_ours, ln_ref = (LogNScale(H, learnable=True, min_n=2).to(DEV) for _ in range(2))
        with torch.no_grad():
            for m in (ln_ours, ln_ref):
                m.s.copy_(torch.linspace(0.5, 1.5, H))
        _check(dtype, _run(fused_attention, q, k, v, ln_ours, mask=mask, is_causal=mask is None),
               _run(attention_reference, q, k, v, ln_ref, mask=mask, is_causal=mask is None), "LogNScale")
        for shape in ((B, H, L, 1), (1, H, 1, 1), (B, 1, L, 1)):
            # a full logits scale around the standard 1/sqrt(D) (larger ones make bf16 rounding of p dominate)
            t = ((torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5) / D ** 0.5).to(DEV)
            _check(dtype, _run(fused_attention, q, k, v, t, mask=mask), _run(attention_reference, q, k, v, t,
                                                                                mask=mask), f"tensor {shape}")


def test_callable_scale_gets_row_counts():
    B, H, L, D = 2, 2, 21, 16
    q, k, v = _qkv(B, H, L, L, D, torch.float32)
    seg = (torch.arange(L)[None] >= torch.tensor([[5], [12]])).long()
    mask = RankMask.unilm(seg)

    def scale(counts):
        return (1.0 + counts.float() / 100).unsqueeze(-1)

    _check(torch.float32, _run(fused_attention, q, k, v, scale, mask=mask),
           _run(attention_reference, q, k, v, scale, mask=mask), "callable")


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (5, 40), (40, 5), (17, 33), (20, 37), (20, 50)])  # offsets 35 16 17 30
def test_cross_lengths_and_kv_cache(Lq, Lk):
    q, k, v = _qkv(2, 2, Lq, Lk, 16, torch.float32, Dv=8)
    am = (torch.arange(Lk)[None] < torch.tensor([[Lk], [max(Lk - 3, 1)]])).long()
    masks = [None, RankMask.padding(am)]
    if Lk >= Lq:
        masks += [RankMask.causal(Lq, Lk)]
    for mask in masks:
        for scale in ("standard", "entropy"):
            for is_causal in (False, True):
                kw = dict(mask=mask, is_causal=is_causal, min_n=2)
                _check(torch.float32, _run(fused_attention, q, k, v, scale, **kw),
                       _run(attention_reference, q, k, v, scale, **kw), f"{Lq}x{Lk} {mask} {scale} {is_causal}")


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32), (64, 64)])
def test_other_block_sizes(monkeypatch, blocks):
    """The block loops, bounds and skips with unequal and with oversized blocks (interpreter only: on a GPU the
    block sizes are the configured ones)."""
    if DEV == "cuda":
        pytest.skip("block sizes are fixed by the GPU configuration")
    monkeypatch.setattr(fused_mod, "_INTERPRETER_BLOCKS", blocks)
    B, H, L = 3, 1, 70
    q, k, v = _qkv(B, H, L, L, 16, torch.float32)
    masks = _masks(B, L)
    for name in ("unilm_ranks", "documents_causal", "prefix"):
        for is_causal in (False, True):
            kw = dict(mask=masks[name], is_causal=is_causal)
            _check(torch.float32, _run(fused_attention, q, k, v, "entropy", **kw),
                   _run(attention_reference, q, k, v, "entropy", **kw), f"{name} {blocks}")


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16)])
def test_dead_blocks_inside_the_scanned_range_are_masked(monkeypatch, blocks):
    """The loops run over the blocks from the first to the last that some row may see, with no branch around their
    loads (so that Triton pipelines them); the blocks in between that no row may see must then be masked. The
    masks of article 3 have none (their visible keys are a prefix in rank order); these do: groups and ranks
    that alternate block by block, hidden keys at the start (left padding) and query blocks that see nothing."""
    if DEV == "cuda":
        pytest.skip("block sizes are fixed by the GPU configuration")
    monkeypatch.setattr(fused_mod, "_INTERPRETER_BLOCKS", blocks)
    B, H, L = 2, 1, 70
    q, k, v = _qkv(B, H, L, L, 16, torch.float32)
    pos = torch.arange(L)
    stripes = torch.stack([(pos // 16) % 2, (pos // 32) % 2])           # one group per block, alternating
    left_pad = (pos[None] >= torch.tensor([[20], [37]])).long()
    masks = {
        "alternating groups": RankMask.documents(stripes),
        "alternating groups, causal": RankMask.documents(stripes, causal=True),
        "alternating ranks": RankMask(q_rank=pos.expand(B, L), k_rank=torch.where(stripes > 0, 50, 0)),
        "left padding": RankMask.padding(left_pad),
        "rows that see nothing": RankMask(q_rank=torch.where(pos < 40, 0, 5).expand(B, L),
                                          k_rank=torch.ones(B, L, dtype=torch.long)),
    }
    for name, mask in masks.items():
        for scale in ("standard", "entropy"):
            kw = dict(mask=mask, min_n=2)
            _check(torch.float32, _run(fused_attention, q, k, v, scale, **kw),
                   _run(attention_reference, q, k, v, scale, **kw), f"{name} {scale} {blocks}")


@pytest.mark.skipif(DEV != "cuda", reason="the GPU block sizes (64-128) need long sequences to span many blocks")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("L,D", [(300, 64), (1031, 64), (520, 128), (257, 256)])
def test_gpu_sizes_span_many_blocks(dtype, L, D):
    B, H = 2, 3
    q, k, v = _qkv(B, H, L, L, D, dtype)
    seg = (torch.arange(L)[None] >= torch.tensor([[L // 3], [L - 5]])).long().to(DEV)
    am = (torch.arange(L)[None] < torch.tensor([[L], [L - 77]])).long().to(DEV)
    docs = (torch.arange(L)[None] // 97 + torch.tensor([[0], [3]])).to(DEV)
    for mask, is_causal in ((None, True), (RankMask.unilm(seg), False), (RankMask.documents(docs, causal=True), False),
                            (RankMask.unilm(seg, am), True)):
        for scale in ("standard", "entropy"):
            kw = dict(mask=mask, is_causal=is_causal)
            _check(dtype, _run(fused_attention, q, k, v, scale, **kw),
                   _run(attention_reference, q, k, v, scale, **kw), f"L={L} D={D} {mask} {scale}")


def test_rows_with_no_key_output_zero_with_zero_gradients():
    B, H, L = 2, 2, 19
    q, k, v = _qkv(B, H, L, L, 16, torch.float32)
    am = torch.zeros(B, L, dtype=torch.long)
    am[0, :4] = 1                                     # batch 1: every key hidden
    for mask in (RankMask.padding(am), RankMask.unilm(torch.zeros(B, L, dtype=torch.long), am),
                 prepare_mask(q_len=L, batch=B, attention_mask=am)):
        out, gq, gk, gv = _run(fused_attention, q, k, v, "entropy", mask=mask)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(gq[1], torch.zeros_like(gq[1])) and torch.equal(gk[1], torch.zeros_like(gk[1]))
        assert torch.equal(gk[0, :, 4:], torch.zeros_like(gk[0, :, 4:]))      # hidden keys get no gradient
        for t in (out, gq, gk, gv):
            assert torch.isfinite(t).all()


def test_non_contiguous_inputs_as_a_model_makes_them():
    """q, k, v as permuted views of one projection ([B, L, 3, H, D] -> [3, B, H, L, D]), as TransformerBlock
    makes them: the kernel reads strides, no copy."""
    B, L, H, D = 2, 23, 2, 16
    x = torch.randn(B, L, 3, H, D).to(DEV)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    seg = (torch.arange(L)[None] >= torch.tensor([[7], [15]])).long()
    for mask in (None, RankMask.unilm(seg)):
        _check(torch.float32, _run(fused_attention, q, k, v, "entropy", mask=mask),
               _run(attention_reference, q, k, v, "entropy", mask=mask), "views")


def test_attention_backend_fused_equals_sdpa_backend():
    B, H, L, D = 2, 2, 33, 16
    q, k, v = _qkv(B, H, L, L, D, torch.float32)
    seg = (torch.arange(L)[None] >= torch.tensor([[10], [0]])).long()
    am = (torch.arange(L)[None] < torch.tensor([[33], [25]])).long()
    for mask in (prepare_mask(RankMask.unilm(seg), q_len=L, batch=B, attention_mask=am), RankMask.unilm(seg, am),
                 None):
        for scale in ("standard", "entropy"):
            kw = dict(mask=mask, is_causal=mask is None)
            _check(torch.float32, _run(attention, q, k, v, scale, backend="fused", **kw),
                   _run(attention, q, k, v, scale, **kw), f"backend {scale}")


def test_counts_from_the_structure_and_from_the_kernel_agree():
    """A mask whose row counts the PreparedMask works out from its ranks hands them to the kernel (HAS_COUNTS); a
    causal or grouped RankMask is counted in the kernel: both give the reference's scale."""
    B, H, L = 2, 1, 45
    q, k, v = _qkv(B, H, L, L, 16, torch.float32)
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    docs = torch.cumsum(torch.rand(B, L, generator=g) < 0.2, -1)
    for rm, counted_by in ((RankMask.permutation(order), "structure"),
                           (RankMask.documents(docs, causal=True), "kernel")):
        pm = prepare_mask(rm, q_len=L, batch=B)
        _, counts, _ = fused_mod._resolve_mask(pm)
        assert (counts is not None) == (counted_by == "structure")
        with torch.no_grad():
            a = fused_attention(q, k, v, pm, scale="entropy", min_n=1)
            c = attention_reference(q, k, v, rm, scale="entropy", min_n=1)
        torch.testing.assert_close(a, c, **TOL[torch.float32])


def test_empty_lengths():
    q, k, v = _qkv(1, 1, 3, 0, 16, torch.float32)
    assert torch.equal(fused_attention(q, k, v, scale="entropy"), torch.zeros(1, 1, 3, 16, device=DEV))
    q, k, v = _qkv(1, 1, 0, 4, 16, torch.float32)
    assert fused_attention(q, k, v).shape == (1, 1, 0, 16)


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 2, 8, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="RankMask or a PreparedMask"):
        fused_attention(q, k, v, torch.ones(8, 8, dtype=torch.bool, device=DEV))           # a dense tensor
    with pytest.raises(TypeError, match="RankMask or a PreparedMask"):
        fused_attention(q, k, v, unilm(torch.tensor([[0] * 4 + [1] * 4])))                 # a predicate
    with pytest.raises(ValueError, match="dense part"):
        fused_attention(q, k, v, prepare_mask(unilm_mask(torch.tensor([[0] * 4 + [1] * 4])), q_len=8))
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        fused_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="head dims up to 256"):
        fused_attention(*_qkv(1, 1, 4, 4, 300, torch.float32))
    with pytest.raises(ValueError, match=r"for \(Q, K\) = \(5, 5\)"):
        fused_attention(q, k, v, RankMask.causal(5))
    with pytest.raises(ValueError, match="batch size 3"):
        fused_attention(q, k, v, RankMask.unilm(torch.zeros(3, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="scale must be"):
        fused_attention(q, k, v, scale="logn")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="no dropout"):
        attention(q, k, v, backend="fused", dropout_p=0.1)
    with pytest.raises(ValueError, match="k must have shape"):
        fused_attention(q, k[..., :8], v)


def test_fused_available_reports_this_machine():
    assert fused_available(DEV) is True


# ------------------------------------------------------------------------------------------- torch.compile
def _compiled(fn):
    """``fn`` under torch.compile (fullgraph: a graph break is an error; aot_eager, which runs the graph's ops as
    they are, so the interpreter can run the kernels on a CPU), and the list it fills with the op names of the
    graphs it compiles."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True), seen


@pytest.mark.parametrize("scale", ["standard", "entropy", "learnable", "tensor"])
def test_under_torch_compile_the_kernel_is_in_the_graph(scale):
    """With a RankMask (or no mask) the launches are the custom ops kexue::fused_attention_fwd / _bwd: the traced
    call has no graph break, and values and gradients (q, k, v, a learnable or tensor scale) equal the reference."""
    B, H, L = 2, 2, 37
    q, k, v = _qkv(B, H, L, L, 16, torch.float32)
    seg = (torch.arange(L)[None] >= torch.tensor([[12], [30]])).long().to(DEV)
    am = (torch.arange(L)[None] < torch.tensor([[L], [L - 6]])).long().to(DEV)
    docs = (torch.arange(L)[None] // 10).expand(B, L).to(DEV)
    scale_arg = {"learnable": LogNScale(H, learnable=True, min_n=4).to(DEV),
                 "tensor": torch.rand(B, H, L, 1, generator=torch.Generator().manual_seed(3)).to(DEV) + 0.1}
    scale_arg = scale_arg.get(scale, scale)
    for mask, is_causal in ((RankMask.unilm(seg, am), False), (RankMask.documents(docs, causal=True), False),
                            (None, True)):
        fn, ops = _compiled(fused_attention)
        got = _run(fn, q, k, v, scale_arg, mask=mask, is_causal=is_causal, min_n=4)
        assert "kexue.fused_attention_fwd.default" in ops, ops
        want = _run(attention_reference, q, k, v, scale_arg, mask=mask, is_causal=is_causal, min_n=4)
        _check(torch.float32, got, want, f"compiled {mask} {scale}")


def test_the_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and autograd registration of the custom ops, checked by torch.library.opcheck."""
    B, H, L = 1, 2, 20
    q, k, v = (t.requires_grad_(True) for t in _qkv(B, H, L, L, 16, torch.float32))
    rm = RankMask.unilm((torch.arange(L)[None] >= 8).long().to(DEV))
    spec = fused_mod._make_spec(rm, None, rm.causal_offset, True, 0.25, 4.0, 512.0, q, L)
    flags, nums = fused_mod._spec_numbers(spec)
    mult = torch.rand(1, H, 1, device=DEV, requires_grad=True)
    args = (q, k, v, spec.qr, spec.kr, spec.qg, spec.kg, spec.counts, mult, flags, nums)
    torch.library.opcheck(torch.ops.kexue.fused_attention_fwd.default, args)
    o, lse, cb = torch.ops.kexue.fused_attention_fwd(*args)
    bwd_args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse, cb, spec.qr, spec.kr,
                spec.qg, spec.kg, spec.counts, mult.detach(), flags, nums, True)
    torch.library.opcheck(torch.ops.kexue.fused_attention_bwd.default, bwd_args)


# ------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("scale", ["entropy", "learnable"])
def test_transformer_on_the_fused_backend_matches_sdpa(scale):
    """Transformer(attention_backend='fused'): the PreparedMask of a RankMask with padding and the causal flag goes
    to the kernel as one RankMask; logits, parameter gradients and entropies equal SDPA's."""
    from kexue.nn import Transformer

    B, L = 2, 27
    ids = torch.randint(0, 50, (B, L), generator=torch.Generator().manual_seed(0)).to(DEV)
    seg = (torch.arange(L)[None] >= torch.tensor([[9], [14]])).long().to(DEV)
    am = (torch.arange(L)[None] < torch.tensor([[27], [20]])).long().to(DEV)
    calls = [dict(mask=RankMask.unilm(seg), attention_mask=am), dict(mask=RankMask.unilm(seg, am)),
             dict(is_causal=True, attention_mask=am), dict(mask=RankMask.prefix_lm(5, L, device=DEV), is_causal=True)]
    for kw in calls:
        outs = []
        for backend in ("sdpa", "fused"):
            torch.manual_seed(0)
            model = Transformer(50, dim=32, depth=2, heads=2, attention_scale=scale, min_n=4,
                                attention_backend=backend).to(DEV)
            out = model(ids, return_entropy=True, **kw)
            out.logits.square().mean().backward()
            outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (a, ga), (b, gb) = outs
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
        for x, y in zip(a.entropies, b.entropies):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_transformer_keeps_the_fused_kernel_in_one_graph():
    """torch.compile(fullgraph=True) of a Transformer on the fused backend with a RankMask (padding added, or
    is_causal): one graph with the kernel's op in it, and logits and parameter gradients equal to the eager SDPA
    model's."""
    from kexue.nn import Transformer

    B, L = 2, 23
    ids = torch.randint(0, 50, (B, L), generator=torch.Generator().manual_seed(1)).to(DEV)
    seg = (torch.arange(L)[None] >= torch.tensor([[7], [15]])).long().to(DEV)
    am = (torch.arange(L)[None] < torch.tensor([[L], [18]])).long().to(DEV)
    for kw in (dict(mask=RankMask.unilm(seg), attention_mask=am), dict(is_causal=True)):
        results = []
        for backend in ("sdpa", "fused"):
            torch.manual_seed(0)
            model = Transformer(50, dim=32, depth=2, heads=2, attention_scale="entropy", min_n=4,
                                attention_backend=backend).to(DEV)
            if backend == "fused":
                fn, ops = _compiled(lambda ids, model=model, kw=kw: model(ids, **kw).logits)
                logits = fn(ids)
                assert ops.count("kexue.fused_attention_fwd.default") == 2, ops    # one per layer
            else:
                logits = model(ids, **kw).logits
            logits.square().mean().backward()
            results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (a, ga), (b, gb) = results
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_transformer_fused_backend_needs_a_structured_mask():
    from kexue.nn import SoftmaxAttention, Transformer

    model = Transformer(50, dim=32, depth=1, heads=2, attention_backend="fused").to(DEV)
    ids = torch.randint(0, 50, (1, 8)).to(DEV)
    with pytest.raises(ValueError, match="dense part"):
        model(ids, mask=unilm_mask(torch.tensor([[0] * 4 + [1] * 4])).to(DEV))
    with pytest.raises(ValueError, match=r"\(Q, K\) = \(5, 5\)"):
        model(ids, mask=RankMask.causal(5))
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        Transformer(50, dim=32, depth=1, heads=2, attention_backend="flash")
    assert "backend='fused'" in repr(SoftmaxAttention("entropy", backend="fused"))


def test_bench_rows_for_the_fused_kernel_run(monkeypatch):
    """The GPU-only bench rows, run here through the interpreter at a tiny size with the CUDA timing and memory
    calls stubbed: a GPU session's few minutes must not be spent on a typo. The timings mean nothing here."""
    from kexue.bench import attention as bench
    from kexue.bench.base import BenchOptions

    if DEV == "cpu":
        for name in ("synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    L = 32
    q, k, v = _qkv(1, 2, L, L, 16, torch.float32)
    seg = (torch.arange(L) >= L // 2).long()[None].to(DEV)
    next_mask = bench._in_turn([unilm_mask(seg), unilm_mask(seg)])
    tk = {"repeats": 1, "rounds": 1, "warmup": 1, "min_time": 0.0}
    opts = BenchOptions(device=DEV, quick=True)
    rows = list(bench._fused_rows(L, q, k, v, seg, next_mask, opts, tk))
    rows += list(bench._fused_compiled_rows(L, q, k, v, seg, opts, tk))
    assert [r.ours for r in rows] == ["fused(entropy)", "fused(standard)", "fused(entropy) new mask",
                                      "fused Transformer(scale='entropy')", "fused(entropy)",
                                      "fused(entropy) new mask", "compiled fused(entropy)",
                                      "compiled fused(entropy) new RankMask",
                                      "compiled fused Transformer(scale='entropy')"]
    assert all(r.ours_s > 0 and r.peer_s > 0 for r in rows), [(r.ours, r.extra.get("error")) for r in rows]
    for r in rows:
        if "max_abs_diff_vs_prescaled_sdpa" in r.extra:
            assert float(r.extra["max_abs_diff_vs_prescaled_sdpa"]) < 1e-4
