"""Length-aware attention scales, after "从熵不变性看Attention的Scale操作" (kexue.fm/archives/8823).

Su's entropy-invariant scale replaces ``1/sqrt(d)`` by ``log_512(n)/sqrt(d)``, where ``n`` is the number of
keys a query row can see (bert4keras ``softmax_plus``: unmasked keys per row, floored at 16). It equals the
standard scale at ``n = 512``, so nothing changes for the length the usual hyper-parameters were tuned at,
and it sharpens attention as more keys compete, keeping the row entropy roughly flat.

Public names: :func:`entropy_invariant_scale`, :func:`logn_factor`, :func:`keys_per_row`,
:func:`attention_entropy`, :class:`LogNScale` (the per-head learnable SSMax-style variant, off by default) and
:func:`resolve_scale`, the one place a ``scale=`` argument is interpreted (attention, its reference, the entropy
diagnostics, the fused kernel and the Transformer all call it). One set of defaults everywhere:
``base=512`` (:data:`BASE`) and ``min_n=16`` (:data:`MIN_N`, Su's floor), both keyword-only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kexue._checks import check_positive, check_tensor, compute_dtype

from . import _cpu
from .masks import MaskMod, check_is_causal, render_mask
from .prepared import allowed_of, as_prepared
from .ranks import RankMask

__all__ = ["BASE", "MIN_N", "ScaleArg", "entropy_invariant_scale", "logn_factor", "keys_per_row",
           "attention_entropy", "LogNScale", "resolve_scale", "check_scale"]

BASE = 512
MIN_N = 16
ScaleArg = str | float | Tensor | Callable[[Tensor], Tensor]
_SCALE_KINDS = "'standard', 'entropy', a positive float, a tensor or a callable (e.g. LogNScale)"


def check_base(base: float) -> float:
    """``base`` of the log: a finite number > 1."""
    b = check_positive("base", base)
    if b <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    return b


def check_min_n(min_n: float) -> float:
    """``min_n``, the floor on the key count: a finite number >= 1."""
    m = check_positive("min_n", min_n)
    if m < 1:
        raise ValueError(f"min_n must be >= 1, got {min_n}")
    return m


def check_scale(scale: ScaleArg, *, min_n: float = MIN_N, base: float = BASE) -> None:
    """Check a ``scale=`` argument and its ``min_n`` / ``base`` (raises ``ValueError`` / ``TypeError``)."""
    check_min_n(min_n)
    check_base(base)
    if isinstance(scale, str):
        if scale not in ("standard", "entropy"):
            raise ValueError(f"scale must be {_SCALE_KINDS}, got {scale!r}")
    elif isinstance(scale, bool):
        raise TypeError(f"scale must be {_SCALE_KINDS}, got a bool")
    elif isinstance(scale, (int, float)):
        check_positive("scale", scale)
    elif not (isinstance(scale, Tensor) or callable(scale)):
        raise TypeError(f"scale must be {_SCALE_KINDS}, got {type(scale).__name__}")


def needs_counts(scale: ScaleArg) -> bool:
    """Whether ``scale`` is worked out from the per-row key counts (``"entropy"`` and callables)."""
    return (isinstance(scale, str) and scale == "entropy") or (
        callable(scale) and not isinstance(scale, (str, Tensor)))


def _check_n(n: float | int | Tensor) -> None:
    if isinstance(n, Tensor):
        if n.is_complex() or n.dtype == torch.bool:
            raise TypeError(f"n must be a real number or a real tensor, got dtype {n.dtype}")
        if n.numel() and not bool((n >= 0).all()):
            raise ValueError(f"n must be >= 0 (a count of keys), got min {n.min().item()}")
        if n.numel() and n.is_floating_point() and not bool(torch.isfinite(n).all()):
            raise ValueError(f"n must be finite, got max {n.max().item()}")
        return
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"n must be a number or a tensor, got {type(n).__name__}")
    if not n >= 0:
        raise ValueError(f"n must be >= 0 (a count of keys), got {n}")
    if n == float("inf"):
        raise ValueError(f"n must be finite, got {n}")


def logn_of_counts(counts: Tensor, *, base: float, min_n: float) -> Tensor:
    """``log(max(n, min_n)) / log(base)`` in float64 for key counts already known to be valid: no data-dependent
    check, so it also traces under torch.compile."""
    return counts.to(torch.float64, copy=True).clamp_min_(float(min_n)).log_().div_(math.log(base))


def logn_factor(n: float | Tensor, *, base: float = BASE, min_n: float = MIN_N) -> float | Tensor:
    """``log(max(n, min_n)) / log(base)``: the multiplier Attention-E puts on the standard ``1/sqrt(d)``.

    ``n`` is a number or a tensor of key counts (>= 0). Tensors are computed in float64 and returned as float32
    (float64 stays float64), so ``n = base`` gives exactly 1. Pass ``min_n=1`` for the bare formula ``log_base(n)``
    (then ``n`` must be >= 1).

    Example:
        >>> logn_factor(64), logn_factor(512), logn_factor(4) == logn_factor(16)
        (0.6666666666666666, 1.0, True)
    """
    b, m = check_base(base), check_min_n(min_n)
    _check_n(n)
    if isinstance(n, Tensor):
        out = logn_of_counts(n, base=b, min_n=m)
        return out if n.dtype == torch.float64 else out.float()
    return math.log(max(n, m)) / math.log(b)


def entropy_invariant_scale(n: float | Tensor, head_dim: int, *, base: float = BASE,
                            min_n: float = MIN_N) -> float | Tensor:
    """Entropy-invariant attention scale ``log(max(n, min_n)) / log(base) / sqrt(head_dim)``
    (kexue.fm/archives/8823).

    Equals the standard ``1/sqrt(head_dim)`` exactly at ``n = base`` (512, the length usual hyper-parameters are
    tuned at) and 2/3 of it at ``n = 64``. ``n`` (number of keys a row sees) may be a tensor; ``min_n`` floors it
    first (Su's code uses 16; ``min_n=1`` gives the bare formula).

    Example:
        >>> entropy_invariant_scale(512, 64) == 1 / 8
        True
        >>> round(entropy_invariant_scale(64, 64) * 8, 6)
        0.666667
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, float)):
        raise TypeError(f"head_dim must be a number, got {type(head_dim).__name__}")
    if not 0 < head_dim < float("inf"):
        raise ValueError(f"head_dim must be a finite number > 0, got {head_dim}")
    return logn_factor(n, base=base, min_n=min_n) / math.sqrt(head_dim)


