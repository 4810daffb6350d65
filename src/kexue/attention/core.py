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

import contextlib
import functools
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from kexue._checks import check_tensor, compute_dtype

from .masks import (
    _LIB,
    MaskMod,
    RankMask,
    _additive,
    _additive_counted,
    _as_allowed,
    _attached_counts,
    _check_is_causal,
    _eager_identity,
    _mask4,
    _row_any,
    _row_counts,
    _to_float_mask,
    _tracing,
    causal,
    render_mask,
)
from .scaling import ScaleArg, _check_base, _check_min_n, _logn_of_counts, _row_multiplier

__all__ = ["attention", "attention_reference"]


class _MaskMemo:
    """One mask shared by the attention calls of one forward pass (``Transformer`` wraps its mask in one and
    passes it to every layer): the first call prepares the float mask and the row counts, the later calls reuse
    them. In eager mode the kept-mask entry already does this; under ``torch.compile`` it is what keeps a
    compiled model from preparing the mask again in every layer (a trace keeps nothing between calls, and the
    compiler does not merge the layers' identical mask work in an inference graph). It lives for one forward
    pass, as a local object of the caller, so nothing outlives the call."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self.prepared: dict = {}


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.is_floating_point()):
        # the slow path only to name what is wrong (the common call pays three isinstance checks)
        check_tensor("q", q, floating=True, dim=4)
        check_tensor("k", k, floating=True, dim=4)
        check_tensor("v", v, floating=True, dim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    if Bk != B or Hk != H or Dk != D:
        raise ValueError(f"k must have shape [B, H, K, D] = [{B}, {H}, K, {D}], got {tuple(k.shape)}")
    Bv, Hv, Lv, _ = v.shape
    if Bv != B or Hv != H or Lv != Lk:
        raise ValueError(f"v must have shape [B, H, K, Dv] = [{B}, {H}, {Lk}, Dv], got {tuple(v.shape)}")
    if D == 0:
        raise ValueError("q must have head_dim > 0")
    return B, H, Lq, Lk, D


@functools.lru_cache(maxsize=256)
def _check_numbers(min_n: float, base: float, dropout_p: float) -> None:
    """The numeric arguments, checked once per distinct combination of plain ints/floats (calls repeat the
    same few; _check_common sends anything else, bools included, past the cache)."""
    _check_min_n(min_n)
    _check_base(base)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


def _check_common(scale: ScaleArg, min_n: float, base: float, dropout_p: float, tracing: bool) -> None:
    if type(min_n) in (int, float) and type(base) in (int, float) and type(dropout_p) in (int, float) \
            and not tracing:
        _check_numbers(min_n, base, dropout_p)
    else:                                   # anything else (bool, tensor, list...) is checked uncached
        _check_numbers.__wrapped__(min_n, base, dropout_p)
    if isinstance(scale, str) and scale not in ("standard", "entropy"):
        raise ValueError(f"scale must be 'standard', 'entropy', a positive float, a tensor or a callable, "
                         f"got {scale!r}")


@functools.lru_cache(maxsize=64)
def _causal_logn_table(Lq: int, Lk: int, is_causal: bool, min_n: float, base: float, dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    """``[Q, 1]`` multipliers ``log_base(max(n_i, min_n))`` with ``n_i = min(i + 1, K)`` (causal) or ``K``.
    (Made outside inference mode even when called in it: a kept inference tensor would break later training
    calls, which cannot save it for backward.)"""
    with torch.inference_mode(False):
        n = _causal_counts(Lq, Lk, is_causal, torch.device("cpu"))
        return _logn_of_counts(n, base, min_n).to(dtype=dtype, device=device).unsqueeze(-1)


def _causal_counts(Lq: int, Lk: int, is_causal: bool, device: torch.device) -> Tensor:
    """``[Q]`` int64 key counts with no mask: ``min(i + 1, K)`` (causal, top-left) or ``K``."""
    i = torch.arange(1, Lq + 1, device=device)
    return i.clamp_max(Lk) if is_causal else torch.full((Lq,), Lk, device=device)


def _traced_logn_multiplier(counts: Tensor, k_len: int, min_n: float, base: float, q: Tensor) -> Tensor:
    """``log_base(max(n, min_n))`` of int64 ``counts``, in q's dtype, while torch.compile traces.

    Written as plain ops, the compiler inlines this formula into the q multiply that reads it, so the float64
    log runs once per *element* of q (per 8, vectorised) instead of once per row. On a CPU it is therefore the
    eager table lookup as an opaque op (``kexue::logn_multiplier``), which the compiler cannot inline: the
    compiled causal multiply (D = 64, 2 cores) took 1.9 ms instead of 3.1 ms at B = 8, H = 12, L = 512, and
    0.22 ms instead of 0.33 ms at B = 1, H = 2, L = 2048; at B = 1, H = 2, L = 512 the op's call cost eats the
    gain (scripts/traced-logn-multiplier.py). Elsewhere the plain ops are kept for the compiler to fuse (not
    measured on a GPU)."""
    if q.is_cpu and _TRACED_CPU_KERNELS:
        return torch.ops.kexue.logn_multiplier(counts, k_len, float(min_n), float(base), q.dtype)
    return _logn_of_counts(counts, base, min_n).to(q.dtype)


def _needs_counts(scale: ScaleArg) -> bool:
    return (isinstance(scale, str) and scale == "entropy") or (
        callable(scale) and not isinstance(scale, (str, Tensor)))


BACKENDS = ("sdpa", "fused")


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | MaskMod | None = None,
              scale: ScaleArg = "standard", min_n: float = 16, base: float = 512, dropout_p: float = 0.0,
              is_causal: bool = False, *, generator: torch.Generator | None = None,
              backend: str = "sdpa") -> Tensor:
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
    evaluating its predicate in row chunks), or ``None``. Fully masked rows output 0. In an additive float mask
    only ``-inf`` hides a key: masks made the Hugging Face way, with ``torch.finfo(dtype).min`` for padding, let
    those keys count towards ``n_i`` -- pass ``mask > torch.finfo(mask.dtype).min`` (a bool mask) instead.
    A bool mask is handed to SDPA in its additive float form, converted here by
    :func:`~kexue.attention.masks.to_additive_mask` (less than half the cost, on a CPU, of the conversion SDPA
    itself makes on every call); the converted mask is kept while the same tensor keeps coming (as a model passes one
    mask to every layer: one conversion per forward; at most 4M elements, i.e. 16 MB in fp32; dropped when
    another mask comes or the tensor is changed in place; a change made behind autograd's back -- through
    ``.data``, numpy or DLPack -- bumps no version counter and is not seen: pass a new tensor instead). A float
    mask that requires grad (a learnt bias) is converted per call, never kept. The per-row key counts of a mask built by
    :func:`~kexue.attention.masks.unilm_mask`, ``causal_mask``, ``prefix_lm_mask``, ``permutation_mask`` or
    ``padding_mask`` come attached to it (worked out from the segment ids / lengths / order, never read back
    from the mask); any other mask is read once and its counts kept with it.
    Under ``torch.compile`` the call traces to one graph (no graph break): nothing is kept between calls and the
    row counts are read from the mask in the graph (on a GPU as plain ops the compiler fuses with the float
    mask and the q multiplier; on a CPU through the eager kernels, as opaque ops). A mask built inside the
    compiled function works too; the builders' input checks may split the graph there, so build masks outside
    it (as a data loader would).
    ``dropout_p`` is applied as given (pass 0 in eval). With a ``generator`` the dropout is drawn from it and
    the computation falls back to :func:`attention_reference` (the fused kernel draws from the global RNG).

    ``backend="fused"`` runs :func:`kexue.attention.fused.fused_attention` instead of SDPA: one Triton kernel
    (CUDA) that works out the mask from a :class:`~kexue.attention.masks.RankMask` -- or from the structure a
    mask builder attached to its mask -- and the per-row scale itself, with no q pre-multiply and no L x L mask
    read. It takes ``mask=None``, a ``RankMask`` or a builder's mask (not an arbitrary tensor, predicate or
    block mask) and no dropout; ``"sdpa"`` (the default) takes everything.

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> out = attention(q, k, v, is_causal=True, scale="entropy")
        >>> out.shape
        torch.Size([2, 4, 16, 8])
    """
    _check_is_causal(is_causal)
    if backend != "sdpa":
        if backend != "fused":
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if dropout_p:
            raise ValueError("backend='fused' has no dropout: pass dropout_p=0 or use backend='sdpa'")
        from .fused import fused_attention

        return fused_attention(q, k, v, mask, scale, min_n=min_n, base=base, is_causal=is_causal)
    memo = None
    if isinstance(mask, _MaskMemo):
        memo, mask = mask, mask.mask
    B, H, Lq, Lk, D = _check_qkv(q, k, v)
    if isinstance(mask, RankMask):          # its dense form (kept on it), with the row counts attached
        mask = mask._dense_for(Lq, q.device)
    tracing = _tracing()
    _check_common(scale, min_n, base, dropout_p, tracing)
    if dropout_p > 0 and generator is not None:
        return attention_reference(q, k, v, mask, scale, min_n=min_n, base=base, dropout_p=dropout_p,
                                   is_causal=is_causal, generator=generator)
    if _is_block_mask(mask):
        return _flex_attention(q, k, v, mask, scale, min_n=min_n, base=base, dropout_p=dropout_p,
                               is_causal=is_causal)
    if Lk == 0 or Lq == 0:                      # degenerate: every row is empty (output 0) or no rows
        return attention_reference(q, k, v, mask, scale, min_n=min_n, base=base, is_causal=is_causal)
    counts_needed = _needs_counts(scale)

    if mask is None:                            # (the same under torch.compile: nothing here is kept)
        # no mask: either nothing hidden, or SDPA's own causal path (top-left, every row sees >= 1 key)
        if isinstance(scale, str) and scale == "entropy" and not is_causal:
            # every row sees all K keys: the entropy scale is one number, SDPA takes it as is
            mult, s = None, math.log(max(Lk, min_n)) / math.log(base) / math.sqrt(D)
        elif isinstance(scale, str) and scale == "entropy":
            # n_i depends only on (Q, K, is_causal): a cached [Q, 1] table, no per-call work (in a trace: made
            # per call, see _traced_logn_multiplier)
            if not tracing:
                mult = _causal_logn_table(Lq, Lk, is_causal, float(min_n), float(base), q.dtype, q.device)
            else:
                mult = _traced_logn_multiplier(_causal_counts(Lq, Lk, is_causal, q.device), Lk, min_n, base,
                                               q).unsqueeze(-1)
            s = 1.0 / math.sqrt(D)
        else:
            counts = None
            if counts_needed:
                counts = _causal_counts(Lq, Lk, is_causal, q.device)
            mult, s = _row_multiplier(scale, counts, D, min_n, base, q)
        qs = q if mult is None else q * mult
        return F.scaled_dot_product_attention(qs, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=s)
    key = prepared = None
    if memo is not None:
        key = (q.dtype, q.device, Lq, Lk, is_causal, counts_needed)
        prepared = memo.prepared.get(key)      # made by an earlier layer of this forward pass
    if prepared is None:
        if tracing:     # under torch.compile: tensor ops only, nothing kept between calls (see _traced_prepare)
            prepared = _traced_prepare(q, mask, scale, is_causal, (B, H, Lq, Lk, D))
        else:
            dev = q.device
            # (q.is_cpu first: reading dev.type costs a few microseconds on every call)
            policy = _EMPTY_ROWS_ZERO.get("cpu") if q.is_cpu else _EMPTY_ROWS_ZERO.get(dev.type)
            with _outside_inference_mode():
                m4 = _mask4(mask, B, H, Lq, Lk, dev)
                prepared = _prepare_mask(mask, m4, Lq, Lk, is_causal, q.dtype, dev, counts_needed,
                                         guard=policy is None)
        if memo is not None and not (isinstance(mask, Tensor) and mask.requires_grad):
            memo.prepared[key] = prepared       # (not a learnt float bias: its form belongs to one graph)
    attn_mask, counts, empty = prepared
    if isinstance(scale, str) and scale == "entropy":
        assert counts is not None
        # (eager: one lookup in a cached table, kept with the mask; traced: made once per forward, see
        # _traced_logn_multiplier)
        if not tracing:
            with _outside_inference_mode():
                mult = _entropy_multiplier(counts, Lk, float(min_n), float(base), q.dtype)
        else:
            mkey = (key, "mult", float(min_n), float(base))
            mult = None if memo is None else memo.prepared.get(mkey)
            if mult is None:
                mult = _traced_logn_multiplier(counts, Lk, min_n, base, q)
                if memo is not None:
                    memo.prepared[mkey] = mult
        s = 1.0 / math.sqrt(D)
    else:
        mult, s = _row_multiplier(scale, None if counts is None else counts[..., 0], D, min_n, base, q)
    qs = q if mult is None else q * mult
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=s)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _traced_prepare(q: Tensor, mask: Tensor | MaskMod, scale: ScaleArg, is_causal: bool,
                    dims: tuple[int, int, int, int, int]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(additive float mask for SDPA, row counts ``[..., Q, 1]`` or None, empty rows or None) while
    ``torch.compile`` traces :func:`attention`: tensor operations only -- no kept masks, no counts attached by
    the builders, no data-dependent branch -- so a compiled model has no graph break here. On a GPU the
    compiler fuses this work with the q multiplier; on a CPU the counts and the float mask come from the eager
    path's kernels, called as opaque ops."""
    B, H, Lq, Lk, D = dims
    m4 = _mask4(mask, B, H, Lq, Lk, q.device)
    allowed = m4 if m4.dtype == torch.bool else m4 > float("-inf")
    tri = render_mask(causal(0), 1, 1, Lq, Lk, q.device) if is_causal else None
    if tri is not None:
        allowed = allowed & tri
    # the device is fixed in a trace: the same empty-row policy as the eager path, and on a CPU the eager path's
    # own kernels (the kexue:: ops registered in masks.py: faster there than what inductor generates)
    guard = _EMPTY_ROWS_ZERO.get(q.device.type) is None
    kernels = q.is_cpu and _TRACED_CPU_KERNELS
    counts = empty = None
    if kernels and m4.dtype == torch.bool and _needs_counts(scale) and not guard and allowed.shape[-1] == Lk:
        attn_mask, counts = torch.ops.kexue.to_additive_counted(allowed, q.dtype)   # one pass over the mask
        counts = counts.unsqueeze(-1)
    else:
        if _needs_counts(scale) or guard:
            rows = allowed.expand(*allowed.shape[:-1], Lk)
            counts = (torch.ops.kexue.row_counts(rows) if kernels else rows.sum(-1)).unsqueeze(-1)  # [.., Q|1, 1]
            if guard:           # rows that see no key: the kernel sees every key there, output 0 after
                empty = counts == 0
        attn_mask = _traced_float_mask(m4, allowed, tri, empty, q.dtype, kernels)
    return attn_mask, counts, empty


def _traced_float_mask(m4: Tensor, allowed: Tensor, tri: Tensor | None, empty: Tensor | None, dtype: torch.dtype,
                       kernels: bool) -> Tensor:
    """The additive mask SDPA gets in a trace: ``allowed`` (``m4`` and the causal triangle ``tri``) with the
    empty rows un-masked."""
    if m4.dtype == torch.bool:
        ok = allowed if empty is None else allowed | empty
        if kernels:
            return torch.ops.kexue.to_additive(ok, dtype)
        return torch.where(ok, torch.zeros((), dtype=dtype, device=ok.device),
                           torch.full((), float("-inf"), dtype=dtype, device=ok.device))
    attn_mask = _to_float_mask(m4, dtype)
    if tri is not None:
        attn_mask = attn_mask.masked_fill(~tri, float("-inf"))
    return attn_mask if empty is None else attn_mask.masked_fill(empty, 0.0)


# What a mask costs beyond SDPA's own work, and how it is kept down:
# * SDPA turns a bool mask into an additive float mask (0 / -inf) inside every call that gets one. We convert it
#   ourselves (masks._additive), hand SDPA the float mask, and keep it while the same mask tensor comes again,
#   so a Transformer (one mask for every layer) converts once per forward instead of once per layer. Even a mask
#   used once is cheaper so: at L = 512 (B = 1, H = 2, a [1, 1, L, L] mask, 2 CPU cores) SDPA with the bool mask
#   took ~320 us longer than with a ready float mask, and our conversion ~130 us. Masks above
#   _ADDITIVE_MAX_ELEMENTS are converted per call and not kept: a kept copy would be 4x the bool mask in fp32.
# * the per-row key counts for scale="entropy" come from the mask's builder when it attached them (O(B L),
#   kexue.attention.masks._attach_counts), else from the mask itself: on a CPU summed from the integer copy the
#   conversion makes anyway (masks._additive_counted, one pass for both), elsewhere by one read of the mask
#   (_row_counts); either way they are kept with the mask, as is the log n multiplier made from them.
# Everything is kept in ONE entry per thread (the last mask the thread saw; threads share nothing), keyed on the
# tensor object (weak reference), its identity (storage, version counter bumped by any in-place change, layout;
# masks._tensor_identity) and the call's geometry. The previous entry is dropped before anything is computed
# for a new mask, so at most one kept float mask per thread is alive.
_LOCAL = threading.local()          # one entry per thread: threads never see (or clear) each other's entry


def _mask_cache() -> dict:
    """This thread's kept-mask entry (a dict, empty until a mask tensor is seen)."""
    try:
        return _LOCAL.entry
    except AttributeError:
        _LOCAL.entry = {}
        return _LOCAL.entry


_ADDITIVE_MAX_ELEMENTS = 1 << 22  # 16 MB in fp32: L = 2048 with one mask per batch

# What a device's SDPA kernels return for a query row with no visible key, by device type:
# * "any": 0, with zero gradients, for bool and additive masks alike (CPU; tests/test_attention_core.py holds
#   torch to it: fully masked rows vs the reference, fp64/fp32/bf16, bool and additive masks);
# * "additive": the same for additive float masks (-inf = hidden) on every backend that takes a mask (math,
#   memory-efficient, cuDNN), but cuDNN's bool-mask path returns a finite, non-zero row (CUDA, torch 2.11 on an
#   H100): as every bool mask goes to SDPA in its additive form, no extra pass or host synchronisation is
#   needed (tests/test_cuda.py holds each backend to it);
# * missing: the empty rows are found (from the row counts when known), un-masked for the kernel, and the
#   output zeroed there afterwards (the "guard"; no host synchronisation off the CPU).
_EMPTY_ROWS_ZERO: dict[str, str] = {"cpu": "any"}
if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit()) >= (2, 11):
    _EMPTY_ROWS_ZERO["cuda"] = "additive"     # seen on torch 2.11; older releases take the guard


