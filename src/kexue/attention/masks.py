"""Attention masks as predicates, after "从语言模型到Seq2Seq：Transformer如戏，全靠Mask" (kexue.fm/archives/6933).

A mask is a predicate ``mod(b, h, q_idx, kv_idx) -> bool tensor`` (the FlexAttention ``mask_mod`` shape):
``True`` means query ``q_idx`` may attend to key ``kv_idx``. Predicates are combined with :func:`and_masks`
and :func:`or_masks`, rendered to a dense boolean tensor for ``F.scaled_dot_product_attention`` with
:func:`render_mask`, or to a FlexAttention ``BlockMask`` with :func:`to_block_mask`.

Predicate factories (return a ``mod``): :func:`full`, :func:`causal`, :func:`padding`,
:func:`sliding_window_mask`, :func:`unilm`, :func:`prefix_lm`, :func:`permutation`, :func:`from_dense`.

Builders (return a rendered bool tensor): :func:`causal_mask` ``[Q, K]``, :func:`padding_mask`
``[B, 1, 1, L]``, :func:`unilm_mask` ``[B, 1, L, L]``, :func:`prefix_lm_mask`, :func:`permutation_mask`,
and :func:`permute_for_plm`, the "reorder the input instead" form of the permutation LM.

Every predicate is written with tensor ops only (comparisons and tensor indexing), so it works both when
called with broadcast index grids (:func:`render_mask`) and under ``vmap`` (``create_block_mask``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import lru_cache, reduce

import torch
from torch import Tensor

from kexue._checks import check_tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "MaskMod", "and_masks", "or_masks", "render_mask", "to_block_mask", "to_additive_mask", "full", "causal",
    "padding",
    "sliding_window_mask", "sliding_window", "unilm", "prefix_lm", "permutation", "from_dense",
    "causal_mask", "padding_mask", "unilm_mask", "prefix_lm_mask", "permutation_mask", "permute_for_plm",
    "RankMask",
]


# ----------------------------------------------------------------------------------------------- helpers
def _check_len(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_binary(name: str, value: object) -> Tensor:
    """A 0/1 integer (or bool) tensor of shape [L] or [B, L], returned as int64 [B, L]."""
    t = check_tensor(name, value)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor of 0/1 values, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [L] or [B, L], got shape {tuple(t.shape)}")
    t = t.long()
    # (not while torch.compile traces: a data-dependent check would split the graph)
    if t.numel() and not _tracing() and not bool(((t == 0) | (t == 1)).all()):
        bad = t[(t != 0) & (t != 1)][0].item()
        raise ValueError(f"{name} must contain only 0 and 1, found {bad}")
    return t if t.dim() == 2 else t.unsqueeze(0)


def _check_is_causal(is_causal: object) -> None:
    """``is_causal`` must be a bool (a truthy string or None would be read as a flag without a word)."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")


def _to_float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive float mask in ``dtype`` without turning finite values into infinities: values beyond
    ``dtype``'s range (``torch.finfo(torch.float32).min`` of a Hugging Face mask, cast to fp16 or bf16) saturate
    at its finite limits, and only ``-inf`` stays ``-inf`` -- so the cast never hides a key the mask shows."""
    if mask.dtype == dtype:
        return mask
    if torch.finfo(mask.dtype).max > torch.finfo(dtype).max:
        lim = torch.finfo(dtype)
        mask = torch.where(mask == float("-inf"), mask, mask.clamp(lim.min, lim.max))
    return mask.to(dtype)


def _check_order(name: str, order: object) -> Tensor:
    """An integer permutation of 0..L-1, shape [L] or [B, L]; returned as int64 with the same shape."""
    t = check_tensor(name, order)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [L] or [B, L], got shape {tuple(t.shape)}")
    t = t.long()
    L = t.shape[-1]
    if L and not bool((t.sort(dim=-1).values == torch.arange(L, device=t.device)).all()):
        raise ValueError(f"{name} must be a permutation of 0..{L - 1} in every row, got {t.tolist()}")
    return t


def _rank(order: Tensor) -> Tensor:
    """Inverse permutation along the last dim: rank[order[t]] = t."""
    rank = torch.empty_like(order)
    steps = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return rank.scatter_(-1, order, steps)


def _tracing() -> bool:
    """True while ``torch.compile`` (dynamo) traces the caller: the paths that keep data between calls (attached
    row counts, kept float masks) are then skipped; only tensor operations go into the graph."""
    return torch.compiler.is_compiling()


def _tensor_identity(t: Tensor) -> tuple | None:
    """What a result derived from ``t`` stays valid for: its storage, version counter (bumped by every in-place
    change, also through views and ``detach()``), layout, dtype and device. A copy (``clone``, ``deepcopy``,
    pickling, ``.to(other device)``) has another storage and so another identity. None for an inference tensor
    (made under ``torch.inference_mode``): it has no version counter, so nothing derived from it is kept."""
    if _tracing():                      # (while torch.compile traces, nothing is attached or kept either)
        return None
    return _eager_identity(t)


def _eager_identity(t: Tensor) -> tuple | None:
    """_tensor_identity for a caller that knows it is not being traced (saves a check on every call)."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)


_COUNTS_ATTR = "_kexue_row_counts"


def _attach_counts(mask: Tensor, counts: Tensor, ranks: RankMask | None = None) -> Tensor:
    """Record on a freshly built ``mask`` its per-row key counts (``mask.shape[:-1]``, int64), worked out by the
    builder from the mask's structure in O(B * L) instead of read back from the O(B * L^2) mask, and the
    :class:`RankMask` it was rendered from (what the fused kernel reads instead of the mask). ``attention``
    and :func:`~kexue.attention.scaling.keys_per_row` use them while the mask is unchanged (same identity)."""
    if tuple(counts.shape) != tuple(mask.shape[:-1]):
        raise AssertionError(f"counts {tuple(counts.shape)} do not match mask {tuple(mask.shape)}")
    identity = _tensor_identity(mask)
    if identity is None:                # an inference tensor: no way to tell later whether it was changed
        return mask
    counts4 = counts.reshape((1,) * (4 - mask.dim()) + tuple(counts.shape) + (1,))  # [B|1, H|1, Q, 1]: for q
    # (the RankMask as its plain fields -- tensors, ints, None -- so torch.save/torch.load(weights_only=True) of a
    # mask still work; the record goes with the tensor's __dict__, and a loaded copy drops it by its identity)
    setattr(mask, _COUNTS_ATTR, (identity, counts, counts4, None if ranks is None else ranks._fields()))
    return mask


