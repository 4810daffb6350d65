"""Mask predicates and builders (kexue.fm/archives/6933) against brute-force references."""

from __future__ import annotations

import torch

from kexue.attention import unilm_mask


def test_unilm_article_example():
    # [CLS] 你 想 吃 啥 [SEP] 白 切 鸡 [SEP], s = 0000001111
    s = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    rows = ["".join(str(int(x)) for x in r) for r in unilm_mask(s)[0, 0]]
    assert rows[:6] == ["1111110000"] * 6
    assert rows[6:] == ["1111111000", "1111111100", "1111111110", "1111111111"]
