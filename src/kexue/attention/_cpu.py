"""The two CPU kernels that earn their keep in ``kexue bench attention``, behind one switch.

* :func:`row_counts` — ``allowed.sum(-1)`` of a bool mask (the per-row key counts the entropy scale needs). torch's
  bool ``sum`` promotes every element to int64 first; here eight bools are read as one int64 word and up to 255
  words are added as plain int64 (each byte lane stays <= 255, so no lane carries into its neighbour), then the
  few partial sums per row are split back into bytes. At L = 8192 (a ``[1, 1, L, L]`` mask, 2 cores) the plain
  sum took ~300 ms, a third of SDPA's own time; this takes ~2 ms.
* :func:`to_additive` — bool mask → additive float mask (0 / -inf), made on the float's bit pattern (the bools
  cast to integers, then one multiply-add in place). SDPA converts a bool mask itself on every call, at more
  than twice this cost on a CPU, so handing it the additive form made here is what keeps a call with a mask at
  or above SDPA's own speed.
* :func:`to_additive_counted` — both in one pass over the mask (the counts summed from the integer copy).

``ENABLED`` is the switch (``KEXUE_ATTENTION_PLAIN=1`` in the environment turns it off at import): off, or on
other devices, every function is the plain torch expression it replaces, which is also what the tests hold the
fast forms to. While ``torch.compile`` or ``torch.export`` traces on a CPU, the three are called as the opaque
ops ``kexue::row_counts``, ``kexue::to_additive`` and ``kexue::to_additive_counted`` (registered here, with
shape functions): inductor's own code for these bool reductions and selects ran slower than the eager kernels
(``kexue bench attention --only compiled``, the new-mask rows).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

ENABLED = os.environ.get("KEXUE_ATTENTION_PLAIN", "") not in ("1", "true", "yes")

# The bit pattern of -inf read as a signed integer of the float's width (the sign bit and an all-ones exponent).
_NEG_INF_BITS = {torch.float32: (torch.int32, -(1 << 23)), torch.float64: (torch.int64, -(1 << 52)),
                 torch.float16: (torch.int16, -(1 << 10)), torch.bfloat16: (torch.int16, -(1 << 7))}
_LANE_GROUP = 255  # int64 words of 8 bool bytes added per partial sum: byte lanes stay <= 255


def _mode(t: Tensor) -> str:
    """"plain" (switch off or not a CPU tensor), "op" (a CPU trace: the registered op) or "eager"."""
    if not ENABLED or t.device.type != "cpu":
        return "plain"
    return "op" if torch.compiler.is_compiling() or torch.compiler.is_exporting() else "eager"


def row_counts_plain(allowed: Tensor) -> Tensor:
    """The reference: ``allowed.sum(-1)`` as int64."""
    return allowed.sum(-1, dtype=torch.int64)


def to_additive_plain(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The reference: ``torch.where(allowed, 0, -inf)`` in ``dtype``, contiguous."""
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device),
                       torch.full((), float("-inf"), dtype=dtype, device=allowed.device)).contiguous()


def row_counts(allowed: Tensor) -> Tensor:
    """Int64 ``[..., Q]`` number of True per row of a bool ``[..., Q, K]`` tensor (see the module docstring)."""
    mode = _mode(allowed)
    if mode == "plain":
        return row_counts_plain(allowed)
    return torch.ops.kexue.row_counts(allowed) if mode == "op" else _row_counts_eager(allowed)


