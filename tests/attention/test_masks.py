"""Mask predicates and builders (kexue.fm/archives/6933) against brute-force references from the definitions."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from kexue.attention import (
    and_masks,
    causal,
    causal_mask,
    document_mask,
    documents,
    from_dense,
    full,
    or_masks,
    padding,
    padding_mask,
    permutation,
    permutation_mask,
    permute_for_plm,
    prefix_lm,
    prefix_lm_mask,
    render_mask,
    sliding_window,
    sliding_window_mask,
    to_block_mask,
    unilm,
    unilm_mask,
)


def _brute(L_q, L_k, pred):
    out = torch.zeros(L_q, L_k, dtype=torch.bool)
    for i in range(L_q):
        for j in range(L_k):
            out[i, j] = bool(pred(i, j))
    return out


# ----------------------------------------------------------------------------------------------- causal
@pytest.mark.parametrize("q_len,k_len", [(0, 0), (0, 3), (1, 1), (1, 5), (4, 4), (3, 7), (7, 7)])
def test_causal_mask_right_aligned(q_len, k_len):
    off = k_len - q_len
    want = _brute(q_len, k_len, lambda i, j: j <= i + off)
    got = causal_mask(q_len, k_len)
    assert got.dtype == torch.bool and got.shape == (q_len, k_len)
    assert torch.equal(got, want)
    if q_len:
        assert got[-1].all()               # the newest query sees the whole cache
        assert got[0].sum() == off + 1     # the oldest query sees the cache and itself


def test_causal_mask_square_default_and_bad():
    assert torch.equal(causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="k_len must be >= q_len"):
        causal_mask(5, 3)
    with pytest.raises(ValueError, match="q_len must be >= 0"):
        causal_mask(-1)
    with pytest.raises(TypeError, match="q_len must be an int"):
        causal_mask(2.0)


# ---------------------------------------------------------------------------------------------- padding
def test_padding_mask_values_and_input_kinds():
    am = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]])
    for x in (am, am.bool(), am.int()):
        got = padding_mask(x)
        assert got.shape == (2, 1, 1, 4) and got.dtype == torch.bool
        assert torch.equal(got[:, 0, 0], am.bool())
    assert torch.equal(render_mask(padding(am), 2, 1, 3, 4), padding_mask(am).expand(2, 1, 3, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        padding_mask(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="integer or bool"):
        padding_mask(torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        padding_mask(torch.ones(1, 1, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ UniLM
def test_unilm_article_example():
    # [CLS] 你 想 吃 啥 [SEP] 白 切 鸡 [SEP], s = 0000001111
    s = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    rows = ["".join(str(int(x)) for x in r) for r in unilm_mask(s)[0, 0]]
    assert rows[:6] == ["1111110000"] * 6
    assert rows[6:] == ["1111111000", "1111111100", "1111111110", "1111111111"]


def _unilm_definition(s, am):
    """From the words: source bidirectional, target sees all source + earlier target, source never sees
    target; then padding keys hidden. s has the form 0..0 1..1."""
    L = len(s)

    def pred(i, j):
        if not am[j]:
            return False
        if s[i] == 0:
            return s[j] == 0
        return s[j] == 0 or j <= i

    return _brute(L, L, pred)


def _cases(L):
    """(segment_ids, attention_mask) covering empty source, empty target and padding in either part."""
    out = []
    for src in range(L + 1):
        s = [0] * src + [1] * (L - src)
        out.append((s, [1] * L))                                  # no padding
        for p in range(L):                                        # one pad key anywhere (inside src or tgt)
            out.append((s, [0 if j == p else 1 for j in range(L)]))
        out.append((s, [1] * max(L - 2, 0) + [0] * min(L, 2)))    # right padding
        out.append((s, [0] * L))                                  # all padding
    return out


@pytest.mark.parametrize("L", [1, 2, 5])
def test_unilm_against_definition_all_off_by_one_cases(L):
    cases = _cases(L)
    s = torch.tensor([c[0] for c in cases])
    am = torch.tensor([c[1] for c in cases])
    got = unilm_mask(s, am)
    assert got.shape == (len(cases), 1, L, L) and got.dtype == torch.bool
    for b, (sb, ab) in enumerate(cases):
        assert torch.equal(got[b, 0], _unilm_definition(sb, ab)), (sb, ab)
    # empty source == plain causal LM; empty target == bidirectional (MLM)
    assert torch.equal(unilm_mask(torch.ones(1, L, dtype=torch.long))[0, 0], causal_mask(L))
    assert unilm_mask(torch.zeros(1, L, dtype=torch.long)).all()


def test_unilm_cumsum_equals_product_form_for_suffix_segments():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        L = int(torch.randint(1, 12, (1,), generator=g))
        src = int(torch.randint(0, L + 1, (1,), generator=g))
        s = torch.tensor([0] * src + [1] * (L - src))
        si, sj = s[:, None], s[None, :]
        product = (1 - si) * (1 - sj) + si * torch.ones(L, L, dtype=torch.long).tril()
        assert torch.equal(unilm_mask(s[None])[0, 0], product.bool())
    # not a suffix: the cumsum form generalises (documented) and the 2019 product form no longer agrees
    s = torch.tensor([0, 1, 0, 1])
    si, sj = s[:, None], s[None, :]
    product = ((1 - si) * (1 - sj) + si * torch.ones(4, 4, dtype=torch.long).tril()).bool()
    c = s.cumsum(0)
    assert torch.equal(unilm_mask(s[None])[0, 0], c[None, :] <= c[:, None])
    assert not torch.equal(unilm_mask(s[None])[0, 0], product)


def test_unilm_predicate_equals_builder_and_1d_input():
    s = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    am = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1]])
    pred = and_masks(unilm(s), padding(am))
    assert torch.equal(render_mask(pred, 2, 1, 5, 5), unilm_mask(s, am))
    assert torch.equal(unilm_mask(s[0]), unilm_mask(s[:1]))


def test_unilm_bad_input():
    with pytest.raises(TypeError, match="segment_ids"):
        unilm_mask(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="segment_ids must contain only 0 and 1"):
        unilm_mask(torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="segment_ids must contain only 0 and 1"):
        unilm_mask(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        unilm_mask(torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        unilm_mask(torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        unilm_mask([[0, 1]])


# ---------------------------------------------------------------------------------------------- prefix
@pytest.mark.parametrize("L", [0, 1, 4, 6])
def test_prefix_lm_against_definition(L):
    for p in range(L + 1):
        want = _brute(L, L, lambda i, j, p=p: j < p or j <= i)
        assert torch.equal(prefix_lm_mask(p, L), want)
        s = torch.tensor([[0] * p + [1] * (L - p)], dtype=torch.long)
        assert torch.equal(prefix_lm_mask(p, L), unilm_mask(s)[0, 0])
        # prefix queries never see the continuation
        assert not prefix_lm_mask(p, L)[:p, p:].any()
    assert torch.equal(prefix_lm_mask(0, L), causal_mask(L))
    assert prefix_lm_mask(L, L).all()


def test_prefix_lm_per_batch_and_bad():
    p = torch.tensor([0, 2, 5])
    got = prefix_lm_mask(p, 5)
    assert got.shape == (3, 1, 5, 5)
    for b in range(3):
        assert torch.equal(got[b, 0], prefix_lm_mask(int(p[b]), 5))
    assert torch.equal(render_mask(prefix_lm(p), 3, 1, 5, 5), got)
    with pytest.raises(ValueError, match="prefix_len must be <= seq_len"):
        prefix_lm_mask(6, 5)
    with pytest.raises(ValueError, match="prefix_len must be <= seq_len"):
        prefix_lm_mask(torch.tensor([1, 6]), 5)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        prefix_lm_mask(-1, 5)
    with pytest.raises(TypeError, match="prefix_len"):
        prefix_lm_mask(torch.tensor([1.0]), 5)


# ------------------------------------------------------------------------------------- sliding / combos
@pytest.mark.parametrize("w", [1, 2, 3, 10])
def test_sliding_window_and_combinators(w):
    L = 7
    band = _brute(L, L, lambda i, j: abs(i - j) < w)
    assert torch.equal(render_mask(sliding_window(w), 1, 1, L, L)[0, 0], band)
    assert torch.equal(sliding_window_mask(w, L), band)                      # the builder renders the predicate
    local = render_mask(and_masks(causal(), sliding_window(w)), 1, 1, L, L)[0, 0]
    assert torch.equal(local, _brute(L, L, lambda i, j: 0 <= i - j < w))
    assert torch.equal(sliding_window_mask(w, L, causal=True), local)
    either = render_mask(or_masks(causal(), sliding_window(w)), 1, 1, L, L)[0, 0]
    assert torch.equal(either, band | causal_mask(L))
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window(0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window_mask(0, 4)
    # a kv-cache: Q = 3 queries at the last positions of K = 7 keys, offset K - Q for both predicates
    Q, off = 3, L - 3
    cached = render_mask(and_masks(causal(off), sliding_window(w, off)), 1, 1, Q, L)[0, 0]
    assert torch.equal(cached, _brute(Q, L, lambda i, j: 0 <= i + off - j < w))
    assert torch.equal(cached, local[off:])                  # the last rows of the full local mask
    assert torch.equal(sliding_window_mask(w, Q, L, causal=True), cached)
    with pytest.raises(TypeError, match="offset"):
        sliding_window(2, 1.5)
    with pytest.raises(ValueError, match="k_len must be >= q_len"):
        sliding_window_mask(2, 5, 3)


@pytest.mark.parametrize("causal_flag", [False, True])
def test_document_mask_against_definition(causal_flag):
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 7, 7]])
    got = document_mask(ids, causal=causal_flag)
    assert got.shape == (2, 1, 6, 6) and got.dtype == torch.bool
    for b in range(2):
        want = _brute(6, 6, lambda i, j, b=b: bool(ids[b, i] == ids[b, j]) and (j <= i or not causal_flag))
        assert torch.equal(got[b, 0], want)
    assert torch.equal(document_mask(ids[0], causal=causal_flag), got[0, 0])        # [L] ids -> [L, L]
    assert torch.equal(render_mask(documents(ids), 2, 1, 6, 6), document_mask(ids))
    with pytest.raises(TypeError, match="document_ids must be an integer"):
        documents(torch.zeros(3))
    with pytest.raises(TypeError, match="causal must be a bool"):
        document_mask(ids, causal="yes")


def test_render_shapes_full_and_from_dense():
    m = render_mask(full(), 2, 3, 4, 5)
    assert m.shape == (2, 3, 4, 5) and m.all()
    head_mod = lambda b, h, q, kv: (kv + h) % 2 == 0          # noqa: E731 - depends on the head index
    got = render_mask(head_mod, 1, 2, 2, 3)
    assert torch.equal(got[0, 0], _brute(2, 3, lambda i, j: j % 2 == 0))
    assert torch.equal(got[0, 1], _brute(2, 3, lambda i, j: (j + 1) % 2 == 0))
    dense = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(render_mask(from_dense(dense), 2, 3, 4, 4), dense.expand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="bool tensor"):
        render_mask(lambda b, h, q, kv: q - kv, 1, 1, 2, 2)
    with pytest.raises(TypeError, match="mask predicate"):
        render_mask(torch.ones(2, 2), 1, 1, 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        and_masks()


# ------------------------------------------------------------------------------------------ permutation
def test_permutation_article_example():
    # 北 京 欢 迎 你 at positions 0..4; generation order 迎 京 你 欢 北
    order = torch.tensor([3, 1, 4, 2, 0])
    m = permutation_mask(order)
    assert m[3].int().tolist() == [0, 0, 0, 1, 0]      # 迎 (first) sees only itself
    assert m[1].int().tolist() == [0, 1, 0, 1, 0]      # 京 sees 迎 and itself
    assert m[0].all()                                   # 北 (last) sees everything


@pytest.mark.parametrize("L", [1, 2, 6])
def test_permutation_mask_against_ranks(L):
    g = torch.Generator().manual_seed(L)
    orders = torch.stack([torch.randperm(L, generator=g) for _ in range(4)])
    got = permutation_mask(orders)
    assert got.shape == (4, 1, L, L)
    for b in range(4):
        rank = {int(p): t for t, p in enumerate(orders[b])}
        assert torch.equal(got[b, 0], _brute(L, L, lambda i, j, rank=rank: rank[j] <= rank[i]))
        assert torch.equal(permutation_mask(orders[b]), got[b, 0])
        assert got[b, 0].diagonal().all()              # diagonal included (see the docstring)
        assert got[b, 0].sum() == L * (L + 1) // 2     # a relabelled lower triangle
    assert torch.equal(permutation_mask(torch.arange(L)), causal_mask(L))
    assert torch.equal(render_mask(permutation(orders), 4, 1, L, L), got)


@pytest.mark.parametrize("bad", [torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3]), torch.tensor([-1, 0, 1]),
                                 torch.tensor([[0, 1, 2], [2, 2, 0]])])
def test_permutation_rejects_non_permutations(bad):
    with pytest.raises(ValueError, match="permutation of 0..2"):
        permutation_mask(bad)
    with pytest.raises(ValueError, match="permutation"):
        permute_for_plm(torch.arange(3), bad if bad.dim() == 1 else bad)


def test_permutation_bad_types_and_shapes():
    with pytest.raises(TypeError, match="order must be an integer tensor"):
        permutation_mask(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="order must have shape"):
        permutation_mask(torch.zeros(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match order length"):
        permute_for_plm(torch.arange(4), torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="batch size"):
        permute_for_plm(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 2]] * 3))
    with pytest.raises(ValueError, match="tokens must have shape"):
        permute_for_plm(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1, 2]))


class _TinyLM(torch.nn.Module):
    """One attention layer + MLP with learned absolute position embeddings: enough to test mask semantics."""

    def __init__(self, vocab=11, d=16, max_len=16, heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = torch.nn.Parameter(torch.randn(vocab, d, generator=g, dtype=torch.float64))
        self.pos = torch.nn.Parameter(torch.randn(max_len, d, generator=g, dtype=torch.float64))
        self.qkv = torch.nn.Parameter(torch.randn(d, 3 * d, generator=g, dtype=torch.float64) / d**0.5)
        self.out = torch.nn.Parameter(torch.randn(d, vocab, generator=g, dtype=torch.float64) / d**0.5)
        self.heads = heads

    def forward(self, tokens, pos_ids, mask):
        B, L = tokens.shape
        x = self.tok[tokens] + self.pos[pos_ids]
        q, k, v = (x @ self.qkv).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, -1)
        return torch.log_softmax(torch.tanh(x + h) @ self.out, dim=-1)


def test_permutation_by_mask_equals_permutation_by_reordering():
    """Article 3: shuffled-mask PLM on the original order == causal LM on reordered tokens + original ids."""
    model = _TinyLM().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    B, L = 3, 9
    tokens = torch.randint(0, 11, (B, L), generator=g)
    orders = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    pos = torch.arange(L).expand(B, L)
    # formulation 1: original order, permutation mask; the output at position order[t] predicts order[t+1]
    logp_mask = model(tokens, pos, permutation_mask(orders))
    # formulation 2: reorder, keep the original position ids, ordinary causal mask
    toks_r, pos_r = permute_for_plm(tokens, orders)
    logp_re = model(toks_r, pos_r, causal_mask(L))
    assert torch.equal(pos_r, orders)
    assert torch.equal(toks_r, tokens.gather(1, orders))
    # every hidden state is the same, relabelled
    torch.testing.assert_close(logp_re, logp_mask.gather(1, orders[..., None].expand(-1, -1, 11)),
                               rtol=1e-12, atol=1e-12)
    def ll(logp, toks, rows):
        """sum_t log p(token at step t+1 | output of the row holding step t)."""
        nxt = toks.gather(1, rows[:, 1:]) if rows is not None else toks[:, 1:]
        src = logp.gather(1, rows[:, :-1, None].expand(-1, -1, 11)) if rows is not None else logp[:, :-1]
        return src.gather(2, nxt[..., None]).sum()

    ll_mask = ll(logp_mask, tokens, orders)
    ll_re = ll(logp_re, toks_r, None)
    assert abs(float(ll_mask - ll_re)) < 1e-10  # same log-likelihood
    # controls: without the original position ids, or with a plain causal mask on the original order,
    # the likelihood changes — the equivalence is not vacuous
    assert abs(float(ll(model(toks_r, pos, causal_mask(L)), toks_r, None) - ll_re)) > 1e-3
    assert abs(float(ll(model(tokens, pos, causal_mask(L)), tokens, orders) - ll_re)) > 1e-3


def test_permute_for_plm_embeddings_and_shared_order():
    x = torch.randn(2, 4, 3)
    order = torch.tensor([2, 0, 3, 1])
    xr, pos = permute_for_plm(x, order)
    assert torch.equal(xr, x[:, order]) and torch.equal(pos, order.expand(2, 4))
    t1, p1 = permute_for_plm(torch.tensor([5, 6, 7, 8]), order)
    assert t1.tolist() == [7, 5, 8, 6] and p1.tolist() == [2, 0, 3, 1]


# ------------------------------------------------------------------------------------ block masks (flex)
MODS = {
    "causal": (lambda B, L: causal()),
    "unilm_pad": (lambda B, L: and_masks(unilm(torch.tensor([[0] * 5 + [1] * (L - 5), [0] * 11 + [1] * (L - 11)])),
                                          padding(torch.tensor([[1] * L, [1] * (L - 3) + [0] * 3])))),
    "prefix": (lambda B, L: prefix_lm(torch.tensor([3, 12]))),
    "window": (lambda B, L: and_masks(causal(), sliding_window(5))),
    "perm": (lambda B, L: permutation(torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b))
                                                   for b in range(B)]))),
}


@pytest.mark.parametrize("name", list(MODS))
def test_render_and_block_mask_agree(name):
    from torch.nn.attention.flex_attention import flex_attention

    B, H, L, bs = 2, 2, 16, 4
    mod = MODS[name](B, L)
    dense = render_mask(mod, B, 1, L, L)
    bm = to_block_mask(mod, B, None, L, L, BLOCK_SIZE=bs)
    blocks = bm.to_dense().bool()                          # [B, 1, L/bs, L/bs]: blocks that are computed
    want_blocks = dense.reshape(B, 1, L // bs, bs, L // bs, bs).any(dim=(3, 5))
    assert torch.equal(blocks, want_blocks)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, L, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "called without torch.compile": eager on CPU, fine for a check
        out_flex = flex_attention(q, k, v, block_mask=bm)
    out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out_flex, out_sdpa, rtol=1e-5, atol=1e-5)


def test_all_rows_brute_force_small_exhaustive():
    """Every 0/1 segment vector of length 4 (not only suffixes): predicate, builder and cumsum definition agree."""
    for bits in itertools.product([0, 1], repeat=4):
        s = torch.tensor([bits])
        c = s[0].cumsum(0)
        want = _brute(4, 4, lambda i, j, c=c: c[j] <= c[i])
        assert torch.equal(unilm_mask(s)[0, 0], want)


# ------------------------------------------------------------------------- counts attached by the builders
def _builder_masks():
    """Masks from every builder that attaches per-row key counts, with the off-by-one cases of the file."""
    g = torch.Generator().manual_seed(5)
    out = [causal_mask(q, k) for q, k in [(0, 0), (0, 3), (1, 1), (3, 7), (6, 6)]]
    out += [padding_mask(torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]))]
    for L in (1, 2, 5):
        cases = _cases(L)
        s = torch.tensor([c[0] for c in cases])
        out += [unilm_mask(s), unilm_mask(s, torch.tensor([c[1] for c in cases]))]
    bits = torch.tensor(list(itertools.product([0, 1], repeat=4)))      # also non-suffix segment patterns
    out += [unilm_mask(bits), unilm_mask(bits, bits.flip(0))]
    out += [prefix_lm_mask(p, 5) for p in (0, 2, 5)] + [prefix_lm_mask(torch.tensor([0, 3, 5]), 5)]
    out += [permutation_mask(torch.randperm(7, generator=g)),
            permutation_mask(torch.stack([torch.randperm(7, generator=g) for _ in range(3)]))]
    return out


def test_a_mask_changed_in_place_is_read_afresh_by_every_call():
    """Nothing is attached to a mask or kept between calls: a mask changed in place (through a view, .data or
    numpy, the last two bump no version counter) gives the changed answer on the next call."""
    from kexue.attention import attention, attention_reference, keys_per_row

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    m = unilm_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    changes = (lambda t: t[0, 0].__setitem__((4, 0), False),          # through a view
               lambda t: t.data.fill_(True),                             # behind autograd's back
               lambda t: t.numpy().__setitem__((0, 0, 2, 3), False))      # through numpy
    for change in changes:
        before = attention(q, k, v, m, scale="entropy", min_n=1)
        torch.testing.assert_close(before, attention_reference(q, k, v, m.clone(), scale="entropy", min_n=1))
        change(m)
        after = attention(q, k, v, m, scale="entropy", min_n=1)
        torch.testing.assert_close(after, attention_reference(q, k, v, m.clone(), scale="entropy", min_n=1))
        assert (after - before).abs().max() > 1e-3             # the change is seen
        assert torch.equal(keys_per_row(m, 5, 5), m.sum(-1))


def test_entropy_attention_with_every_builder_equals_the_reference():
    from kexue.attention import attention, attention_reference

    g = torch.Generator().manual_seed(9)
    for m in _builder_masks():
        if m.numel() == 0:
            continue
        L_q, L_k = m.shape[-2:]
        B = m.shape[0] if m.dim() == 4 else 1
        q = torch.randn(B, 2, L_q, 4, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, 2, L_k, 4, generator=g, dtype=torch.float64) for _ in range(2))
        for is_causal in (False, True):
            if is_causal and L_q != L_k:
                continue
            got = attention(q, k, v, m, scale="entropy", min_n=1, is_causal=is_causal)
            torch.testing.assert_close(got, attention_reference(q, k, v, m, scale="entropy", min_n=1,
                                                                is_causal=is_causal))


def test_to_additive_mask_matches_where_in_every_float_dtype_and_layout():
    from kexue.attention import to_additive_mask

    g = torch.Generator().manual_seed(31)
    m = torch.rand(2, 3, 5, 8, generator=g) > 0.5
    m[0, 0, 1] = False                                       # a fully hidden row
    views = [m, m.transpose(-1, -2), m[:, :1].expand(2, 4, 5, 8), m[..., 1:6], causal_mask(7), m[:0]]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for x in views:
            got = to_additive_mask(x, dtype)
            want = torch.where(x, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))
            assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
            assert torch.equal(got, want), (dtype, x.shape, x.stride())
    assert to_additive_mask(m).dtype == torch.float32
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        to_additive_mask(m.float())
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        to_additive_mask([[True]])
    with pytest.raises(TypeError, match="dtype must be a floating"):
        to_additive_mask(m, torch.int32)


def test_builders_and_attention_work_under_inference_mode():
    from kexue.attention import attention, attention_reference, keys_per_row

    seg, am = torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1, 1, 0]])
    q = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        masks = [unilm_mask(seg, am), causal_mask(6), padding_mask(am), prefix_lm_mask(2, 6),
                 permutation_mask(torch.tensor([2, 0, 1, 3, 5, 4]))]
        for m in masks:
            assert torch.equal(keys_per_row(m, 6, 6), m.expand(*m.shape[:-2], 6, 6).sum(-1))
            for scale in ("entropy", "standard"):
                torch.testing.assert_close(attention(q, q, q, m, scale=scale, min_n=1),
                                           attention_reference(q, q, q, m, scale=scale, min_n=1))


@pytest.mark.parametrize("shape", ["[L]", "[1, L]"])
def test_unilm_and_padding_predicates_from_one_row_serve_every_batch_row(shape):
    seg, am = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 1, 1, 1, 0])
    if shape == "[1, L]":
        seg, am = seg[None], am[None]
    for mod, dense in ((unilm(seg), unilm_mask(seg)), (padding(am), padding_mask(am))):
        got = render_mask(mod, 3, 2, 5, 5)
        assert got.shape == (3, 2, 5, 5)
        assert torch.equal(got, dense.expand(3, 2, 5, 5))


def test_a_rank_mask_keeps_its_own_copy_of_int32_ranks():
    from kexue.attention import RankMask, attention, attention_reference

    q = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    rm = RankMask(r, r.clone())
    before = attention(q, q, q, rm)
    r.zero_()                                       # the caller's tensor, not the mask's
    torch.testing.assert_close(attention(q, q, q, rm), before)
    torch.testing.assert_close(attention(q, q, q, rm), attention_reference(q, q, q, rm))


def test_a_predicate_built_for_another_length_is_a_value_error():
    with pytest.raises(ValueError, match="built for another batch or length"):
        render_mask(unilm(torch.tensor([[0, 0, 1, 1]])), 1, 1, 6, 6)
    with pytest.raises(ValueError, match="built for another batch or length"):
        render_mask(padding(torch.tensor([[1, 1, 0], [1, 0, 0]])), 3, 1, 3, 3)
