"""Linear attention (article 5): the chunked causal, non-causal and recurrent forms against the plain O(L^2)
reference (values and gradients), the no-look-ahead property, state carry, the FAVOR+ estimator and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kexue.attention import (
    ExpFeatureMap,
    FavorPlus,
    FavorPlusHyperbolic,
    FeatureMap,
    LinearAttention,
    LinearAttentionCache,
    LinearAttentionState,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    linear_attention_weights,
    make_feature_map,
    prepare_mask,
    random_features,
    unilm_mask,
)
from kexue.nn import Transformer

D = 8


def _maps(dtype=torch.float64) -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    return {"elu1": "elu1", "relu": "relu", "exp": "exp",
            "exp-m": ExpFeatureMap(D, 12, generator=g).to(dtype),
            "favor": FavorPlus(D, num_features=12, generator=g).to(dtype),
            "favor_hyp": FavorPlusHyperbolic(D, num_features=6, generator=g).to(dtype)}


def _qkv(B, H, L, dtype=torch.float64, seed=0, scale=1.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)
                 for _ in range(3))


def _padding(B, L):
    am = torch.ones(B, L, dtype=torch.long)
    am[0, 0] = 0                                     # a padded first key
    if B > 1:
        am[1, L // 2:] = 0                           # right padding
    return am


@pytest.mark.parametrize("name", list(_maps()))
@torch.no_grad()
def test_fast_paths_equal_the_reference_fp64(name):
    fm = _maps()[name]
    worst = 0.0
    for L, chunk, causal, pad in itertools.product([1, 5, 16, 37], [4, 64], [True, False], [False, True]):
        q, k, v = _qkv(2, 3, L, scale=2.0, seed=L + chunk)
        am = _padding(2, L) if pad else None
        out = linear_attention(q, k, v, feature_map=fm, causal=causal, attention_mask=am, chunk_size=chunk)
        ref = linear_attention_reference(q, k, v, feature_map=fm, causal=causal, attention_mask=am)
        assert out.dtype == torch.float64 and out.shape == ref.shape
        worst = max(worst, float((out - ref).abs().max()))
    assert worst < 1e-10


@pytest.mark.parametrize("name", ["elu1", "exp-m"])
@pytest.mark.parametrize("block_chunks", [64, 2])
@torch.no_grad()
def test_every_chunk_size_from_1_to_beyond_L(name, block_chunks, monkeypatch):
    """Chunk sizes 1..L+1, and (block_chunks=2) long sequences taken a few chunks per pass, state carried."""
    import kexue.attention.linear as la

    monkeypatch.setattr(la, "_BLOCK_CHUNKS", block_chunks)
    fm = _maps()[name]
    q, k, v = _qkv(2, 2, 9, scale=2.0)
    am = _padding(2, 9)
    ref = linear_attention_reference(q, k, v, feature_map=fm, causal=True, attention_mask=am)
    for chunk in range(1, 11):
        out = linear_attention(q, k, v, feature_map=fm, causal=True, attention_mask=am, chunk_size=chunk)
        assert float((out - ref).abs().max()) < 1e-10, chunk


@pytest.mark.parametrize("name", ["elu1", "relu", "exp", "exp-m", "favor", "favor_hyp"])
@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_inputs_and_the_map_are_left_untouched(name, causal):
    """Without autograd the features are formed in place -- only ever in tensors the map made for the call: the
    plain exp map (whose log-features are q and k themselves) must not write into q or k, no map into its own
    parameters or buffers, and a second call gives the same result."""
    fm = _maps()[name]
    q, k, v = _qkv(2, 2, 40, scale=2.0)
    kept = [t.clone() for t in (q, k, v)]
    state = {n: t.clone() for n, t in (fm.state_dict().items() if isinstance(fm, FeatureMap) else [])}
    a = linear_attention(q, k, v, feature_map=fm, causal=causal, chunk_size=8)
    assert all(torch.equal(t, c) for t, c in zip((q, k, v), kept))
    assert all(torch.equal(fm.state_dict()[n], t) for n, t in state.items())
    assert torch.equal(linear_attention(q, k, v, feature_map=fm, causal=causal, chunk_size=8), a)


@pytest.mark.parametrize("name", ["elu1", "exp", "exp-m", "favor", "favor_hyp"])
def test_blockwise_features_values_gradients_and_state(name, monkeypatch):
    """The causal form computes each block's features on its own, carrying the state and the key shift: with
    blocks of a few positions (and keys growing along the sequence, so the shift keeps rising) values, gradients
    and the returned state equal the reference and the one-block pass."""
    import kexue.attention.linear as la

    fm = _maps()[name]
    q, k, v = _qkv(2, 2, 37, scale=1.5, grad=True)
    ramp = torch.linspace(0.2, 3.0, 37, dtype=torch.float64)[:, None]
    am = _padding(2, 37)
    w = torch.randn(2, 2, 37, D, dtype=torch.float64)
    params = [p for p in (fm.parameters() if isinstance(fm, FeatureMap) else []) if p.requires_grad]

    def run(rows, chunks):
        monkeypatch.setattr(la, "_BLOCK_ROWS", rows)
        monkeypatch.setattr(la, "_BLOCK_CHUNKS", chunks)
        out, st = linear_attention(q, k * ramp, v, feature_map=fm, causal=True, attention_mask=am, chunk_size=4,
                                   return_state=True)
        return out, st, torch.autograd.grad((out * w).sum(), (q, k, v, *params))

    one = run(4096, 64)
    for rows, chunks in ((4, 64), (8, 2), (12, 1)):
        out, st, grads = run(rows, chunks)
        assert float((out - one[0]).detach().abs().max()) < 1e-12
        sums = one[1].sums.detach()
        assert float((st.sums.detach() - sums).abs().max()) < 1e-10 * max(1.0, float(sums.abs().max()))
        assert (st.shift is None) == (one[1].shift is None)
        if st.shift is not None:
            assert float((st.shift - one[1].shift).abs().max()) < 1e-12     # the matmuls may round per block
        for a, b in zip(grads, one[2]):
            assert float((a - b).abs().max()) < 1e-10
    ref = linear_attention_reference(q, k * ramp, v, feature_map=fm, causal=True, attention_mask=am)
    assert float((one[0] - ref).detach().abs().max()) < 1e-10


@pytest.mark.parametrize("name", ["elu1", "exp", "exp-m", "favor", "favor_hyp"])
@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_the_reference_fp64(name, causal):
    fm = _maps()[name]
    q, k, v = _qkv(2, 2, 21, scale=1.5, grad=True)
    am = _padding(2, 21)
    w = torch.randn(2, 2, 21, D, dtype=torch.float64)
    params = [p for p in (fm.parameters() if isinstance(fm, FeatureMap) else []) if p.requires_grad]
    inputs = (q, k, v, *params)
    out = linear_attention(q, k, v, feature_map=fm, causal=causal, attention_mask=am, chunk_size=8)
    g1 = torch.autograd.grad((out * w).sum(), inputs)
    ref = linear_attention_reference(q, k, v, feature_map=fm, causal=causal, attention_mask=am)
    g2 = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) < 1e-10
    assert float(g1[1][1, :, 12:].abs().max()) == 0.0 and float(g1[2][0, :, 0].abs().max()) == 0.0   # padding


@pytest.mark.parametrize("name", ["elu1", "exp", "favor"])
def test_fp32_and_half_precision(name):
    fm32 = _maps(torch.float32)[name]
    fm64 = _maps(torch.float64)[name]
    q, k, v = _qkv(2, 2, 70, dtype=torch.float32)
    for causal in (True, False):
        out = linear_attention(q, k, v, feature_map=fm32, causal=causal, chunk_size=16)
        ref = linear_attention_reference(q.double(), k.double(), v.double(), feature_map=fm64, causal=causal)
        assert out.dtype == torch.float32 and float((out.double() - ref).abs().max()) < 1e-5
        for dt, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
            qh, kh, vh = q.to(dt), k.to(dt), v.to(dt)
            out = linear_attention(qh, kh, vh, feature_map=fm32, causal=causal, chunk_size=16)
            ref = linear_attention_reference(qh.double(), kh.double(), vh.double(), feature_map=fm64, causal=causal)
            assert out.dtype == dt and float((out.double() - ref).abs().max()) < tol
    # gradients with key padding, relative to the largest gradient: fp32 to 1e-5, half types within their rounding
    am = _padding(2, 70)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        qg, kg, vg = (t.to(dt).requires_grad_() for t in (q, k, v))
        out = linear_attention(qg, kg, vg, feature_map=fm32, causal=True, chunk_size=16, attention_mask=am)
        g1 = torch.autograd.grad(out.float().square().sum(), (qg, kg, vg))
        q6, k6, v6 = (t.to(dt).double().requires_grad_() for t in (q, k, v))
        ref = linear_attention_reference(q6, k6, v6, feature_map=fm64, causal=True, attention_mask=am)
        g2 = torch.autograd.grad(ref.square().sum(), (q6, k6, v6))
        assert all(a.dtype == dt for a in g1)
        rel = max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(g1, g2))
        assert rel < tol, (dt, rel)


@pytest.mark.parametrize("name", ["elu1", "exp", "exp-m", "favor", "favor_hyp"])
def test_recurrent_steps_equal_the_reference(name):
    fm = _maps()[name]
    q, k, v = _qkv(2, 2, 19, scale=2.0)
    am = _padding(2, 19)
    ref = linear_attention_reference(q, k, v, feature_map=fm, causal=True, attention_mask=am)
    st, outs = None, []
    for t in range(19):
        o, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, feature_map=fm,
                                      key_valid=am[:, t].bool())
        outs.append(o)
    assert float((torch.stack(outs, 2) - ref).detach().abs().max()) < 1e-10
    o4, _ = linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, feature_map=fm)   # [B, H, 1, D] too
    assert o4.shape == (2, 2, 1, D)


@pytest.mark.parametrize("name", ["elu1", "exp", "exp-m", "favor", "favor_hyp"])
def test_no_leak_outputs_before_t_are_bit_identical(name):
    """Change keys and values at positions >= t (to huge values, too): outputs before t must not move at all.
    performer-pytorch fails this: its key stabiliser is a maximum over the whole sequence (its issue #82)."""
    fm = _maps(torch.float32)[name]
    q, k, v = _qkv(2, 2, 150, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    for t, chunk in ((70, 64), (64, 64), (1, 16), (149, 7)):
        o1 = linear_attention(q, k, v, feature_map=fm, causal=True, chunk_size=chunk)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t:] = torch.randn(k2[:, :, t:].shape, generator=g) * 40
        v2[:, :, t:] = v2[:, :, t:] * 1e6
        o2 = linear_attention(q, k2, v2, feature_map=fm, causal=True, chunk_size=chunk)
        assert torch.equal(o1[:, :, :t], o2[:, :, :t])
        assert not torch.equal(o1[:, :, t:], o2[:, :, t:])
        assert torch.isfinite(o2).all()


@pytest.mark.parametrize("name", ["elu1", "exp", "favor"])
def test_state_carry_two_halves_equal_one_pass(name):
    fm = _maps()[name]
    q, k, v = _qkv(2, 2, 41, scale=2.0)
    am = _padding(2, 41)
    for causal in (True, False):
        full, st_full = linear_attention(q, k, v, feature_map=fm, causal=causal, attention_mask=am, chunk_size=8,
                                         return_state=True)
        cut = 17
        a, st = linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], feature_map=fm, causal=causal,
                                 attention_mask=am[:, :cut], chunk_size=8, return_state=True)
        qs = q[:, :, cut:] if causal else q
        b, st2 = linear_attention(qs, k[:, :, cut:], v[:, :, cut:], feature_map=fm, causal=causal,
                                  attention_mask=am[:, cut:], chunk_size=5, initial_state=st, return_state=True)
        if causal:
            assert float((torch.cat([a, b], 2) - full).abs().max()) < 1e-12
        else:
            assert float((b - full).abs().max()) < 1e-12
        scale = 1.0 if st_full.shift is None else torch.exp(st_full.shift - st2.shift)[..., None, None]
        assert torch.allclose(st2.sums * (1 / scale if st_full.shift is not None else 1), st_full.sums, rtol=1e-12)
        assert st2.kv.shape == (2, 2, fm.num_features(D) if isinstance(fm, FeatureMap) else D, D)


