"""A small Transformer encoder with rotary positions, pluggable attention and a tied MLM head.

It is the model behind the mask study (kexue.fm/archives/6933: LM, MLM, UniLM and permutation LM are the
same network under different attention masks) and the entropy-invariant scale study
(kexue.fm/archives/8823: ``softmax(log_512(n)/sqrt(d) * QK^T)``, "Attention-E").

**The attention interface.** A block never computes attention itself. It projects the input to
``q, k, v`` of shape ``[B, H, L, D]``, rotates ``q`` and ``k`` with RoPE, and calls its attention module::

    out = attn(q, k, v, mask=prepared_mask, cache=layer_cache)   # -> [B, H, L_q, D_v]

* ``mask`` is a :class:`~kexue.attention.PreparedMask`, made once per forward by the model
  (:func:`~kexue.attention.prepare_mask`) and shared by every layer: the padding, the causal flag and any other
  mask, with their additive form and per-row key counts worked out once. A softmax attention hands it to
  :func:`kexue.attention.attention`; a linear attention reads ``mask.is_causal`` and ``mask.key_padding``;
* ``cache`` is None, or this layer's entry of a :class:`TransformerCache` for incremental decoding: the object
  the attention module made with its ``new_cache()`` method (a :class:`KVCache` of past keys and values when it
  has none; a linear attention keeps a recurrent state). The module appends the new keys/values (or advances its
  state) and attends over everything seen so far; earlier positions never change under a causal or UniLM mask,
  so decoding with a cache equals recomputing the whole sequence;
* the module may define ``entropy(q, k, *, mask) -> [B, H, L_q]`` (nats per query row), which
  :class:`Transformer` calls for ``return_entropy=True``, and ``new_cache() -> object`` (see above; the object
  must have ``reorder(index)`` for beam search).

Pass one module shared by all layers as ``attention=``, or a factory ``attention_factory(layer_index)`` that
builds one per layer (needed when the attention has its own parameters). The default is
:class:`SoftmaxAttention`: :func:`kexue.attention.attention` with ``scale="standard"`` (1/sqrt(d), Attention-O)
or ``scale="entropy"`` (Attention-E, per-row n = number of visible keys, floored at 16).

Example:
    >>> import torch
    >>> model = Transformer(vocab_size=50, dim=32, depth=2, heads=4, attention_scale="entropy")
    >>> out = model(torch.randint(0, 50, (2, 10)))
    >>> out.hidden.shape, out.logits.shape
    (torch.Size([2, 10, 32]), torch.Size([2, 10, 50]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from kexue._checks import check_choice, check_positive, check_tensor, compute_dtype
from kexue.attention import BASE, MIN_N, LogNScale, PreparedMask, attention, attention_entropy, prepare_mask
from kexue.attention.scaling import check_scale

ATTENTION_SCALES = ("standard", "entropy", "learnable")
ATTENTION_BACKENDS = ("sdpa", "fused")      # the default attention's kernel, by name (see SoftmaxAttention)
NORMS = ("pre", "post")


@runtime_checkable
class AttentionModule(Protocol):
    """What a block calls: ``attn(q, k, v, *, mask, cache=None) -> [B, H, L_q, D_v]`` (see the module docstring).

    ``q, k, v`` are ``[B, H, L, D]`` (``q``/``k`` already rotated); ``mask`` is a
    :class:`~kexue.attention.PreparedMask`; ``cache`` is None or the object this module's ``new_cache()`` made.
    Optional methods: ``entropy(q, k, *, mask) -> [B, H, L_q]`` and ``new_cache() -> object``.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: PreparedMask,
                 cache: object | None = None) -> torch.Tensor: ...