def _attached_counts(mask: Tensor, identity: tuple | None = None, *, as_4d: bool = False,
                     eager: bool = False) -> Tensor | None:
    """The counts a builder attached to ``mask`` (shape ``mask.shape[:-1]``, or ``[B|1, H|1, Q, 1]`` with
    ``as_4d``), or None when there are none or the mask has changed since (in place, or it is a copy).
    ``identity`` is ``_tensor_identity(mask)`` when the caller has it already; ``eager``: the caller knows it
    is not being traced."""
    if not eager and _tracing():        # a traced graph cannot read Python attributes of its inputs
        return None
    rec = mask.__dict__.get(_COUNTS_ATTR)
    if rec is None or rec[0] != (identity if identity is not None else _eager_identity(mask)):
        return None                     # (an inference tensor has no record: _attach_counts leaves none)
    return rec[2] if as_4d else rec[1]


_LAST_RANKS: list = [None, None, None]     # (weak ref to the mask, its record, the RankMask rebuilt from it)


def _attached_ranks(mask: Tensor, identity: tuple | None = None) -> tuple[RankMask, Tensor] | None:
    """(the :class:`RankMask` a builder rendered ``mask`` from, its row counts) while ``mask`` is unchanged. The
    last one rebuilt is kept (a model passes one mask to every layer)."""
    if _tracing():
        return None
    rec = mask.__dict__.get(_COUNTS_ATTR)
    if rec is None or rec[3] is None or rec[0] != (identity if identity is not None else _eager_identity(mask)):
        return None
    ref, last_rec, rm = _LAST_RANKS
    if last_rec is not rec or ref() is not mask:
        qr, kr, qg, kg, offset, q_len, k_len, device = rec[3]
        rm = RankMask._built(qr, kr, q_group=qg, k_group=kg, causal_offset=offset, q_len=q_len, k_len=k_len)
        rm.device = torch.device(device)
        _LAST_RANKS[:] = [weakref.ref(mask), rec, rm]
    return rm, rec[1]


# -------------------------------------------------------------------------------------------- combinators
def and_masks(*mods: MaskMod) -> MaskMod:
    """Intersection of mask predicates (a key is allowed when every ``mod`` allows it).

    Example:
        >>> m = and_masks(causal(), sliding_window_mask(2))
        >>> render_mask(m, 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    if not mods:
        raise ValueError("and_masks needs at least one mask predicate")
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(f"and_masks argument {i} must be a mask predicate, got {type(m).__name__}")

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return reduce(lambda x, y: x & y, (m(b, h, q_idx, kv_idx) for m in mods))

    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    """Union of mask predicates (a key is allowed when any ``mod`` allows it).

    Example:
        >>> m = or_masks(causal(), lambda b, h, q, kv: kv < 2)   # prefix-LM with a 2-token prefix
        >>> render_mask(m, 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    if not mods:
        raise ValueError("or_masks needs at least one mask predicate")
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(f"or_masks argument {i} must be a mask predicate, got {type(m).__name__}")

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return reduce(lambda x, y: x | y, (m(b, h, q_idx, kv_idx) for m in mods))

    return mod


# ------------------------------------------------------------------------------------------------ render
def render_mask(mod: MaskMod, B: int, H: int, Q_LEN: int, KV_LEN: int,
                device: torch.device | str | None = None) -> Tensor:
    """Evaluate predicate ``mod`` on the grid ``[B, H, Q_LEN, KV_LEN]``; bool, True = may attend.

    The predicate is called once with broadcast index tensors, so the result is an ``expand``-ed view
    (dimensions the predicate ignores cost no memory). Pass ``B=1`` / ``H=1`` for a mask that broadcasts
    over batch / heads in ``F.scaled_dot_product_attention``.

    Example:
        >>> render_mask(causal(), 1, 1, 2, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0]]
    """
    if not callable(mod):
        raise TypeError(f"mod must be a mask predicate mod(b, h, q_idx, kv_idx), got {type(mod).__name__}")
    B, H = _check_len("B", B), _check_len("H", H)
    Q_LEN, KV_LEN = _check_len("Q_LEN", Q_LEN), _check_len("KV_LEN", KV_LEN)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    q = torch.arange(Q_LEN, device=dev).view(1, 1, Q_LEN, 1)
    kv = torch.arange(KV_LEN, device=dev).view(1, 1, 1, KV_LEN)
    try:
        out = mod(b, h, q, kv)
    except IndexError as exc:       # e.g. unilm(segment_ids) of 4 positions asked for 6
        raise ValueError(f"mask predicate indexed past its own tensors for B={B}, H={H}, Q_LEN={Q_LEN}, "
                         f"KV_LEN={KV_LEN}: was it built for another batch or length? ({exc})") from exc
    if not isinstance(out, Tensor):
        out = torch.as_tensor(out, device=dev)
    if out.dtype != torch.bool:
        raise TypeError(f"mask predicate must return a bool tensor, got dtype {out.dtype}")
    while out.dim() < 4:
        out = out.unsqueeze(0)
    return out.to(dev).expand(B, H, Q_LEN, KV_LEN)


def to_block_mask(mod: MaskMod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                  device: torch.device | str | None = None, BLOCK_SIZE: int | tuple[int, int] = 128):
    """Render predicate ``mod`` to a FlexAttention ``BlockMask`` (``create_block_mask``; eager on CPU).

    ``B`` / ``H`` may be ``None`` for a mask shared across batch / heads, as in ``create_block_mask``.

    Example:
        >>> bm = to_block_mask(causal(), None, None, 256, 256)
        >>> tuple(bm.shape)
        (1, 1, 256, 256)
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if not callable(mod):
        raise TypeError(f"mod must be a mask predicate mod(b, h, q_idx, kv_idx), got {type(mod).__name__}")
    if B is not None:
        _check_len("B", B)
    if H is not None:
        _check_len("H", H)
    Q_LEN, KV_LEN = _check_len("Q_LEN", Q_LEN), _check_len("KV_LEN", KV_LEN)
    dev = device if device is not None else "cpu"
    return create_block_mask(mod, B, H, Q_LEN, KV_LEN, device=dev, BLOCK_SIZE=BLOCK_SIZE)



# The bit pattern of -inf read as a signed integer of the float's width (the sign bit and an all-ones exponent).
_NEG_INF_BITS = {torch.float32: (torch.int32, -(1 << 23)), torch.float64: (torch.int64, -(1 << 52)),
                 torch.float16: (torch.int16, -(1 << 10)), torch.bfloat16: (torch.int16, -(1 << 7))}


@lru_cache(maxsize=16)
def _fill_values(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The 0-d tensors ``0`` and ``-inf`` of an additive mask (made once, not on every call)."""
    return torch.zeros((), dtype=dtype, device=device), torch.full((), float("-inf"), dtype=dtype, device=device)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> additive ``dtype`` mask (0 where True, -inf where False), unchecked; see to_additive_mask."""
    bits = _NEG_INF_BITS.get(dtype)
    if bits is None or not allowed.is_cpu:   # one select: other float types, and on a GPU one kernel, not three
        return torch.where(allowed, *_fill_values(dtype, allowed.device))
    int_dtype, neg_inf = bits
    out = torch.empty(allowed.shape, dtype=int_dtype, device=allowed.device).copy_(allowed)
    # 1/0 -> 0/-inf on the integer view of the float: neg_inf + x * (-neg_inf), with neg_inf the bits of -inf,
    # in place as one kernel. (torch.add(start, allowed) straight from the bools would be one call, but on a CPU
    # it first copies the bools to a temporary of the integer type: two fresh buffers, slower at large L.)
    return torch.add(_neg_inf_start(int_dtype, neg_inf), out, alpha=-neg_inf, out=out).view(dtype)


def _additive_counted(allowed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(_additive(allowed, dtype), _row_counts(allowed))`` in one pass over the mask where that is faster.

    On a CPU, for fp32 and fp64, the row counts are summed from the integer copy of the bools that the
    conversion makes anyway (0/1, still in cache at moderate L), before it turns into the bit pattern of 0/-inf:
    one read of the mask instead of two, and one op for a compiled graph to call. An int32 sum vectorises
    well: at L = 512 and 2048 (a [1, 1, L, L] mask, 2 cores) the pair took 0.64-0.73 of the time of the two
    kernels when _row_counts still sliced its rows into groups; against the one-sum _row_counts (rows of up
    to 2040 keys) the two ways are level within the noise of a whole attention() call. Elsewhere (other
    float types, whose integer view is too narrow to hold a count, and other devices) it is the two calls.
    ``allowed`` must have the full key dimension (not a broadcast 1).
    """
    bits = _NEG_INF_BITS.get(dtype)
    if bits is None or bits[0] == torch.int16 or not allowed.is_cpu or allowed.shape[-1] == 0:
        return _additive(allowed, dtype), _row_counts(allowed)
    int_dtype, neg_inf = bits
    out = torch.empty(allowed.shape, dtype=int_dtype, device=allowed.device).copy_(allowed)
    counts = out.sum(-1, dtype=int_dtype).long()     # (the sum in the copy's own type: int64 ran slower)
    return torch.add(_neg_inf_start(int_dtype, neg_inf), out, alpha=-neg_inf, out=out).view(dtype), counts


@lru_cache(maxsize=8)
def _neg_inf_start(int_dtype: torch.dtype, neg_inf: int) -> Tensor:
    return torch.tensor(neg_inf, dtype=int_dtype)


def to_additive_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A bool mask (True = may attend) as an additive float mask: ``0`` where True, ``-inf`` where False.

    The same values as ``torch.where(mask, 0, -inf)``, the conversion ``F.scaled_dot_product_attention``
    repeats on every call that gets a bool mask. On a CPU it is made on the float's bit pattern instead (the
    bools cast to integers, then one fused multiply-add in place); on other devices by ``torch.where``, one
    kernel. Convert once and pass the result to every layer to skip SDPA's own conversion
    (:func:`kexue.attention.attention` does this itself). Broadcast (``expand``-ed) dimensions of ``mask`` are
    materialised in the result, which is contiguous.

    Example:
        >>> to_additive_mask(causal_mask(2)).tolist()
        [[0.0, -inf], [0.0, 0.0]]
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return _additive(mask, dtype)


