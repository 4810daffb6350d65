"""Entropy-invariant scale (kexue.fm/archives/8823): values, per-row counts, entropy diagnostic, LogNScale."""

from __future__ import annotations

import math

import pytest
import torch

from kexue.attention import (
    LogNScale,
    attention,
    attention_entropy,
    attention_reference,
    causal_mask,
    entropy_invariant_scale,
    keys_per_row,
    logn_factor,
    padding_mask,
    unilm_mask,
)


@pytest.mark.parametrize("d", [1, 16, 64, 128])
def test_scale_equals_standard_at_512_exactly(d):
    assert entropy_invariant_scale(512, d) == 1 / math.sqrt(d)
    t = entropy_invariant_scale(torch.tensor([512.0], dtype=torch.float64), d)
    assert t.item() == 1 / math.sqrt(d)


@pytest.mark.parametrize("n,ratio", [(64, 6 / 9), (128, 7 / 9), (256, 8 / 9), (1024, 10 / 9), (1, 0.0)])
def test_scale_article_multipliers(n, ratio):
    assert entropy_invariant_scale(n, 64, min_n=1) * 8 == pytest.approx(ratio, abs=1e-12)   # the bare formula


def test_one_default_floor_everywhere():
    """min_n=16 and base=512 are the defaults of every function that takes them (one set of defaults)."""
    import inspect

    from kexue.attention import BASE, MIN_N, resolve_scale
    from kexue.nn import SoftmaxAttention, Transformer

    assert (BASE, MIN_N) == (512, 16)
    for fn in (entropy_invariant_scale, logn_factor, attention, attention_reference, attention_entropy, LogNScale,
               resolve_scale, SoftmaxAttention, Transformer):
        params = inspect.signature(fn).parameters
        assert params["min_n"].default == 16 and params["base"].default == 512, fn
        assert params["min_n"].kind is inspect.Parameter.KEYWORD_ONLY, fn
    assert entropy_invariant_scale(4, 64) == entropy_invariant_scale(16, 64)


def test_scale_tensor_and_floor():
    n = torch.tensor([1, 4, 16, 64, 512])
    got = entropy_invariant_scale(n, 4, min_n=16)
    want = torch.tensor([4 / 9, 4 / 9, 4 / 9, 6 / 9, 1.0]) / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert logn_factor(8, min_n=16) == logn_factor(16) == pytest.approx(4 / 9)
    assert entropy_invariant_scale(27, 1, base=3) == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [-0.5, -3, float("nan"), torch.tensor([2.0, -1.0])])
def test_scale_rejects_negative_counts(bad):
    with pytest.raises(ValueError, match="n must be >= 0"):
        entropy_invariant_scale(bad, 64)


@pytest.mark.parametrize("bad", [0, -1, -0.5])
def test_scale_rejects_bad_head_dim(bad):
    with pytest.raises(ValueError, match="head_dim"):
        entropy_invariant_scale(64, bad)


def test_scale_rejects_bad_types_and_base():
    with pytest.raises(TypeError, match="head_dim"):
        entropy_invariant_scale(64, "64")
    with pytest.raises(TypeError, match="n must be"):
        entropy_invariant_scale("64", 64)
    with pytest.raises(ValueError, match="base"):
        entropy_invariant_scale(64, 64, base=1)


def test_keys_per_row_causal_padding_and_floor():
    assert keys_per_row(None, 5, 5, is_causal=True).tolist() == [1, 2, 3, 4, 5]
    assert keys_per_row(None, 5, 3, is_causal=True).tolist() == [1, 2, 3, 3, 3]
    assert keys_per_row(None, 3, 6).tolist() == [6, 6, 6]
    assert keys_per_row(causal_mask(3, 5), 3, 5).tolist() == [3, 4, 5]
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    got = keys_per_row(padding_mask(am), 6, 6, is_causal=True)
    # brute force: row i counts keys j <= i that are not padding
    want = torch.stack([torch.stack([am[b, : i + 1].sum() for i in range(6)]) for b in range(2)])
    assert got.shape == (2, 1, 6)
    assert torch.equal(got[:, 0], want)
    with pytest.raises(TypeError, match="min_n"):
        keys_per_row(padding_mask(am), 6, 6, is_causal=True, min_n=16)    # raw counts: the scales floor them
    float_mask = torch.zeros(2, 3).masked_fill(torch.tensor([[False, True, True], [False, False, True]]),
                                               float("-inf"))
    assert keys_per_row(float_mask, 2, 3).tolist() == [1, 2]


def test_keys_per_row_unilm():
    s = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert keys_per_row(unilm_mask(s), 6, 6)[0, 0].tolist() == [3, 3, 3, 4, 5, 6]


