"""Softmax attention entry point over ``F.scaled_dot_product_attention``, and its naive reference.

:func:`attention` is the fast path: the mask (bool, additive float or a predicate from
:mod:`kexue.attention.masks`) goes to SDPA, and a per-row scale — Su's entropy-invariant
``log_512(n_i)/sqrt(d)`` (kexue.fm/archives/8823), a per-head learnable :class:`LogNScale`, or any tensor —
is applied by pre-multiplying q, so the fused kernel still runs. :func:`attention_reference` materialises
``softmax(scale * Q K^T + mask) V`` and is what the tests hold the fast path to.

Conventions shared by both:

* tensors are ``q [B, H, Q, D]``, ``k [B, H, K, D]``, ``v [B, H, K, Dv]``; the mask broadcasts to
  ``[B, H, Q, K]``, True = may attend (additive float masks: ``-inf`` = hidden).
* ``is_causal`` is SDPA's: top-left aligned, key ``j`` visible to query ``i`` iff ``j <= i``. It may be
  combined with ``mask`` (they are ANDed). For a kv-cache (``K > Q``, queries are the last positions) pass
  :func:`~kexue.attention.masks.causal_mask` ``(Q, K)``, which is right-aligned.
* a **fully masked row** (a query that may see no key) outputs **0**, and gets zero gradients — never NaN.
* ``n_i`` for ``scale="entropy"`` is the number of keys row ``i`` may see (padding and causal structure
  included), floored at ``min_n`` (16, as in Su's bert4keras ``softmax_plus``).
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from kexue._checks import check_tensor, compute_dtype

from .masks import MaskMod, _as_allowed, _mask4, _row_any, _row_counts, causal, render_mask
from .scaling import ScaleArg, _check_base, _check_min_n, _row_multiplier

__all__ = ["attention", "attention_reference"]


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    check_tensor("q", q, floating=True, dim=4)
    check_tensor("k", k, floating=True, dim=4)
    check_tensor("v", v, floating=True, dim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, H, K, D] = [{B}, {H}, K, {D}], got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B, H, K, Dv] = [{B}, {H}, {k.shape[2]}, Dv], got {tuple(v.shape)}")
    if D == 0:
        raise ValueError("q must have head_dim > 0")
    return B, H, Lq, k.shape[2], D


def _check_common(scale: ScaleArg, min_n: float, base: float, dropout_p: float) -> None:
    _check_min_n(min_n)
    _check_base(base)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if isinstance(scale, str) and scale not in ("standard", "entropy"):
        raise ValueError(f"scale must be 'standard', 'entropy', a positive float, a tensor or a callable, "
                         f"got {scale!r}")


@functools.lru_cache(maxsize=64)
def _causal_logn_table(Lq: int, Lk: int, is_causal: bool, min_n: float, base: float, dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    """``[Q, 1]`` multipliers ``log_base(max(n_i, min_n))`` with ``n_i = min(i + 1, K)`` (causal) or ``K``."""
    n = torch.arange(1, Lq + 1, dtype=torch.float64).clamp_max(Lk) if is_causal else \
        torch.full((Lq,), float(Lk), dtype=torch.float64)
    return (torch.log(n.clamp_min(min_n)) / math.log(base)).to(dtype=dtype, device=device).unsqueeze(-1)


def _needs_counts(scale: ScaleArg) -> bool:
    return (isinstance(scale, str) and scale == "entropy") or (
        callable(scale) and not isinstance(scale, (str, Tensor)))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | MaskMod | None = None,
              scale: ScaleArg = "standard", min_n: float = 16, base: float = 512, dropout_p: float = 0.0,
              is_causal: bool = False, *, generator: torch.Generator | None = None) -> Tensor:
    """Scaled dot-product attention with masks and length-aware scales, on the fused SDPA kernel.

    ``scale``:

    * ``"standard"`` — ``1/sqrt(D)``;
    * ``"entropy"`` — Attention-E of kexue.fm/archives/8823: row ``i`` uses ``log_base(n_i)/sqrt(D)`` with
      ``n_i = max(keys row i may see, min_n)``. Implemented as ``q_i * log_base(n_i)`` followed by SDPA with
      ``1/sqrt(D)``. With ``is_causal=True`` and no mask, ``n_i = min(i + 1, K)`` is computed arithmetically and
      SDPA keeps its ``is_causal`` fast path (no mask is materialised);
    * a positive float — that scale for every row;
    * a tensor broadcastable to ``[B, H, Q, 1]`` — the full per-row logits scale;
    * a callable (e.g. :class:`~kexue.attention.scaling.LogNScale`) — called with the per-row key counts
      (broadcastable to ``[B, H, Q]``), returns a q multiplier broadcastable to ``[B, H, Q, 1]``, used on top
      of ``1/sqrt(D)``.

    ``mask`` is a bool tensor broadcastable to ``[B, H, Q, K]`` (True = may attend), an additive float mask,
    a predicate ``mod(b, h, q_idx, kv_idx)`` (rendered here to a dense bool mask for SDPA), a FlexAttention
    ``BlockMask`` from :func:`~kexue.attention.masks.to_block_mask` (runs ``flex_attention``: eager and
    forward-only on CPU, fused under ``torch.compile`` on GPU; per-row counts for ``"entropy"`` are read by
    evaluating its predicate in row chunks), or ``None``. Fully masked rows output 0.
    A bool mask tensor passed in two consecutive calls (as a model passes one mask to every layer) is
    converted to its additive float form on the second call and kept for the calls that follow (one mask,
    at most 4M elements, i.e. 16 MB in fp32; it is dropped when another mask comes or the tensor is
    changed in place), saving the conversion SDPA would repeat on every call.
    ``dropout_p`` is applied as given (pass 0 in eval). With a ``generator`` the dropout is drawn from it and
    the computation falls back to :func:`attention_reference` (the fused kernel draws from the global RNG).

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> out = attention(q, k, v, is_causal=True, scale="entropy")
        >>> out.shape
        torch.Size([2, 4, 16, 8])
    """
    B, H, Lq, Lk, D = _check_qkv(q, k, v)
    _check_common(scale, min_n, base, dropout_p)
    if dropout_p > 0 and generator is not None:
        return attention_reference(q, k, v, mask, scale, min_n=min_n, base=base, dropout_p=dropout_p,
                                   is_causal=is_causal, generator=generator)
    if _is_block_mask(mask):
        return _flex_attention(q, k, v, mask, scale, min_n=min_n, base=base, dropout_p=dropout_p,
                               is_causal=is_causal)
    if Lk == 0 or Lq == 0:                      # degenerate: every row is empty (output 0) or no rows
        return attention_reference(q, k, v, mask, scale, min_n=min_n, base=base, is_causal=is_causal)
    counts_needed = _needs_counts(scale)

    if mask is None:
        # no mask: either nothing hidden, or SDPA's own causal path (top-left, every row sees >= 1 key)
        if isinstance(scale, str) and scale == "entropy" and not is_causal:
            # every row sees all K keys: the entropy scale is one number, SDPA takes it as is
            mult, s = None, math.log(max(Lk, min_n)) / math.log(base) / math.sqrt(D)
        elif isinstance(scale, str) and scale == "entropy":
            # n_i depends only on (Q, K, is_causal): a cached [Q, 1] table, no per-call work
            mult, s = _causal_logn_table(Lq, Lk, is_causal, float(min_n), float(base), q.dtype, q.device), \
                1.0 / math.sqrt(D)
        else:
            counts = None
            if counts_needed:
                i = torch.arange(Lq, device=q.device)
                counts = (i + 1).clamp_max(Lk) if is_causal else torch.full((Lq,), Lk, device=q.device)
            mult, s = _row_multiplier(scale, counts, D, min_n, base, q)
        qs = q if mult is None else q * mult
        return F.scaled_dot_product_attention(qs, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=s)

    m4 = _mask4(mask, B, H, Lq, Lk, q.device)
    if is_causal:
        tri = render_mask(causal(0), 1, 1, Lq, Lk, q.device)
        attn_mask = m4 & tri if m4.dtype == torch.bool else m4.masked_fill(~tri, float("-inf"))
    else:
        attn_mask = m4
    if attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)
    guard = q.device.type not in _SAFE_EMPTY_ROWS
    counts, empty = _mask_stats(mask, attn_mask, (B, H, Lq, Lk, is_causal, str(q.device)), counts_needed,
                                 guard)
    if isinstance(scale, str) and scale == "entropy":
        assert counts is not None
        mult, s = _entropy_multiplier(counts, Lk, float(min_n), float(base), q.dtype), 1.0 / math.sqrt(D)
    else:
        mult, s = _row_multiplier(scale, counts, D, min_n, base, q)
    qs = q if mult is None else q * mult
    if empty is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask | empty.unsqueeze(-1)
        else:
            attn_mask = attn_mask.masked_fill(empty.unsqueeze(-1), 0.0)
    if attn_mask.dtype == torch.bool and isinstance(mask, Tensor):
        attn_mask = _additive_mask(mask, attn_mask, (B, H, Lq, Lk, is_causal, guard), q.dtype)
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=s)
    if empty is not None:
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out


# SDPA turns a bool mask into an additive float mask (0 / -inf) on every call. For a bool mask tensor passed
# again and again (every layer of a Transformer gets the same one) we keep that float mask from the previous
# call, so the conversion runs once per forward instead of once per layer. One entry, keyed like the stats
# cache (object, version counter, storage, geometry, dtype); masks above _ADDITIVE_MAX_ELEMENTS are not kept
# (the cached copy is 4x the bool mask in fp32) and go to SDPA as they are.
_ADDITIVE: dict[str, object] = {}
_ADDITIVE_MAX_ELEMENTS = 1 << 22  # 16 MB in fp32: L = 2048 with one mask per batch


def _mask_identity(user_mask: Tensor, extra: object) -> tuple:
    """What makes a cached result for ``user_mask`` still valid: its version counter (bumped by any in-place
    change), storage, layout, dtype and device, plus the call's ``extra`` (geometry, dtype)."""
    return (user_mask._version, user_mask.data_ptr(), tuple(user_mask.shape), tuple(user_mask.stride()),
            user_mask.dtype, str(user_mask.device), extra)


