"""Softmax attention over ``F.scaled_dot_product_attention``: the stateless :func:`attention`, and
:class:`PreparedMask`, a mask plus what attention needs from it, built once by :func:`prepare_mask`.

:func:`attention` keeps nothing between calls. A mask given as a tensor, predicate or :class:`RankMask` is
prepared inside the call (its additive float form, its per-row key counts for the entropy scale). A model that
passes one mask to every layer prepares it once per forward with :func:`prepare_mask` and hands the
:class:`PreparedMask` to each layer -- as Hugging Face's ``create_causal_mask`` does -- so the conversion and the
counting happen once. A per-row scale (Su's entropy-invariant ``log_512(n_i)/sqrt(d)``, kexue.fm/archives/8823,
a per-head :class:`LogNScale`, or any tensor) is applied by pre-multiplying q, so the fused SDPA kernel still runs.

Conventions (shared by :func:`attention`, :func:`~kexue.attention.attention_reference` and
:func:`~kexue.attention.attention_entropy`):

* tensors are ``q [B, H, Q, D]``, ``k [B, H, K, D]``, ``v [B, H, K, Dv]``; a mask broadcasts to ``[B, H, Q, K]``,
  True = may attend; in an additive float mask ``-inf`` -- and any value at or below the mask dtype's most
  negative finite value, the Hugging Face convention for padding -- hides a key, other values are a bias.
* ``is_causal`` is SDPA's: top-left aligned, key ``j`` visible to query ``i`` iff ``j <= i``, ANDed with the mask.
  For a kv-cache (``K > Q``, queries are the last positions) pass ``causal_mask(Q, K)`` or
  ``prepare_mask(..., is_causal=True, causal_offset=K - Q)``.
* a **fully masked row** (a query that may see no key) outputs **0**, and gets zero gradients — never NaN.
* ``n_i`` for ``scale="entropy"`` is the number of keys row ``i`` may see (padding and causal structure included),
  floored at ``min_n`` (16, as in Su's bert4keras ``softmax_plus``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu
from .masks import MaskMod, check_is_causal, render_mask
from .prepared import PreparedMask, as_prepared, check_dropout, check_qkv, is_block_mask
from .ranks import RankMask
from .reference import attention_reference
from .scaling import BASE, MIN_N, ScaleArg, check_scale, needs_counts, resolve_scale

__all__ = ["attention"]

BACKENDS = ("sdpa", "fused")

def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | MaskMod | RankMask | PreparedMask | None = None, *,
              scale: ScaleArg = "standard", min_n: float = MIN_N, base: float = BASE, dropout_p: float = 0.0,
              is_causal: bool = False, generator: torch.Generator | None = None, backend: str = "sdpa") -> Tensor:
    """Scaled dot-product attention with masks and length-aware scales, on the fused SDPA kernel. Stateless.

    ``scale`` (interpreted by :func:`~kexue.attention.resolve_scale`):

    * ``"standard"`` — ``1/sqrt(D)``;
    * ``"entropy"`` — Attention-E of kexue.fm/archives/8823: row ``i`` uses ``log_base(n_i)/sqrt(D)`` with
      ``n_i = max(keys row i may see, min_n)``, implemented as ``q_i * log_base(n_i)`` followed by SDPA with
      ``1/sqrt(D)``; with ``is_causal=True`` and no mask ``n_i = min(i + 1, K)`` is worked out arithmetically and
      SDPA keeps its ``is_causal`` fast path;
    * a positive float — that scale for every row;
    * a tensor broadcastable to ``[B, H, Q, 1]`` — the full per-row logits scale;
    * a callable (e.g. :class:`~kexue.attention.LogNScale`) — called with the per-row key counts, returns a q
      multiplier broadcastable to ``[B, H, Q, 1]``, used on top of ``1/sqrt(D)``.

    ``mask``: a bool tensor broadcastable to ``[B, H, Q, K]`` (True = may attend), an additive float mask, a
    predicate ``mod(b, h, q_idx, kv_idx)``, a :class:`~kexue.attention.RankMask`, a :class:`PreparedMask` (from
    :func:`prepare_mask`: what a model passes to every layer, so the mask is converted and counted once per
    forward), a FlexAttention ``BlockMask`` from :func:`~kexue.attention.to_block_mask` (runs ``flex_attention``:
    eager and forward-only on CPU; counts for ``"entropy"`` come from evaluating its predicate), or None.
    Nothing is kept between calls: a mask changed in place is read afresh by the next call.

    ``dropout_p`` is applied as given (pass 0 in eval); with a ``generator`` the dropout is drawn from it and the
    computation falls back to :func:`~kexue.attention.attention_reference`. ``backend="fused"`` runs the
    experimental Triton kernel of :mod:`kexue.attention.kernels` (CUDA; imported only when asked for).

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> attention(q, k, v, is_causal=True, scale="entropy").shape
        torch.Size([2, 4, 16, 8])
    """
    check_is_causal(is_causal)
    if backend != "sdpa":
        if backend != "fused":
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if dropout_p:
            raise ValueError("backend='fused' has no dropout: pass dropout_p=0 or use backend='sdpa'")
        from .kernels import fused_attention

        return fused_attention(q, k, v, mask, scale=scale, min_n=min_n, base=base, is_causal=is_causal)
    B, H, Lq, Lk, D = check_qkv(q, k, v)
    check_scale(scale, min_n=min_n, base=base)
    dropout_p = check_dropout(dropout_p)
    if is_block_mask(mask):
        return _flex_attention(q, k, v, mask, scale=scale, min_n=min_n, base=base, dropout_p=dropout_p,
                               is_causal=is_causal)
    pm = as_prepared(mask, batch=B, heads=H, q_len=Lq, k_len=Lk, is_causal=is_causal, device=q.device)
    if (dropout_p > 0 and generator is not None) or Lq == 0 or Lk == 0:
        return attention_reference(q, k, v, pm, scale=scale, min_n=min_n, base=base, dropout_p=dropout_p,
                                   generator=generator)
    want = needs_counts(scale)
    if want and isinstance(scale, str) and pm.is_empty:     # every row sees all K keys: one number
        mult, s = None, math.log(max(Lk, min_n)) / math.log(base) / math.sqrt(D)
        attn_mask, causal, empty = None, False, None
    else:
        attn_mask, causal, counts, empty = pm.for_sdpa(q.dtype, want_counts=want)
        mult, s = resolve_scale(scale, head_dim=D, like=q, counts=counts, min_n=min_n, base=base)
    qs = q if mult is None else q * mult
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal,
                                         scale=s)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _block_mask_counts(bm, Lq: int, Lk: int, device: torch.device, chunk: int = 1024) -> Tensor:
    """Keys per row of a BlockMask ``[B, H, Q, 1]``, by evaluating its predicate ``chunk`` query rows at a time."""
    B, H = int(bm.shape[0]), int(bm.shape[1])
    mod = bm.mask_mod
    parts = []
    for start in range(0, Lq, chunk):
        n = min(chunk, Lq - start)

        def shifted(b, h, q_idx, kv_idx, start=start):
            return mod(b, h, q_idx + start, kv_idx)

        parts.append(_cpu.row_counts(render_mask(shifted, B, H, n, Lk, device)))
    out = torch.cat(parts, dim=-1) if parts else torch.zeros(B, H, 0, dtype=torch.long, device=device)
    return out.unsqueeze(-1)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, bm, *, scale: ScaleArg, min_n: float, base: float,
                    dropout_p: float, is_causal: bool) -> Tensor:
    """FlexAttention path for a ``BlockMask`` (eager on CPU, forward only there; fused when compiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if is_causal:
        raise ValueError("is_causal cannot be combined with a BlockMask: build the block mask with "
                         "and_masks(causal(), ...) instead")
    if dropout_p > 0:
        raise ValueError("dropout_p > 0 is not supported with a BlockMask (FlexAttention has no dropout)")
    if tuple(bm.seq_lengths) != (Lq, Lk):
        raise ValueError(f"block mask was built for (Q, K) = {tuple(bm.seq_lengths)}, got ({Lq}, {Lk})")
    counts = _block_mask_counts(bm, Lq, Lk, q.device) if needs_counts(scale) else None
    mult, s = resolve_scale(scale, head_dim=D, like=q, counts=counts, min_n=min_n, base=base)
    qs = q if mult is None else q * mult
    return flex_attention(qs, k, v, block_mask=bm, scale=s)
