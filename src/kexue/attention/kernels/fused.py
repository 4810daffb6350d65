"""One fused kernel for the masks of article 3 and the scale of article 8: :func:`fused_attention`.

EXPERIMENTAL: these Triton kernels are built and compile-checked (``pytest -m kernels``: every launch setting
compiled to sm_80 / sm_90 cubins, and run in Triton's interpreter against the reference), but they have never
run on a GPU. Nothing imports this package unless asked: ``attention(..., backend="fused")`` or
``Transformer(attention_backend="fused")``.

``attention(q, k, v, mask, scale="entropy")`` on SDPA pre-multiplies q by its per-row factor in a kernel of its
own and hands SDPA an L x L mask. Here both are worked out inside one flash-attention kernel (Triton) from
O(L) numbers, a :class:`~kexue.attention.RankMask`:

* the mask: query ``i`` sees key ``j`` iff ``k_rank[j] <= q_rank[i]`` (UniLM's ``cumsum(segment_ids)``,
  prefix-LM, permutation order, hidden padding keys), ``k_group[j] == q_group[i]`` (packed documents) and
  ``j <= i + offset`` (causal) -- no L x L mask is built or read, and each block of rows loops only over the
  key blocks from the first to the last it may see;
* the scale: ``c_i = log_base(max(n_i, min_n)) / sqrt(d)`` (kexue.fm/archives/8823), with ``n_i`` the number of
  keys row ``i`` sees, counted in the kernel (or taken from a :class:`~kexue.attention.PreparedMask` that knows
  them); a per-head :class:`~kexue.attention.LogNScale` or a per-row scale tensor multiplies in, with gradients.

A row that sees no key outputs 0 with zero gradients, as everywhere in :mod:`kexue.attention`. fp16 and bf16
are computed with fp32 accumulation (p and dS rounded to the input type before their matrix products, as
FlashAttention does); fp32 in full fp32 products (no TF32). No dropout.

Where it runs: CUDA tensors with ``triton`` installed (``fused_available()``). With ``TRITON_INTERPRET=1`` set
before the kernels are first imported, Triton's interpreter runs the same kernels on CPU tensors (slowly): that
is how the kernel tests check them against :func:`~kexue.attention.attention_reference` on a machine without a
GPU. Under ``torch.compile`` a call traces into the graph as the custom ops ``kexue::fused_attention_fwd`` /
``kexue::fused_attention_bwd`` (no graph break).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..prepared import PreparedMask, as_prepared, check_qkv
from ..ranks import HIDDEN, RankMask
from ..reference import attention_reference
from ..scaling import BASE, MIN_N, LogNScale, ScaleArg, check_scale, resolve_scale

__all__ = ["fused_attention", "fused_available"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _kernels():
    """The Triton kernels module (imported on first use: importing triton takes a while)."""
    try:
        from . import _triton
    except ImportError as exc:          # no triton in this environment
        raise RuntimeError("the fused attention kernel needs Triton (pip install triton) and a CUDA device; "
                           "use backend='sdpa' instead") from exc
    return _triton


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` when first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels()._fwd_kernel, InterpretedFunction)


def fused_available(device: torch.device | str = "cuda") -> bool:
    """Whether :func:`fused_attention` can run on ``device`` here: Triton importable and a CUDA device (any device
    under Triton's interpreter, ``TRITON_INTERPRET=1``).

    Example:
        >>> isinstance(fused_available("cpu"), bool)
        True
    """
    try:
        _kernels()
    except RuntimeError:
        return False
    dev = torch.device(device)
    if _interpreting():
        return True
    return dev.type == "cuda" and torch.cuda.is_available()


# Launch settings (BLOCK_M, BLOCK_N, warps, pipeline stages) by (pass, head-dim bucket, fp32?). Not timed (no GPU
# has run these kernels yet) but chosen so that no variant spills registers on sm_90: compiled offline with
# Triton 3.9 for sm_90a with every feature on (causal, ranks, groups, multiplier, entropy) and off, specialised as
# a launch with contiguous tensors is and also for any strides, and read with `ptxas -v`
# (scripts/fused-compile-check.py; the earlier picks spilled up to 2.8 KB per thread in fp32 and used 255 registers
# with 4 warps on 128-row blocks). Registers per thread, every feature on, contiguous, in the comments. With 2 or
# more stages the loop's loads are software-pipelined (asynchronous copies), which the same check holds them to.
_GPU_CONFIGS: dict[tuple[str, int, bool], tuple[int, int, int, int]] = {
    ("fwd", 64, False): (128, 64, 8, 3),    # 238
    ("fwd", 128, False): (128, 32, 8, 3),   # 178
    ("fwd", 256, False): (64, 32, 8, 2),    # 174
    ("fwd", 64, True): (32, 32, 4, 2),      # 128
    ("fwd", 128, True): (32, 32, 8, 2),     # 111
    ("fwd", 256, True): (32, 32, 8, 2),     # 128 (1 stage: 4 bytes of spills)
    ("bwd", 64, False): (64, 64, 8, 2),     # 213 (dK/dV) / 216 (dQ)
    ("bwd", 128, False): (32, 64, 8, 2),    # 216 / 196 ((64, 32): 8 bytes of spills for strided tensors)
    ("bwd", 256, False): (16, 16, 8, 1),    # 128 / 160
    ("bwd", 64, True): (16, 16, 4, 1),      # 70 / 96 (2 stages: 4 KB of spills with the features off)
    ("bwd", 128, True): (16, 32, 8, 1),     # 90 / 76
    ("bwd", 256, True): (16, 16, 4, 1),     # 168 / 128
}
_INTERPRETER_BLOCKS = (16, 16)          # tests may change it (e.g. to (32, 16)) to cover unequal blocks


def _config(kind: str, head_dim: int, fp32: bool) -> tuple[int, int, int, int]:
    if _interpreting():
        return (*_INTERPRETER_BLOCKS, 1, 1)
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return _GPU_CONFIGS[(kind, bucket, fp32)]


@dataclass
class _Spec:
    """What the kernels need besides q, k, v and the multiplier: the mask vectors (int32, expanded to
    ``[B, L]`` views, or q as a placeholder), the row counts, and the numbers."""

    qr: Tensor
    kr: Tensor
    qg: Tensor
    kg: Tensor
    counts: Tensor
    has_rank: bool
    has_group: bool
    has_counts: bool
    is_causal: bool
    causal_offset: int
    entropy: bool
    sm_scale: float
    inv_log2_base: float
    min_n: float


def _int32_vectors(rm: RankMask, device: torch.device) -> tuple[Tensor | None, ...]:
    def i32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=device, dtype=torch.int32).contiguous()

    return i32(rm.q_rank), i32(rm.k_rank), i32(rm.q_group), i32(rm.k_group)


def _resolve_mask(pm: PreparedMask) -> tuple[RankMask | None, Tensor | None, int | None]:
    """(the RankMask without its causal part, row counts usable as they are or None, causal offset or None)."""
    rm = pm.ranks()                     # (ValueError for a mask with a dense part)
    counts = pm.counts() if pm.counts_known() else None
    offset = None
    if rm is not None:
        offset = rm.causal_offset
        if rm.q_rank is None and rm.k_rank is None and rm.q_group is None:
            rm = None                   # causal only: no vectors to read
    return rm, counts, offset


def _resolve_scale(scale: ScaleArg, q: Tensor, pm: PreparedMask, min_n: float,
                   base: float) -> tuple[bool, Tensor | None, float, float, float]:
    """(entropy?, multiplier ``[B|1, H|1, Q|1]`` or None, kernel scale, min_n, base)."""
    B, H, Lq, D = q.shape
    inv = 1.0 / math.sqrt(D)
    if isinstance(scale, str):
        return scale == "entropy", None, inv, min_n, base
    if isinstance(scale, LogNScale):    # s_h * log_base(n): the log factor in the kernel, s_h as the multiplier
        if scale.num_heads not in (1, H):
            raise ValueError(f"LogNScale has {scale.num_heads} heads, the inputs {H}")
        return True, scale.s.view(1, -1, 1), inv, scale.min_n, scale.base
    counts = pm.counts() if callable(scale) and not isinstance(scale, Tensor) else None
    mult, s = resolve_scale(scale, head_dim=D, like=q, counts=counts, min_n=min_n, base=base)
    if mult is None:
        return False, None, s, min_n, base
    return False, mult.reshape((1,) * (4 - mult.dim()) + tuple(mult.shape))[..., 0], s, min_n, base


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: RankMask | PreparedMask | None = None, *,
                    scale: ScaleArg = "standard", min_n: float = MIN_N, base: float = BASE,
                    is_causal: bool = False) -> Tensor:
    """Softmax attention with the mask and the per-row scale computed inside one Triton kernel (forward and
    backward), for CUDA tensors. Experimental (never run on a GPU yet; see the module docstring).

    Same conventions and results as :func:`~kexue.attention.attention` (``q [B, H, Q, D]``, ``k [B, H, K, D]``,
    ``v [B, H, K, Dv]``; a row that sees no key outputs 0; ``is_causal`` is SDPA's top-left causal mask, ANDed
    with ``mask``). ``mask`` is ``None``, a :class:`~kexue.attention.RankMask`, or a
    :class:`~kexue.attention.PreparedMask` made of ranks, padding and the causal flag (no dense part: the L x L
    tensor is never read). ``scale``: ``"standard"``, ``"entropy"``, a float, a
    :class:`~kexue.attention.LogNScale`, a tensor broadcastable to ``[B, H, Q, 1]`` or a callable of the row
    counts. Inputs: fp16, bf16 or fp32, head dims up to 256. Differentiable in q, k, v and a tensor or learnable
    scale (not twice). No dropout.

    Example (needs a CUDA device and Triton):
        >>> seg = torch.tensor([[0] * 300 + [1] * 212]).cuda()                  # doctest: +SKIP
        >>> q = k = v = torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.bfloat16)   # doctest: +SKIP
        >>> out = fused_attention(q, k, v, RankMask.unilm(seg), scale="entropy")  # doctest: +SKIP
    """
    B, H, Lq, Lk, D = check_qkv(q, k, v)
    if q.dtype not in _DTYPES:
        raise TypeError(f"the fused kernel takes fp16, bf16 or fp32 inputs, got {q.dtype}")
    DV = v.shape[-1]
    if D > _MAX_HEAD_DIM or DV > _MAX_HEAD_DIM:
        raise ValueError(f"the fused kernel takes head dims up to {_MAX_HEAD_DIM}, got {D} and {DV}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if mask is not None and not isinstance(mask, (RankMask, PreparedMask)):
        raise TypeError(f"the fused kernel takes mask=None, a RankMask or a PreparedMask without a dense part, got "
                        f"{type(mask).__name__} (use backend='sdpa' for tensors, predicates and block masks)")
    check_scale(scale, min_n=min_n, base=base)
    traced = torch.compiler.is_compiling()
    if not traced:      # (traced: the op checks it when it runs)
        _check_runnable(q)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    pm = as_prepared(mask, batch=B, heads=H, q_len=Lq, k_len=Lk, is_causal=is_causal, device=q.device)
    if Lq == 0 or Lk == 0:                      # nothing to launch: every row is empty (output 0) or no rows
        return attention_reference(q, k, v, pm, scale=scale, min_n=min_n, base=base)
    rm, counts, offset = _resolve_mask(pm)
    entropy, mult, sm_scale, min_n_, base_ = _resolve_scale(scale, q, pm, min_n, base)
    spec = _make_spec(rm, counts, offset, entropy, sm_scale, min_n_, base_, q, Lk)
    if traced:          # the launches are custom ops, with their autograd formula
        flags, nums = _spec_numbers(spec)
        return _fwd_op(q, k, v, spec.qr, spec.kr, spec.qg, spec.kg, spec.counts, mult, flags, nums)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (mult is not None and mult.requires_grad)):
        return _FusedAttention.apply(q, k, v, mult, spec)
    return _forward(q, k, v, mult, spec)[0]     # (no graph to record: the autograd Function's cost is saved)


def _check_runnable(q: Tensor) -> None:
    _kernels()                                  # (raises when Triton is missing)
    if not (q.is_cuda or _interpreting()):
        raise ValueError(f"the fused kernel runs on CUDA tensors, got {q.device} (use backend='sdpa')")


def _make_spec(rm: RankMask | None, counts: Tensor | None, offset: int | None, entropy: bool, sm_scale: float,
               min_n: float, base: float, q: Tensor, Lk: int) -> _Spec:
    """The launch spec: the mask vectors as ``[B, L]`` views, flags and numbers."""
    B, _, Lq, _ = q.shape
    qr = kr = qg = kg = None
    if rm is not None:
        qr, kr, qg, kg = _int32_vectors(rm, q.device)
    has_rank = qr is not None or kr is not None
    if has_rank and qr is None:     # "above every visible key"
        qr = torch.full((1, 1), HIDDEN - 1, dtype=torch.int32, device=q.device)
    if has_rank and kr is None:
        kr = torch.zeros((1, Lk), dtype=torch.int32, device=q.device)
    has_counts = entropy and counts is not None
    none = torch.zeros(1, dtype=torch.int32, device=q.device)     # (a pointer the kernel never reads)
    if has_counts:                  # [B|1, H|1, Q|1, 1] -> [B, Q] (the counts do not vary by head)
        c = counts.to(q.device)[:, 0, :, 0]
        counts_bq = c.expand(B, Lq)
    return _Spec(
        qr=qr.expand(B, Lq) if has_rank else none, kr=kr.expand(B, Lk) if has_rank else none,
        qg=qg.expand(B, Lq) if qg is not None else none, kg=kg.expand(B, Lk) if kg is not None else none,
        counts=counts_bq if has_counts else none,
        has_rank=has_rank, has_group=qg is not None, has_counts=has_counts, is_causal=offset is not None,
        causal_offset=0 if offset is None else offset, entropy=entropy, sm_scale=sm_scale,
        inv_log2_base=1.0 / math.log2(base), min_n=float(min_n))


def _two_strides(t: Tensor, use: bool) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if use else (0, 0)


def _mask_strides(spec: _Spec) -> tuple[int, ...]:
    return (*_two_strides(spec.qr, spec.has_rank), spec.kr.stride(0) if spec.has_rank else 0,
            *_two_strides(spec.qg, spec.has_group), spec.kg.stride(0) if spec.has_group else 0)


def _mult_view(mult: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    if mult is None:
        return q, (0, 0, 0)
    B, H, Lq, _ = q.shape
    m = mult.expand(B, H, Lq)
    return m, tuple(m.stride())         # (broadcast dims have stride 0)


def _forward(q: Tensor, k: Tensor, v: Tensor, mult: Tensor | None, spec: _Spec) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: (output, log2-sum-exp per row, base scale per row)."""
    kern = _kernels()
    B, H, Lq, D = q.shape
    Lk, DV = k.shape[2], v.shape[3]
    o = torch.empty((B, H, Lq, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    cb = torch.empty_like(lse)
    BM, BN, warps, stages = _config("fwd", max(D, DV), q.dtype == torch.float32)
    m, m_strides = _mult_view(mult, q)
    counts_strides = spec.counts.stride() if spec.has_counts else (0, 0)
    kern._fwd_kernel[(-(-Lq // BM), B * H)](
        q, k, v, o, lse, cb, spec.counts, spec.qr, spec.kr, spec.qg, spec.kg, m,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *counts_strides, *_mask_strides(spec), *m_strides,
        H, Lq, Lk, D, DV, spec.sm_scale, spec.inv_log2_base, spec.min_n, spec.causal_offset,
        IS_CAUSAL=spec.is_causal, HAS_RANK=spec.has_rank, HAS_GROUP=spec.has_group, ENTROPY=spec.entropy,
        HAS_COUNTS=spec.has_counts, HAS_MULT=mult is not None, **_dtype_flags(q),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), num_warps=warps, num_stages=stages)
    return o, lse, cb


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cb: Tensor, mult: Tensor | None,
              spec: _Spec, want_c: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Launch the two backward kernels: (dq, dk, dv, d loss / d c_i per row or None)."""
    kern = _kernels()
    B, H, Lq, D = q.shape
    Lk, DV = k.shape[2], v.shape[3]
    delta = (o.float() * do.float()).sum(-1).contiguous()          # D_i = dO_i . O_i
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Lk, DV), dtype=v.dtype, device=v.device)
    dc = torch.empty_like(lse) if want_c else None
    BM, BN, warps, stages = _config("bwd", max(D, DV), q.dtype == torch.float32)
    m, m_strides = _mult_view(mult, q)
    common = dict(IS_CAUSAL=spec.is_causal, HAS_RANK=spec.has_rank, HAS_GROUP=spec.has_group,
                  HAS_MULT=mult is not None, **_dtype_flags(q), BLOCK_M=BM, BLOCK_N=BN,
                  BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), num_warps=warps, num_stages=stages)
    sizes = (H, Lq, Lk, D, DV, spec.causal_offset)
    kern._bwd_dkdv_kernel[(-(-Lk // BN), B * H)](
        q, k, v, do, dk, dv, lse, cb, delta, spec.qr, spec.kr, spec.qg, spec.kg, m,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *_mask_strides(spec), *m_strides, *sizes, **common)
    kern._bwd_dq_kernel[(-(-Lq // BM), B * H)](
        q, k, v, do, dq, lse if dc is None else dc, lse, cb, delta, spec.qr, spec.kr, spec.qg, spec.kg, m,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *_mask_strides(spec), *m_strides, *sizes, GRAD_C=want_c, **common)
    return dq, dk, dv, dc


def _mult_grad(dc: Tensor | None, cb: Tensor, mult: Tensor | None) -> Tensor | None:
    """c_i = cb_i * mult_i, and d loss / d c_i = dc_i."""
    return None if dc is None or mult is None else (dc * cb).sum_to_size(mult.shape).to(mult.dtype)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mult: Tensor | None, spec: _Spec) -> Tensor:
        o, lse, cb = _forward(q, k, v, mult, spec)
        ctx.save_for_backward(q, k, v, o, lse, cb, *(() if mult is None else (mult,)))
        ctx.spec = spec
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse, cb, *rest = ctx.saved_tensors
        mult = rest[0] if rest else None
        want_c = mult is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dc = _backward(do, q, k, v, o, lse, cb, mult, ctx.spec, want_c)
        return dq, dk, dv, _mult_grad(dc, cb, mult), None


# ---- torch.compile: the launches as custom ops (opaque to the compiler, so the graph has no break at the kernel;
# CUDA graphs can replay them). Defining them imports no Triton: their bodies launch the kernels when they run.
def _spec_numbers(spec: _Spec) -> tuple[list[int], list[float]]:
    return ([int(spec.has_rank), int(spec.has_group), int(spec.has_counts), int(spec.is_causal), spec.causal_offset,
             int(spec.entropy)], [spec.sm_scale, spec.inv_log2_base, spec.min_n])


def _spec_of(qr: Tensor, kr: Tensor, qg: Tensor, kg: Tensor, counts: Tensor, flags: list[int],
             nums: list[float]) -> _Spec:
    return _Spec(qr=qr, kr=kr, qg=qg, kg=kg, counts=counts, has_rank=bool(flags[0]), has_group=bool(flags[1]),
                 has_counts=bool(flags[2]), is_causal=bool(flags[3]), causal_offset=int(flags[4]),
                 entropy=bool(flags[5]), sm_scale=nums[0], inv_log2_base=nums[1], min_n=nums[2])


@torch.library.custom_op("kexue::fused_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, qr: Tensor, kr: Tensor, qg: Tensor, kg: Tensor, counts: Tensor,
            mult: Tensor | None, flags: list[int], nums: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(out, log2-sum-exp per row, base scale per row): the forward kernel."""
    _check_runnable(q)
    return _forward(q, k, v, mult, _spec_of(qr, kr, qg, kg, counts, flags, nums))


@_fwd_op.register_fake
def _(q, k, v, qr, kr, qg, kg, counts, mult, flags, nums):
    B, H, Lq, _ = q.shape
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    return q.new_empty((B, H, Lq, v.shape[-1])), lse, torch.empty_like(lse)


@torch.library.custom_op("kexue::fused_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cb: Tensor, qr: Tensor, kr: Tensor,
            qg: Tensor, kg: Tensor, counts: Tensor, mult: Tensor | None, flags: list[int], nums: list[float],
            want_c: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d loss / d c_i per row -- empty unless ``want_c``): the two backward kernels."""
    spec = _spec_of(qr, kr, qg, kg, counts, flags, nums)
    dq, dk, dv, dc = _backward(do.contiguous(), q, k, v, o, lse, cb, mult, spec, want_c)
    return dq, dk, dv, dc if dc is not None else lse.new_empty(0)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, cb, qr, kr, qg, kg, counts, mult, flags, nums, want_c):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(lse) if want_c else lse.new_empty(0))


def _op_setup(ctx, inputs, output):
    q, k, v, qr, kr, qg, kg, counts, mult, flags, nums = inputs
    o, lse, cb = output
    ctx.save_for_backward(q, k, v, o, lse, cb, qr, kr, qg, kg, counts, mult)
    ctx.flags, ctx.nums = flags, nums
    ctx.mark_non_differentiable(lse, cb)


def _op_backward(ctx, do, _dlse, _dcb):
    q, k, v, o, lse, cb, qr, kr, qg, kg, counts, mult = ctx.saved_tensors
    want_c = mult is not None and ctx.needs_input_grad[8]
    dq, dk, dv, dc = _bwd_op(do, q, k, v, o, lse, cb, qr, kr, qg, kg, counts, mult, ctx.flags, ctx.nums, want_c)
    return dq, dk, dv, None, None, None, None, None, _mult_grad(dc if want_c else None, cb, mult), None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def _pow2(n: int) -> int:
    """The block width for a head dim: a power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, 1 << (n - 1).bit_length())


def _dtype_flags(q: Tensor) -> dict:
    """``UPCAST``: bf16 under the interpreter (which cannot multiply bf16); ``PRECISION``: full fp32 products
    for fp32 inputs (Triton would use TF32)."""
    upcast = q.dtype == torch.bfloat16 and _interpreting()
    return {"UPCAST": upcast, "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}