def _additive_mask(user_mask: Tensor, allowed: Tensor, geometry: tuple, dtype: torch.dtype) -> Tensor:
    """``allowed`` the first time ``user_mask`` is seen; from the second call with the same unchanged tensor on,
    its additive (0 / -inf) ``dtype`` version, converted once and kept. Too large masks stay bool."""
    if allowed.numel() > _ADDITIVE_MAX_ELEMENTS:
        return allowed
    key = _mask_identity(user_mask, (geometry, dtype))
    ref = _ADDITIVE.get("ref")
    if ref is None or ref() is not user_mask or _ADDITIVE.get("key") != key:
        # first sight: let SDPA convert as usual (a mask used once costs nothing extra), remember the mask
        _ADDITIVE.clear()
        _ADDITIVE.update(ref=weakref.ref(user_mask), key=key)
        return allowed
    if "mask" not in _ADDITIVE:  # second sight: convert once, keep it for the calls that follow
        _ADDITIVE["mask"] = torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device),
                                        torch.full((), float("-inf"), dtype=dtype, device=allowed.device))
    return _ADDITIVE["mask"]  # type: ignore[return-value]


# Devices whose SDPA kernels already return 0 (and zero gradients) for a query row with no visible key; the
# tests hold torch to this (fully masked rows vs the reference, fp64/fp32/bf16, bool and additive masks).
# Elsewhere such rows are un-masked for the kernel and their output zeroed afterwards.
_SAFE_EMPTY_ROWS = frozenset({"cpu"})