def test_large_logits_stay_finite_and_exact():
    """e^x of q/k with entries ~ +-60 overflows fp32 without the shifts; with them the result is finite and
    matches the fp64 reference."""
    q, k, v = _qkv(1, 2, 300, dtype=torch.float32, scale=20.0)
    for causal in (True, False):
        out = linear_attention(q, k, v, feature_map="exp", causal=causal)
        ref = linear_attention_reference(q.double(), k.double(), v.double(), feature_map="exp", causal=causal)
        assert torch.isfinite(out).all() and float((out.double() - ref).abs().max()) < 1e-3


def test_a_running_maximum_that_keeps_growing_is_handled_exactly():
    """Keys whose log-features grow by 150 over the sequence: the chunked form rebases its running sums several
    times (every time the maximum has grown by 40 in fp32) and still equals the fp64 reference."""
    import kexue.attention.linear as la

    q, k, v = _qkv(2, 2, 300, dtype=torch.float32)
    k = k + torch.linspace(0, 150, 300)[:, None]
    ends = torch.cummax(k.amax(-1), -1).values.reshape(4, 300)[:, 63::64]
    assert len(la._segments(ends, 40.0)) >= 2
    out = linear_attention(q, k, v, feature_map="exp", causal=True, chunk_size=64)
    ref = linear_attention_reference(q.double(), k.double(), v.double(), feature_map="exp", causal=True)
    assert float((out.double() - ref).abs().max()) < 1e-4
    _, st = linear_attention(q[:, :, :290], k[:, :, :290], v[:, :, :290], feature_map="exp", causal=True,
                             return_state=True)
    for t in range(290, 300):
        o, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, feature_map="exp")
    assert float((o.double() - ref[:, :, -1]).abs().max()) < 1e-4