class KVCache:
    """One layer's keys and values of the tokens seen so far (incremental decoding).

    :meth:`update` appends the new ``k``, ``v`` (``[B, H, L_new, D]``) and returns all of them; :meth:`reorder`
    picks batch rows (beam search keeps the rows of the surviving beams).

    Example:
        >>> c = KVCache()
        >>> k, v = c.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
        >>> k, v = c.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
        >>> k.shape, len(c)
        (torch.Size([1, 2, 4, 4]), 4)
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
                raise ValueError(f"new keys {tuple(k.shape)} do not match the cached {tuple(self.k.shape)}")
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class TransformerCache:
    """The per-layer caches of a :class:`Transformer` and the number of tokens they hold (``length``); made by
    :meth:`Transformer.new_cache`, passed to ``forward(..., cache=...)``, which appends to it."""

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (``[B']`` int64) in every layer (beam search)."""
        check_tensor("index", index, floating=False, dim=1)
        for c in self.layers:
            c.reorder(index)


# ------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ------------------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, L, D]`` by its positions (RoPE, Su et al. 2021; kexue.fm/archives/8265).

    Channel pairs ``(i, i + D/2)`` are rotated by angle ``pos * base^(-2i/D)``, so that
    ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only. ``position_ids`` is ``[L]``, ``[1, L]`` or
    ``[B, L]`` (``B`` = the batch of ``x``) and may be any integers (e.g. the original positions of a
    permuted sequence). Computed in fp32 (fp64 for fp64 input), returned in ``x.dtype``.

    Example:
        >>> q = torch.randn(1, 1, 4, 8)
        >>> apply_rope(q, torch.arange(4)).shape
        torch.Size([1, 1, 4, 8])
    """
    check_tensor("x", x, floating=True, dim=4)
    check_tensor("position_ids", position_ids)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x must have an even head dimension for RoPE, got {d}")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != x.shape[2]:
        raise ValueError(f"position_ids must be [L] or [B, L] with L={x.shape[2]}, got {tuple(position_ids.shape)}")
    if position_ids.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"position_ids must be [L], [1, L] or [B, L] with B={x.shape[0]} (the batch of x), got "
                         f"{tuple(position_ids.shape)}")
    half = d // 2
    cdt = compute_dtype(x.dtype)
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=cdt) / half)
    ang = position_ids.to(device=x.device, dtype=cdt)[..., None] * inv_freq  # [B, L, half]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [B, 1, L, half]
    xf = x.to(cdt)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------------
# Default attention: softmax attention with the standard or entropy-invariant scale
# ------------------------------------------------------------------------------------------------------
class SoftmaxAttention(nn.Module):
    """Softmax attention (:func:`kexue.attention.attention`) with ``scale="standard"`` (1/sqrt(d), "Attention-O"),
    ``"entropy"`` (``log_base(n)/sqrt(d)`` with ``n`` the number of keys a row may see, floored at ``min_n``;
    "Attention-E" of kexue.fm/archives/8823), a fixed float, or a :class:`~kexue.attention.LogNScale` module
    (kept as a submodule, so a learnable per-head factor trains with the model; its own ``base`` and ``min_n``
    apply). ``backend`` names the kernel (``"sdpa"``; ``"fused"`` is the experimental Triton kernel of
    :mod:`kexue.attention.kernels`, CUDA only, for masks made of ranks, padding and the causal flag). With a
    cache it keeps the past keys and values in a :class:`KVCache`.

    Example:
        >>> attn = SoftmaxAttention("entropy")
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> from kexue.attention import prepare_mask
        >>> pm = prepare_mask(q_len=8)
        >>> attn(q, k, v, mask=pm).shape, attn.entropy(q, k, mask=pm).shape
        (torch.Size([1, 2, 8, 16]), torch.Size([1, 2, 8]))
    """

    def __init__(self, scale: str | float | LogNScale = "standard", *, min_n: float = MIN_N, base: float = BASE,
                 backend: str = "sdpa") -> None:
        super().__init__()
        check_scale(scale, min_n=min_n, base=base)
        if isinstance(scale, torch.Tensor) or (callable(scale) and not isinstance(scale, LogNScale)):
            raise TypeError("scale must be 'standard', 'entropy', a positive float or a LogNScale")
        check_choice("backend", backend, ATTENTION_BACKENDS)
        self.scale, self.min_n, self.base, self.backend = scale, min_n, base, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: PreparedMask | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            k, v = cache.update(k, v)
        return attention(q, k, v, mask, scale=self.scale, min_n=self.min_n, base=self.base, backend=self.backend)

    def entropy(self, q: torch.Tensor, k: torch.Tensor, *, mask: PreparedMask | None = None) -> torch.Tensor:
        """Per-row attention entropy in nats, ``[B, H, L_q]``, under the same scale and mask."""
        return attention_entropy(q, k, mask, scale=self.scale, min_n=self.min_n, base=self.base)

    def new_cache(self) -> KVCache:
        return KVCache()

    def extra_repr(self) -> str:
        tail = "" if self.backend == "sdpa" else f"backend={self.backend!r}"
        if isinstance(self.scale, LogNScale):
            return tail                      # the LogNScale child module prints its own settings
        return f"scale={self.scale!r}, min_n={self.min_n}, base={self.base}" + (f", {tail}" if tail else "")


ATTENTION_NAMES = ("linear",)


def named_attention_factory(name: str, *, head_dim: int, feature_map: str | None = None,
                            num_features: int | None = None) -> Callable[[int], nn.Module]:
    """``factory(layer_index)`` for ``Transformer(attention=name)``: ``"linear"`` gives a new
    :class:`~kexue.attention.LinearAttention` (``feature_map``, default ``"exp"``; ``num_features``) per layer.

    Example:
        >>> named_attention_factory("linear", head_dim=8, feature_map="elu1")(0)
        LinearAttention(
          chunk_size=64
          (feature_map): Elu1FeatureMap()
        )
    """
    check_choice("attention", name, ATTENTION_NAMES)
    from kexue.attention import FEATURE_MAPS, LinearAttention

    fm = "exp" if feature_map is None else feature_map
    check_choice("feature_map", fm, FEATURE_MAPS)
    if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                     or num_features < 1):
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    return lambda i: LinearAttention(fm, head_dim=head_dim, num_features=num_features)


def _check_sizes(dim: int, heads: int, mlp_ratio: float) -> int:
    """Check a block's sizes; returns the MLP's hidden width ``int(dim * mlp_ratio)``, which must be >= 1."""
    for name, val in (("dim", dim), ("heads", heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    check_positive("mlp_ratio", mlp_ratio)
    hidden = int(dim * mlp_ratio)
    if hidden < 1:
        raise ValueError(f"mlp_ratio must give an MLP hidden width int(dim * mlp_ratio) >= 1, got mlp_ratio="
                         f"{mlp_ratio} with dim={dim}")
    return hidden


def _check_qk_dim(qk_dim: object, head_dim: int, name: str = "qk_dim") -> int:
    if qk_dim is None:
        return head_dim
    if isinstance(qk_dim, bool) or not isinstance(qk_dim, int) or qk_dim < 2 or qk_dim % 2:
        raise ValueError(f"{name} must be a positive even integer (the q/k width per head: RoPE rotates q and k in "
                         f"pairs), got {qk_dim!r}")
    return qk_dim


# ------------------------------------------------------------------------------------------------------
# Blocks and model
# ------------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    """One encoder block: multi-head self-attention (through a pluggable attention module) and an MLP, with pre-LN
    (``x + f(LN(x))``) or post-LN (``LN(x + f(x))``) residuals. ``qk_dim`` (even; default ``dim // heads``) is the
    per-head width of q and k, which may differ from that of the values.

    Example:
        >>> from kexue.attention import prepare_mask
        >>> blk = TransformerBlock(32, 4, attention=SoftmaxAttention())
        >>> blk(torch.randn(2, 5, 32), torch.arange(5), mask=prepare_mask(q_len=5))[0].shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, heads: int, *, attention: Callable[..., torch.Tensor], mlp_ratio: float = 4.0,
                 norm: str = "pre", dropout: float = 0.0, rope_base: float = 10000.0, qk_dim: int | None = None
                 ) -> None:
        super().__init__()
        hidden = _check_sizes(dim, heads, mlp_ratio)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        check_choice("norm", norm, NORMS)
        self.dim, self.heads, self.head_dim, self.norm, self.rope_base = dim, heads, dim // heads, norm, rope_base
        self.qk_dim = _check_qk_dim(qk_dim, dim // heads)
        self.attn = attention
        self.qkv = nn.Linear(dim, 2 * heads * self.qk_dim + dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _attend(self, x: torch.Tensor, position_ids: torch.Tensor, mask: PreparedMask, cache: object | None,
                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = x.shape
        if self.qk_dim == self.head_dim:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:                                       # q/k of their own width (e.g. linear attention's m)
            w = self.heads * self.qk_dim
            q, k, v = self.qkv(x).split([w, w, self.dim], dim=-1)
            q, k = (t.view(b, n, self.heads, self.qk_dim).transpose(1, 2) for t in (q, k))
            v = v.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, position_ids, base=self.rope_base)
        k = apply_rope(k, position_ids, base=self.rope_base)
        ent = None
        if want_entropy:
            fn = getattr(self.attn, "entropy", None)
            if fn is None:
                raise ValueError("return_entropy=True needs an attention module with an entropy(q, k, *, mask) "
                                 "method")
            with torch.no_grad():
                ent = fn(q, k, mask=mask)
        out = self.attn(q, k, v, mask=mask, cache=cache)
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        return self.drop(self.proj(out)), ent

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *, mask: PreparedMask,
                cache: object | None = None, return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.norm == "pre":
            a, ent = self._attend(self.ln1(x), position_ids, mask, cache, return_entropy)
            x = x + a
            x = x + self.drop(self.mlp(self.ln2(x)))
        else:
            a, ent = self._attend(x, position_ids, mask, cache, return_entropy)
            x = self.ln1(x + a)
            x = self.ln2(x + self.drop(self.mlp(x)))
        return x, ent


@dataclass
class TransformerOutput:
    """``hidden`` ``[B, L, dim]``, ``logits`` ``[B, L, vocab]`` (MLM head, tied to the embeddings) and, when
    asked, ``entropies``: one ``[B, H, L]`` tensor of per-row attention entropies (nats) per layer."""

    hidden: torch.Tensor
    logits: torch.Tensor
    entropies: list[torch.Tensor] | None = None


# a pytree node, so that torch.export can trace a model returning it (and rebuild it from the exported outputs)
torch.export.register_dataclass(TransformerOutput, serialized_type_name="kexue.nn.TransformerOutput")


def prepare_model_mask(batch: int, q_len: int, device: torch.device, *, heads: int,
                       attention_mask: torch.Tensor | None = None, mask: object = None, is_causal: bool = False,
                       past: int = 0) -> PreparedMask:
    """The mask a model's blocks share for ``q_len`` new tokens after ``past`` cached ones: ``mask`` (a bool
    tensor -- 3-D read as ``[B, L, K]`` -- or anything :func:`~kexue.attention.prepare_mask` takes), the padding
    of ``attention_mask`` (``[B, past + q_len]``, 1 = token) and the causal flag, right-aligned after ``past``.

    Example:
        >>> pm = prepare_model_mask(1, 2, torch.device("cpu"), heads=2, is_causal=True, past=3)
        >>> pm.counts()[0, 0, :, 0].tolist()
        [4, 5]
    """
    k_len = past + q_len
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend) or a RankMask, got {mask.dtype}")
        if mask.dim() == 3:
            if mask.shape[0] not in (1, batch) or tuple(mask.shape[1:]) != (q_len, k_len):
                raise ValueError(f"mask with 3 dimensions must be [B, L, K] (one mask per batch item) or "
                                 f"[1, L, K] with B={batch}, L={q_len}, K={k_len}, got {tuple(mask.shape)}")
            mask = mask[:, None]
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, dim=2)
        if tuple(attention_mask.shape) != (batch, k_len):
            raise ValueError(f"attention_mask must be [B, K]=[{batch}, {k_len}] (cached and new tokens), got "
                             f"{tuple(attention_mask.shape)}")
    return prepare_mask(mask, q_len=q_len, k_len=k_len, batch=batch, heads=heads, attention_mask=attention_mask,
                        is_causal=is_causal, causal_offset=past, device=device)