# attention() under torch.compile on a CPU calls the eager kernels as opaque ops (the kexue:: ops of masks.py);
# False makes it use the plain torch ops it uses on other devices (the tests run that path on a CPU too)
_TRACED_CPU_KERNELS = True


def _outside_inference_mode() -> contextlib.AbstractContextManager:
    """``torch.inference_mode(False)`` when inference mode is on, else nothing: what is kept between calls (the
    converted mask, its counts and multiplier) must be made as normal tensors, since a later training call
    saves them for backward, which an inference tensor cannot be; kept so, they serve inference calls too."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def _clear_mask_stats_cache() -> None:
    """Forget this thread's kept mask data (row counts, multipliers, float mask)."""
    _mask_cache().clear()


def _mask_entry(mask: object, geometry: tuple) -> dict:
    """The kept entry for ``mask`` under ``geometry``: the cached one if it is still valid, else a fresh one
    (which replaces the cached one for tensors; predicates and inference tensors get a throwaway entry)."""
    identity = _eager_identity(mask) if isinstance(mask, Tensor) else None
    if identity is None:                # a predicate, or an inference tensor (no version counter): nothing kept
        return {"ref": None, "identity": None, "counts": None, "empty": None, "empty_known": False, "ready": {},
                "mults": {}}
    kept = _mask_cache()
    ref = kept.get("ref")
    if ref is not None and ref() is mask and kept.get("identity") == identity and kept.get("geometry") == geometry:
        return kept
    kept.clear()                        # drop the old mask's data first (see the note above)
    kept.update(ref=weakref.ref(mask), identity=identity, geometry=geometry, counts=None, empty=None,
                empty_known=False, ready={}, mults={})
    return kept


