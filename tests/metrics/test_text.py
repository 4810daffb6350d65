"""kexue.metrics.text: ROUGE-1/2/L F1 and BLEU on hand-computed cases, English words and Chinese characters."""

from __future__ import annotations

import pytest

from kexue.metrics.text import CharRougeTokenizer, bleu, rouge, text_metrics

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")


def test_english_word_level_by_hand():
    # hyp: the cat sat on the mat / ref: the cat is on the mat
    # unigrams: 5 of 6 match (the x2, cat, on, mat) -> P = R = F = 5/6
    # bigrams: the-cat, on-the, the-mat match, 3 of 5 -> 3/5; LCS "the cat on the mat" = 5 -> 5/6
    r = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert r["rouge1"] == pytest.approx(5 / 6) and r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)
    # different lengths: hyp "a b c d" / ref "a b x d": R-1 3/4, R-2 1/3 (ab), LCS a b d = 3 -> 3/4
    r = rouge(["A b c d"], ["a b x d"])
    assert (r["rouge1"], r["rouge2"], r["rougeL"]) == pytest.approx((0.75, 1 / 3, 0.75))
    # P != R: hyp "a b" / ref "a b c d": R-1 P = 1, R = 1/2 -> F = 2/3
    assert rouge(["a b"], ["a b c d"])["rouge1"] == pytest.approx(2 / 3)
    # means over pairs; an empty hypothesis scores 0
    assert rouge(["a b", ""], ["a b", "c"])["rougeL"] == pytest.approx(0.5)
    assert rouge(["running cats"], ["run cat"])["rouge1"] == 0.0
    assert rouge(["running cats"], ["run cat"], stemmer=True)["rouge1"] == pytest.approx(1.0)


def test_chinese_character_level_by_hand():
    ref, hyp = "基于深度学习的中文文本摘要方法研究", "基于深度学习的文本摘要研究"      # 17 and 13 characters
    r = rouge([hyp], [ref], lang="zh")
    # 13 matches -> P = 1, R = 13/17 -> F = 26/30; R-2: 10 matching bigrams of 12 and 16 -> 2*10/28;
    # R-L: LCS = 13 (all of hyp, in order) -> 26/30
    assert r["rouge1"] == pytest.approx(26 / 30) and r["rouge2"] == pytest.approx(20 / 28)
    assert r["rougeL"] == pytest.approx(26 / 30)
    # rouge-score's own tokenizer drops every CJK character: that is why lang="zh" exists
    assert rouge([hyp], [ref], lang="en")["rouge1"] == 0.0
    assert CharRougeTokenizer().tokenize("基于 BERT") == ["基", "于", "b", "e", "r", "t"]
    assert rouge(["基于BERT的方法"], ["基于bert的方法"], lang="zh")["rougeL"] == pytest.approx(1.0)


def test_bleu():
    # the published value for this pair with sacrebleu's zh tokenizer (reference/offline-resources.md, section C)
    b = bleu(["基于深度学习的文本摘要研究"], ["基于深度学习的中文文本摘要方法研究"], lang="zh")
    assert b == pytest.approx(52.75, abs=0.01)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)
    assert set(text_metrics(["a"], ["a"])) == {"rouge1", "rouge2", "rougeL", "bleu"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        rouge(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="sequences of strings"):
        rouge("a", "a")
    with pytest.raises(ValueError, match="lang"):
        rouge(["a"], ["a"], lang="fr")
    with pytest.raises(ValueError, match="not be empty"):
        bleu([], [])
    with pytest.raises(TypeError, match="hold strings"):
        rouge([1], ["a"])