class Transformer(nn.Module):
    """Transformer encoder with RoPE, pre-/post-LN, pluggable attention and an MLM head tied to the token
    embeddings. No absolute positions, so it runs at any sequence length.

    Args (all but ``vocab_size`` keyword-only):
        vocab_size: number of tokens.
        dim, depth, heads, mlp_ratio: width, number of blocks, attention heads, MLP expansion.
        norm: ``"pre"`` (default) or ``"post"`` (BERT-style, with a LayerNorm on the embeddings).
        attention_scale: ``"standard"`` (Attention-O), ``"entropy"`` (Attention-E, kexue.fm/archives/8823)
            or ``"learnable"`` (beyond the article: a per-head factor ``s_h * log_base(n)`` per layer,
            :class:`~kexue.attention.LogNScale` with ``learnable=True``, starting at Attention-E) for the
            default :class:`SoftmaxAttention`; ``min_n`` and ``base`` (the log's base) tune the latter two.
        attention_backend: the default attention's kernel, ``"sdpa"`` or the experimental ``"fused"``
            (:class:`SoftmaxAttention`).
        attention: one attention module shared by every block (see the module docstring for the protocol);
            overrides ``attention_scale``. Its own layers keep their initialisation. Or a name:
            ``"linear"`` builds one :class:`~kexue.attention.LinearAttention` per block (article 5) with
            ``feature_map`` (``"exp"``, the default, ``"elu1"``, ``"relu"``, ``"favor"``, ``"favor_hyp"``) and
            ``num_features`` (``m``; the random maps draw from torch's global RNG). With ``"exp"`` and
            ``num_features=m`` the projection to ``m`` dims is merged into the blocks' q/k layers, as the article
            has it: they output ``m`` dims per head (``qk_dim=m``) and ``e^x`` is applied to them directly.
        qk_dim: width of q and k per head (even; default ``dim // heads``), the values keep ``dim // heads``.
        attention_factory: ``f(layer_index) -> attention`` to build one attention module per block.
        rope_base: RoPE frequency base. dropout: dropout on residual branches.

    ``forward(input_ids, *, position_ids=None, attention_mask=None, mask=None, is_causal=False, cache=None,
    return_entropy=False, logits_positions=None)``: ``input_ids`` is an int64 or int32 tensor ``[B, L]``;
    ``position_ids`` default to ``past..past+L-1`` (``past`` = tokens already in ``cache``; pass the original
    positions for a permutation LM); ``attention_mask`` ``[B, past + L]`` marks real tokens (1) vs padding (0);
    ``mask`` is a boolean attention mask (``True`` = may attend) that broadcasts to ``[B, H, L, past + L]``, e.g.
    ``[B, 1, L, L]`` from :func:`kexue.attention.unilm_mask`, or a :class:`~kexue.attention.RankMask`. One exception
    to plain broadcasting: a **3-D** mask is ``[B, L, K]`` (one mask per batch item, shared by the heads; the
    Hugging Face convention), read as ``[B, 1, L, K]``. ``is_causal`` adds the LM mask (right-aligned with the
    cache: a new token sees every earlier one). ``cache`` (from :meth:`new_cache`) decodes incrementally: the
    keys/values (or recurrent state) of earlier calls are reused and the new tokens appended.
    ``logits_positions`` (bool ``[B, L]``) computes the MLM logits only there and returns them as ``[N, vocab]``
    (cheap MLM training with a large vocabulary). The mask is prepared once per forward
    (:func:`kexue.attention.prepare_mask`) and shared by the blocks.

    Example:
        >>> m = Transformer(30, dim=32, depth=1, heads=2, norm="post")
        >>> ids = torch.randint(0, 30, (1, 7))
        >>> m(ids, is_causal=True).logits.shape
        torch.Size([1, 7, 30])
    """

    def __init__(self, vocab_size: int, *, dim: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 norm: str = "pre", attention_scale: str = "standard", attention: Callable | str | None = None,
                 attention_factory: Callable[[int], Callable] | None = None, min_n: float = MIN_N,
                 base: float = BASE, rope_base: float = 10000.0, dropout: float = 0.0,
                 attention_backend: str = "sdpa", feature_map: str | None = None,
                 num_features: int | None = None, qk_dim: int | None = None) -> None:
        super().__init__()
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        for name, val in (("vocab_size", vocab_size), ("depth", depth)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        _check_sizes(dim, heads, mlp_ratio)
        check_choice("norm", norm, NORMS)
        check_choice("attention_scale", attention_scale, ATTENTION_SCALES)
        check_scale("standard", min_n=min_n, base=base)
        check_positive("rope_base", rope_base)
        check_positive("dropout", dropout, allow_zero=True)
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim / heads must be an even integer (RoPE), got dim={dim}, heads={heads}")
        qk_dim = _check_qk_dim(qk_dim, dim // heads) if qk_dim is not None else None
        if isinstance(attention, str):          # a named attention: one module per layer from its factory
            if attention_factory is not None:
                raise ValueError("pass at most one of attention and attention_factory")
            if attention in ATTENTION_NAMES and (feature_map or "exp") == "exp" and num_features is not None:
                # the article's form: e^x on q/k that the blocks' own q/k layers project to m dims per head
                if qk_dim is not None and qk_dim != num_features:
                    raise ValueError(f"attention='linear' with the exp map projects q/k to num_features="
                                     f"{num_features} dims per head; qk_dim={qk_dim} contradicts it")
                qk_dim = _check_qk_dim(num_features, dim // heads, "num_features (with the exp map)")
                num_features = None
            attention_factory = named_attention_factory(attention, head_dim=qk_dim or dim // heads,
                                                        feature_map=feature_map, num_features=num_features)
            attention = None
        elif feature_map is not None or num_features is not None:
            raise ValueError("feature_map and num_features are options of attention='linear'")
        if attention is not None and attention_factory is not None:
            raise ValueError("pass at most one of attention and attention_factory")
        if attention is not None and not callable(attention):
            raise TypeError(f"attention must be callable, got {type(attention).__name__}")
        if attention_factory is not None and not callable(attention_factory):
            raise TypeError(f"attention_factory must be callable, got {type(attention_factory).__name__}")
        self.vocab_size, self.dim, self.depth, self.heads, self.norm = vocab_size, dim, depth, heads, norm
        self.attention_scale = attention_scale
        if attention_factory is None and attention is None and attention_scale == "learnable":
            def attention_factory(i: int) -> SoftmaxAttention:      # one set of per-head factors per layer
                return SoftmaxAttention(LogNScale(heads, learnable=True, base=base, min_n=min_n),
                                        backend=attention_backend)
        elif attention_factory is None:
            shared = attention if attention is not None else SoftmaxAttention(
                attention_scale, min_n=min_n, base=base, backend=attention_backend)
            attention_factory = lambda i: shared  # noqa: E731
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.emb_ln = nn.LayerNorm(dim) if norm == "post" else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, attention=attention_factory(i), mlp_ratio=mlp_ratio, norm=norm,
                             dropout=dropout, rope_base=rope_base, qk_dim=qk_dim)
            for i in range(depth))
        self.final_ln = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        # MLM head: dense + GELU + LayerNorm, then the transposed token embedding (tied) plus a bias.
        self.head_dense = nn.Linear(dim, dim)
        self.head_ln = nn.LayerNorm(dim)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT-style init: normal(0, 0.02) weights, zero biases, unit LayerNorms -- of the model's own layers:
        the modules inside a block's attention object (``attention=`` / ``attention_factory``, e.g. the feature
        map of a linear attention) keep the initialisation their author gave them."""
        theirs = {id(m) for blk in self.blocks if isinstance(blk.attn, nn.Module) for m in blk.attn.modules()}
        for mod in self.modules():
            if id(mod) in theirs:
                continue
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.zeros_(self.head_bias)

    def new_cache(self) -> TransformerCache:
        """An empty cache for incremental decoding: one entry per layer, from its attention module's
        ``new_cache()`` (a :class:`KVCache` when it has none)."""
        return TransformerCache([blk.attn.new_cache() if hasattr(blk.attn, "new_cache") else KVCache()
                                 for blk in self.blocks])

    def prepare_mask(self, batch: int, q_len: int, device: torch.device, *, attention_mask: torch.Tensor | None = None,
                     mask: object = None, is_causal: bool = False, past: int = 0) -> PreparedMask:
        """The :class:`~kexue.attention.PreparedMask` every block gets (see :func:`prepare_model_mask`)."""
        return prepare_model_mask(batch, q_len, device, heads=self.heads, attention_mask=attention_mask, mask=mask,
                                  is_causal=is_causal, past=past)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask: object = None, is_causal: bool = False,
                cache: TransformerCache | None = None, return_entropy: bool = False,
                logits_positions: torch.Tensor | None = None) -> TransformerOutput:
        check_tensor("input_ids", input_ids, floating=False, dim=2)
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64 or int32 tensor (token ids), got dtype {input_ids.dtype}")
        b, n = input_ids.shape
        if n == 0:
            raise ValueError("input_ids must have at least one position")
        # (skipped while torch.compile traces: a data-dependent check would split the graph in two; an id out of
        # range then fails in the embedding lookup instead)
        if not torch.compiler.is_compiling() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if cache is not None and not isinstance(cache, TransformerCache):
            raise TypeError(f"cache must be a TransformerCache (model.new_cache()), got {type(cache).__name__}")
        if cache is not None and return_entropy:
            raise ValueError("return_entropy=True is not available with a cache")
        past = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=input_ids.device)
        else:
            check_tensor("position_ids", position_ids, floating=False)
            if position_ids.shape not in ((n,), (b, n), (1, n)):
                raise ValueError(f"position_ids must be [L], [1, L] or [B, L] with B={b}, L={n}, "
                                 f"got {tuple(position_ids.shape)}")
        pm = self.prepare_mask(b, n, input_ids.device, attention_mask=attention_mask, mask=mask,
                               is_causal=is_causal, past=past)
        x = self.drop(self.emb_ln(self.tok_emb(input_ids)))
        entropies: list[torch.Tensor] | None = [] if return_entropy else None
        for i, blk in enumerate(self.blocks):
            x, ent = blk(x, position_ids, mask=pm, cache=None if cache is None else cache.layers[i],
                         return_entropy=return_entropy)
            if entropies is not None:
                entropies.append(ent)
        if cache is not None:
            cache.length += n
        hidden = self.final_ln(x)
        h = hidden
        if logits_positions is not None:
            check_tensor("logits_positions", logits_positions)
            if logits_positions.dtype != torch.bool or logits_positions.shape != (b, n):
                raise ValueError(f"logits_positions must be a bool tensor [B, L]=[{b}, {n}], got "
                                 f"{logits_positions.dtype} {tuple(logits_positions.shape)}")
            h = hidden[logits_positions]
        h = self.head_ln(F.gelu(self.head_dense(h)))
        logits = F.linear(h, self.tok_emb.weight, self.head_bias)
        return TransformerOutput(hidden=hidden, logits=logits, entropies=entropies)

    def num_parameters(self) -> int:
        """Number of distinct trainable parameters (the tied output layer counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


__all__ = ["ATTENTION_BACKENDS", "ATTENTION_NAMES", "ATTENTION_SCALES", "AttentionModule", "KVCache",
           "SoftmaxAttention", "Transformer", "TransformerBlock", "TransformerCache", "TransformerOutput", "apply_rope",
           "named_attention_factory", "prepare_model_mask"]