def _check_row_shape(name: str, mult: Tensor, like: Tensor) -> None:
    """A per-row multiplier must broadcast to ``[B, H, Q, 1]`` of ``like`` (q) without growing it."""
    want = (*like.shape[:-1], 1)
    try:
        ok = mult.dim() <= 4 and tuple(torch.broadcast_shapes(tuple(mult.shape), want)) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to [B, H, Q, 1] = {list(want)}, got shape {tuple(mult.shape)}")


def resolve_scale(scale: ScaleArg, *, head_dim: int, like: Tensor, counts: Tensor | None = None,
                  min_n: float = MIN_N, base: float = BASE) -> tuple[Tensor | None, float]:
    """Interpret a ``scale=`` argument: ``(per-row q multiplier or None, scalar scale)``, so that row ``i``'s logits
    scale is ``multiplier[i] * scalar``.

    * ``"standard"``: ``(None, 1/sqrt(head_dim))``;
    * ``"entropy"``: ``log_base(max(n_i, min_n))`` per row on top of ``1/sqrt(head_dim)`` (Attention-E);
    * a positive float: ``(None, scale)``;
    * a tensor broadcastable to ``[B, H, Q, 1]``: the full per-row logits scale, ``(scale, 1.0)``;
    * a callable (e.g. :class:`LogNScale`): called with the per-row key counts, returns the multiplier.

    ``counts`` (int64, broadcastable to ``[B, H, Q, 1]``) are the keys each row may see; they are needed for
    ``"entropy"`` and callables (:func:`needs_counts`). The multiplier is in ``like``'s dtype.

    Example:
        >>> q = torch.zeros(1, 1, 3, 4)
        >>> mult, s = resolve_scale("entropy", head_dim=4, like=q, counts=torch.tensor([[[[512], [16], [4]]]]))
        >>> mult[0, 0, :, 0].tolist(), s
        ([1.0, 0.4444444477558136, 0.4444444477558136], 0.5)
    """
    inv = 1.0 / math.sqrt(head_dim)
    if isinstance(scale, str):
        if scale == "standard":
            return None, inv
        if scale == "entropy":
            if counts is None:
                raise ValueError("scale='entropy' needs the per-row key counts")
            return logn_of_counts(counts, base=base, min_n=min_n).to(like.dtype), inv
        raise ValueError(f"scale must be {_SCALE_KINDS}, got {scale!r}")
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale tensor must be floating point, got dtype {scale.dtype}")
        _check_row_shape("scale tensor", scale, like)
        return scale.to(like.dtype), 1.0
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return None, check_positive("scale", scale)
    if callable(scale):
        if counts is None:
            raise ValueError("a callable scale needs the per-row key counts")
        mult = scale(counts[..., 0] if counts.dim() == 4 else counts)
        if not isinstance(mult, Tensor):
            raise TypeError(f"a callable scale must return a tensor, got {type(mult).__name__}")
        _check_row_shape("a callable scale's result", mult, like)
        return mult.to(like.dtype), inv
    raise TypeError(f"scale must be {_SCALE_KINDS}, got {type(scale).__name__}")