def _prepare_mask(mask: Tensor | MaskMod, m4: Tensor, Lq: int, Lk: int, is_causal: bool, dtype: torch.dtype,
                  device: torch.device, want_counts: bool, *,
                  guard: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(the additive float mask to give SDPA, per-row key counts ``[..., Q, 1]`` int64 or None, rows with no
    visible key ``[..., Q, 1]`` bool or None). ``m4`` is the validated 4-D form of ``mask``; ``guard`` asks for
    the empty rows (devices missing from _EMPTY_ROWS_ZERO), which are then un-masked in the returned mask."""
    entry = _mask_entry(mask, (m4.shape[0], m4.shape[1], Lq, Lk, is_causal, device))
    ready = entry["ready"].get(dtype)   # type: ignore[union-attr]
    if ready is not None and (entry["counts"] is not None or not want_counts) and (entry["empty_known"] or not guard):
        return ready, entry["counts"], entry["empty"] if guard else None   # type: ignore[return-value]

    if is_causal:
        tri = render_mask(causal(0), 1, 1, Lq, Lk, device)
        allowed_or_additive = m4 & tri if m4.dtype == torch.bool else m4.masked_fill(~tri, float("-inf"))
    else:
        allowed_or_additive = m4
    if allowed_or_additive.is_floating_point():
        allowed_or_additive = _to_float_mask(allowed_or_additive, dtype)
    is_bool = allowed_or_additive.dtype == torch.bool
    fused = None                        # (float mask, counts) made in one pass, see masks._additive_counted
    if want_counts and entry["counts"] is None:
        counts = None
        if isinstance(mask, Tensor) and not is_causal and m4.shape[-1] == Lk:   # the mask as its builder made it
            # (not one whose key dim broadcasts: a builder counted its one column, a row sees Lk keys or none)
            attached = _attached_counts(mask, entry["identity"], as_4d=True, eager=True)   # type: ignore[arg-type]
            if attached is not None:
                counts = attached if attached.device == device else attached.to(device)
        if counts is None:
            allowed = allowed_or_additive if is_bool else allowed_or_additive > float("-inf")
            if allowed.shape[-1] != Lk:     # broadcast over the keys ([..., Q, 1]): a row sees all Lk or none
                counts = _row_counts(allowed.expand(*allowed.shape[:-1], Lk))
            elif is_bool and ready is None and not guard:
                fused = _additive_counted(allowed, dtype)
                counts = fused[1]
            else:
                counts = _row_counts(allowed)
            counts = counts.unsqueeze(-1)
        entry["counts"] = counts
    if guard and not entry["empty_known"]:
        if entry["counts"] is not None:
            rows = entry["counts"] == 0
        else:
            allowed = allowed_or_additive if is_bool else allowed_or_additive > float("-inf")
            rows = ~_row_any(allowed).unsqueeze(-1)
        if rows.is_cpu and not bool(rows.any()):   # off the CPU, asking would wait for the device
            rows = None
        entry["empty"], entry["empty_known"] = rows, True
    empty = entry["empty"] if guard else None
    if ready is None:
        ready = allowed_or_additive
        if empty is not None:   # let the kernel see every key of an empty row; its output is zeroed after
            ready = ready | empty if is_bool else ready.masked_fill(empty, 0.0)
        if fused is not None:
            ready = fused[0]
        elif is_bool:           # converted here: cheaper than the conversion SDPA makes inside the call
            ready = _additive(ready, dtype)
        # (not a float mask that takes gradients, e.g. a learnt bias: its converted form belongs to one graph)
        if entry["ref"] is not None and ready.numel() <= _ADDITIVE_MAX_ELEMENTS and not m4.requires_grad:
            entry["ready"][dtype] = ready   # type: ignore[index]
    return ready, entry["counts"], empty   # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _logn_lookup(k_len: int, min_n: float, base: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[K + 1]`` table of ``log_base(max(n, min_n))`` for ``n = 0..K`` (computed in float64, stored in dtype;
    outside inference mode, as :func:`_causal_logn_table`)."""
    with torch.inference_mode(False):
        return _logn_of_counts(torch.arange(k_len + 1), base, min_n).to(dtype=dtype, device=device)


_LIB.define("logn_multiplier(Tensor counts, SymInt k_len, float min_n, float base, ScalarType dtype) -> Tensor")
_LIB.impl("logn_multiplier", lambda counts, k_len, min_n, base, dtype:
          torch.take(_logn_lookup(k_len, min_n, base, dtype, counts.device), counts), "CPU")


@torch.library.register_fake("kexue::logn_multiplier", lib=_LIB)
def _(counts: Tensor, k_len: int, min_n: float, base: float, dtype: torch.dtype) -> Tensor:
    return counts.new_empty(counts.shape, dtype=dtype)


def _entropy_multiplier(counts: Tensor, k_len: int, min_n: float, base: float, dtype: torch.dtype) -> Tensor:
    """``log_base(max(n_i, min_n))`` as a ``[..., Q, 1]`` q multiplier: one ``take`` from a cached table of the
    ``K + 1`` possible values (rather than five elementwise ops per call), kept with the mask's entry."""
    kept = _mask_cache()
    mults = kept.get("mults") if kept.get("counts") is counts else None
    key = (k_len, min_n, base, dtype)
    if isinstance(mults, dict) and key in mults:
        return mults[key]
    mult = torch.take(_logn_lookup(k_len, min_n, base, dtype, counts.device), counts)
    if isinstance(mults, dict):
        mults[key] = mult
    return mult


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
    _check_common(scale, min_n, base, dropout_p, _tracing())
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
        logits = logits + torch.where(allowed, _to_float_mask(mask, cd), torch.zeros((), dtype=cd, device=q.device))
    logits = logits.masked_fill(~allowed, float("-inf"))
    logits = logits.masked_fill(empty, 0.0)           # keep softmax finite; the row is zeroed below
    p = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return (p @ vf).to(q.dtype)
