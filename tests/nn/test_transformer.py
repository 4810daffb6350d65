"""Tests for kexue.nn.transformer: RoPE, pre/post-LN, tied head, any length, pluggable attention, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kexue.nn.transformer import SoftmaxAttention, Transformer, TransformerBlock, apply_rope

pytestmark = pytest.mark.usefixtures("one_thread")



def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=40, dim=32, depth=2, heads=4)
    base.update(kw)
    return Transformer(**base).double()


def test_rope_dot_product_depends_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, torch.tensor([m]))
        kn = apply_rope(k, torch.tensor([n]))
        return float((qm * kn).sum())

    for m, n in [(0, 0), (3, 1), (10, 7), (100, 97), (1000, 1001)]:
        for shift in (1, 5, 333):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)
    # and it does depend on the offset
    assert abs(score(5, 0) - score(0, 0)) > 1e-3
    # rotation keeps norms; position 0 is the identity
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, torch.arange(5)).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x, torch.zeros(5, dtype=torch.long)), x)


def test_rope_keeps_dtype_and_rejects_odd_dim():
    x = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    assert apply_rope(x, torch.arange(4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 1, 4, 7), torch.arange(4))
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(torch.randn(1, 1, 4, 8), torch.arange(5))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_shapes_pre_and_post_ln(norm):
    m = _model(norm=norm)
    ids = torch.randint(0, 40, (3, 11))
    out = m(ids, return_entropy=True)
    assert out.hidden.shape == (3, 11, 32)
    assert out.logits.shape == (3, 11, 40)
    assert len(out.entropies) == 2 and out.entropies[0].shape == (3, 4, 11)
    assert torch.isfinite(out.logits).all()
    # entropy of a row is between 0 and log(n)
    assert (out.entropies[0] >= -1e-9).all() and (out.entropies[0] <= math.log(11) + 1e-9).all()
    # the two variants are really different networks
    other = _model(norm="post" if norm == "pre" else "pre")
    assert not torch.allclose(other(ids).hidden, out.hidden)


def test_mlm_head_is_tied_to_embeddings():
    m = _model()
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    ids = torch.randint(0, 40, (2, 6))
    out = m(ids)
    h = m.head_ln(F.gelu(m.head_dense(out.hidden)))
    torch.testing.assert_close(out.logits, h @ m.tok_emb.weight.T + m.head_bias)
    # a change to the embedding matrix changes the output layer too, and gradients from the head reach it
    m.zero_grad()
    m(ids).logits[..., 7].sum().backward()
    assert m.tok_emb.weight.grad[7].abs().sum() > 0
    assert not any("head" in n and p.shape == m.tok_emb.weight.shape for n, p in m.named_parameters())


def test_logits_positions_select_rows():
    m = _model()
    ids = torch.randint(0, 40, (2, 9))
    sel = torch.rand(2, 9) < 0.4
    sel[0, 0] = True
    torch.testing.assert_close(m(ids, logits_positions=sel).logits, m(ids).logits[sel])
    with pytest.raises(ValueError, match="logits_positions"):
        m(ids, logits_positions=sel[:, :3])


def test_any_length_at_inference_and_padding():
    m = _model()
    for n in (1, 7, 64, 300):
        assert m(torch.randint(0, 40, (1, n))).logits.shape == (1, n, 40)
    # padding at the end does not change the outputs of the real tokens
    ids = torch.randint(5, 40, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    am = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()
    torch.testing.assert_close(m(padded, attention_mask=am).hidden[:, :9], m(ids).hidden)


def test_position_ids_are_used_and_shift_invariant():
    m = _model()
    ids = torch.randint(0, 40, (2, 8))
    base = m(ids).hidden
    torch.testing.assert_close(m(ids, position_ids=torch.arange(8) + 50).hidden, base)  # RoPE: only offsets
    assert not torch.allclose(m(ids, position_ids=torch.arange(8).flip(0)).hidden, base)


def test_pluggable_attention_callable_is_really_used():
    calls = []

    def doubled_values(q, k, v, *, mask, cache=None):
        calls.append((q.shape, mask.sdpa_causal, cache is None))
        return F.scaled_dot_product_attention(q, k, 2 * v, attn_mask=mask.allowed(), is_causal=False)

    m_custom = _model(attention=doubled_values)
    m_plain = _model()
    ids = torch.randint(0, 40, (2, 5))
    out = m_custom(ids, is_causal=True)
    assert len(calls) == 2 and calls[0] == (torch.Size([2, 4, 5, 8]), True, True)
    assert not torch.allclose(out.hidden, m_plain(ids, is_causal=True).hidden)
    # zeroing the value path through the plugged attention behaves like a model without attention output
    m_zero = _model(attention=lambda q, k, v, *, mask, cache=None: torch.zeros_like(v))
    x = m_zero.tok_emb(ids)
    for blk in m_zero.blocks:
        x = x + blk.proj(torch.zeros_like(x))
        x = x + blk.mlp(blk.ln2(x))
    torch.testing.assert_close(m_zero(ids).hidden, m_zero.final_ln(x))
    # a factory builds one module per layer
    built = []

    def factory(i):
        built.append(i)
        return SoftmaxAttention("entropy")

    m_fact = _model(attention_factory=factory)
    assert built == [0, 1] and m_fact.blocks[0].attn is not m_fact.blocks[1].attn


def test_entropy_scale_differs_from_standard_and_matches_at_512_keys():
    ids = torch.randint(0, 40, (1, 20))
    o, e = _model(attention_scale="standard"), _model(attention_scale="entropy")
    assert not torch.allclose(o(ids).hidden, e(ids).hidden)
    # the per-row factor at n = 512 is exactly 1: the two models agree there
    ids = torch.randint(0, 40, (1, 512))
    torch.testing.assert_close(o(ids).hidden, e(ids).hidden)


def test_block_standalone():
    from kexue.attention import prepare_mask

    blk = TransformerBlock(16, 2, attention=SoftmaxAttention(), norm="post")
    y, ent = blk(torch.randn(2, 5, 16), torch.arange(5), mask=prepare_mask(q_len=5), return_entropy=True)
    assert y.shape == (2, 5, 16) and ent.shape == (2, 2, 5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="attention_scale"):
        Transformer(10, dim=16, depth=1, heads=2, attention_scale="logn")
    with pytest.raises(ValueError, match="norm"):
        Transformer(10, dim=16, depth=1, heads=2, norm="sandwich")
    with pytest.raises(ValueError, match="divisible|even"):
        Transformer(10, dim=18, depth=1, heads=4)
    with pytest.raises(ValueError, match="at most one"):
        Transformer(10, dim=16, depth=1, heads=2, attention=SoftmaxAttention(),
                    attention_factory=lambda i: SoftmaxAttention())
    with pytest.raises(TypeError, match="attention"):
        Transformer(10, dim=16, depth=1, heads=2, attention=3)
    with pytest.raises(ValueError, match="scale"):
        SoftmaxAttention("log")
    with pytest.raises(ValueError, match="min_n"):
        SoftmaxAttention("entropy", min_n=0.5)
    with pytest.raises(ValueError, match="base"):
        SoftmaxAttention("entropy", base=1)
    assert SoftmaxAttention("entropy", min_n=12.5, base=600.7).base == 600.7      # kept as given, not int()
    m = Transformer(10, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="attention_mask must contain only 0 and 1"):
        m(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 2, 0]]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[1, 2, 10]]))
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.randn(1, 3))
    with pytest.raises(TypeError, match="mask"):
        m(torch.tensor([[1, 2]]), mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="mask"):
        m(torch.tensor([[1, 2]]), mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        m(torch.tensor([[1, 2]]), position_ids=torch.arange(3))
    with pytest.raises(ValueError, match="entropy"):
        Transformer(10, dim=16, depth=1, heads=2, attention=lambda q, k, v, **kw: v)(
            torch.tensor([[1, 2]]), return_entropy=True)


def test_forward_under_inference_mode_equals_no_grad():
    """A UniLM mask built under torch.inference_mode is an inference tensor (no version counter): the model
    must still run, with the same logits as under no_grad."""
    from kexue.attention import unilm_mask

    torch.manual_seed(0)
    model = Transformer(50, dim=32, depth=2, heads=2, attention_scale="entropy").eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    seg = torch.tensor([[0] * 4 + [1] * 6] * 2)
    with torch.no_grad():
        want = model(ids, mask=unilm_mask(seg)).logits
    with torch.inference_mode():
        got = model(ids, mask=unilm_mask(seg)).logits
    torch.testing.assert_close(got, want)


def test_learnable_scale_starts_at_attention_e_and_trains_per_layer():
    """attention_scale="learnable": one LogNScale (learnable, per head) per layer, s = 1 at the start, so the
    model starts exactly where Attention-E does; the factors get gradients and are trainable parameters."""
    from kexue.attention import LogNScale

    ids = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    learn = Transformer(20, dim=16, depth=2, heads=2, attention_scale="learnable")
    torch.manual_seed(0)
    ent = Transformer(20, dim=16, depth=2, heads=2, attention_scale="entropy")
    scales = [m for m in learn.modules() if isinstance(m, LogNScale)]
    assert len(scales) == 2 and scales[0] is not scales[1] and all(s.learnable for s in scales)
    assert learn.num_parameters() == ent.num_parameters() + 2 * 2
    out = learn(ids, is_causal=True, return_entropy=True)
    torch.testing.assert_close(out.logits, ent(ids, is_causal=True).logits, rtol=1e-5, atol=1e-5)
    out.logits.square().mean().backward()
    assert all(s.s.grad is not None and s.s.grad.abs().sum() > 0 for s in scales)
    attn = SoftmaxAttention(LogNScale(2, learnable=True))
    assert any(p is attn.scale.s for p in attn.parameters())
    with pytest.raises(ValueError, match="scale"):
        SoftmaxAttention("learnable")                 # a name for the model's option, not a scale by itself


def test_rope_position_ids_batch_must_match_x():
    x = torch.randn(2, 1, 4, 8)
    pos = torch.arange(4)
    torch.testing.assert_close(apply_rope(x, pos[None].expand(2, 4)), apply_rope(x, pos))
    torch.testing.assert_close(apply_rope(x, pos[None]), apply_rope(x, pos))
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(torch.randn(1, 1, 4, 8), pos[None].expand(3, 4))      # would silently give a batch of 3
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(x, pos[None].expand(3, 4))                            # would raise a raw RuntimeError


def test_mask_that_broadcasts_is_accepted():
    """A key-padding mask ``[B, 1, 1, L]`` (or any shape that broadcasts to ``[B, H, L, L]``) is accepted, and
    gives what the dense mask and the model's own ``attention_mask`` give."""
    from kexue.attention import padding_mask

    m = _model(depth=1)
    ids = torch.randint(0, 40, (2, 20))
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, 13:] = 0
    pm = padding_mask(am)
    assert pm.shape == (2, 1, 1, 20)
    got = m(ids, mask=pm).hidden
    torch.testing.assert_close(got, m(ids, mask=pm.expand(2, 4, 20, 20).clone()).hidden)
    torch.testing.assert_close(got, m(ids, attention_mask=am).hidden)
    # a key mask shared by the batch, [1, 1, 1, L] and [L]
    keys = torch.arange(20) < 15
    want = m(ids, mask=keys.expand(2, 4, 20, 20).clone()).hidden
    torch.testing.assert_close(m(ids, mask=keys[None, None, None]).hidden, want)
    torch.testing.assert_close(m(ids, mask=keys).hidden, want)
    # shapes that do not broadcast to [B, H, L, L] are still refused, naming the mask
    for bad in (torch.ones(3, 1, 1, 20), torch.ones(2, 3, 20, 20), torch.ones(2, 1, 1, 19),
                torch.ones(1, 2, 1, 1, 20)):
        with pytest.raises(ValueError, match="mask"):
            m(ids, mask=bad.bool())


