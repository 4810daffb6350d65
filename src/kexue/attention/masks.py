"""Attention masks as predicates, after "从语言模型到Seq2Seq：Transformer如戏，全靠Mask" (kexue.fm/archives/6933).

A mask is a predicate ``mod(b, h, q_idx, kv_idx) -> bool tensor`` (the FlexAttention ``mask_mod`` shape):
``True`` means query ``q_idx`` may attend to key ``kv_idx``. Predicates are combined with :func:`and_masks`
and :func:`or_masks`, rendered to a dense boolean tensor for ``F.scaled_dot_product_attention`` with
:func:`render_mask`, or to a FlexAttention ``BlockMask`` with :func:`to_block_mask`.

* Predicates (return a ``mod``): :func:`full`, :func:`causal`, :func:`padding`, :func:`sliding_window`,
  :func:`unilm`, :func:`prefix_lm`, :func:`permutation`, :func:`documents`, :func:`from_dense`.
* Builders (return a rendered bool tensor; each one is ``render_mask`` of its predicate):
  :func:`causal_mask` ``[Q, K]``, :func:`padding_mask` ``[B, 1, 1, L]``, :func:`unilm_mask` ``[B, 1, L, L]``,
  :func:`prefix_lm_mask`, :func:`permutation_mask`, :func:`sliding_window_mask`, :func:`document_mask`.
* :func:`permute_for_plm`: the "reorder the input instead" form of the permutation LM.

Every predicate is written with tensor ops only (comparisons and tensor indexing), so it works both when
called with broadcast index grids (:func:`render_mask`) and under ``vmap`` (``create_block_mask``). A mask
tensor is a plain tensor: nothing is attached to it, so changing it in place is always seen by the next call.
The same masks as O(L) rank vectors, for kernels that read ranks: :class:`kexue.attention.RankMask`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import torch
from torch import Tensor

from kexue._checks import check_tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "MaskMod", "and_masks", "or_masks", "render_mask", "to_block_mask", "to_additive_mask",
    "full", "causal", "padding", "sliding_window", "unilm", "prefix_lm", "permutation", "documents", "from_dense",
    "causal_mask", "padding_mask", "unilm_mask", "prefix_lm_mask", "permutation_mask", "sliding_window_mask",
    "document_mask", "permute_for_plm",
]


# ----------------------------------------------------------------------------------------------- checks
def check_len(name: str, value: object) -> int:
    """``value`` as a length: an int >= 0 (``TypeError`` / ``ValueError`` naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_binary(name: str, value: object) -> Tensor:
    """A 0/1 integer (or bool) tensor of shape [L] or [B, L], returned as int64 [B, L]."""
    t = check_tensor(name, value)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor of 0/1 values, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [L] or [B, L], got shape {tuple(t.shape)}")
    t = t.long()
    # (not while torch.compile traces: a data-dependent check would split the graph)
    if t.numel() and not torch.compiler.is_compiling() and not bool(((t == 0) | (t == 1)).all()):
        bad = t[(t != 0) & (t != 1)][0].item()
        raise ValueError(f"{name} must contain only 0 and 1, found {bad}")
    return t if t.dim() == 2 else t.unsqueeze(0)


def check_order(name: str, order: object) -> Tensor:
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


def check_is_causal(is_causal: object) -> bool:
    """``is_causal`` must be a bool (a truthy string or None would be read as a flag without a word)."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    return is_causal


def rank_of(order: Tensor) -> Tensor:
    """Inverse permutation along the last dim: ``rank[order[t]] = t``."""
    rank = torch.empty_like(order)
    steps = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return rank.scatter_(-1, order, steps)


def _check_mod(name: str, mod: object) -> None:
    if not callable(mod):
        raise TypeError(f"{name} must be a mask predicate mod(b, h, q_idx, kv_idx), got {type(mod).__name__}")


# -------------------------------------------------------------------------------------------- combinators
def and_masks(*mods: MaskMod) -> MaskMod:
    """Intersection of mask predicates (a key is allowed when every ``mod`` allows it).

    Example:
        >>> m = and_masks(causal(), sliding_window(2))
        >>> render_mask(m, 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    if not mods:
        raise ValueError("and_masks needs at least one mask predicate")
    for i, m in enumerate(mods):
        _check_mod(f"and_masks argument {i}", m)

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
        _check_mod(f"or_masks argument {i}", m)

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
    _check_mod("mod", mod)
    B, H = check_len("B", B), check_len("H", H)
    Q_LEN, KV_LEN = check_len("Q_LEN", Q_LEN), check_len("KV_LEN", KV_LEN)
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

    _check_mod("mod", mod)
    if B is not None:
        check_len("B", B)
    if H is not None:
        check_len("H", H)
    Q_LEN, KV_LEN = check_len("Q_LEN", Q_LEN), check_len("KV_LEN", KV_LEN)
    dev = device if device is not None else "cpu"
    return create_block_mask(mod, B, H, Q_LEN, KV_LEN, device=dev, BLOCK_SIZE=BLOCK_SIZE)


def to_additive_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A bool mask (True = may attend) as an additive float mask: ``0`` where True, ``-inf`` where False.

    The same values as ``torch.where(mask, 0, -inf)``, the conversion ``F.scaled_dot_product_attention``
    repeats on every call that gets a bool mask: convert once (or let :func:`kexue.attention.prepare_mask` do it)
    and pass the result to every layer. Broadcast (``expand``-ed) dimensions of ``mask`` are materialised in the
    result, which is contiguous. (On a CPU the conversion runs on the float's bit pattern,
    :mod:`kexue.attention._cpu`.)

    Example:
        >>> to_additive_mask(causal_mask(2)).tolist()
        [[0.0, -inf], [0.0, 0.0]]
    """
    from . import _cpu

    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return _cpu.to_additive(mask, dtype)


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


_causal_predicate = causal      # (for the builders whose ``causal=`` flag shadows the name)


def padding(attention_mask: Tensor) -> MaskMod:
    """Keys where ``attention_mask[b, kv_idx]`` is 1/True are visible; padding keys (0) are hidden.

    ``attention_mask`` is ``[B, L]`` (or ``[L]`` / ``[1, L]``, shared by every batch row).

    Example:
        >>> render_mask(padding(torch.tensor([[1, 1, 0]])), 1, 1, 1, 3)[0, 0, 0].tolist()
        [True, True, False]
    """
    am = check_binary("attention_mask", attention_mask).bool()
    if am.shape[0] == 1:                # [L] or [1, L]: shared by every batch row
        am1 = am[0]

        def mod1(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return am1[kv_idx]

        return mod1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return am[b, kv_idx]

    return mod


def sliding_window(window: int, offset: int = 0) -> MaskMod:
    """Band predicate ``|q_idx + offset - kv_idx| < window`` (each query sees keys within ``window - 1``
    positions of its own).

    Symmetric on purpose: ``and_masks(causal(), sliding_window(w))`` is the causal local window of ``w`` keys
    including the query itself; on its own it is a bidirectional local window. ``offset`` places query ``i`` at
    key position ``i + offset``, as :func:`causal` does: with a kv-cache (``K > Q``, the queries being the last
    positions) pass ``offset = K - Q`` to both.

    Example:
        >>> render_mask(and_masks(causal(), sliding_window(2)), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
        >>> render_mask(and_masks(causal(3), sliding_window(2, 3)), 1, 1, 2, 5)[0, 0].int().tolist()
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


def unilm(segment_ids: Tensor) -> MaskMod:
    """UniLM seq2seq predicate: query i sees key j iff cumsum(s)[j] <= cumsum(s)[i] (bert4keras ``UniLM_Mask``).

    See :func:`unilm_mask` for the meaning and the validation of ``segment_ids``.

    Example:
        >>> s = torch.tensor([[0, 0, 1, 1]])
        >>> render_mask(unilm(s), 1, 1, 4, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    c = check_binary("segment_ids", segment_ids).cumsum(-1)
    if c.shape[0] == 1:                 # [L] or [1, L]: shared by every batch row
        c1 = c[0]

        def mod1(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return c1[kv_idx] <= c1[q_idx]

        return mod1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return c[b, kv_idx] <= c[b, q_idx]

    return mod


def _check_prefix(prefix_len: int | Tensor) -> int | Tensor:
    if isinstance(prefix_len, Tensor):
        if prefix_len.is_floating_point() or prefix_len.dtype == torch.bool or prefix_len.dim() != 1:
            raise TypeError(f"prefix_len must be an int or a 1-D integer tensor [B], got dtype "
                            f"{prefix_len.dtype} and shape {tuple(prefix_len.shape)}")
        if prefix_len.numel() and bool((prefix_len < 0).any()):
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len.tolist()}")
        return prefix_len.long()
    return check_len("prefix_len", prefix_len)


def prefix_lm(prefix_len: int | Tensor) -> MaskMod:
    """Prefix-LM predicate: ``kv_idx < prefix_len or kv_idx <= q_idx`` (``prefix_len`` int or int tensor [B]).

    The prefix is bidirectional, the rest causal, and prefix queries never see the continuation (for
    ``q_idx < prefix_len`` both terms only admit keys inside the prefix).

    Example:
        >>> render_mask(prefix_lm(2), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    p = _check_prefix(prefix_len)
    if isinstance(p, Tensor):
        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx < p[b]) | (kv_idx <= q_idx)

        return mod

    def mod_int(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < p) | (kv_idx <= q_idx)

    return mod_int


def permutation(order: Tensor) -> MaskMod:
    """Permutation-LM predicate: ``rank(kv_idx) <= rank(q_idx)`` for the generation order ``order``.

    ``order`` is ``[L]`` (shared by the batch) or ``[B, L]``; ``order[t]`` is the position generated at step
    ``t`` and ``rank`` its inverse. See :func:`permutation_mask`.

    Example:
        >>> render_mask(permutation(torch.tensor([2, 0, 1])), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 1], [1, 1, 1], [0, 0, 1]]
    """
    rank = rank_of(check_order("order", order))
    if rank.dim() == 1:
        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return rank[kv_idx] <= rank[q_idx]

        return mod

    def mod_b(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return rank[b, kv_idx] <= rank[b, q_idx]

    return mod_b


def documents(document_ids: Tensor) -> MaskMod:
    """Packed sequences: query i sees key j iff both belong to the same document (``document_ids`` ``[L]`` or
    ``[B, L]``, one non-negative integer id per token). ``and_masks(documents(ids), causal())`` is the causal
    form.

    Example:
        >>> render_mask(documents(torch.tensor([0, 0, 1])), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    t = check_tensor("document_ids", document_ids)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"document_ids must be an integer tensor, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"document_ids must have shape [L] or [B, L], got shape {tuple(t.shape)}")
    ids = t.long()
    if ids.dim() == 1:
        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return ids[kv_idx] == ids[q_idx]

        return mod

    def mod_b(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ids[b, kv_idx] == ids[b, q_idx]

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


# ------------------------------------------------------------------------------------------- builders
def causal_mask(q_len: int, k_len: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Rendered causal mask ``[q_len, k_len]`` (True = may attend), right-aligned when ``k_len > q_len``.

    Query ``i`` sees keys ``j <= i + (k_len - q_len)``: the queries are the *last* ``q_len`` positions of a
    sequence whose first ``k_len - q_len`` keys come from a cache. ``k_len < q_len`` raises ``ValueError``
    (queries would have no keys to be aligned with). Predicate form: :func:`causal`.

    Example:
        >>> causal_mask(2, 4).int().tolist()
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    q_len = check_len("q_len", q_len)
    k_len = q_len if k_len is None else check_len("k_len", k_len)
    if k_len < q_len:
        raise ValueError(f"k_len must be >= q_len for a right-aligned causal mask, got q_len={q_len}, "
                         f"k_len={k_len}")
    return render_mask(causal(k_len - q_len), 1, 1, q_len, k_len, device)[0, 0].contiguous()


def padding_mask(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` 0/1 (or bool) attention mask → bool ``[B, 1, 1, L]`` that hides padding keys.

    Example:
        >>> padding_mask(torch.tensor([[1, 1, 0]])).shape
        torch.Size([1, 1, 1, 3])
    """
    am = check_binary("attention_mask", attention_mask)
    return render_mask(padding(am), am.shape[0], 1, 1, am.shape[1], am.device).contiguous()


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
    s = check_binary("segment_ids", segment_ids)
    B, L = s.shape
    mod = unilm(s)
    if attention_mask is not None:
        am = check_binary("attention_mask", attention_mask)
        if am.shape != s.shape:
            raise ValueError(f"attention_mask must have the shape of segment_ids {tuple(segment_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        mod = and_masks(mod, padding(am))
    return render_mask(mod, B, 1, L, L, s.device).contiguous()


def prefix_lm_mask(prefix_len: int | Tensor, seq_len: int, *, device: torch.device | str | None = None) -> Tensor:
    """Prefix-LM mask: ``[L, L]`` for an int ``prefix_len``, ``[B, 1, L, L]`` for an int tensor ``[B]``.

    Query ``i`` sees key ``j`` iff ``j < prefix_len`` or ``j <= i`` (see :func:`prefix_lm`). It equals
    :func:`unilm_mask` with segment ids ``[0] * prefix_len + [1] * (L - prefix_len)``.

    Example:
        >>> prefix_lm_mask(1, 3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    L = check_len("seq_len", seq_len)
    p = _check_prefix(prefix_len)
    if isinstance(p, Tensor):
        if p.numel() and bool((p > L).any()):
            raise ValueError(f"prefix_len must be <= seq_len={L}, got {p.tolist()}")
        dev = device if device is not None else p.device
        return render_mask(prefix_lm(p.to(dev)), p.shape[0], 1, L, L, dev).contiguous()
    if p > L:
        raise ValueError(f"prefix_len must be <= seq_len={L}, got {p}")
    return render_mask(prefix_lm(p), 1, 1, L, L, device)[0, 0].contiguous()


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
    o = check_order("order", order)
    L = o.shape[-1]
    if o.dim() == 1:
        return render_mask(permutation(o), 1, 1, L, L, o.device)[0, 0].contiguous()
    return render_mask(permutation(o), o.shape[0], 1, L, L, o.device).contiguous()


def sliding_window_mask(window: int, q_len: int, k_len: int | None = None, *, causal: bool = False,
                        device: torch.device | str | None = None) -> Tensor:
    """Local-window mask ``[q_len, k_len]``: query ``i`` sees the keys within ``window - 1`` positions of its own
    (:func:`sliding_window`), only the earlier ones with ``causal=True`` (the causal local window of ``window``
    keys including the query). Queries are right-aligned with the keys when ``k_len > q_len`` (a kv-cache).

    Example:
        >>> sliding_window_mask(2, 3, causal=True).int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    q_len = check_len("q_len", q_len)
    k_len = q_len if k_len is None else check_len("k_len", k_len)
    if k_len < q_len:
        raise ValueError(f"k_len must be >= q_len (queries right-aligned with the keys), got q_len={q_len}, "
                         f"k_len={k_len}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    off = k_len - q_len
    mod = sliding_window(window, off)
    if causal:
        mod = and_masks(_causal_predicate(off), mod)
    return render_mask(mod, 1, 1, q_len, k_len, device)[0, 0].contiguous()


def document_mask(document_ids: Tensor, *, causal: bool = False) -> Tensor:
    """Packed-sequence mask ``[B, 1, L, L]`` (``[L, L]`` for 1-D ids): a token sees the tokens of its own
    document (:func:`documents`), up to itself with ``causal=True``.

    Example:
        >>> document_mask(torch.tensor([0, 0, 1]), causal=True).int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    mod = documents(document_ids)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal:
        mod = and_masks(mod, _causal_predicate(0))
    L = document_ids.shape[-1]
    if document_ids.dim() == 1:
        return render_mask(mod, 1, 1, L, L, document_ids.device)[0, 0].contiguous()
    return render_mask(mod, document_ids.shape[0], 1, L, L, document_ids.device).contiguous()


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
    o = check_order("order", order)
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