def keys_per_row(mask: Tensor | MaskMod | RankMask | None, q_len: int, k_len: int, *,
                 is_causal: bool = False) -> Tensor:
    """Number of keys each query row may see: int64 ``[..., q_len]`` (leading dims those of ``mask``).

    ``mask`` is a bool mask (True = may attend), an additive float mask (``-inf``, or any value at or below the
    dtype's most negative finite value -- the Hugging Face convention -- = hidden), a
    :class:`~kexue.attention.RankMask` (every batch row: ``[B|1, 1, q_len]``), another predicate (rendered with
    ``B = H = 1``) or ``None`` (every row sees ``k_len`` keys). ``is_causal`` adds the top-left causal mask of
    ``F.scaled_dot_product_attention``, so causal row ``i`` counts ``min(i + 1, k_len)``. 0 marks a fully masked
    row. (The scales floor the counts at ``min_n``; this function returns them raw.)

    Example:
        >>> keys_per_row(None, 4, 4, is_causal=True).tolist()
        [1, 2, 3, 4]
        >>> from kexue.attention import padding_mask
        >>> keys_per_row(padding_mask(torch.tensor([[1, 1, 1, 0]])), 2, 4).tolist()
        [[[3, 3]]]
    """
    check_is_causal(is_causal)
    for name, v in (("q_len", q_len), ("k_len", k_len)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if mask is None:
        i = torch.arange(q_len)
        return (i + 1).clamp_max(k_len) if is_causal else torch.full((q_len,), k_len, dtype=torch.long)
    if isinstance(mask, Tensor):
        if mask.dim() < 2:
            raise ValueError(f"mask must have at least 2 dims [..., Q, K], got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be a bool or an additive float tensor, got dtype {mask.dtype}")
        if any(m not in (1, n) for m, n in zip(mask.shape[-2:], (q_len, k_len))):
            raise ValueError(f"mask's last two dims {tuple(mask.shape[-2:])} do not broadcast to "
                             f"[q_len, k_len] = [{q_len}, {k_len}]")
        allowed = allowed_of(mask)
    elif isinstance(mask, RankMask):                 # every batch row of it: [B|1, 1, q_len]
        allowed = mask.to_dense(q_len)
    elif callable(mask):
        allowed = render_mask(mask, 1, 1, q_len, k_len)
    else:
        raise TypeError(f"mask must be a tensor, a mask predicate, a RankMask or None, got {type(mask).__name__}")
    if is_causal:
        allowed = allowed & render_mask(lambda b, h, q, kv: kv <= q, 1, 1, q_len, k_len, allowed.device)[0, 0]
    return _cpu.row_counts(allowed.expand(*allowed.shape[:-2], q_len, k_len))


def attention_entropy(q: Tensor, k: Tensor, mask=None, *, scale: ScaleArg = "standard", is_causal: bool = False,
                      min_n: float = MIN_N, base: float = BASE) -> Tensor:
    """Entropy (nats) of every attention row, float32 ``[B, H, Q]``; masked keys are excluded.

    ``H_i = -sum_j a_ij log a_ij`` with ``a = softmax(scale_i * q_i . k_j)`` over the keys row ``i`` may see.
    ``mask`` and ``scale`` are as in :func:`kexue.attention.attention` (a :class:`~kexue.attention.PreparedMask`
    too). A fully masked row has entropy 0 (no distribution). A uniform row over ``n`` keys has entropy ``log n``.

    Example:
        >>> q = torch.zeros(1, 1, 3, 4); k = torch.randn(1, 1, 3, 4)
        >>> torch.allclose(attention_entropy(q, k, is_causal=True)[0, 0], torch.log(torch.tensor([1., 2., 3.])))
        True
    """
    check_tensor("q", q, floating=True, dim=4)
    check_tensor("k", k, floating=True, dim=4)
    check_scale(scale, min_n=min_n, base=base)
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, H, K, D] = [{B}, {H}, K, {D}], got {tuple(k.shape)}")
    pm = as_prepared(mask, batch=B, heads=H, q_len=Lq, k_len=k.shape[2], is_causal=is_causal, device=q.device)
    cd = torch.float64 if q.dtype == torch.float64 else compute_dtype(q.dtype)
    qf, kf = q.to(cd), k.to(cd)
    mult, s = resolve_scale(scale, head_dim=D, like=qf, counts=pm.counts() if needs_counts(scale) else None,
                            min_n=min_n, base=base)
    logits = (qf @ kf.transpose(-1, -2)) * s
    if mult is not None:
        logits = logits * mult
    bias = pm.additive(cd)
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=cd, device=q.device))
    ent = -plogp.sum(-1)
    return torch.nan_to_num(ent, nan=0.0).float()   # (a row that sees no key: log_softmax of all -inf)