# One-entry cache of per-row statistics of the last mask seen. A Transformer passes the same mask object to
# every layer; its key counts are then computed once per forward instead of once per layer. Keyed on the
# object (weak reference), its version counter (bumped by any in-place change) and the call's geometry.
_STATS: dict[str, object] = {}


def _clear_mask_stats_cache() -> None:
    """Forget the cached mask statistics and additive masks (benchmarks use it to time the uncached path)."""
    _STATS.clear()
    _ADDITIVE.clear()


@functools.lru_cache(maxsize=32)
def _logn_lookup(k_len: int, min_n: float, base: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[K + 1]`` table of ``log_base(max(n, min_n))`` for ``n = 0..K`` (computed in float64, stored in dtype)."""
    n = torch.arange(k_len + 1, dtype=torch.float64)
    return (torch.log(n.clamp_min(min_n)) / math.log(base)).to(dtype=dtype, device=device)


def _entropy_multiplier(counts: Tensor, k_len: int, min_n: float, base: float, dtype: torch.dtype) -> Tensor:
    """``log_base(max(n_i, min_n))`` as a ``[..., Q, 1]`` q multiplier: one gather from a cached table of the
    ``K + 1`` possible values (rather than five elementwise ops per call), memoised with the mask stats."""
    mults = _STATS.get("mults")
    key = (k_len, min_n, base, dtype)
    if _STATS.get("counts") is counts and isinstance(mults, dict) and key in mults:
        return mults[key]
    mult = _logn_lookup(k_len, min_n, base, dtype, counts.device)[counts].unsqueeze(-1)
    if _STATS.get("counts") is counts:
        if not isinstance(mults, dict):
            mults = _STATS["mults"] = {}
        mults[key] = mult
    return mult


def _mask_stats(user_mask: object, attn_mask: Tensor, geometry: tuple, want_counts: bool,
                want_empty: bool) -> tuple[Tensor | None, Tensor | None]:
    """(per-row key counts or None, bool rows-with-no-key or None when there are none / not wanted)."""
    if not (want_counts or want_empty):
        return None, None
    key = None
    if isinstance(user_mask, Tensor):
        key = _mask_identity(user_mask, geometry)
        ref = _STATS.get("ref")
        if ref is not None and ref() is user_mask and _STATS.get("key") == key:
            counts, empty = _STATS["counts"], _STATS["empty"]
            if (counts is not None or not want_counts) and (_STATS.get("has_empty") or not want_empty):
                return (counts if want_counts else None), (empty if want_empty else None)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    counts: Tensor | None = None
    empty: Tensor | None = None
    if want_counts:
        counts = _row_counts(allowed)
    if want_empty:  # only where the kernel cannot take a row with no visible key (see _SAFE_EMPTY_ROWS)
        empty_rows = counts == 0 if counts is not None else ~_row_any(allowed)
        empty = empty_rows if bool(empty_rows.any()) else None
    if key is not None:
        _STATS.clear()
        _STATS.update(ref=weakref.ref(user_mask), key=key, counts=counts, empty=empty, has_empty=want_empty)
    return counts, empty


def _is_block_mask(mask: object) -> bool:
    if mask is None or isinstance(mask, Tensor):
        return False
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def _block_mask_counts(bm, Lq: int, Lk: int, device: torch.device, chunk: int = 1024) -> Tensor:
    """Keys per row of a BlockMask, by evaluating its predicate ``chunk`` query rows at a time."""
    from .masks import render_mask

    B, H = int(bm.shape[0]), int(bm.shape[1])
    mod = bm.mask_mod
    parts = []
    for start in range(0, Lq, chunk):
        n = min(chunk, Lq - start)

        def shifted(b, h, q_idx, kv_idx, start=start):
            return mod(b, h, q_idx + start, kv_idx)

        parts.append(render_mask(shifted, B, H, n, Lk, device).sum(-1))
    return torch.cat(parts, dim=-1) if parts else torch.zeros(B, H, 0, dtype=torch.long, device=device)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, bm, scale: ScaleArg, *, min_n: float, base: float,
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
    counts = _block_mask_counts(bm, Lq, Lk, q.device) if _needs_counts(scale) else None
    mult, s = _row_multiplier(scale, counts, D, min_n, base, q)
    qs = q if mult is None else q * mult
    return flex_attention(qs, k, v, block_mask=bm, scale=s)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | MaskMod | None = None,
                        scale: ScaleArg = "standard", min_n: float = 16, base: float = 512,
                        dropout_p: float = 0.0, is_causal: bool = False, *,
                        generator: torch.Generator | None = None) -> Tensor:
    """Naive ``softmax(scale * Q K^T + mask) V`` on materialised scores; the reference for :func:`attention`.

    Same arguments and conventions as :func:`attention`. Computes in fp32 for fp16/bf16 inputs (fp64 stays
    fp64) and returns the input dtype. The per-row key counts for ``scale="entropy"`` are read off the
    materialised mask. Dropout (if any) zeroes attention probabilities with a draw from ``generator`` and
    rescales by ``1/(1 - dropout_p)``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 4)
        >>> torch.allclose(attention_reference(q, k, v, is_causal=True), attention(q, k, v, is_causal=True),
        ...                atol=1e-6)
        True
    """
    B, H, Lq, Lk, D = _check_qkv(q, k, v)
    _check_common(scale, min_n, base, dropout_p)
    cd = compute_dtype(q.dtype)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    allowed = _as_allowed(mask, B, H, Lq, Lk, is_causal, q.device)
    if allowed is None:
        allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    counts = allowed.expand(*allowed.shape[:2], Lq, Lk).sum(-1)
    empty = (counts == 0).unsqueeze(-1)
    logits = qf @ kf.transpose(-1, -2)
    if isinstance(scale, str) and scale == "standard":
        logits = logits / math.sqrt(D)
    else:
        mult, s = _row_multiplier(scale, counts if _needs_counts(scale) else None, D, min_n, base, qf)
        logits = logits * s
        if mult is not None:
            logits = logits * mult.to(cd)
    if isinstance(mask, Tensor) and mask.is_floating_point():
        logits = logits + torch.where(allowed, mask.to(cd), torch.zeros((), dtype=cd, device=q.device))
    logits = logits.masked_fill(~allowed, float("-inf"))
    logits = logits.masked_fill(empty, 0.0)           # keep softmax finite; the row is zeroed below
    p = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return (p @ vf).to(q.dtype)
