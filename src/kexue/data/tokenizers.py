"""Character-level tokenizer for the MLM and seq2seq corpora (Chinese novels, Shakespeare, speeches).

One character is one token. The vocabulary is built from a corpus with a minimum count (the 2019 UniLM
code of kexue.fm/archives/6933 used ``min_count=32`` on THUCNews); rarer characters map to ``[UNK]``.
The five special tokens come first, in this order: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``.

Example:
    >>> tok = CharTokenizer.from_corpus(["hello world"], min_count=1)
    >>> tok.decode(tok.encode("hello"))
    'hello'
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kexue._io import atomic_write

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class CharTokenizer:
    """A character vocabulary with the BERT special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``.

    Build it with :meth:`from_corpus`; ``encode`` maps text to ids (unknown characters to ``[UNK]``),
    ``encode_tensor`` does the same for long texts in one vectorised pass, ``decode`` maps back.
    ``save``/``load`` write and read a JSON file (written atomically).

    Example:
        >>> tok = CharTokenizer.from_corpus(["abcab"], min_count=2)
        >>> tok.tokens[5:]
        ['a', 'b']
        >>> tok.encode("abc") == [5, 6, tok.unk_id]
        True
    """

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not contain duplicates")
        self.tokens: list[str] = list(SPECIAL_TOKENS) + chars
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(len(SPECIAL_TOKENS))
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_corpus(cls, texts: str | Iterable[str], min_count: int = 1,
                    max_vocab: int | None = None) -> CharTokenizer:
        """Build the vocabulary from ``texts``: characters seen at least ``min_count`` times, most frequent
        first (ties by code point), at most ``max_vocab`` of them (special tokens not counted).

        Example:
            >>> CharTokenizer.from_corpus("aab", min_count=1).tokens[5:]
            ['a', 'b']
        """
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
        if max_vocab is not None and (not isinstance(max_vocab, int) or max_vocab < 1):
            raise ValueError(f"max_vocab must be None or an integer >= 1, got {max_vocab!r}")
        if isinstance(texts, str):
            texts = [texts]
        counts: Counter[str] = Counter()
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
            counts.update(t)
        chars = [c for c, n in counts.items() if n >= min_count and c not in SPECIAL_TOKENS]
        chars.sort(key=lambda c: (-counts[c], ord(c)))
        if max_vocab is not None:
            chars = chars[:max_vocab]
        return cls(chars)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return len(self.tokens)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (always ``0..4``)."""
        return tuple(range(len(SPECIAL_TOKENS)))

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Map ``text`` to ids, one per character; with ``add_special_tokens`` wrap it in ``[CLS] ... [SEP]``.

        Example:
            >>> tok = CharTokenizer(["x"])
            >>> tok.encode("xy", add_special_tokens=True)
            [2, 5, 1, 3]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        get, unk = self.token_to_id.get, self.unk_id
        ids = [get(c, unk) for c in text]
        if add_special_tokens:
            ids = [self.cls_id, *ids, self.sep_id]
        return ids

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Map a list of tokens (characters or special tokens such as ``"[CLS]"``) to ids.

        Example:
            >>> CharTokenizer(["a"]).convert_tokens_to_ids(["[CLS]", "a", "[SEP]"])
            [2, 5, 3]
        """
        return [self.token_to_id.get(t, self.unk_id) for t in tokens]

    def encode_tensor(self, text: str) -> torch.Tensor:
        """Encode a long text to an ``int64`` tensor in one vectorised pass (no special tokens added); the ids
        are those of :meth:`encode`, also for a lone surrogate (``[UNK]`` unless it is in the vocabulary).

        Example:
            >>> CharTokenizer(["a", "b"]).encode_tensor("abz").tolist()
            [5, 6, 1]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            return torch.zeros(0, dtype=torch.long)
        if self._lookup is None:
            chars = self.tokens[len(SPECIAL_TOKENS):]
            cps = np.array([ord(c) for c in chars], dtype=np.int64)
            order = np.argsort(cps)
            self._lookup = (cps[order], order + len(SPECIAL_TOKENS))
        keys, vals = self._lookup
        # (surrogatepass: a lone surrogate such as "\ud800" is one code point here, as it is one character to
        # encode; it is then looked up like any other)
        cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)
        if keys.size == 0:
            return torch.full((cp.size,), self.unk_id, dtype=torch.long)
        pos = np.clip(np.searchsorted(keys, cp), 0, keys.size - 1)
        out = np.where(keys[pos] == cp, vals[pos], self.unk_id)
        return torch.from_numpy(out.astype(np.int64))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Map ids back to text; special tokens are dropped unless ``skip_special_tokens=False``.

        Example:
            >>> tok = CharTokenizer(["h", "i"])
            >>> tok.decode([2, 5, 6, 3]), tok.decode([5, 4], skip_special_tokens=False)
            ('hi', 'h[MASK]')
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        n_special, out = len(SPECIAL_TOKENS), []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be integers in [0, {self.vocab_size}), got {i!r}")
            if i < n_special and skip_special_tokens:
                continue
            out.append(self.tokens[i])
        return "".join(out)

    # -- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "CharTokenizer", "special_tokens": list(SPECIAL_TOKENS),
                "chars": self.tokens[len(SPECIAL_TOKENS):]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary to a JSON file atomically (temporary file, then ``os.replace``).

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "vocab.json")
            >>> CharTokenizer(["a"]).save(p); CharTokenizer.load(p).tokens[-1]
            'a'
        """
        text = json.dumps(self.to_dict(), ensure_ascii=False)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:      # a lone surrogate has no UTF-8 form: write ASCII with \u escapes
            data = json.dumps(self.to_dict()).encode("ascii")
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("type") != "CharTokenizer" or "chars" not in d:
            raise ValueError(f"{path} is not a CharTokenizer JSON file")
        if list(d.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise ValueError(f"{path} has special tokens {d.get('special_tokens')}, expected {SPECIAL_TOKENS}")
        return cls(d["chars"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


__all__ = ["SPECIAL_TOKENS", "CharTokenizer"]