def test_3d_mask_is_per_batch_item():
    """A 3-D mask is ``[B, L, L]`` (one mask per batch item, shared by the heads), also when B == H."""
    m = _model(depth=1)                                       # heads = 4
    ids = torch.randint(0, 40, (4, 6))
    per_item = torch.stack([torch.ones(6, 6, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).tril(),
                            torch.eye(6, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).triu()])
    got = m(ids, mask=per_item).hidden
    torch.testing.assert_close(got, m(ids, mask=per_item[:, None]).hidden)
    for i in range(4):
        torch.testing.assert_close(got[i:i + 1], m(ids[i:i + 1], mask=per_item[i]).hidden)
    # a 3-D mask of one item is shared by the batch; any other first dimension is an error
    torch.testing.assert_close(m(ids, mask=per_item[1:2]).hidden, m(ids, is_causal=True).hidden)
    with pytest.raises(ValueError, match=r"mask.*\[B, L, K\]"):
        m(ids[:2], mask=per_item)


def test_input_ids_must_be_int32_or_int64():
    m = _model(depth=1)
    ids = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(m(ids.int()).hidden, m(ids).hidden)
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16):
        with pytest.raises(TypeError, match="input_ids"):
            m(ids.clamp(max=1).to(dtype))


def test_block_and_model_size_checks():
    attn = SoftmaxAttention()
    with pytest.raises(ValueError, match="heads"):
        TransformerBlock(32, 0, attention=attn)
    with pytest.raises(ValueError, match="dim"):
        TransformerBlock(0, 2, attention=attn)
    with pytest.raises(ValueError, match="mlp_ratio"):
        TransformerBlock(32, 4, attention=attn, mlp_ratio=-1)
    with pytest.raises(ValueError, match="mlp_ratio"):
        TransformerBlock(32, 4, attention=attn, mlp_ratio=0.01)         # a zero-width MLP
    with pytest.raises(TypeError, match="mlp_ratio"):
        TransformerBlock(32, 4, attention=attn, mlp_ratio="4")
    with pytest.raises(ValueError, match="heads"):
        Transformer(10, dim=16, depth=1, heads=0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        Transformer(10, dim=16, depth=1, heads=2, mlp_ratio=-1)
    with pytest.raises(ValueError, match="mlp_ratio"):
        Transformer(10, dim=32, depth=1, heads=4, mlp_ratio=0.01)
    assert TransformerBlock(32, 4, attention=attn, mlp_ratio=1 / 32).mlp[0].out_features == 1


def test_the_model_init_leaves_a_user_attention_module_s_own_layers_alone():
    """reset_parameters gives the model's layers the BERT init, not the layers inside a plugged-in attention
    module (e.g. the projection of a linear attention), which keep what their author chose."""
    from kexue.attention import attention as attention_fn

    class ProjectedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feature = torch.nn.Linear(4, 4)
            torch.nn.init.eye_(self.feature.weight)
            torch.nn.init.constant_(self.feature.bias, 0.5)

        def forward(self, q, k, v, *, mask, cache=None):
            return attention_fn(self.feature(q), self.feature(k), v, mask)

    torch.manual_seed(0)
    m = Transformer(20, dim=8, depth=2, heads=2, attention_factory=lambda i: ProjectedAttention())
    for blk in m.blocks:
        assert torch.equal(blk.attn.feature.weight, torch.eye(4))
        assert torch.equal(blk.attn.feature.bias, torch.full((4,), 0.5))
        assert blk.qkv.weight.std().item() < 0.05 and torch.equal(blk.qkv.bias, torch.zeros_like(blk.qkv.bias))
    out = m(torch.randint(0, 20, (2, 5)), is_causal=True).logits
    assert out.shape == (2, 5, 20) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
CUDA = "cuda"


@pytest.mark.cuda
def test_transformer_on_cuda_matches_cpu_at_any_length():
    from kexue.attention import unilm_mask
    from kexue.nn import Transformer

    torch.manual_seed(0)
    model = Transformer(50, dim=64, depth=2, heads=4, attention_scale="entropy").eval()
    ids = torch.randint(0, 50, (2, 100), generator=torch.Generator().manual_seed(3))
    seg = (torch.arange(100) >= 40).long()[None].expand(2, -1)
    with torch.no_grad():
        want = model(ids, mask=unilm_mask(seg)).logits
        gpu = model.to(CUDA)
        got = gpu(ids.to(CUDA), mask=unilm_mask(seg.to(CUDA))).logits
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(ids.to(CUDA), mask=unilm_mask(seg.to(CUDA))).logits
    assert torch.isfinite(low).all()
    assert (low.float().argmax(-1).cpu() == want.argmax(-1)).float().mean() > 0.9