def _row_counts_eager(allowed: Tensor) -> Tensor:
    n = allowed.shape[-1]
    if n and n % 8 == 0 and allowed.stride(-1) == 1 and allowed.storage_offset() % 8 == 0 and \
            all(st % 8 == 0 for st, sz in zip(allowed.stride()[:-1], allowed.shape[:-1]) if sz > 1):
        try:
            words = allowed.view(torch.int64)
        except RuntimeError:
            words = None
        if words is not None:
            w = words.shape[-1]
            if w <= _LANE_GROUP:        # one group (L <= 2040): one sum, no slices
                return words.sum(-1, keepdim=True).contiguous().view(torch.uint8).sum(-1, dtype=torch.int64)
            full = (w // _LANE_GROUP) * _LANE_GROUP
            parts = [words[..., :full].unflatten(-1, (w // _LANE_GROUP, _LANE_GROUP)).sum(-1)]
            if w > full:
                parts.append(words[..., full:].sum(-1, keepdim=True))
            lane_sums = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
            return lane_sums.contiguous().view(torch.uint8).sum(-1, dtype=torch.int64)
    return allowed.view(torch.uint8).sum(-1, dtype=torch.int64)


def to_additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask → contiguous additive ``dtype`` mask (0 where True, -inf where False)."""
    mode = _mode(allowed)
    if dtype not in _NEG_INF_BITS or mode == "plain":
        return to_additive_plain(allowed, dtype)
    return torch.ops.kexue.to_additive(allowed, dtype) if mode == "op" else _to_additive_eager(allowed, dtype)


def _to_additive_eager(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    int_dtype, neg_inf = _NEG_INF_BITS[dtype]
    out = torch.empty(allowed.shape, dtype=int_dtype).copy_(allowed)
    # 1/0 -> 0/-inf on the integer view of the float: neg_inf + x * (-neg_inf), in place as one kernel
    return torch.add(torch.tensor(neg_inf, dtype=int_dtype), out, alpha=-neg_inf, out=out).view(dtype)


def to_additive_counted(allowed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(to_additive(allowed, dtype), row_counts(allowed))``; for fp32/fp64 on a CPU in one pass (the counts
    summed from the integer copy of the bools the conversion makes anyway). ``allowed`` must have its full key
    dimension (not a broadcast 1)."""
    bits = _NEG_INF_BITS.get(dtype)
    mode = _mode(allowed)
    if bits is None or bits[0] == torch.int16 or mode == "plain" or allowed.shape[-1] == 0:
        return to_additive(allowed, dtype), row_counts(allowed)
    if mode == "op":
        return torch.ops.kexue.to_additive_counted(allowed, dtype)
    return _to_additive_counted_eager(allowed, dtype)


def _to_additive_counted_eager(allowed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    int_dtype, neg_inf = _NEG_INF_BITS[dtype]
    out = torch.empty(allowed.shape, dtype=int_dtype).copy_(allowed)
    counts = out.sum(-1, dtype=int_dtype).long()     # (the sum in the copy's own type: int64 ran slower)
    return torch.add(torch.tensor(neg_inf, dtype=int_dtype), out, alpha=-neg_inf, out=out).view(dtype), counts


# ---- the three as ops, for traces on a CPU (see the module docstring)
_LIB = torch.library.Library("kexue", "FRAGMENT")
_LIB.define("row_counts(Tensor allowed) -> Tensor")
_LIB.define("to_additive(Tensor allowed, ScalarType dtype) -> Tensor")
_LIB.define("to_additive_counted(Tensor allowed, ScalarType dtype) -> (Tensor, Tensor)")
_LIB.impl("row_counts", _row_counts_eager, "CPU")
_LIB.impl("to_additive", _to_additive_eager, "CPU")
_LIB.impl("to_additive_counted", _to_additive_counted_eager, "CPU")


@torch.library.register_fake("kexue::row_counts", lib=_LIB)
def _row_counts_shape(allowed: Tensor) -> Tensor:
    return allowed.new_empty(allowed.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("kexue::to_additive", lib=_LIB)
def _to_additive_shape(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return allowed.new_empty(allowed.shape, dtype=dtype)


@torch.library.register_fake("kexue::to_additive_counted", lib=_LIB)
def _to_additive_counted_shape(allowed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return allowed.new_empty(allowed.shape, dtype=dtype), allowed.new_empty(allowed.shape[:-1], dtype=torch.int64)