def test_empty_rows_give_zero_never_nan():
    q, k, v = _qkv(2, 2, 10, grad=True)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1] = 0                                                 # batch row 1: no key at all
    am[0, :3] = 0                                             # batch row 0: queries 0..2 see no key (causal)
    for fm in ("elu1", "exp", _maps()["favor"]):
        for causal in (True, False):
            out = linear_attention(q, k, v, feature_map=fm, causal=causal, attention_mask=am, chunk_size=4)
            assert torch.equal(out[1], torch.zeros_like(out[1]))
            if causal:
                assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads)
    for causal in (True, False):                                # no position at all
        e = torch.zeros(1, 2, 0, D)
        out, st = linear_attention(e, e, e, feature_map="exp", causal=causal, return_state=True)
        assert out.shape == (1, 2, 0, D) and st.sums.shape == (1, 2, D, D + 1)
    # relu features can all be 0: such a query outputs 0
    out = linear_attention(-q.detach().abs(), k.detach(), v.detach(), feature_map="relu", causal=True)
    assert torch.equal(out, torch.zeros_like(out))


def test_positive_per_row_scaling_of_phi_q_changes_nothing():
    """The article's scale invariance: phi(q_i) -> lambda_i phi(q_i), lambda_i > 0, leaves the output unchanged."""

    class Scaled(FeatureMap):
        """elu+1, the query rows times a positive factor from e^-15 to e^15 that depends on the row alone."""

        def features(self, x, *, is_query=False):
            f = torch.nn.functional.elu(x) + 1
            return f * torch.exp(15 * torch.sin(37 * x.sum(-1, keepdim=True))) if is_query else f

    q, k, v = _qkv(2, 2, 33)
    for causal in (True, False):
        a = linear_attention(q, k, v, feature_map="elu1", causal=causal, chunk_size=8)
        b = linear_attention(q, k, v, feature_map=Scaled(), causal=causal, chunk_size=8)
        r = linear_attention_reference(q, k, v, feature_map=Scaled(), causal=causal)
        assert float((a - b).abs().max()) < 1e-12 and float((a - r).abs().max()) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# FAVOR+ as an estimator of e^{q.k}
