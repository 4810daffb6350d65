"""RankMask (kexue.attention.ranks): the masks of article 3 as O(L) rank vectors, against the dense builders, on the
SDPA path, in keys_per_row and as a FlexAttention mask."""

from __future__ import annotations

import pytest
import torch

from kexue.attention import (
    RankMask,
    attention,
    attention_reference,
    causal_mask,
    padding_mask,
    permutation_mask,
    prefix_lm_mask,
    render_mask,
    unilm_mask,
)


@pytest.mark.parametrize("B,L", [(1, 1), (3, 8), (2, 13)])
def test_rank_masks_equal_the_builders(B, L):
    """Each RankMask constructor renders exactly the dense builder's mask, and its counts from the ranks equal the
    dense mask's row sums."""

    g = torch.Generator().manual_seed(B * 100 + L)
    am = (torch.arange(L)[None] < torch.randint(0, L + 1, (B, 1), generator=g)).long()
    seg = (torch.arange(L)[None] >= torch.randint(0, L + 1, (B, 1), generator=g)).long()
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    prefix = torch.randint(0, L + 1, (B,), generator=g)
    pairs = [
        (unilm_mask(seg, am), RankMask.unilm(seg, am)),
        (unilm_mask(seg), RankMask.unilm(seg)),
        (prefix_lm_mask(prefix, L), RankMask.prefix_lm(prefix, L)),
        (prefix_lm_mask(L // 2, L), RankMask.prefix_lm(L // 2, L)),
        (permutation_mask(order), RankMask.permutation(order)),
        (permutation_mask(order[0]), RankMask.permutation(order[0])),
        (causal_mask(L), RankMask.causal(L)),
        (causal_mask(max(L - 2, 0), L), RankMask.causal(max(L - 2, 0), L)),
        (padding_mask(am), RankMask.padding(am)),
    ]
    for dense, rm in pairs:
        d4 = dense.reshape((1,) * (4 - dense.dim()) + tuple(dense.shape))
        Q = rm.q_len if rm.q_len is not None else 5         # (a padding mask serves any number of queries)
        want = d4.expand(d4.shape[0], 1, Q, d4.shape[3])
        got = render_mask(rm, d4.shape[0], 1, Q, d4.shape[3])
        assert torch.equal(got, want), f"{rm}"
        assert torch.equal(rm.to_dense(q_len=Q).expand_as(want), want)
        rc = rm.row_counts(Q)
        if rm.causal_offset is None:
            assert torch.equal(rc.expand(want.shape[0], Q), want.sum(-1)[:, 0]), f"{rm}"
        else:
            assert rc is None


def test_rank_mask_documents_and_padding():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    am = torch.tensor([[1, 1, 0, 1, 1, 1, 0]])
    m = RankMask.documents(docs, causal=True).with_key_padding(am).to_dense()[0, 0]
    want = torch.zeros(7, 7, dtype=torch.bool)
    for i in range(7):
        for j in range(7):
            want[i, j] = docs[0, i] == docs[0, j] and j <= i and am[0, j] == 1
    assert torch.equal(m, want)


def test_rank_mask_bad_input():
    with pytest.raises(TypeError, match="q_rank must be an integer tensor"):
        RankMask(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k_rank must hold integers in \[0, 1073741824\]"):
        RankMask(torch.zeros(3, dtype=torch.long), torch.tensor([0, -1, 0]))
    with pytest.raises(ValueError, match="together"):
        RankMask(q_group=torch.zeros(3, dtype=torch.long), k_len=3)
    with pytest.raises(ValueError, match="k_len must be given"):
        RankMask(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="share the batch size"):
        RankMask(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree on the length"):
        RankMask(torch.zeros(3, dtype=torch.long), q_len=4, k_len=3)
    with pytest.raises(TypeError, match="causal_offset"):
        RankMask(k_len=3, causal_offset=1.5)
    with pytest.raises(ValueError, match="q_len must be given"):
        RankMask(k_len=3, causal_offset=0).to_dense()


def test_rank_mask_on_the_sdpa_path_and_in_keys_per_row():
    """A RankMask given to attention(backend='sdpa') is rendered for SDPA and counted from its ranks; keys_per_row
    counts every batch row of it."""
    from kexue.attention import keys_per_row

    B, L = 3, 12
    seg = (torch.arange(L)[None] >= torch.tensor([[4], [0], [12]])).long()
    am = (torch.arange(L)[None] < torch.tensor([[12], [7], [3]])).long()
    rm = RankMask.unilm(seg, am)
    q, k, v = (torch.randn(B, 2, L, 8) for _ in range(3))
    a = attention(q, k, v, rm, scale="entropy")
    torch.testing.assert_close(a, attention_reference(q, k, v, unilm_mask(seg, am), scale="entropy"))
    counts = keys_per_row(rm, L, L)
    assert counts.shape == (B, 1, L)
    assert torch.equal(counts, unilm_mask(seg, am).sum(-1))
    assert torch.equal(keys_per_row(RankMask.padding(am), 5, L), padding_mask(am).sum(-1).expand(B, 1, 5))
    with pytest.raises(ValueError, match=r"RankMask is for \(Q, K\) = \(12, 12\)"):
        attention(q[:, :, :5], k, v, rm)


def test_rank_mask_as_a_flex_block_mask():
    """A RankMask is a FlexAttention mask_mod too (vmapped by create_block_mask): UniLM with padding and causal
    packed documents, against the reference."""
    import warnings

    from kexue.attention import to_block_mask

    L = 256
    seg = (torch.arange(L)[None] >= torch.tensor([[100], [31]])).long()
    am = (torch.arange(L)[None] < torch.tensor([[256], [200]])).long()
    docs = torch.arange(L)[None] // 50
    q, k, v = (torch.randn(2, 2, L, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # flex on CPU: "debug only"
        for rm in (RankMask.unilm(seg, am), RankMask.documents(docs, causal=True)):
            bm = to_block_mask(rm, rm.batch, None, L, L)
            torch.testing.assert_close(attention(q[: rm.batch], k[: rm.batch], v[: rm.batch], bm, scale="entropy"),
                                       attention_reference(q[: rm.batch], k[: rm.batch], v[: rm.batch], rm,
                                                           scale="entropy"), rtol=1e-5, atol=1e-5)


def test_a_rank_mask_with_key_padding_and_causal_offset():
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    am = torch.tensor([[1, 1, 1, 0, 1]])
    rm = RankMask.unilm(seg).with_key_padding(am).with_causal(0)
    want = unilm_mask(seg, am) & causal_mask(5)
    assert torch.equal(rm.to_dense(), want)
    assert rm.with_causal(2).causal_offset == 0                 # the tighter offset is kept
    with pytest.raises(TypeError, match="offset must be an int"):
        rm.with_causal(0.5)
