"""Length-aware attention scales, after "从熵不变性看Attention的Scale操作" (kexue.fm/archives/8823).

Su's entropy-invariant scale replaces ``1/sqrt(d)`` by ``log_512(n)/sqrt(d)``, where ``n`` is the number of
keys a query row can see (bert4keras ``softmax_plus``: unmasked keys per row, floored at 16). It equals the
standard scale at ``n = 512``, so nothing changes for the length the usual hyper-parameters were tuned at,
and it sharpens attention as more keys compete, keeping the row entropy roughly flat.

Public names: :func:`entropy_invariant_scale`, :func:`logn_factor`, :func:`keys_per_row`,
:func:`attention_entropy`, :class:`LogNScale` (the per-head learnable SSMax-style variant, off by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kexue._checks import check_positive, check_tensor

from .masks import (
    MaskMod,
    RankMask,
    _as_allowed,
    _attached_counts,
    _check_is_causal,
    _row_counts,
    _to_float_mask,
    causal,
    render_mask,
)

__all__ = ["entropy_invariant_scale", "logn_factor", "keys_per_row", "attention_entropy", "LogNScale"]

ScaleArg = str | float | Tensor | Callable[[Tensor], Tensor]


def _check_n(n: float | int | Tensor) -> None:
    if isinstance(n, Tensor):
        if n.is_complex() or n.dtype == torch.bool:
            raise TypeError(f"n must be a real number or a real tensor, got dtype {n.dtype}")
        if n.numel() and not bool((n >= 1).all()):
            raise ValueError(f"n must be >= 1 (a count of keys), got min {n.min().item()}")
        if n.numel() and n.is_floating_point() and not bool(torch.isfinite(n).all()):
            raise ValueError(f"n must be finite, got max {n.max().item()}")
        return
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"n must be a number or a tensor, got {type(n).__name__}")
    if not n >= 1:
        raise ValueError(f"n must be >= 1 (a count of keys), got {n}")
    if n == float("inf"):
        raise ValueError(f"n must be finite, got {n}")


def _check_base(base: float) -> float:
    b = check_positive("base", base)
    if b <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    return b


def _check_min_n(min_n: float) -> float:
    m = check_positive("min_n", min_n)
    if m < 1:
        raise ValueError(f"min_n must be >= 1, got {min_n}")
    return m


def logn_factor(n: float | Tensor, base: float = 512, min_n: float = 1) -> float | Tensor:
    """``log(max(n, min_n)) / log(base)``: the multiplier Attention-E puts on the standard ``1/sqrt(d)``.

    ``n`` is a number or a tensor of counts (>= 1, or >= 0 when ``min_n`` floors the zeros away). Tensors
    are computed in float64 and returned as float32 (float64 stays float64), so ``n = base`` gives exactly 1.

    Example:
        >>> logn_factor(64), logn_factor(512), logn_factor(4, min_n=16) == logn_factor(16)
        (0.6666666666666666, 1.0, True)
    """
    b = _check_base(base)
    m = _check_min_n(min_n)
    if isinstance(n, Tensor):
        if n.numel() and not n.is_complex() and n.dtype != torch.bool and not bool((n >= 0).all()):
            raise ValueError(f"n must be >= 0 (a count of keys), got min {n.min().item()}")
        nn_ = n.double().clamp_min(m)
        _check_n(nn_)
        out = torch.log(nn_) / math.log(b)
        return out if n.dtype == torch.float64 else out.float()
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n < 0:
        raise ValueError(f"n must be >= 0 (a count of keys), got {n}")
    _check_n(max(n, m) if isinstance(n, (int, float)) and not isinstance(n, bool) else n)
    return math.log(max(n, m)) / math.log(b)


def _logn_of_counts(counts: Tensor, base: float, min_n: float) -> Tensor:
    """``log(max(n, min_n)) / log(base)`` in float64 for internal key counts (>= 0, ``min_n`` >= 1 already
    checked): :func:`logn_factor` without its data-dependent check, so it also traces under torch.compile."""
    return torch.log(counts.double().clamp_min(float(min_n))) / math.log(base)


def entropy_invariant_scale(n: float | Tensor, head_dim: int, base: float = 512,
                            min_n: float = 1) -> float | Tensor:
    """Entropy-invariant attention scale ``log(n) / log(base) / sqrt(head_dim)`` (kexue.fm/archives/8823).

    Equals the standard ``1/sqrt(head_dim)`` exactly at ``n = base`` (512, the length usual hyper-parameters
    are tuned at) and 2/3 of it at ``n = 64``. ``n`` (number of keys a row sees) must be >= 1 and may be a
    tensor; ``min_n`` floors it first (Su's code uses 16; the default 1 leaves it as given).

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
    _check_n(n)
    return logn_factor(n, base, min_n) / math.sqrt(head_dim)


def keys_per_row(mask: Tensor | MaskMod | None, q_len: int, k_len: int, *, is_causal: bool = False,
                 min_n: int = 0) -> Tensor:
    """Number of keys each query row may see: int64 ``[..., q_len]`` (leading dims those of ``mask``).

    ``mask`` is a bool mask (True = may attend), an additive float mask (``-inf`` = hidden), a
    :class:`~kexue.attention.RankMask` (every batch row: ``[B|1, 1, q_len]``), another predicate (rendered with
    ``B = H = 1``) or ``None`` (every row sees ``k_len`` keys). ``is_causal`` adds the
    top-left causal mask of ``F.scaled_dot_product_attention``, so causal row ``i`` counts ``min(i + 1, k_len)``;
    padding keys are excluded by the mask. ``min_n`` floors the counts (Su's implementation uses 16); the
    default 0 returns the raw counts, where 0 marks a fully masked row.

    Example:
        >>> keys_per_row(None, 4, 4, is_causal=True).tolist()
        [1, 2, 3, 4]
        >>> from kexue.attention.masks import padding_mask
        >>> keys_per_row(padding_mask(torch.tensor([[1, 1, 1, 0]])), 2, 4).tolist()
        [[[3, 3]]]
    """
    _check_is_causal(is_causal)
    for name, v in (("q_len", q_len), ("k_len", k_len)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if mask is None:
        i = torch.arange(q_len)
        counts = (i + 1).clamp_max(k_len) if is_causal else torch.full((q_len,), k_len, dtype=torch.long)
        return counts.clamp_min(min_n) if min_n else counts
    if isinstance(mask, Tensor):
        if mask.dim() < 2:
            raise ValueError(f"mask must have at least 2 dims [..., Q, K], got shape {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            allowed = mask
        elif mask.is_floating_point():
            allowed = mask > float("-inf")
        else:
            raise TypeError(f"mask must be a bool or an additive float tensor, got dtype {mask.dtype}")
        if any(m not in (1, n) for m, n in zip(allowed.shape[-2:], (q_len, k_len))):
            raise ValueError(f"mask's last two dims {tuple(mask.shape[-2:])} do not broadcast to "
                             f"[q_len, k_len] = [{q_len}, {k_len}]")
    elif isinstance(mask, RankMask):                 # every batch row of it: [B|1, 1, q_len]
        allowed = mask.to_dense(q_len if mask.q_len is None else None)
    elif callable(mask):
        allowed = render_mask(mask, 1, 1, q_len, k_len)
    else:
        raise TypeError(f"mask must be a tensor, a mask predicate or None, got {type(mask).__name__}")
    counts = None
    if isinstance(mask, Tensor) and not is_causal and tuple(mask.shape[-2:]) == (q_len, k_len):
        counts = _attached_counts(mask)          # worked out by the mask's builder, if it has not changed since
        if counts is not None:
            counts = counts.clone()              # (kept with the mask: the caller gets a copy to change)
    if counts is None:
        if is_causal:
            allowed = allowed & render_mask(causal(0), 1, 1, q_len, k_len, allowed.device)[0, 0]
        counts = _row_counts(allowed.expand(*allowed.shape[:-2], q_len, k_len))
    return counts.clamp_min(min_n) if min_n else counts


def _check_row_shape(name: str, mult: Tensor, like: Tensor) -> None:
    """A per-row multiplier must broadcast to ``[B, H, Q, 1]`` of ``like`` (q) without growing it."""
    want = (*like.shape[:-1], 1)
    try:
        ok = mult.dim() <= 4 and tuple(torch.broadcast_shapes(tuple(mult.shape), want)) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to [B, H, Q, 1] = {list(want)}, got shape {tuple(mult.shape)}")


def _row_multiplier(scale: ScaleArg, counts: Tensor | None, head_dim: int, min_n: float, base: float,
                    like: Tensor) -> tuple[Tensor | None, float]:
    """Resolve ``scale`` into (per-row q multiplier or None, scalar scale for the kernel).

    The effective logits scale of row ``i`` is ``multiplier[i] * scalar``. ``counts`` are the raw per-row key
    counts (broadcastable to ``[B, H, Q]``), needed only for ``"entropy"`` and callables.
    """
    inv = 1.0 / math.sqrt(head_dim)
    if isinstance(scale, str):
        if scale == "standard":
            return None, inv
        if scale == "entropy":
            assert counts is not None
            return _logn_of_counts(counts, base, min_n).to(like.dtype).unsqueeze(-1), inv
        raise ValueError(f"scale must be 'standard', 'entropy', a positive float, a tensor or a callable, "
                         f"got {scale!r}")
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale tensor must be floating point, got dtype {scale.dtype}")
        _check_row_shape("scale tensor", scale, like)
        return scale.to(like.dtype), 1.0
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return None, check_positive("scale", scale)
    if callable(scale):
        assert counts is not None
        mult = scale(counts)
        if not isinstance(mult, Tensor):
            raise TypeError(f"a callable scale must return a tensor, got {type(mult).__name__}")
        _check_row_shape("a callable scale's result", mult, like)
        return mult.to(like.dtype), inv
    raise TypeError(f"scale must be 'standard', 'entropy', a float, a tensor or a callable, got "
                    f"{type(scale).__name__}")


def attention_entropy(q: Tensor, k: Tensor, mask: Tensor | MaskMod | None = None,
                      scale: ScaleArg = "standard", *, is_causal: bool = False, min_n: float = 16,
                      base: float = 512) -> Tensor:
    """Entropy (nats) of every attention row, float32 ``[B, H, Q]``; masked keys are excluded.

    ``H_i = -sum_j a_ij log a_ij`` with ``a = softmax(scale_i * q_i . k_j)`` over the keys row ``i`` may see.
    ``scale`` is as in :func:`kexue.attention.attention`. A fully masked row has entropy 0 (no distribution).
    A uniform row over ``n`` keys has entropy ``log n``.

    Example:
        >>> q = torch.zeros(1, 1, 3, 4); k = torch.randn(1, 1, 3, 4)
        >>> torch.allclose(attention_entropy(q, k, is_causal=True)[0, 0], torch.log(torch.tensor([1., 2., 3.])))
        True
    """
    check_tensor("q", q, floating=True, dim=4)
    check_tensor("k", k, floating=True, dim=4)
    _check_min_n(min_n)
    _check_base(base)
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, H, K, D] = [{B}, {H}, K, {D}], got {tuple(k.shape)}")
    Lk = k.shape[2]
    allowed = _as_allowed(mask, B, H, Lq, Lk, is_causal, q.device)
    counts = keys_per_row(allowed, Lq, Lk) if allowed is not None else torch.full((Lq,), Lk, device=q.device)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(cd), k.to(cd)
    mult, s = _row_multiplier(scale, counts, D, min_n, base, qf)
    logits = (qf @ kf.transpose(-1, -2)) * s
    if mult is not None:
        logits = logits * mult
    if isinstance(mask, Tensor) and mask.is_floating_point():   # an additive mask's finite values are a bias
        bias = _to_float_mask(mask.to(q.device), cd)
        logits = logits + torch.where(bias > float("-inf"), bias, torch.zeros((), dtype=cd, device=q.device))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=cd, device=q.device))
    ent = -plogp.sum(-1)
    return ent.float()