# ---------------------------------------------------------------------------------------------------------------
def _estimates(cls, m, orthogonal, draws, q, k, seed):
    """``draws`` independent FAVOR estimates of ``e^{q.k}`` with ``m`` features each: one draw of ``m * draws``
    features (independent blocks) cut into groups of ``m``."""
    fm = cls(q.shape[-1], num_features=m * draws, orthogonal=orthogonal, scale=1.0,
             generator=torch.Generator().manual_seed(seed)).double()
    x = fm(q, is_query=True) * fm(k) * fm.num_features(q.shape[-1])       # e^{w.q - |q|^2/2} e^{w.k - |k|^2/2}
    if cls is FavorPlusHyperbolic:                           # pair each draw's two features
        x = (x[: m * draws] + x[m * draws:]) / 2
    return x.view(draws, m).mean(1)


@pytest.mark.parametrize("cls", [FavorPlus, FavorPlusHyperbolic])
def test_favor_is_unbiased_and_its_error_falls_like_one_over_sqrt_m(cls):
    d, draws = 16, 4000
    g = torch.Generator().manual_seed(0)
    q = torch.randn(d, generator=g, dtype=torch.float64) * 0.15
    k = torch.randn(d, generator=g, dtype=torch.float64) * 0.15
    exact = math.exp(float(q @ k))
    mse, mse_se = {}, {}
    for m in (4, 64):
        est = _estimates(cls, m, False, draws, q, k, seed=m)
        se = float(est.std()) / math.sqrt(draws)
        assert abs(float(est.mean()) - exact) < 4 * se                    # unbiased, within 4 standard errors
        sq = (est - exact) ** 2
        mse[m], mse_se[m] = float(sq.mean()), float(sq.std()) / math.sqrt(draws)
    # i.i.d. features: variance sigma^2 / m, so MSE(4) / MSE(64) = 16; the tolerance is 4 standard errors of the
    # ratio (delta method from the two MSEs' standard errors)
    ratio = mse[4] / mse[64]
    rel = math.sqrt((mse_se[4] / mse[4]) ** 2 + (mse_se[64] / mse[64]) ** 2)
    assert abs(ratio - 16) < 4 * rel * 16, (ratio, rel)
    assert rel < 0.1


