"""A small Transformer encoder with rotary positions, pluggable attention and a tied MLM head.

It is the model behind the mask study (kexue.fm/archives/6933: LM, MLM, UniLM and permutation LM are the
same network under different attention masks) and the entropy-invariant scale study
(kexue.fm/archives/8823: ``softmax(log_512(n)/sqrt(d) * QK^T)``, "Attention-E").

**The attention interface.** A block never computes attention itself. It projects the input to
``q, k, v`` of shape ``[B, H, L, D]``, rotates ``q`` and ``k`` with RoPE, and calls its attention object::

    out = attn(q, k, v, mask=mask, is_causal=is_causal)   # -> [B, H, L, D_v]

* ``mask`` is ``None`` or a boolean tensor broadcastable to ``[B, H, L_q, L_k]`` with ``True`` = may
  attend (padding is already folded in by the model);
* ``is_causal`` is ``True`` only when no explicit mask is given and the model asks for a causal LM;
* the object may also define ``entropy(q, k, mask=None, is_causal=False) -> [B, H, L_q]`` (nats per
  query row); :class:`Transformer` calls it when asked for ``return_entropy=True``.

Any callable with that signature slots in (a function, or an ``nn.Module`` such as a linear attention);
pass one object shared by all layers as ``attention=``, or a factory ``attention_factory(layer_index)``
that builds one module per layer (needed when the attention has its own parameters). The default is
:class:`SoftmaxAttention`, i.e. :func:`kexue.attention.attention` with ``scale="standard"`` (1/sqrt(d),
Attention-O) or ``scale="entropy"`` (Attention-E, per-row n = number of visible keys, floored at 16).

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
from kexue.attention import LogNScale, RankMask, attention, attention_entropy, causal_mask
from kexue.attention.core import BACKENDS, _MaskMemo
from kexue.attention.masks import _structure_of
from kexue.attention.scaling import _check_base, _check_min_n

ATTENTION_SCALES = ("standard", "entropy", "learnable")
NORMS = ("pre", "post")


@runtime_checkable
class AttentionFunction(Protocol):
    """What a block calls: ``attn(q, k, v, mask=None, is_causal=False) -> [B, H, L_q, D_v]``.

    ``q, k, v`` are ``[B, H, L, D]`` (``q``/``k`` already rotated); ``mask`` is boolean, broadcastable to
    ``[B, H, L_q, L_k]``, ``True`` = may attend. An optional ``entropy(q, k, mask=None, is_causal=False)``
    method returns the per-row attention entropy ``[B, H, L_q]`` for diagnostics.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                 is_causal: bool = False) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ------------------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
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
    """Softmax attention over SDPA with ``scale="standard"`` (1/sqrt(d), "Attention-O") or ``"entropy"``
    (``log_base(n)/sqrt(d)`` with ``n`` the number of keys a row may see, floored at ``min_n``;
    "Attention-E" of kexue.fm/archives/8823), a fixed float, or a :class:`~kexue.attention.LogNScale`
    module (kept as a submodule, so a learnable per-head factor trains with the model; its own ``base`` and
    ``min_n`` apply). ``backend="fused"`` computes it in one Triton kernel on a GPU
    (:func:`kexue.attention.fused.fused_attention`; the mask must then be a ``RankMask`` or a builder's mask).

    Example:
        >>> attn = SoftmaxAttention("entropy")
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> attn(q, k, v).shape, attn.entropy(q, k).shape
        (torch.Size([1, 2, 8, 16]), torch.Size([1, 2, 8]))
    """

    def __init__(self, scale: str | float | LogNScale = "standard", min_n: float = 16, base: float = 512,
                 backend: str = "sdpa") -> None:
        super().__init__()
        if isinstance(scale, str):
            check_choice("scale", scale, ("standard", "entropy"))
        elif not isinstance(scale, LogNScale):
            check_positive("scale", scale)
        _check_min_n(min_n)
        _check_base(base)
        check_choice("backend", backend, BACKENDS)
        self.scale, self.min_n, self.base, self.backend = scale, min_n, base, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return attention(q, k, v, mask=mask, scale=self.scale, min_n=self.min_n, base=self.base,
                         is_causal=is_causal, backend=self.backend)

    def entropy(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Per-row attention entropy in nats, ``[B, H, L_q]``, under the same scale and mask."""
        if isinstance(mask, _MaskMemo):
            mask = mask.mask
        return attention_entropy(q, k, mask=mask, scale=self.scale, is_causal=is_causal, min_n=self.min_n,
                                 base=self.base)

    def extra_repr(self) -> str:
        tail = "" if self.backend == "sdpa" else f"backend={self.backend!r}"
        if isinstance(self.scale, LogNScale):
            return tail                      # the LogNScale child module prints its own settings
        return f"scale={self.scale!r}, min_n={self.min_n}, base={self.base}" + (f", {tail}" if tail else "")


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


def _takes_memo(attn: object) -> bool:
    """Whether ``attn`` is a SoftmaxAttention whose forward and entropy are ours (so it unwraps a _MaskMemo): a
    subclass that overrides either gets the mask tensor. (Not an exact type check: torch.export's non-strict
    tracer stands a proxy subclass in for every submodule.)"""
    cls = type(attn)
    return isinstance(attn, SoftmaxAttention) and cls.forward is SoftmaxAttention.forward and \
        cls.entropy is SoftmaxAttention.entropy


# ------------------------------------------------------------------------------------------------------
# Blocks and model
# ------------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    """One encoder block: multi-head self-attention (through a pluggable attention callable) and an MLP,
    with pre-LN (``x + f(LN(x))``) or post-LN (``LN(x + f(x))``) residuals.

    Example:
        >>> blk = TransformerBlock(32, 4, attention=SoftmaxAttention())
        >>> blk(torch.randn(2, 5, 32), torch.arange(5))[0].shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, heads: int, attention: Callable[..., torch.Tensor], mlp_ratio: float = 4.0,
                 norm: str = "pre", dropout: float = 0.0, rope_base: float = 10000.0) -> None:
        super().__init__()
        hidden = _check_sizes(dim, heads, mlp_ratio)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        check_choice("norm", norm, NORMS)
        self.dim, self.heads, self.head_dim, self.norm, self.rope_base = dim, heads, dim // heads, norm, rope_base
        self.attn = attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _attend(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(q, position_ids, self.rope_base)
        k = apply_rope(k, position_ids, self.rope_base)
        out = self.attn(q, k, v, mask=mask, is_causal=is_causal)
        ent = None
        if want_entropy:
            fn = getattr(self.attn, "entropy", None)
            if fn is None:
                raise ValueError("return_entropy=True needs an attention object with an entropy(q, k, mask, "
                                 "is_causal) method")
            with torch.no_grad():
                ent = fn(q, k, mask=mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        return self.drop(self.proj(out)), ent

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.norm == "pre":
            a, ent = self._attend(self.ln1(x), position_ids, mask, is_causal, return_entropy)
            x = x + a
            x = x + self.drop(self.mlp(self.ln2(x)))
        else:
            a, ent = self._attend(x, position_ids, mask, is_causal, return_entropy)
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


def _check_attention_mask(attention_mask: torch.Tensor, batch: int, length: int) -> None:
    check_tensor("attention_mask", attention_mask, dim=2)
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be [B, L]=[{batch}, {length}], got {tuple(attention_mask.shape)}")


class Transformer(nn.Module):
    """Transformer encoder with RoPE, pre-/post-LN, pluggable attention and an MLM head tied to the token
    embeddings. No absolute positions, so it runs at any sequence length.

    Args:
        vocab_size: number of tokens.
        dim, depth, heads, mlp_ratio: width, number of blocks, attention heads, MLP expansion.
        norm: ``"pre"`` (default) or ``"post"`` (BERT-style, with a LayerNorm on the embeddings).
        attention_scale: ``"standard"`` (Attention-O), ``"entropy"`` (Attention-E, kexue.fm/archives/8823)
            or ``"learnable"`` (beyond the article: a per-head factor ``s_h * log_base(n)`` per layer,
            :class:`~kexue.attention.LogNScale` with ``learnable=True``, starting at Attention-E) for the
            default :class:`SoftmaxAttention`; ``min_n`` and ``scale_base`` tune the latter two.
        attention_backend: ``"sdpa"`` (default) or ``"fused"``: the default attention's kernel. ``"fused"`` is
            one Triton kernel (CUDA) that computes the mask from a :class:`~kexue.attention.RankMask` -- a
            ``mask`` from kexue's builders carries one, padding is added to it -- and the entropy scale itself.
        attention: one attention callable shared by every block (see the module docstring for the
            interface); overrides ``attention_scale``. Its own layers keep their initialisation.
        attention_factory: ``f(layer_index) -> attention`` to build one attention module per block.
        rope_base: RoPE frequency base. dropout: dropout on residual branches.

    ``forward(input_ids, position_ids=None, attention_mask=None, mask=None, is_causal=False,
    return_entropy=False)``: ``position_ids`` default to ``0..L-1`` (pass the original positions for a
    permutation LM); ``input_ids`` is an int64 or int32 tensor ``[B, L]``; ``attention_mask`` ``[B, L]``
    marks real tokens (1) vs padding (0); ``mask`` is a boolean attention mask (``True`` = may attend) that
    broadcasts to ``[B, H, L, L]``, e.g. ``[B, 1, L, L]`` from :func:`kexue.attention.unilm_mask`, ``[B, 1, 1, L]``
    from :func:`kexue.attention.padding_mask` or ``[L, L]``, or a :class:`~kexue.attention.RankMask`. One
    exception to plain broadcasting: a **3-D** mask is ``[B, L, L]`` (one mask per batch item, shared by the
    heads; the Hugging Face convention), read as ``[B, 1, L, L]`` -- not ``[H, L, L]`` as
    :func:`kexue.attention.attention` reads it -- and its first dimension must be 1 or ``B``. ``is_causal`` adds the LM
    mask; ``logits_positions`` (bool ``[B, L]``) computes the MLM logits only there and returns them as
    ``[N, vocab]`` (cheap MLM training with a large vocabulary). With the default :class:`SoftmaxAttention` in
    every block, the mask is turned into SDPA's float form (and counted per row, for the entropy scales) once
    per forward and shared by the blocks, also under ``torch.compile``; a user's attention callable gets the
    bool mask tensor itself.

    Example:
        >>> m = Transformer(vocab_size=30, dim=32, depth=1, heads=2, norm="post")
        >>> ids = torch.randint(0, 30, (1, 7))
        >>> m(ids, is_causal=True).logits.shape
        torch.Size([1, 7, 30])
    """

    def __init__(self, vocab_size: int, dim: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 norm: str = "pre", attention_scale: str = "standard", attention: Callable | None = None,
                 attention_factory: Callable[[int], Callable] | None = None, min_n: float = 16,
                 scale_base: float = 512, rope_base: float = 10000.0, dropout: float = 0.0,
                 attention_backend: str = "sdpa") -> None:
        super().__init__()
        check_choice("attention_backend", attention_backend, BACKENDS)
        for name, val in (("vocab_size", vocab_size), ("depth", depth)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        _check_sizes(dim, heads, mlp_ratio)
        check_choice("norm", norm, NORMS)
        check_choice("attention_scale", attention_scale, ATTENTION_SCALES)
        check_positive("rope_base", rope_base)
        check_positive("dropout", dropout, allow_zero=True)
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim / heads must be an even integer (RoPE), got dim={dim}, heads={heads}")
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
                return SoftmaxAttention(LogNScale(heads, learnable=True, base=scale_base, min_n=min_n),
                                        backend=attention_backend)
        elif attention_factory is None:
            shared = attention if attention is not None else SoftmaxAttention(attention_scale, min_n, scale_base,
                                                                              backend=attention_backend)
            attention_factory = lambda i: shared  # noqa: E731
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.emb_ln = nn.LayerNorm(dim) if norm == "post" else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, attention_factory(i), mlp_ratio, norm, dropout, rope_base)
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

    def build_mask(self, batch: int, length: int, device: torch.device, attention_mask: torch.Tensor | None,
                   mask: torch.Tensor | RankMask | None, is_causal: bool, *,
                   structured: bool = False) -> tuple[torch.Tensor | RankMask | None, bool]:
        """Fold padding and the causal flag into one boolean mask; returns ``(mask, is_causal)`` for the
        attention call (``is_causal`` stays ``True`` only when no other mask is present). With ``structured``
        (the fused backend) the result is a :class:`~kexue.attention.RankMask` with the padding keys hidden, and
        ``is_causal`` is passed on as it is (the kernel applies it)."""
        if structured:
            return self._structured_mask(batch, length, device, attention_mask, mask), is_causal
        if isinstance(mask, RankMask):
            mask = mask.to_dense(q_len=length, device=device)
        if mask is not None:
            check_tensor("mask", mask)
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
            mask = self._check_mask(mask, batch, length)
        if attention_mask is not None:
            _check_attention_mask(attention_mask, batch, length)
            if attention_mask.dtype != torch.bool and not torch.compiler.is_compiling() and \
                    not bool(((attention_mask == 0) | (attention_mask == 1)).all()):   # (not while tracing)
                raise ValueError("attention_mask must hold 1 (a token) and 0 (padding) only, got values "
                                 f"{sorted(set(attention_mask.unique().tolist()))[:6]}")
            pad = attention_mask.to(device).bool()[:, None, None, :]
            mask = pad if mask is None else mask & pad
        if is_causal and mask is not None:
            mask = mask & causal_mask(length, device=device)
            is_causal = False
        return mask, is_causal

    def _check_mask(self, mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """``mask`` as a 4-D tensor that broadcasts to ``[B, H, L, L]``: a 3-D mask is ``[B, L, L]`` (made
        ``[B, 1, L, L]``), fewer dimensions get leading ones; raise ``ValueError`` for any other shape."""
        want = (batch, self.heads, length, length)
        shape = tuple(mask.shape)
        if mask.dim() == 3:
            if shape[0] not in (1, batch) or shape[1:] != (length, length):
                raise ValueError(f"mask with 3 dimensions must be [B, L, L] (one mask per batch item) or "
                                 f"[1, L, L] with B={batch}, L={length}, got {shape}")
            return mask[:, None]
        try:
            fits = mask.dim() <= 4 and torch.broadcast_shapes(shape, want) == want
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask must broadcast to [B, H, L, L]=[{batch}, {self.heads}, {length}, {length}], "
                             f"got {shape}")
        return mask.reshape((1,) * (4 - mask.dim()) + shape) if mask.dim() < 4 else mask

    def _structured_mask(self, batch: int, length: int, device: torch.device, attention_mask: torch.Tensor | None,
                         mask: torch.Tensor | RankMask | None) -> torch.Tensor | RankMask | None:
        """What the fused kernel gets: the mask itself when no padding is added (a builder's mask keeps its row
        counts, so no layer counts them again), else its RankMask with the padding keys hidden. Shapes are
        checked by the kernel's call."""
        rm, _ = _structure_of(mask)                 # (raises for a mask with no structure)
        if attention_mask is None:
            return mask
        _check_attention_mask(attention_mask, batch, length)
        am = attention_mask.to(device)
        return RankMask.padding(am) if rm is None else rm.with_key_padding(am)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                is_causal: bool = False, return_entropy: bool = False,
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
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)
        else:
            check_tensor("position_ids", position_ids, floating=False)
            if position_ids.shape not in ((n,), (b, n), (1, n)):
                raise ValueError(f"position_ids must be [L], [1, L] or [B, L] with B={b}, L={n}, "
                                 f"got {tuple(position_ids.shape)}")
        structured = all(isinstance(blk.attn, SoftmaxAttention) and blk.attn.backend == "fused"
                         for blk in self.blocks)
        attn_mask, causal = self.build_mask(b, n, input_ids.device, attention_mask, mask, is_causal,
                                            structured=structured)
        if attn_mask is not None and all(_takes_memo(blk.attn) for blk in self.blocks):
            # prepared (float mask, row counts) once for all layers, also in a compiled graph; only our own
            # attention knows the wrapper, a user's attention callable gets the mask tensor itself
            attn_mask = _MaskMemo(attn_mask)
        x = self.drop(self.emb_ln(self.tok_emb(input_ids)))
        entropies: list[torch.Tensor] | None = [] if return_entropy else None
        for blk in self.blocks:
            x, ent = blk(x, position_ids, attn_mask, causal, return_entropy)
            if entropies is not None:
                entropies.append(ent)
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


__all__ = ["ATTENTION_SCALES", "AttentionFunction", "SoftmaxAttention", "Transformer", "TransformerBlock",
           "TransformerOutput", "apply_rope"]