class LogNScale(nn.Module):
    """Per-row, per-head query multiplier ``s_h * log(max(n, min_n)) / log(base)`` (SSMax-style option).

    With ``learnable=False`` (default) ``s_h = 1`` is a buffer and this is exactly Su's entropy-invariant
    factor (kexue.fm/archives/8823). With ``learnable=True``, ``s`` is a parameter per head initialised to
    ``init`` — the Scalable-Softmax idea (Nakanishi 2025, ``s * log n``) made per-head and mask-aware, in the
    ``log_base`` parametrisation so that ``s = 1`` starts from the entropy-invariant scale.

    ``forward(counts)`` takes the per-row key counts (:func:`keys_per_row`; ``[Q]``, ``[H|1, Q]`` or
    ``[B|1, H|1, Q]``) and returns the multiplier ``[B|1, H, Q, 1]`` to multiply into q (on top of
    ``1/sqrt(d)``). It can also be passed directly as ``scale=`` to :func:`kexue.attention.attention`.

    Example:
        >>> m = LogNScale(2)
        >>> m(torch.tensor([512, 64])).shape
        torch.Size([1, 2, 2, 1])
    """

    def __init__(self, num_heads: int, learnable: bool = False, base: float = 512, min_n: float = 16,
                 init: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        self.num_heads = num_heads
        self.base = _check_base(base)
        self.min_n = _check_min_n(min_n)
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