def test_orthogonal_features_have_lower_error_than_iid():
    d, m, draws = 16, 16, 8000
    g = torch.Generator().manual_seed(3)
    q = torch.randn(d, generator=g, dtype=torch.float64) * 0.2
    k = torch.randn(d, generator=g, dtype=torch.float64) * 0.2
    exact = math.exp(float(q @ k))
    sq_iid = (_estimates(FavorPlus, m, False, draws, q, k, 1) - exact) ** 2
    sq_ort = (_estimates(FavorPlus, m, True, draws, q, k, 2) - exact) ** 2
    se = math.sqrt((float(sq_iid.var()) + float(sq_ort.var())) / draws)      # s.e. of the difference of the MSEs
    assert float(sq_ort.mean()) + 2 * se < float(sq_iid.mean()), (float(sq_ort.mean()), float(sq_iid.mean()), se)


def test_random_features_blocks_are_orthogonal_with_chi_lengths_and_reproducible():
    w = random_features(40, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for lo in (0, 16):
        blk = w[lo:lo + 16]
        gram = blk @ blk.T
        assert float((gram - torch.diag(torch.diagonal(gram))).abs().max()) < 1e-10
    w2 = random_features(40, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(w, w2)
    big = random_features(4000, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sq = (big ** 2).sum(1)                                   # chi^2_16: mean 16, sd sqrt(32)
    assert abs(float(sq.mean()) - 16) < 4 * math.sqrt(32 / 4000)


def test_favor_redraw_policy_and_deterministic_eval():
    fm = FavorPlus(D, num_features=16, redraw=2, generator=torch.Generator().manual_seed(0))
    attn = LinearAttention(fm)
    q = k = v = torch.randn(1, 1, 5, D)
    pm = prepare_mask(q_len=5)
    w0 = fm.omega.clone()
    attn(q, k, v, mask=pm)
    assert torch.equal(fm.omega, w0)
    attn(q, k, v, mask=pm)                                   # second training call: redrawn
    assert not torch.equal(fm.omega, w0)
    attn.eval()
    w1 = fm.omega.clone()
    outs = [attn(q, k, v, mask=pm) for _ in range(4)]
    assert torch.equal(fm.omega, w1) and all(torch.equal(o, outs[0]) for o in outs)
    same = FavorPlus(D, num_features=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.omega, w0)                       # the draw is the generator's
    assert not FavorPlus(D, num_features=16).step()          # redraw=None: never by itself


# ---------------------------------------------------------------------------------------------------------------
# The layer and the Transformer
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature_map,m", [("exp", 16), ("elu1", None), ("favor", 16)])
def test_transformer_with_linear_attention_decodes_with_its_cache(feature_map, m):
    torch.manual_seed(0)
    model = Transformer(40, dim=16, depth=2, heads=2, attention="linear", feature_map=feature_map,
                        num_features=m).double().eval()
    assert all(isinstance(b.attn, LinearAttention) for b in model.blocks)
    assert model.blocks[0].attn is not model.blocks[1].attn
    ids = torch.randint(0, 40, (2, 13))
    am = torch.ones(2, 13, dtype=torch.long)
    am[1, :2] = 0
    full = model(ids, is_causal=True, attention_mask=am).logits
    cache = model.new_cache()
    assert isinstance(cache.layers[0], LinearAttentionCache)
    outs = [model(ids[:, :6], is_causal=True, cache=cache, attention_mask=am[:, :6]).logits]
    for t in range(6, 13):
        outs.append(model(ids[:, t:t + 1], is_causal=True, cache=cache, attention_mask=am[:, :t + 1]).logits)
    assert float((torch.cat(outs, 1) - full).detach().abs().max()) < 1e-10
    cache.reorder(torch.tensor([1, 1]))
    assert cache.layers[0].state.sums.shape[0] == 2 and torch.equal(cache.layers[0].state.sums[0],
                                                                     cache.layers[0].state.sums[1])
    ent = model(ids, return_entropy=True).entropies
    assert len(ent) == 2 and ent[0].shape == (2, 2, 13)
    assert bool((ent[0] <= math.log(13) + 1e-9).all())
    loss = model(ids, is_causal=True).logits.sum()
    loss.backward()                                          # trains


def test_exp_map_projection_is_merged_into_the_q_k_layers():
    """Article 5: e^x on q/k that the model's own q/k layers project to m dims -- the blocks' qkv layer outputs
    H * m dims for q and for k (values keep dim / heads), the attention holds no projection of its own, and the
    q/k it receives are m wide."""
    model = Transformer(40, dim=16, depth=1, heads=2, attention="linear", feature_map="exp", num_features=24)
    blk = model.blocks[0]
    assert blk.qk_dim == 24 and blk.qkv.out_features == 2 * 2 * 24 + 16
    assert sum(p.numel() for p in blk.attn.parameters()) == 0
    seen = []
    blk.attn.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape, args[2].shape)))
    out = model(torch.randint(0, 40, (3, 7)), is_causal=True).logits
    assert seen == [((3, 2, 7, 24), (3, 2, 7, 8))] and out.shape == (3, 7, 40)
    # the same merged form by hand: the exp map on 24-wide q/k from a factory
    by_hand = Transformer(40, dim=16, depth=1, heads=2, attention_factory=lambda i: LinearAttention("exp"), qk_dim=24)
    assert by_hand.blocks[0].qkv.weight.shape == blk.qkv.weight.shape
    with pytest.raises(ValueError, match="contradicts"):
        Transformer(10, dim=16, depth=1, heads=2, attention="linear", num_features=8, qk_dim=16)
    with pytest.raises(ValueError, match="num_features"):
        Transformer(10, dim=16, depth=1, heads=2, attention="linear", num_features=7)
    with pytest.raises(ValueError, match="qk_dim"):
        Transformer(10, dim=16, depth=1, heads=2, qk_dim=5)