def test_entropy_mask_rows_use_their_own_counts():
    """scale='entropy' multiplies the logits of row i by log_512(max(n_i, min_n)) exactly."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, is_causal=True, scale="entropy", min_n=16)
    n = torch.arange(1, 41).clamp_min(16).double()
    per_row = (torch.log(n) / math.log(512) / math.sqrt(8)).view(1, 1, 40, 1)
    want = attention_reference(q * per_row * math.sqrt(8), k, v, is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def _entropy_direct(q, k, allowed, scale):
    B, H, Q, _ = q.shape
    out = torch.zeros(B, H, Q, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                idx = allowed[b if allowed.shape[0] > 1 else 0, 0, i].nonzero().flatten()
                if len(idx) == 0:
                    continue
                logits = [float(q[b, h, i] @ k[b, h, j]) * scale for j in idx]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                ps = [math.exp(x - m) / z for x in logits]
                out[b, h, i] = -sum(p * math.log(p) for p in ps if p > 0)
    return out


def test_attention_entropy_matches_direct_computation():
    torch.manual_seed(2)
    q, k = torch.randn(2, 2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
    am = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    s = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    m = unilm_mask(s, am)
    got = attention_entropy(q, k, m, scale=0.7)
    torch.testing.assert_close(got.double(), _entropy_direct(q, k, m, 0.7), rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32
    # a fully masked row has entropy 0, not NaN
    dead = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    assert torch.equal(attention_entropy(q, k, dead), torch.zeros(2, 2, 6))


def test_attention_entropy_uniform_rows_and_sharpening():
    q = torch.zeros(1, 1, 5, 4)
    k = torch.randn(1, 1, 5, 4)
    torch.testing.assert_close(attention_entropy(q, k, is_causal=True)[0, 0],
                               torch.log(torch.arange(1, 6).float()))
    # a larger scale can only lower the entropy (claim 2 of the article)
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    e1, e2 = attention_entropy(q, k, scale=0.1), attention_entropy(q, k, scale=0.3)
    assert (e2 <= e1 + 1e-6).all()


def test_lognscale_fixed_equals_entropy_scale_and_learns():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 20, 8) for _ in range(3))
    fixed = LogNScale(3)
    assert not any(p.requires_grad for p in fixed.parameters())
    torch.testing.assert_close(attention(q, k, v, is_causal=True, scale=fixed),
                               attention(q, k, v, is_causal=True, scale="entropy"), rtol=1e-6, atol=1e-6)
    learn = LogNScale(3, learnable=True)
    with torch.no_grad():
        learn.s.copy_(torch.tensor([0.5, 1.0, 2.0]))
    out = attention(q, k, v, is_causal=True, scale=learn)
    ref = attention_reference(q, k, v, is_causal=True, scale=learn)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert learn.s.grad is not None and learn.s.grad.abs().sum() > 0
    mult = learn(torch.tensor([512, 64]))
    torch.testing.assert_close(mult[0, :, :, 0], torch.tensor([[0.5, 1 / 3], [1.0, 2 / 3], [2.0, 4 / 3]]))
    with pytest.raises(ValueError, match="num_heads"):
        LogNScale(0)
    with pytest.raises(ValueError, match="counts head dim"):
        learn(torch.ones(2, 4, 5))


def test_attention_entropy_with_entropy_scale_uses_per_row_scale():
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 40, 8, dtype=torch.float64), torch.randn(1, 2, 40, 8, dtype=torch.float64)
    got = attention_entropy(q, k, scale="entropy", is_causal=True, min_n=16)
    n = torch.arange(1, 41).clamp_min(16).double()
    per_row = (torch.log(n) / math.log(512) / math.sqrt(8)).view(1, 1, 40, 1)
    # entropy of row i with the explicit per-row logits scale, via a scale tensor
    want = attention_entropy(q, k, scale=per_row, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Attention-E has the smaller scale at n < 512, so its rows are flatter (higher entropy) than Attention-O
    assert (got >= attention_entropy(q, k, is_causal=True) - 1e-6).all()


def test_attention_entropy_adds_the_finite_values_of_an_additive_mask():
    """A float mask is a bias as well as a mask (as in attention()): its finite values shift the logits."""
    g = torch.Generator().manual_seed(21)
    q, k = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    bias = 3 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    bias[1, 2:] = float("-inf")                                           # row 1 sees keys 0 and 1 only
    p = torch.softmax((q @ k.transpose(-1, -2)) / 2 + bias, dim=-1)
    want = -torch.where(p > 0, p * p.log(), torch.zeros((), dtype=torch.float64)).sum(-1)
    got = attention_entropy(q, k, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, attention_entropy(q, k, bias > float("-inf")))   # the bias matters


def test_non_finite_and_negative_arguments_are_rejected():
    q = torch.randn(1, 1, 4, 8)
    for kw in (dict(scale=float("inf")), dict(scale="entropy", min_n=float("inf")),
               dict(scale="entropy", base=float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            attention(q, q, q, **kw)
    with pytest.raises(ValueError, match="head_dim"):
        entropy_invariant_scale(64, float("inf"))
    with pytest.raises(ValueError, match="finite"):
        entropy_invariant_scale(float("inf"), 64)
    with pytest.raises(ValueError, match="finite"):
        logn_factor(torch.tensor([4.0, float("inf")]))
    with pytest.raises(ValueError, match=">= 0"):
        logn_factor(-5, min_n=16)                     # flooring does not make a negative count valid
    with pytest.raises(ValueError, match=">= 0"):
        logn_factor(torch.tensor([3, -1]), min_n=16)
    for kw, match in ((dict(base=1), "base"), (dict(base=-5), "base"), (dict(min_n=0), "min_n"),
                      (dict(min_n=float("nan")), "min_n")):
        with pytest.raises(ValueError, match=match):
            attention_entropy(q, q, **kw)


def test_scale_tensors_and_callables_of_the_wrong_shape_are_rejected():
    q = torch.randn(1, 2, 8, 4)
    for bad in (torch.ones(3), torch.ones(2, 1, 1, 1), torch.ones(1, 2, 8, 4)):
        with pytest.raises(ValueError, match=r"scale tensor must broadcast to \[B, H, Q, 1\]"):
            attention(q, q, q, scale=bad)
    with pytest.raises(ValueError, match="callable scale's result must broadcast"):
        attention(q, q, q, scale=lambda counts: torch.ones(5), is_causal=True)
    attention(q, q, q, scale=torch.ones(8, 1))                      # broadcastable shapes still work


def test_keys_per_row_returns_a_copy_of_a_builders_counts():
    from kexue.attention import attention, attention_reference, causal_mask

    q = torch.randn(1, 1, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = causal_mask(8)
    keys_per_row(m, 8, 8).fill_(512)                # the caller may change what it got
    torch.testing.assert_close(attention(q, q, q, m, scale="entropy", min_n=1),
                               attention_reference(q, q, q, m, scale="entropy", min_n=1))


@pytest.mark.parametrize("init", [float("nan"), float("inf"), "1", True])
def test_lognscale_init_must_be_a_finite_number(init):
    with pytest.raises(ValueError, match="init"):
        LogNScale(2, init=init)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_a_hugging_face_mask_s_finfo_min_entries_are_hidden_keys(dtype):
    """Issue 18.12: Hugging Face writes padding as torch.finfo(dtype).min; such entries (and anything below,
    -inf included) are hidden keys for the per-row n of the entropy scale, exactly as the bool mask's zeros."""
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    allowed = padding_mask(am)                                           # [2, 1, 1, 5] bool
    hf = torch.zeros(2, 1, 1, 5, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    assert torch.equal(keys_per_row(hf, 4, 5), keys_per_row(allowed, 4, 5))
    assert keys_per_row(hf, 4, 5)[0, 0].tolist() == [3, 3, 3, 3]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4 if i == 0 else 5, 8, generator=g, dtype=torch.float64) for i in range(3))
    for scale in ("entropy", "standard"):
        want = attention_reference(q, k, v, allowed, scale=scale, min_n=1)
        torch.testing.assert_close(attention(q, k, v, hf, scale=scale, min_n=1), want)
        torch.testing.assert_close(attention_entropy(q, k, hf, scale=scale, min_n=1),
                                   attention_entropy(q, k, allowed, scale=scale, min_n=1))


@pytest.mark.parametrize("q_len,k_len,min_n,base", [(1, 1, 16, 512), (40, 40, 16, 512), (40, 9, 4, 512),
                                                    (9, 40, 1, 10), (700, 700, 16, 512), (5, 5, 100, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_in_place_multiplier_equals_the_plain_formula_bit_for_bit(q_len, k_len, min_n, base, dtype):
    from kexue.attention.scaling import logn_of_counts

    counts = keys_per_row(None, q_len, k_len, is_causal=True).view(1, 1, q_len, 1)
    want = (torch.log(counts.double().clamp_min(float(min_n))) / math.log(base)).to(dtype)
    got = logn_of_counts(counts, base=base, min_n=min_n).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    as_float = counts.double()                                   # a float64 input is copied, never changed
    logn_of_counts(as_float, base=base, min_n=min_n)
    assert torch.equal(as_float, counts.double())
