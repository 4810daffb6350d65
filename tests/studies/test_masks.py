"""The invariance checks of the "masks" study as unit tests, on small models (random and briefly trained)."""

from __future__ import annotations

import pytest
import torch

from kexue.nn.transformer import Transformer
from kexue.studies.masks import (
    PLM_ORDER,
    UNILM_SEGMENTS,
    lm_causality_gap,
    plm_loglik_mask,
    plm_loglik_reorder,
    unilm_forms_mismatches,
    unilm_product_mask,
    unilm_source_gap,
)
from kexue.train.mlm import TokenStream, train_mlm

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(scale: str = "standard", norm: str = "pre", dtype=torch.float64) -> Transformer:
    torch.manual_seed(0)
    return Transformer(30, dim=32, depth=2, heads=4, attention_scale=scale, norm=norm).to(dtype).eval()


def _ids(b: int = 3, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 30, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", ["standard", "entropy"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_lm_mask_outputs_ignore_future_tokens(scale, norm):
    m, g = _model(scale, norm), torch.Generator().manual_seed(1)
    for t in (0, 5, 10):
        assert lm_causality_gap(m, _ids(), t, generator=g) == 0.0
    # without the mask the same perturbation does change earlier outputs (the check can fail)
    assert lm_causality_gap(m, _ids(), 5, generator=g, causal=False) > 1e-3


@pytest.mark.parametrize("scale", ["standard", "entropy"])
def test_unilm_mask_source_ignores_target(scale):
    m, g = _model(scale), torch.Generator().manual_seed(2)
    for src in (1, 4, 11):
        seg = torch.tensor([[0] * src + [1] * (12 - src)])
        assert unilm_source_gap(m, _ids(), seg, generator=g) == 0.0
    seg = torch.tensor([[0] * 4 + [1] * 8])
    assert unilm_source_gap(m, _ids(), seg, generator=g, use_unilm_mask=False) > 1e-3


@pytest.mark.parametrize("scale", ["standard", "entropy"])
def test_plm_mask_and_reorder_give_same_loglik(scale):
    m = _model(scale)
    ids = _ids(2, 6)
    order = torch.tensor(PLM_ORDER)
    a, b = plm_loglik_mask(m, ids, order), plm_loglik_reorder(m, ids, order)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # a wrong implementation (reordered tokens, fresh positions) differs
    assert (a - plm_loglik_reorder(m, ids, order, keep_positions=False)).abs().max() > 1e-4
    # a longer random order, fp32
    m32 = _model(scale, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    ids = _ids(3, 40, seed=4)
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(39, generator=g)])
    torch.testing.assert_close(plm_loglik_mask(m32, ids, order), plm_loglik_reorder(m32, ids, order),
                               rtol=1e-5, atol=1e-4)


def test_unilm_cumsum_equals_product_form():
    cases, bad = unilm_forms_mismatches(10)
    assert cases == sum(L + 1 for L in range(1, 11)) and bad == 0
    # the article's example rows
    m = unilm_product_mask(torch.tensor([UNILM_SEGMENTS]))[0, 0].int()
    assert m[0].tolist() == [1] * 6 + [0] * 4
    assert m[6].tolist() == [1] * 7 + [0] * 3 and m[9].tolist() == [1] * 10


def test_checks_hold_on_a_briefly_trained_model():
    torch.manual_seed(0)
    m = Transformer(30, dim=32, depth=2, heads=4)
    stream = TokenStream([torch.randint(5, 30, (2000,), generator=torch.Generator().manual_seed(0))])
    vocab = type("V", (), {"vocab_size": 30, "mask_id": 4, "special_ids": (0, 1, 2, 3, 4)})()
    train_mlm(m, stream, vocab, steps=20, batch_size=8, seq_len=32, lr=3e-3, progress=False)
    g = torch.Generator().manual_seed(5)
    ids = _ids(2, 24)
    assert lm_causality_gap(m, ids, 11, generator=g) <= 1e-6
    assert unilm_source_gap(m, ids, torch.tensor([[0] * 9 + [1] * 15]), generator=g) <= 1e-6
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(23, generator=g)])
    torch.testing.assert_close(plm_loglik_mask(m, ids, order), plm_loglik_reorder(m, ids, order),
                               rtol=1e-5, atol=1e-4)


def test_every_mask_of_the_figure_is_a_rank_comparison():
    from kexue.studies.masks import rank_forms

    rows = rank_forms()
    assert [r[0] for r in rows] == ["LM", "MLM", "UniLM", "permutation LM"]
    assert all(r[2] == 0 for r in rows)
    assert rows[2][1] == "0 0 0 0 0 0 1 2 3 4"            # the cumsum of 0000001111
    assert rows[3][1] == "0 5 2 4 1 3"                    # <s> first, bei (position 1) last