def test_softmax_blocks_with_wider_q_k():
    """qk_dim is a block option of its own: softmax attention with 12-wide q/k and 4-wide values per head."""
    from kexue.nn import TransformerBlock

    torch.manual_seed(0)
    model = Transformer(30, dim=8, depth=2, heads=2, qk_dim=12).eval()
    assert all(isinstance(b, TransformerBlock) and b.qkv.out_features == 2 * 2 * 12 + 8 for b in model.blocks)
    ids = torch.randint(0, 30, (2, 9))
    full = model(ids, is_causal=True).logits
    cache = model.new_cache()
    steps = [model(ids[:, :5], is_causal=True, cache=cache).logits]
    steps += [model(ids[:, t:t + 1], is_causal=True, cache=cache).logits for t in range(5, 9)]
    assert float((torch.cat(steps, 1) - full).detach().abs().max()) < 1e-5


def test_linear_attention_layer_reads_the_prepared_mask():
    attn = LinearAttention("elu1")
    q, k, v = _qkv(2, 2, 9)
    am = _padding(2, 9)
    out = attn(q, k, v, mask=prepare_mask(q_len=9, batch=2, heads=2, attention_mask=am, is_causal=True))
    ref = linear_attention_reference(q, k, v, feature_map="elu1", causal=True, attention_mask=am)
    assert float((out - ref).abs().max()) < 1e-12
    assert torch.equal(attn(q, k, v), linear_attention(q, k, v, feature_map="elu1"))
    with pytest.raises(ValueError, match="causal mask and key padding only"):
        attn(q, k, v, mask=prepare_mask(unilm_mask(torch.tensor([[0] * 4 + [1] * 5])), q_len=9, batch=2))
    with pytest.raises(TypeError, match="PreparedMask"):
        attn(q, k, v, mask=torch.ones(9, 9, dtype=torch.bool))
    win = LinearAttention("elu1", window=3)
    out = win(q, k, v, mask=prepare_mask(q_len=9, is_causal=True))
    assert float((out - linear_attention_reference(q, k, v, feature_map="elu1", causal=True, window=3))
                 .abs().max()) == 0.0
    with pytest.raises(ValueError, match="no cache"):
        win(q, k, v, mask=prepare_mask(q_len=9, is_causal=True), cache=win.new_cache())