# ---------------------------------------------------------------------------------------- predicates
def full() -> MaskMod:
    """Every query sees every key (the MLM / BERT mask).

    Example:
        >>> render_mask(full(), 1, 1, 2, 2).all().item()
        True
    """
    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= 0) & (kv_idx >= 0)

    return mod


def causal(offset: int = 0) -> MaskMod:
    """Lower-triangular predicate ``kv_idx <= q_idx + offset`` (the LM mask, M_ij = [j <= i]).

    ``offset = k_len - q_len`` right-aligns the queries with the last keys (a kv-cache of earlier tokens).

    Example:
        >>> render_mask(causal(1), 1, 1, 2, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + offset

    return mod


def padding(attention_mask: Tensor) -> MaskMod:
    """Keys where ``attention_mask[b, kv_idx]`` is 1/True are visible; padding keys (0) are hidden.

    Example:
        >>> render_mask(padding(torch.tensor([[1, 1, 0]])), 1, 1, 1, 3)[0, 0, 0].tolist()
        [True, True, False]
    """
    am = _check_binary("attention_mask", attention_mask).bool()
    if am.shape[0] == 1:                # [L] or [1, L]: shared by every batch row
        am1 = am[0]

        def mod1(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return am1[kv_idx]

        return mod1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return am[b, kv_idx]

    return mod


def sliding_window_mask(window: int, offset: int = 0) -> MaskMod:
    """Band predicate ``|q_idx + offset - kv_idx| < window`` (each query sees keys within ``window - 1``
    positions of its own).

    Symmetric on purpose: ``and_masks(causal(), sliding_window_mask(w))`` is the causal local window of
    ``w`` keys including the query itself; on its own it is a bidirectional local window. ``offset`` places
    query ``i`` at key position ``i + offset``, as :func:`causal` does: with a kv-cache (``K > Q``, the queries
    being the last positions) pass ``offset = K - Q`` to both.

    Example:
        >>> render_mask(and_masks(causal(), sliding_window_mask(2)), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
        >>> render_mask(and_masks(causal(3), sliding_window_mask(2, 3)), 1, 1, 2, 5)[0, 0].int().tolist()
        [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    """
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pos = q_idx + offset
        return ((pos - kv_idx) < window) & ((kv_idx - pos) < window)

    return mod


sliding_window = sliding_window_mask


def unilm(segment_ids: Tensor) -> MaskMod:
    """UniLM seq2seq predicate: query i sees key j iff cumsum(s)[j] <= cumsum(s)[i] (bert4keras ``UniLM_Mask``).

    See :func:`unilm_mask` for the meaning and the validation of ``segment_ids``.

    Example:
        >>> s = torch.tensor([[0, 0, 1, 1]])
        >>> render_mask(unilm(s), 1, 1, 4, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    c = _check_binary("segment_ids", segment_ids).cumsum(-1)
    if c.shape[0] == 1:                 # [L] or [1, L]: shared by every batch row
        c1 = c[0]

        def mod1(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return c1[kv_idx] <= c1[q_idx]

        return mod1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return c[b, kv_idx] <= c[b, q_idx]

    return mod


def prefix_lm(prefix_len: int | Tensor) -> MaskMod:
    """Prefix-LM predicate: ``kv_idx < prefix_len or kv_idx <= q_idx`` (``prefix_len`` int or int tensor [B]).

    The prefix is bidirectional, the rest causal, and prefix queries never see the continuation (for
    ``q_idx < prefix_len`` both terms only admit keys inside the prefix).

    Example:
        >>> render_mask(prefix_lm(2), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    if isinstance(prefix_len, Tensor):
        if prefix_len.is_floating_point() or prefix_len.dtype == torch.bool or prefix_len.dim() != 1:
            raise TypeError(f"prefix_len must be an int or a 1-D integer tensor [B], got dtype "
                            f"{prefix_len.dtype} and shape {tuple(prefix_len.shape)}")
        if prefix_len.numel() and bool((prefix_len < 0).any()):
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len.tolist()}")
        p = prefix_len.long()

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx < p[b]) | (kv_idx <= q_idx)

        return mod
    p_int = _check_len("prefix_len", prefix_len)

    def mod_int(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < p_int) | (kv_idx <= q_idx)

    return mod_int


def permutation(order: Tensor) -> MaskMod:
    """Permutation-LM predicate: ``rank(kv_idx) <= rank(q_idx)`` for the generation order ``order``.

    ``order`` is ``[L]`` (shared by the batch) or ``[B, L]``; ``order[t]`` is the position generated at step
    ``t`` and ``rank`` its inverse. See :func:`permutation_mask`.

    Example:
        >>> render_mask(permutation(torch.tensor([2, 0, 1])), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 1], [1, 1, 1], [0, 0, 1]]
    """
    o = _check_order("order", order)
    rank = _rank(o)
    if rank.dim() == 1:
        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return rank[kv_idx] <= rank[q_idx]

        return mod

    def mod_b(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return rank[b, kv_idx] <= rank[b, q_idx]

    return mod_b


def from_dense(mask: Tensor) -> MaskMod:
    """Predicate that looks up a dense bool mask (e.g. to hand an arbitrary mask to FlexAttention).

    ``mask`` broadcasts to ``[B, H, Q, K]`` by the usual rules, as in SDPA: ``[Q, K]``, ``[H|1, Q, K]`` or
    ``[B|1, H|1, Q, K]``.

    Example:
        >>> m = causal_mask(3)
        >>> torch.equal(render_mask(from_dense(m), 1, 1, 3, 3)[0, 0], m)
        True
    """
    t = check_tensor("mask", mask)
    if t.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {t.dtype}")
    if not 2 <= t.dim() <= 4:
        raise ValueError(f"mask must have shape [Q, K], [H|1, Q, K] or [B|1, H|1, Q, K], got {tuple(t.shape)}")
    m4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bb = b if m4.shape[0] > 1 else torch.zeros_like(b)
        hh = h if m4.shape[1] > 1 else torch.zeros_like(h)
        return m4[bb, hh, q_idx, kv_idx]

    return mod


_NO_STRUCTURE = ("the fused kernel computes its mask from O(L) numbers: pass mask=None, a RankMask, or a mask "
                 "from kexue's builders (unilm_mask, causal_mask, prefix_lm_mask, permutation_mask, padding_mask) "
                 "unchanged since it was built; this mask tensor carries no such structure (use backend='sdpa' for "
                 "an arbitrary mask)")


def _structure_of(mask: object) -> tuple[RankMask | None, Tensor | None]:
    """(the RankMask, a builder's row counts or None) behind ``mask``: None, a RankMask, or a builder's mask tensor
    (raises ``ValueError`` for any other tensor, ``TypeError`` for anything else)."""
    if mask is None:
        return None, None
    if isinstance(mask, RankMask):
        return mask, None
    if isinstance(mask, Tensor):
        got = _attached_ranks(mask)
        if got is None:
            raise ValueError(_NO_STRUCTURE)
        return got
    raise TypeError(f"mask must be None, a RankMask or a mask tensor from kexue's builders for the fused kernel, got "
                    f"{type(mask).__name__} (use backend='sdpa' for predicates and block masks)")


# -------------------------------------------------------------------------------------- structured masks
_RANK_MAX = 1 << 30          # RankMask.HIDDEN; ranks and groups live in [0, 2**30] so the kernel reads them as int32


def _check_ids(name: str, value: Tensor | None, upper: int) -> Tensor | None:
    """None, or an integer tensor ``[L]`` / ``[B, L]`` with values in ``[0, upper]``, as int32 ``[B|1, L]``."""
    if value is None:
        return None
    t = check_tensor(name, value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [L] or [B, L], got shape {tuple(t.shape)}")
    if t.numel() and not _tracing() and not bool(((t >= 0) & (t <= upper)).all()):
        raise ValueError(f"{name} must hold integers in [0, {upper}], got range [{int(t.min())}, {int(t.max())}]")
    t = t.to(torch.int32, copy=True)    # (a copy: a change to the caller's tensor must not reach the mask)
    return t if t.dim() == 2 else t.unsqueeze(0)


class RankMask:
    """A mask stored as O(L) numbers instead of an L x L tensor: query ``i`` sees key ``j`` iff

    * ``k_rank[j] <= q_rank[i]`` (ranks: a missing ``q_rank`` means every query ranks above every visible key,
      a missing ``k_rank`` means every key has rank 0; a key of rank :attr:`HIDDEN` is seen by no query),
    * ``k_group[j] == q_group[i]`` when groups are given (packed sequences: one group per document), and
    * ``j <= i + causal_offset`` when ``causal_offset`` is not None (0: the top-left causal mask of SDPA's
      ``is_causal``; ``K - Q``: the right-aligned mask of a kv-cache).

    Every mask of article 3 (kexue.fm/archives/6933) has this form: the LM mask (causal), the MLM mask with
    padding (hidden keys), UniLM (``rank = cumsum(segment_ids)``, bert4keras' ``UniLM_Mask``), the prefix-LM
    (``rank = max(position, prefix_len - 1)``) and the permutation LM (``rank = step at which the position is
    generated``). :func:`kexue.attention.fused.fused_attention` reads these vectors inside the kernel -- it
    never builds or reads the L x L mask and skips the blocks nobody may see. A ``RankMask`` is also a mask
    predicate ``mod(b, h, q_idx, kv_idx)``, so :func:`render_mask`, :func:`to_block_mask`,
    :func:`~kexue.attention.attention` and :func:`~kexue.attention.attention_reference` take it as it is.

    Tensors are ``[L]`` (shared by the batch) or ``[B, L]``, integers in ``[0, 2**30]``. ``q_len`` / ``k_len``
    are taken from the tensors; give them for a mask with no tensor on that side (e.g. :meth:`causal`).
    ``q_len=None`` on such a side means "any number of queries" (a padding mask).

    Example:
        >>> m = RankMask.unilm(torch.tensor([[0, 0, 1, 1]]))
        >>> render_mask(m, 1, 1, 4, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
        >>> torch.equal(m.to_dense(), unilm_mask(torch.tensor([[0, 0, 1, 1]])))
        True
    """

    HIDDEN = _RANK_MAX

    def __init__(self, q_rank: Tensor | None = None, k_rank: Tensor | None = None, *,
                 q_group: Tensor | None = None, k_group: Tensor | None = None, causal_offset: int | None = None,
                 q_len: int | None = None, k_len: int | None = None) -> None:
        q_rank = _check_ids("q_rank", q_rank, _RANK_MAX - 1)
        k_rank = _check_ids("k_rank", k_rank, _RANK_MAX)
        q_group = _check_ids("q_group", q_group, _RANK_MAX)
        k_group = _check_ids("k_group", k_group, _RANK_MAX)
        if (q_group is None) != (k_group is None):
            raise ValueError("q_group and k_group must be given together")
        if causal_offset is not None and (isinstance(causal_offset, bool) or not isinstance(causal_offset, int)):
            raise TypeError(f"causal_offset must be an int or None, got {type(causal_offset).__name__}")
        self._set(q_rank, k_rank, q_group, k_group, causal_offset, q_len, k_len)

    def _set(self, q_rank: Tensor | None, k_rank: Tensor | None, q_group: Tensor | None, k_group: Tensor | None,
             causal_offset: int | None, q_len: int | None, k_len: int | None) -> None:
        """Store checked (or built-valid) ``[B|1, L]`` int32 tensors and work out the lengths, batch, device."""
        self.q_rank, self.k_rank, self.q_group, self.k_group = q_rank, k_rank, q_group, k_group
        self.causal_offset = causal_offset
        self.q_len = self._length("q", q_len, (q_rank, q_group))
        self.k_len = self._length("k", k_len, (k_rank, k_group))
        if self.k_len is None:
            raise ValueError("k_len must be given when the mask has no key tensor (k_rank or k_group)")
        tensors = [t for t in (q_rank, k_rank, q_group, k_group) if t is not None]
        batches = {t.shape[0] for t in tensors} - {1}
        if len(batches) > 1:
            raise ValueError(f"the mask's tensors must share the batch size (or have 1), got "
                             f"{sorted(t.shape[0] for t in tensors)}")
        if len({t.device for t in tensors}) > 1:
            raise ValueError(f"the mask's tensors must be on one device, got "
                             f"{sorted({str(t.device) for t in tensors})}")
        self.batch = batches.pop() if batches else 1
        self.device = tensors[0].device if tensors else torch.device("cpu")

    @classmethod
    def _built(cls, q_rank: Tensor | None = None, k_rank: Tensor | None = None, *, q_group: Tensor | None = None,
               k_group: Tensor | None = None, causal_offset: int | None = None, q_len: int | None = None,
               k_len: int | None = None) -> RankMask:
        """A mask from tensors valid by construction (the builders'): no value check, hence no device sync."""
        def as2d(t: Tensor | None) -> Tensor | None:
            return None if t is None else (t if t.dim() == 2 else t.unsqueeze(0)).to(torch.int32)

        m = cls.__new__(cls)
        m._set(as2d(q_rank), as2d(k_rank), as2d(q_group), as2d(k_group), causal_offset, q_len, k_len)
        return m

    @staticmethod
    def _length(side: str, given: int | None, tensors: tuple[Tensor | None, ...]) -> int | None:
        lens = {t.shape[-1] for t in tensors if t is not None}
        if given is not None:
            lens.add(_check_len(f"{side}_len", given))
        if len(lens) > 1:
            raise ValueError(f"{side}_rank, {side}_group and {side}_len disagree on the length: {sorted(lens)}")
        return lens.pop() if lens else None

    # ---- as a predicate
    @staticmethod
    def _at(t: Tensor, b: Tensor, idx: Tensor) -> Tensor:
        return t[b if t.shape[0] > 1 else torch.zeros_like(b), idx]

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = torch.ones((), dtype=torch.bool, device=kv_idx.device) if self.k_rank is None and self.q_rank is None \
            else None
        if self.k_rank is not None or self.q_rank is not None:
            kr = self._at(self.k_rank, b, kv_idx) if self.k_rank is not None else torch.zeros_like(kv_idx)
            if self.q_rank is not None:
                ok = kr <= self._at(self.q_rank, b, q_idx)
            else:
                ok = (kr < _RANK_MAX) | (q_idx < 0)         # (q_idx only to broadcast over the rows)
        if self.q_group is not None:
            ok = ok & (self._at(self.k_group, b, kv_idx) == self._at(self.q_group, b, q_idx))
        if self.causal_offset is not None:
            ok = ok & (kv_idx <= q_idx + self.causal_offset)
        return ok

    def to_dense(self, q_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """The same mask as a bool tensor ``[B|1, 1, Q, K]`` (``[B|1, 1, 1, K]`` when it is the same for every
        query), with its row counts attached, as the builders attach theirs."""
        q = self.q_len if self.q_len is not None else q_len
        broadcast_rows = q is None
        if broadcast_rows:
            if self.causal_offset is not None or self.q_group is not None:
                raise ValueError("q_len must be given: this mask differs between query rows")
            q = 1
        elif q_len is not None and q_len != q:
            raise ValueError(f"q_len={q_len} does not match the mask's query length {q}")
        dev = torch.device(device) if device is not None else self.device
        m = render_mask(self, self.batch, 1, q, self.k_len, dev).contiguous()
        return _attach_counts(m, _row_counts(m), ranks=self)

    def _dense_for(self, q_len: int, device: torch.device) -> Tensor:
        """:meth:`to_dense` for SDPA, kept on the object (the last form asked for), so that a RankMask passed to
        ``attention(backend="sdpa")`` call after call is rendered and counted once, like a builder's mask."""
        if _tracing():
            return self.to_dense(q_len if self.q_len is None else None, device)
        key = (q_len, device)
        kept = self.__dict__.get("_dense")
        if kept is None or kept[0] != key:
            if self.q_len not in (None, q_len):
                raise ValueError(f"the mask has {self.q_len} query rows, the input {q_len}")
            with torch.inference_mode(False):   # (a kept inference tensor would break later training calls)
                kept = (key, self.to_dense(q_len if self.q_len is None else None, device))
            self._dense = kept
        return kept[1]

    # ---- constructors for the masks of article 3
    @classmethod
    def causal(cls, q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> RankMask:
        """The LM mask (:func:`causal_mask`): right-aligned when ``k_len > q_len`` (a kv-cache)."""
        q_len = _check_len("q_len", q_len)
        k_len = q_len if k_len is None else _check_len("k_len", k_len)
        if k_len < q_len:
            raise ValueError(f"k_len must be >= q_len for a right-aligned causal mask, got q_len={q_len}, "
                             f"k_len={k_len}")
        m = cls._built(causal_offset=k_len - q_len, q_len=q_len, k_len=k_len)
        if device is not None:
            m.device = torch.device(device)
        return m

    @classmethod
    def padding(cls, attention_mask: Tensor) -> RankMask:
        """Hide the padding keys (``attention_mask`` 0/1 ``[B, L]``); any number of queries (:func:`padding_mask`)."""
        am = _check_binary("attention_mask", attention_mask)
        return cls._built(k_rank=(1 - am) * _RANK_MAX)

    @classmethod
    def unilm(cls, segment_ids: Tensor, attention_mask: Tensor | None = None) -> RankMask:
        """UniLM seq2seq (:func:`unilm_mask`): ``rank = cumsum(segment_ids)``; padding keys hidden."""
        s = _check_binary("segment_ids", segment_ids)
        c = s.cumsum(-1)
        kr = c
        if attention_mask is not None:
            am = _check_binary("attention_mask", attention_mask)
            if am.shape != s.shape:
                raise ValueError(f"attention_mask must have the shape of segment_ids {tuple(segment_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            kr = torch.where(am.bool(), c, _RANK_MAX)
        return cls._built(c, kr)

    @classmethod
    def prefix_lm(cls, prefix_len: int | Tensor, seq_len: int,
                  device: torch.device | str | None = None) -> RankMask:
        """Prefix-LM (:func:`prefix_lm_mask`): ``rank = max(position, prefix_len - 1)``."""
        L = _check_len("seq_len", seq_len)
        if isinstance(prefix_len, Tensor):
            if prefix_len.is_floating_point() or prefix_len.dtype == torch.bool or prefix_len.dim() != 1:
                raise TypeError(f"prefix_len must be an int or a 1-D integer tensor [B], got dtype "
                                f"{prefix_len.dtype} and shape {tuple(prefix_len.shape)}")
            if prefix_len.numel() and bool(((prefix_len < 0) | (prefix_len > L)).any()):
                raise ValueError(f"prefix_len must lie in [0, seq_len={L}], got {prefix_len.tolist()}")
            dev = device if device is not None else prefix_len.device
            p = prefix_len.to(dev).long()[:, None]
        else:
            p_int = _check_len("prefix_len", prefix_len)
            if p_int > L:
                raise ValueError(f"prefix_len must be <= seq_len={L}, got {p_int}")
            dev = device
            p = torch.tensor([[p_int]], device=dev)
        r = torch.maximum(torch.arange(L, device=dev)[None], p - 1)
        return cls._built(r, r)

    @classmethod
    def permutation(cls, order: Tensor) -> RankMask:
        """Permutation LM (:func:`permutation_mask`): ``rank = the step at which a position is generated``."""
        r = _rank(_check_order("order", order))
        return cls._built(r, r)

    @classmethod
    def documents(cls, document_ids: Tensor, causal: bool = False) -> RankMask:
        """Packed sequences: a token sees the tokens of its own document only (``document_ids`` ``[L]`` or
        ``[B, L]``, one id per token), bidirectionally or, with ``causal=True``, up to itself."""
        return cls(q_group=document_ids, k_group=document_ids, causal_offset=0 if causal else None)

    def with_key_padding(self, attention_mask: Tensor) -> RankMask:
        """This mask with the padding keys of ``attention_mask`` (0/1 ``[B, K]``) hidden as well."""
        am = _check_binary("attention_mask", attention_mask)
        if am.shape[-1] != self.k_len:
            raise ValueError(f"attention_mask must have {self.k_len} keys, got shape {tuple(attention_mask.shape)}")
        am = am.to(self.device)
        kr = self.k_rank if self.k_rank is not None else torch.zeros(1, self.k_len, dtype=torch.int32,
                                                                      device=self.device)
        return RankMask._built(self.q_rank, torch.where(am.bool(), kr, _RANK_MAX), q_group=self.q_group,
                               k_group=self.k_group, causal_offset=self.causal_offset, q_len=self.q_len,
                               k_len=self.k_len)

    def _fields(self) -> tuple:
        return (self.q_rank, self.k_rank, self.q_group, self.k_group, self.causal_offset, self.q_len, self.k_len,
                str(self.device))

    def __repr__(self) -> str:
        parts = [f"batch={self.batch}", f"q_len={self.q_len}", f"k_len={self.k_len}"]
        if self.q_rank is not None or self.k_rank is not None:
            parts.append("ranks")
        if self.q_group is not None:
            parts.append("groups")
        if self.causal_offset is not None:
            parts.append(f"causal_offset={self.causal_offset}")
        return f"RankMask({', '.join(parts)})"


# ------------------------------------------------------------------------------------------- builders
def causal_mask(q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Rendered causal mask ``[q_len, k_len]`` (True = may attend), right-aligned when ``k_len > q_len``.

    Query ``i`` sees keys ``j <= i + (k_len - q_len)``: the queries are the *last* ``q_len`` positions of a
    sequence whose first ``k_len - q_len`` keys come from a cache. ``k_len < q_len`` raises ``ValueError``
    (queries would have no keys to be aligned with). Predicate form: :func:`causal`.

    Example:
        >>> causal_mask(2, 4).int().tolist()
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    q_len = _check_len("q_len", q_len)
    k_len = q_len if k_len is None else _check_len("k_len", k_len)
    if k_len < q_len:
        raise ValueError(f"k_len must be >= q_len for a right-aligned causal mask, got q_len={q_len}, "
                         f"k_len={k_len}")
    m = render_mask(causal(k_len - q_len), 1, 1, q_len, k_len, device)[0, 0].contiguous()
    ranks = RankMask._built(causal_offset=k_len - q_len, q_len=q_len, k_len=k_len)
    ranks.device = m.device
    return _attach_counts(m, torch.arange(k_len - q_len + 1, k_len + 1, device=m.device), ranks)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` 0/1 (or bool) attention mask → bool ``[B, 1, 1, L]`` that hides padding keys.

    Example:
        >>> padding_mask(torch.tensor([[1, 1, 0]])).shape
        torch.Size([1, 1, 1, 3])
    """
    am = _check_binary("attention_mask", attention_mask)
    return _attach_counts(am.bool()[:, None, None, :].contiguous(), am.sum(-1)[:, None, None],
                          RankMask._built(k_rank=(1 - am) * _RANK_MAX))


def unilm_mask(segment_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """UniLM seq2seq mask ``[B, 1, L, L]`` from segment ids (kexue.fm/archives/6933).

    With ``c = cumsum(segment_ids)`` along the sequence, query ``i`` sees key ``j`` iff ``c[j] <= c[i]``. For
    the usual ``[CLS] src [SEP] tgt [SEP]`` layout with ``s = 0..0 1..1`` this is: the source is
    bidirectional, each target token sees the whole source and the target tokens up to itself, and source
    tokens never see the target. Keys where ``attention_mask`` is 0 are then hidden (padding on top; the
    query rows of padding tokens are left as they are, their outputs are meant to be ignored).

    ``segment_ids`` must hold 0/1 integers (``[L]`` or ``[B, L]``). They need not be non-decreasing: for
    other patterns the cumsum form is the natural generalisation (each 1 advances a causal clock and a 0 joins
    the group of the token before it, bidirectionally), and then it differs from the 2019 product form
    ``(1 - s_i)(1 - s_j) + s_i [j <= i]``, which agrees with it exactly when the 1s form a suffix.

    Example:
        >>> s = torch.tensor([[0, 0, 0, 1, 1]])
        >>> unilm_mask(s)[0, 0].int().tolist()
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    s = _check_binary("segment_ids", segment_ids)
    B, L = s.shape
    m = render_mask(unilm(s), B, 1, L, L, s.device)
    # keys per row without reading the mask: c is non-decreasing, so {j : c[j] <= c[i]} = {0, ..., r_i - 1}
    c = s.cumsum(-1)
    r = torch.searchsorted(c, c, right=True)
    counts, k_rank = r, c
    if attention_mask is not None:
        am = _check_binary("attention_mask", attention_mask)
        if am.shape != s.shape:
            raise ValueError(f"attention_mask must have the shape of segment_ids {tuple(segment_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        m = m & am.bool()[:, None, None, :]
        visible = torch.cat([am.new_zeros(B, 1), am.cumsum(-1)], -1)   # visible[r] = real keys among 0..r-1
        counts = visible.gather(-1, r)
        k_rank = torch.where(am.bool(), c, _RANK_MAX)
    return _attach_counts(m.contiguous(), counts[:, None, :], RankMask._built(c, k_rank))


def prefix_lm_mask(prefix_len: int | Tensor, seq_len: int,
                   device: torch.device | str | None = None) -> Tensor:
    """Prefix-LM mask: ``[L, L]`` for an int ``prefix_len``, ``[B, 1, L, L]`` for an int tensor ``[B]``.

    Query ``i`` sees key ``j`` iff ``j < prefix_len`` or ``j <= i`` (see :func:`prefix_lm`). It equals
    :func:`unilm_mask` with segment ids ``[0] * prefix_len + [1] * (L - prefix_len)``.

    Example:
        >>> prefix_lm_mask(1, 3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    L = _check_len("seq_len", seq_len)
    if isinstance(prefix_len, Tensor):
        mod = prefix_lm(prefix_len)
        if prefix_len.numel() and bool((prefix_len > L).any()):
            raise ValueError(f"prefix_len must be <= seq_len={L}, got {prefix_len.tolist()}")
        dev = device if device is not None else prefix_len.device
        m = render_mask(mod, prefix_len.shape[0], 1, L, L, dev).contiguous()
        steps = torch.arange(1, L + 1, device=m.device)
        counts = torch.maximum(steps, prefix_len.to(m.device).long()[:, None])      # = rank + 1
        return _attach_counts(m, counts[:, None, :], RankMask._built(counts - 1, counts - 1))
    p = _check_len("prefix_len", prefix_len)
    if p > L:
        raise ValueError(f"prefix_len must be <= seq_len={L}, got {p}")
    m = render_mask(prefix_lm(p), 1, 1, L, L, device)[0, 0].contiguous()
    counts = torch.arange(1, L + 1, device=m.device).clamp_min(p)                    # = rank + 1
    return _attach_counts(m, counts, RankMask._built(counts - 1, counts - 1))


def permutation_mask(order: Tensor) -> Tensor:
    """XLNet permutation-LM mask: the lower-triangular mask "shuffled" by the generation order.

    ``order`` (``[L]`` or ``[B, L]``, a permutation of ``0..L-1``) lists positions in generation order, and
    ``rank`` is its inverse. ``M[i, j] = [rank(j) <= rank(i)]``: position ``i`` sees every position generated
    no later than itself. Returns ``[L, L]`` for a 1-D order and ``[B, 1, L, L]`` for a batch of orders.

    The diagonal is included, as in the plain LM mask ``[j <= i]`` of which this is a relabelling: the output
    at the position generated at step ``t`` has seen steps ``0..t`` and predicts step ``t + 1`` (inputs and
    targets shifted by one along the order, with a start token generated first — the article's ``<s>``).
    Including the diagonal is what makes it *exactly* equivalent to :func:`permute_for_plm` followed by an
    ordinary causal mask. (XLNet's two-stream "query" stream, which excludes the diagonal so a position
    predicts its own token, is a different mask.)

    Example:
        >>> permutation_mask(torch.tensor([1, 2, 0])).int().tolist()   # generate 1, then 2, then 0
        [[1, 1, 1], [0, 1, 0], [0, 1, 1]]
    """
    o = _check_order("order", order)
    L = o.shape[-1]
    rank = _rank(o)
    counts = rank + 1                                       # position i sees the rank(i) + 1 steps up to its own
    ranks = RankMask._built(rank, rank)
    if o.dim() == 1:
        return _attach_counts(render_mask(permutation(o), 1, 1, L, L, o.device)[0, 0].contiguous(), counts, ranks)
    return _attach_counts(render_mask(permutation(o), o.shape[0], 1, L, L, o.device).contiguous(),
                          counts[:, None, :], ranks)


def permute_for_plm(tokens: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder ``tokens`` into generation order; return ``(reordered tokens, original position ids)``.

    ``tokens`` is ``[L]``, ``[B, L]`` or ``[B, L, ...]`` (ids or embeddings), ``order`` is ``[L]`` or ``[B, L]``.
    ``out[..., t] = tokens[..., order[t]]`` and ``position_ids = order`` (broadcast to the batch).

    Equivalence (article 3): a Transformer sees its input as the set {(token, position id)}; attention is
    permutation-equivariant once positions are carried by the ids. Feeding the reordered tokens with their
    original position ids through an ordinary causal mask lets step ``t`` see steps ``0..t``, i.e. exactly
    the keys ``j`` with ``rank(j) <= rank(order[t])`` — the rows of :func:`permutation_mask`. So the output at
    reordered step ``t`` equals the output at original position ``order[t]`` under the permutation mask, and
    both give the same log-likelihood for any target assignment that is relabelled the same way.

    Example:
        >>> toks, pos = permute_for_plm(torch.tensor([10, 11, 12]), torch.tensor([2, 0, 1]))
        >>> toks.tolist(), pos.tolist()
        ([12, 10, 11], [2, 0, 1])
    """
    t = check_tensor("tokens", tokens, min_dim=1)
    o = _check_order("order", order)
    L = o.shape[-1]
    if t.dim() == 1:
        if o.dim() != 1:
            raise ValueError(f"order must be [L] for 1-D tokens, got shape {tuple(o.shape)}")
        if t.shape[0] != L:
            raise ValueError(f"tokens length {t.shape[0]} does not match order length {L}")
        return t[o.to(t.device)], o.clone()
    B = t.shape[0]
    if t.shape[1] != L:
        raise ValueError(f"tokens must have shape [B, L, ...] with L = len(order) = {L}, got {tuple(t.shape)}")
    if o.dim() == 2 and o.shape[0] != B:
        raise ValueError(f"order batch size {o.shape[0]} does not match tokens batch size {B}")
    pos = o.expand(B, L).to(t.device)
    idx = pos.reshape(B, L, *([1] * (t.dim() - 2))).expand_as(t)
    return t.gather(1, idx), pos.clone()


# ------------------------------------------------------------------------------------ internal helpers
def _mask4(mask: Tensor | MaskMod, B: int, H: int, q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Validate ``mask`` (bool, additive float or predicate) and return it as a 4-D tensor broadcastable to
    ``[B, H, q_len, k_len]`` (a view for tensors; predicates are rendered to bool)."""
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be a bool tensor (True = may attend) or an additive float mask, got "
                            f"dtype {mask.dtype}")
        if mask.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
        m4 = mask if mask.dim() == 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mb, mh, mq, mk = m4.shape
        if not ((mb == 1 or mb == B) and (mh == 1 or mh == H) and (mq == 1 or mq == q_len)
                and (mk == 1 or mk == k_len)):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to [B, H, Q, K] = "
                             f"{[B, H, q_len, k_len]}")
        return m4 if m4.device == device else m4.to(device)
    if callable(mask):
        return render_mask(mask, B, H, q_len, k_len, device)
    raise TypeError(f"mask must be a tensor, a mask predicate or None, got {type(mask).__name__}")


def _as_allowed(mask: Tensor | MaskMod | None, B: int, H: int, q_len: int, k_len: int,
                is_causal: bool, device: torch.device) -> Tensor | None:
    """Normalise ``mask`` (bool, additive float, predicate or None) plus ``is_causal`` to a bool tensor
    broadcastable to ``[B, H, q_len, k_len]`` (4-D), or None when nothing is masked.

    ``is_causal`` follows ``F.scaled_dot_product_attention``: top-left aligned, key ``j`` visible iff ``j <= i``.
    """
    _check_is_causal(is_causal)
    allowed: Tensor | None = None
    if mask is not None:
        m4 = _mask4(mask, B, H, q_len, k_len, device)
        allowed = m4 if m4.dtype == torch.bool else m4 > float("-inf")
    if is_causal:
        tri = render_mask(causal(0), 1, 1, q_len, k_len, device)
        allowed = tri if allowed is None else allowed & tri
    return allowed


_LANE_GROUP = 255  # int64 words of 8 bool bytes added per partial sum: byte lanes stay <= 255


def _row_counts(allowed: Tensor) -> Tensor:
    """``allowed.sum(-1)`` for a bool tensor, fast: int64 ``[..., Q]``.

    torch's bool ``sum`` promotes every element to int64, which costs more than the attention kernel's own
    pass over the mask at large L. When the last dim is contiguous and a multiple of 8, eight bools are read
    as one int64 word and up to 255 words are added as plain int64: each of a word's eight bytes is 0 or 1,
    so every byte lane of the sum stays <= 255 and never carries into its neighbour (two's-complement
    wrap-around of the whole word keeps the bit pattern exact). The few partial sums left per row are then
    split back into their bytes and added. One read of the mask, no temporaries the size of the mask: about
    15x faster than the bool sum at L = 8192.
    """
    n = allowed.shape[-1]
    if _tracing():                      # in a graph, the plain reduction (attention() on a CPU calls this
        return allowed.sum(-1)          # function through the opaque op kexue::row_counts instead)
    if n and n % 8 == 0 and allowed.stride(-1) == 1 and allowed.storage_offset() % 8 == 0 and \
            all(st % 8 == 0 for st, sz in zip(allowed.stride()[:-1], allowed.shape[:-1]) if sz > 1):
        try:
            words = allowed.view(torch.int64)
        except RuntimeError:
            words = None
        if words is not None:
            w = words.shape[-1]
            if w <= _LANE_GROUP:        # one group (L <= 2040): one sum, no slices (half the time at L = 512)
                return words.sum(-1, keepdim=True).contiguous().view(torch.uint8).sum(-1, dtype=torch.int64)
            full = (w // _LANE_GROUP) * _LANE_GROUP
            parts = []
            if full:
                parts.append(words[..., :full].unflatten(-1, (w // _LANE_GROUP, _LANE_GROUP)).sum(-1))
            if w > full:
                parts.append(words[..., full:].sum(-1, keepdim=True))
            lane_sums = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
            return lane_sums.contiguous().view(torch.uint8).sum(-1, dtype=torch.int64)
    return allowed.view(torch.uint8).sum(-1, dtype=torch.int64)


def _row_any(allowed: Tensor) -> Tensor:
    """``allowed.any(-1)`` for a bool tensor, via a byte ``amax`` (several times faster on CPU)."""
    if allowed.shape[-1] == 0:
        return torch.zeros(allowed.shape[:-1], dtype=torch.bool, device=allowed.device)
    return allowed.view(torch.uint8).amax(-1) > 0


# ------------------------------------------------------------------ the CPU kernels as ops torch.compile keeps
# While torch.compile traces attention() on a CPU, the row counts and the bool -> float conversion are called
# as these opaque ops, i.e. the hand-written kernels above: the code inductor generates for the same bool
# reductions and selects ran 2-4x slower (L = 2048, 2 cores: 3.5 ms vs 0.8 ms to count, 2.9 ms vs 2.1 ms to
# convert). On a GPU the traced path uses plain torch ops, which the compiler fuses. They are registered through
# torch.library.Library (schema, CPU kernel, fake kernel for tracing) rather than the torch.library.custom_op
# decorator: its Python wrapper cost ~45 us per call at L = 512, a plain registration ~8 us.
_LIB = torch.library.Library("kexue", "FRAGMENT")
_LIB.define("row_counts(Tensor allowed) -> Tensor")
_LIB.define("to_additive(Tensor allowed, ScalarType dtype) -> Tensor")
_LIB.define("to_additive_counted(Tensor allowed, ScalarType dtype) -> (Tensor, Tensor)")
_LIB.impl("row_counts", lambda allowed: _row_counts(allowed), "CPU")
_LIB.impl("to_additive", lambda allowed, dtype: _additive(allowed, dtype).contiguous(), "CPU")
_LIB.impl("to_additive_counted",
          lambda allowed, dtype: tuple(t.contiguous() for t in _additive_counted(allowed, dtype)), "CPU")


@torch.library.register_fake("kexue::row_counts", lib=_LIB)
def _(allowed: Tensor) -> Tensor:
    return allowed.new_empty(allowed.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("kexue::to_additive", lib=_LIB)
def _(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return allowed.new_empty(allowed.shape, dtype=dtype)


@torch.library.register_fake("kexue::to_additive_counted", lib=_LIB)
def _(allowed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return allowed.new_empty(allowed.shape, dtype=dtype), allowed.new_empty(allowed.shape[:-1], dtype=torch.int64)
