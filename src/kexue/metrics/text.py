"""Text-generation metrics: ROUGE-1/2/L F1 and BLEU, for English words and Chinese characters.

* :func:`rouge` wraps Google's ``rouge-score`` package (the standard count-based ROUGE-N and the LCS-based
  ROUGE-L). For English it uses the package's own tokenizer (lower-cased alphanumeric words); for Chinese it passes
  :class:`CharRougeTokenizer` (one token per non-space character), because the package's default tokenizer replaces
  every character outside ``[a-z0-9]`` by a space and scores any Chinese text 0.
* :func:`bleu` wraps ``sacrebleu`` corpus BLEU, with its ``"zh"`` tokenizer for Chinese (its default ``"13a"``
  leaves a Chinese sentence as one token).

Both packages are in kexue's ``bert`` extra (``pip install "kexue[bert]"``) and imported when first used.

Example:
    >>> r = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    >>> round(r["rouge1"], 4), round(r["rougeL"], 4)
    (0.8333, 0.8333)
    >>> round(rouge(["基于深度学习的文本摘要研究"], ["基于深度学习的中文文本摘要方法研究"], lang="zh")["rougeL"], 4)
    0.8667
"""

from __future__ import annotations

from collections.abc import Sequence

from kexue._checks import check_choice

LANGS = ("en", "zh")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class CharRougeTokenizer:
    """A ``rouge-score`` tokenizer that makes every non-whitespace character a token (Chinese ROUGE is computed on
    characters). Latin letters are lower-cased, so mixed text such as ``基于BERT的`` compares case-insensitively.

    Example:
        >>> CharRougeTokenizer().tokenize("基于 BERT 的")
        ['基', '于', 'b', 'e', 'r', 't', '的']
    """

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def _check_texts(hyps: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("hyps and refs must be sequences of strings (wrap a single text in a list)")
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
    if not hyps:
        raise ValueError("hyps and refs must not be empty")
    for name, xs in (("hyps", hyps), ("refs", refs)):
        for x in xs:
            if not isinstance(x, str):
                raise TypeError(f"{name} must hold strings, got {type(x).__name__}")
    return hyps, refs


def rouge(hyps: Sequence[str], refs: Sequence[str], *, lang: str = "en", stemmer: bool = False,
          types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """Mean ROUGE F1 (0..1) of each hypothesis against its reference: ``{"rouge1", "rouge2", "rougeL"}``.

    ``lang="en"``: words, as ``rouge-score`` tokenizes them (lower case, ``[a-z0-9]+``; ``stemmer=True`` adds its
    Porter stemmer). ``lang="zh"``: characters (:class:`CharRougeTokenizer`). ROUGE-L is the sentence-level LCS F1.
    An empty hypothesis scores 0.

    Example:
        >>> rouge(["a b c d"], ["a b x d"])["rouge2"]
        0.3333333333333333
    """
    check_choice("lang", lang, LANGS)
    types = list(types)
    for t in types:
        check_choice("types", t, ROUGE_TYPES)
    hyps, refs = _check_texts(hyps, refs)
    from rouge_score import rouge_scorer

    tok = CharRougeTokenizer() if lang == "zh" else None
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=stemmer and lang == "en", tokenizer=tok)
    sums = dict.fromkeys(types, 0.0)
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)          # (target, prediction)
        for t in types:
            sums[t] += s[t].fmeasure
    return {t: v / len(hyps) for t, v in sums.items()}


def bleu(hyps: Sequence[str], refs: Sequence[str], *, lang: str = "en") -> float:
    """Corpus BLEU (0..100) with ``sacrebleu`` (one reference per hypothesis; ``tokenize="zh"`` for Chinese,
    ``"13a"`` for English).

    Example:
        >>> round(bleu(["基于深度学习的文本摘要研究"], ["基于深度学习的中文文本摘要方法研究"], lang="zh"), 2)
        52.75
    """
    check_choice("lang", lang, LANGS)
    hyps, refs = _check_texts(hyps, refs)
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh" if lang == "zh" else "13a").score)


def text_metrics(hyps: Sequence[str], refs: Sequence[str], *, lang: str = "en") -> dict[str, float]:
    """ROUGE-1/2/L F1 (:func:`rouge`) and BLEU (:func:`bleu`) in one dict.

    Example:
        >>> sorted(text_metrics(["a b"], ["a b"]))
        ['bleu', 'rouge1', 'rouge2', 'rougeL']
    """
    out = rouge(hyps, refs, lang=lang)
    out["bleu"] = bleu(hyps, refs, lang=lang)
    return out


__all__ = ["LANGS", "ROUGE_TYPES", "CharRougeTokenizer", "bleu", "rouge", "text_metrics"]