class LogNScale(nn.Module):
    """Per-row, per-head query multiplier ``s_h * log(max(n, min_n)) / log(base)`` (SSMax-style option).

    With ``learnable=False`` (default) ``s_h = 1`` is a buffer and this is exactly Su's entropy-invariant
    factor (kexue.fm/archives/8823). With ``learnable=True``, ``s`` is a parameter per head initialised to
    ``init`` — the Scalable-Softmax idea (Nakanishi 2025, ``s * log n``) made per-head and mask-aware, in the
    ``log_base`` parametrisation so that ``s = 1`` starts from the entropy-invariant scale.

    ``forward(counts)`` takes the per-row key counts (:func:`keys_per_row`; ``[Q]``, ``[H|1, Q]`` or
    ``[B|1, H|1, Q]``) and returns the multiplier ``[B|1, H, Q, 1]`` to multiply into q (on top of
    ``1/sqrt(d)``). Pass it as ``scale=`` to :func:`kexue.attention.attention`.

    Example:
        >>> m = LogNScale(2)
        >>> m(torch.tensor([512, 64])).shape
        torch.Size([1, 2, 2, 1])
    """

    def __init__(self, num_heads: int, *, learnable: bool = False, base: float = BASE, min_n: float = MIN_N,
                 init: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        self.num_heads = num_heads
        self.base = check_base(base)
        self.min_n = check_min_n(min_n)
        self.learnable = bool(learnable)
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init!r}")
        s = torch.full((num_heads,), float(init))
        if self.learnable:
            self.s = nn.Parameter(s)
        else:
            self.register_buffer("s", s)

    def forward(self, counts: Tensor) -> Tensor:
        check_tensor("counts", counts)
        if counts.dim() > 3:
            raise ValueError(f"counts must be [Q], [H, Q] or [B, H, Q], got shape {tuple(counts.shape)}")
        c = counts.reshape((1,) * (3 - counts.dim()) + tuple(counts.shape))
        if c.shape[1] not in (1, self.num_heads):
            raise ValueError(f"counts head dim must be 1 or {self.num_heads}, got shape {tuple(counts.shape)}")
        f = torch.log(c.to(self.s.dtype).clamp_min(self.min_n)) / math.log(self.base)
        return (self.s.view(1, -1, 1) * f).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, learnable={self.learnable}, base={self.base}, min_n={self.min_n}"