def test_window_weights_keep_only_neighbours():
    q, k, _ = _qkv(1, 1, 8)
    w = linear_attention_weights(q, k, feature_map="exp", window=2)
    assert w[0, 0].count_nonzero(dim=-1).tolist() == [2, 3, 3, 3, 3, 3, 3, 2]
    assert torch.allclose(w.sum(-1), torch.ones(1, 1, 8, dtype=torch.float64))
    wc = linear_attention_weights(q[:, :, 5:], k, feature_map="exp", causal=True)     # last 3 queries of 8
    assert wc[0, 0].count_nonzero(dim=-1).tolist() == [6, 7, 8]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_error():
    q, k, v = _qkv(2, 2, 6)
    with pytest.raises(ValueError, match="head_dim=8"):
        linear_attention(torch.randn(2, 2, 6, 16, dtype=torch.float64), torch.randn(2, 2, 6, 16,
                         dtype=torch.float64), v, feature_map=_maps()["favor"])
    with pytest.raises(ValueError, match="head_dim=8"):
        linear_attention(q[..., :4], k[..., :4], v, feature_map=_maps()["exp-m"])
    with pytest.raises(ValueError, match="k must have shape"):
        linear_attention(q, k[..., :4], v, feature_map="elu1")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_features"):
            FavorPlus(D, num_features=bad)
        with pytest.raises(ValueError, match="num_features"):
            ExpFeatureMap(D, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, feature_map="elu1", causal=True, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        linear_attention(q, k, v, feature_map="elu1", causal=True, chunk_size=2.0)
    _, st = linear_attention(q, k, v, feature_map="elu1", causal=True, return_state=True)
    with pytest.raises(ValueError, match="initial_state.sums must have shape"):
        linear_attention(q[:1], k[:1], v[:1], feature_map="elu1", causal=True, initial_state=st)
    with pytest.raises(ValueError, match="no shift"):
        linear_attention(q, k, v, feature_map="exp", causal=True, initial_state=st)
    with pytest.raises(TypeError, match="LinearAttentionState"):
        linear_attention(q, k, v, feature_map="elu1", initial_state=st.sums)
    with pytest.raises(ValueError, match="initial_state.shift"):
        linear_attention(q, k, v, feature_map="exp", initial_state=LinearAttentionState(
            torch.zeros(2, 2, D, D + 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="attention_mask must be"):
        linear_attention(q, k, v, feature_map="elu1", attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask"):
        linear_attention(q, k, v, feature_map="elu1", attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="0 and 1"):
        linear_attention(q, k, v, feature_map="elu1", attention_mask=torch.full((2, 6), 2))
    with pytest.raises(ValueError, match="as many queries as keys"):
        linear_attention(q[:, :, :3], k, v, feature_map="elu1", causal=True)
    with pytest.raises(TypeError, match="share a dtype"):
        linear_attention(q.float(), k, v, feature_map="elu1")
    with pytest.raises(ValueError, match="4 dimensions"):
        linear_attention(q[0], k[0], v[0], feature_map="elu1")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="draws random features"):
        linear_attention(q, k, v, feature_map="favor")
    with pytest.raises(TypeError, match="feature_map"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(TypeError, match="causal"):
        linear_attention(q, k, v, feature_map="elu1", causal=1)
    with pytest.raises(ValueError, match="all be"):
        linear_attention_step(q[:, :, 0], k[:, :, :2], v[:, :, 0], None, feature_map="elu1")
    with pytest.raises(ValueError, match="key_valid"):
        linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], None, feature_map="elu1",
                              key_valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        FavorPlus(D, scale=-1.0)
    with pytest.raises(ValueError, match="redraw"):
        FavorPlus(D, redraw=0)
    with pytest.raises(ValueError, match="head_dim"):
        make_feature_map("favor")
    with pytest.raises(ValueError, match="num_features"):
        make_feature_map("elu1", head_dim=8, num_features=32)
    with pytest.raises(ValueError, match="window"):
        linear_attention_reference(q, k, v, feature_map="elu1", window=0)
    with pytest.raises(ValueError, match="attention"):
        Transformer(10, dim=16, depth=1, heads=2, attention="performer")
    with pytest.raises(ValueError, match="feature_map"):
        Transformer(10, dim=16, depth=1, heads=2, attention="linear", feature_map="cosine")
    with pytest.raises(ValueError, match="options of attention='linear'"):
        Transformer(10, dim=16, depth=1, heads=2, num_features=8)
    with pytest.raises(ValueError, match="num_features"):
        Transformer(10, dim=16, depth=1, heads=2, attention="linear", num_features=0)


@pytest.mark.parametrize("name", ["elu1", "exp", "favor"])
def test_gradients_through_recurrent_steps_equal_the_reference(name):
    fm = _maps()[name]
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 9))
    am = _padding(1, 9)
    st, outs = None, []
    for t in range(9):
        o, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, feature_map=fm,
                                      key_valid=am[:, t].bool())
        outs.append(o)
    g_steps = torch.autograd.grad(torch.stack(outs, 2).square().sum(), (q, k, v))
    ref = linear_attention_reference(q, k, v, feature_map=fm, causal=True, attention_mask=am)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g_steps, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_feature_map_subclass_without_features_says_what_to_define():
    class Half(FeatureMap):
        pass

    with pytest.raises(NotImplementedError, match=r"Half must define features\(\)"):
        Half()(torch.ones(1, 1, 2, 4))
    with pytest.raises(NotImplementedError, match="not an exponential feature map"):
        Half().log_parts(torch.ones(1, 1, 2, 4), is_query=True)
