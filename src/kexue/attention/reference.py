"""The plain ``softmax(scale * Q K^T + mask) V`` every fast attention path is tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from kexue._checks import compute_dtype

from .prepared import as_prepared, check_dropout, check_qkv
from .scaling import BASE, MIN_N, ScaleArg, check_scale, needs_counts, resolve_scale

__all__ = ["attention_reference"]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask=None, *, scale: ScaleArg = "standard",
                        min_n: float = MIN_N, base: float = BASE, dropout_p: float = 0.0, is_causal: bool = False,
                        generator: torch.Generator | None = None) -> Tensor:
    """Naive ``softmax(scale * Q K^T + mask) V`` on materialised scores; the reference for
    :func:`~kexue.attention.attention`.

    Same arguments and conventions as :func:`~kexue.attention.attention` (any mask but a FlexAttention block
    mask). Computes in fp32 for fp16/bf16 inputs (fp64 stays fp64) and returns the input dtype. The per-row key
    counts for ``scale="entropy"`` are summed from the materialised mask. Dropout (if any) zeroes attention
    probabilities with a draw from ``generator`` and rescales by ``1/(1 - dropout_p)``. A row that sees no key
    outputs 0.

    Example:
        >>> from kexue.attention import attention
        >>> q = k = v = torch.randn(1, 2, 5, 4)
        >>> torch.allclose(attention_reference(q, k, v, is_causal=True), attention(q, k, v, is_causal=True),
        ...                atol=1e-6)
        True
    """
    B, H, Lq, Lk, D = check_qkv(q, k, v)
    check_scale(scale, min_n=min_n, base=base)
    dropout_p = check_dropout(dropout_p)
    pm = as_prepared(mask, batch=B, heads=H, q_len=Lq, k_len=Lk, is_causal=is_causal, device=q.device)
    cd = compute_dtype(q.dtype)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    allowed = pm.allowed()
    if allowed is None:
        allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    allowed = allowed.expand(*allowed.shape[:2], Lq, Lk)
    counts = allowed.sum(-1, keepdim=True)
    empty = counts == 0
    logits = qf @ kf.transpose(-1, -2)
    mult, s = resolve_scale(scale, head_dim=D, like=qf, counts=counts if needs_counts(scale) else None,
                            min_n=min_n, base=base)
    logits = logits * s
    if mult is not None:
        logits = logits * mult
    bias = pm.bias(cd)
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    logits = logits.masked_fill(empty, 0.0)           # keep softmax finite; the row is zeroed below
    p = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return (p @ vf).to(q.dtype)
