"""A mask made ready for attention once per forward pass: :class:`PreparedMask` and :func:`prepare_mask`.

A model passes one mask to every layer. :func:`prepare_mask` takes its parts -- a bool or additive tensor, a
predicate or a :class:`~kexue.attention.RankMask`, the padding of an ``attention_mask`` and the causal flag -- and the
:class:`PreparedMask` it returns works out, once each and on demand, what attention needs: the whole mask as bool,
its additive float form for SDPA, and the number of keys each query row sees (from the structure in O(L) where the
mask has one). The caller holds the object for the forward pass, as Hugging Face's ``create_causal_mask`` result
is held; nothing is kept anywhere else. :func:`kexue.attention.attention`, its reference, the entropy
diagnostics and the optional kernels all take a PreparedMask (and prepare any other mask themselves, per call).

Conventions: a mask broadcasts to ``[B, H, Q, K]``, True = may attend; in an additive float mask ``-inf`` -- and any
value at or below the mask dtype's most negative finite value, the Hugging Face convention for padding -- hides a
key, other values are a bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue._checks import check_tensor

from . import _cpu
from .masks import MaskMod, check_binary, check_is_causal, check_len, render_mask
from .ranks import RankMask

__all__ = ["PreparedMask", "prepare_mask"]

# What a device's SDPA kernels return for a query row with no visible key, given an additive (-inf) mask: 0 with
# zero gradients on the CPU (tests hold torch to it) and on CUDA from torch 2.11 (every backend, H100); elsewhere
# the empty rows are un-masked for the kernel and the output is zeroed there afterwards (the "guard").
_ZERO_EMPTY_ROWS = {"cpu"}
if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit()) >= (2, 11):
    _ZERO_EMPTY_ROWS.add("cuda")


def hidden_of(mask: Tensor) -> Tensor:
    """Bool: the entries of an additive float mask that hide a key (``-inf``, or at or below the dtype's most
    negative finite value, as Hugging Face writes padding)."""
    return mask <= torch.finfo(mask.dtype).min


def allowed_of(mask: Tensor) -> Tensor:
    """A bool or additive float mask as bool, True = may attend."""
    return mask if mask.dtype == torch.bool else ~hidden_of(mask)


def float_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive float mask in ``dtype``: hidden entries (:func:`hidden_of`) become ``-inf``, the finite bias
    values saturate at ``dtype``'s finite range (a value beyond it must not turn into an infinity and hide a key
    the mask shows)."""
    hidden = hidden_of(mask)
    if torch.finfo(mask.dtype).max > torch.finfo(dtype).max:
        lim = torch.finfo(dtype)
        mask = mask.clamp(lim.min, lim.max)
    return mask.to(dtype).masked_fill(hidden, float("-inf"))


def _mask4(mask: Tensor, B: int, H: int, q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Validate a bool / additive float mask and return it as a 4-D tensor broadcastable to ``[B, H, Q, K]``."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be a bool tensor (True = may attend) or an additive float mask, got "
                        f"dtype {mask.dtype}")
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    m4 = mask if mask.dim() == 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    mb, mh, mq, mk = m4.shape
    if not ((mb == 1 or mb == B) and (mh == 1 or mh == H) and (mq == 1 or mq == q_len) and (mk == 1 or mk == k_len)):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to [B, H, Q, K] = "
                         f"{[B, H, q_len, k_len]}")
    return m4 if m4.device == device else m4.to(device)


class PreparedMask:
    """A mask made ready for attention, once: what every layer of a model needs from it.

    Built by :func:`prepare_mask` (not by hand). It holds the parts the mask was made of -- ``key_padding``
    (bool ``[B, K]``, True = a real key, or None), ``is_causal`` with ``causal_offset`` (query ``i`` sees keys
    ``j <= i + causal_offset``; ``K - Q`` for the new tokens of a kv-cache), and any other mask (a bool or additive
    tensor, a rendered predicate, or a :class:`RankMask`) -- and works out on demand, once each:

    * :meth:`allowed` — the whole mask as one bool tensor broadcastable to ``[B, H, Q, K]`` (None: nothing hidden);
    * :meth:`additive` — its additive float form for SDPA (one per dtype);
    * :meth:`counts` — keys per query row, int64 ``[B|1, H|1, Q, 1]`` (from the structure in O(L) where the mask
      has one: causal, padding, ranks; else read from the mask);
    * :meth:`ranks` — the :class:`RankMask` the whole mask equals, or None (for kernels that read ranks).

    A linear attention reads ``is_causal`` and ``key_padding`` and checks ``has_other_mask``. What is worked out is
    kept on this object, which the caller holds for one forward pass: change the mask tensor and prepare again.

    Example:
        >>> from kexue.attention import unilm_mask
        >>> pm = prepare_mask(unilm_mask(torch.tensor([[0, 0, 1, 1]])), q_len=4, batch=1)
        >>> pm.counts()[0, 0, :, 0].tolist()
        [2, 2, 3, 4]
    """

    def __init__(self, *, batch: int, heads: int, q_len: int, k_len: int, device: torch.device,
                 other: Tensor | None, rank: RankMask | None, key_padding: Tensor | None, is_causal: bool,
                 causal_offset: int) -> None:
        self.batch, self.heads, self.q_len, self.k_len, self.device = batch, heads, q_len, k_len, device
        self.other, self.rank, self.key_padding = other, rank, key_padding
        self.is_causal, self.causal_offset = is_causal, causal_offset
        self._memo: dict = {}

    @property
    def has_other_mask(self) -> bool:
        """Whether the mask has a part beyond the causal structure and the key padding."""
        return self.other is not None or self.rank is not None

    @property
    def is_empty(self) -> bool:
        """True when nothing is hidden: no mask, no padding, not causal."""
        return not self.has_other_mask and self.key_padding is None and not self.is_causal

    @property
    def sdpa_causal(self) -> bool:
        """True when the whole mask is SDPA's own ``is_causal`` (top-left, nothing else): no tensor is needed."""
        return self.is_causal and self.causal_offset == 0 and not self.has_other_mask and self.key_padding is None

    def __repr__(self) -> str:
        parts = [f"batch={self.batch}", f"q_len={self.q_len}", f"k_len={self.k_len}"]
        if self.is_causal:
            parts.append(f"causal_offset={self.causal_offset}")
        if self.key_padding is not None:
            parts.append("key_padding")
        if self.rank is not None:
            parts.append("ranks")
        if self.other is not None:
            parts.append(f"mask={tuple(self.other.shape)} {self.other.dtype}")
        return f"PreparedMask({', '.join(parts)})"

    # ---- the parts as bool tensors
    def _causal_tri(self) -> Tensor:
        off = self.causal_offset
        return render_mask(lambda b, h, q, kv: kv <= q + off, 1, 1, self.q_len, self.k_len, self.device)

    def allowed(self) -> Tensor | None:
        """The whole mask as bool, broadcastable to ``[B, H, Q, K]`` (True = may attend), or None."""
        if "allowed" in self._memo:
            return self._memo["allowed"]
        rest = self._rest_allowed()
        out = rest if self.other is None else allowed_of(self.other) if rest is None else \
            allowed_of(self.other) & rest
        self._memo["allowed"] = out
        return out

    def bias(self, dtype: torch.dtype) -> Tensor | None:
        """The finite values of an additive float mask (a bias; hidden entries 0), in ``dtype``, or None."""
        if self.other is None or self.other.dtype == torch.bool:
            return None
        b = float_bias(self.other, dtype)
        return b.masked_fill(b == float("-inf"), 0.0)

    def additive(self, dtype: torch.dtype, *, with_counts: bool = False) -> Tensor | None:
        """The whole mask as an additive ``dtype`` mask (0 or a bias where visible, -inf where hidden), or None.
        ``with_counts``: the counts will be wanted too (on a CPU both then come from one pass over the mask)."""
        key = ("additive", dtype)
        if key in self._memo:
            return self._memo[key]
        allowed = self.allowed()
        if allowed is None:
            out = None
        elif self.other is not None and self.other.dtype != torch.bool:
            out = float_bias(self.other, dtype)
            rest = self._rest_allowed()
            if rest is not None:
                out = out.masked_fill(~rest, float("-inf"))
        elif not with_counts or self.counts_known() or allowed.shape[-1] != self.k_len:
            out = _cpu.to_additive(allowed, dtype)
        else:                       # one pass for both on a CPU: the counts come with the conversion
            out, counts = _cpu.to_additive_counted(allowed, dtype)
            self._memo["counts"] = counts.unsqueeze(-1)
        if not (self.other is not None and self.other.requires_grad):   # (a learnt bias belongs to one graph)
            self._memo[key] = out
        return out

    def _rest_allowed(self) -> Tensor | None:
        """The mask without its additive float part (ranks, padding, causal), as bool, or None."""
        parts = []
        if self.rank is not None:
            parts.append(self.rank.to_dense(self.q_len, self.device))
        if self.key_padding is not None:
            parts.append(self.key_padding[:, None, None, :])
        if self.is_causal:
            parts.append(self._causal_tri())
        out = None
        for p in parts:
            out = p if out is None else out & p
        return out

    # ---- counts
    def counts_known(self) -> bool:
        """Whether :meth:`counts` is already worked out, or can be from the structure alone (no L x L read)."""
        if "counts" in self._memo:
            return True
        if self.other is not None:
            return False
        return self.rank is None or (not self.is_causal and self.rank.q_group is None
                                     and self.rank.causal_offset is None)

    def counts(self) -> Tensor:
        """Keys each query row sees: int64 ``[B|1, H|1, Q, 1]`` (0 for a row that sees none)."""
        if "counts" not in self._memo:
            self._memo["counts"] = self._counts()
        return self._memo["counts"]

    def _counts(self) -> Tensor:
        Q, K, dev = self.q_len, self.k_len, self.device
        if self.other is None:
            rank = self.rank
            if rank is not None and self.key_padding is not None:
                rank = rank.with_key_padding(self.key_padding.long())
            if rank is not None and not self.is_causal:
                rc = rank.row_counts(Q)
                if rc is not None:
                    return rc.to(dev)[:, None, :, None]
            elif rank is None:
                i = torch.arange(Q, device=dev) + self.causal_offset          # last visible key of row i
                if self.key_padding is None:
                    n = (i + 1).clamp(0, K) if self.is_causal else torch.full((Q,), K, device=dev)
                    return n.view(1, 1, Q, 1)
                real = self.key_padding.long()
                if not self.is_causal:
                    return real.sum(-1).view(-1, 1, 1, 1)
                seen = torch.cat([real.new_zeros(real.shape[0], 1), real.cumsum(-1)], -1)   # seen[r]: real in 0..r-1
                return seen[:, (i + 1).clamp(0, K)].view(-1, 1, Q, 1)
        allowed = self.allowed()
        return _cpu.row_counts(allowed.expand(*allowed.shape[:-1], K)).unsqueeze(-1)

    def ranks(self) -> RankMask | None:
        """The :class:`RankMask` the whole mask equals (its padding, causal and rank parts), or None for no mask at
        all; ``ValueError`` when the mask has a dense tensor or predicate part."""
        if self.other is not None:
            raise ValueError("this mask has a dense part (a tensor or a predicate), which has no rank form: pass a "
                             "RankMask, padding and is_causal to prepare_mask instead")
        rm = self.rank
        if self.key_padding is not None:
            pad = self.key_padding.long()
            rm = RankMask.padding(pad) if rm is None else rm.with_key_padding(pad)
        if self.is_causal:
            if rm is None:
                rm = RankMask._built(q_len=self.q_len, k_len=self.k_len, device=self.device)
            rm = rm.with_causal(self.causal_offset)
        return rm

    # ---- what SDPA gets
    def for_sdpa(self, dtype: torch.dtype, *, want_counts: bool) -> tuple[Tensor | None, bool, Tensor | None,
                                                                          Tensor | None]:
        """``(attn_mask, is_causal, counts, empty_rows)`` for ``F.scaled_dot_product_attention`` in ``dtype``:
        the additive mask (None for no mask or SDPA's own causal path), the counts when asked for, and -- on
        devices whose kernels do not zero a row that sees no key -- those rows (un-masked in ``attn_mask``; zero
        the output there)."""
        if self.is_empty:
            counts = torch.full((1, 1, self.q_len, 1), self.k_len, device=self.device) if want_counts else None
            return None, False, counts, None
        if self.sdpa_causal:
            return None, True, self.counts() if want_counts else None, None
        attn_mask = self.additive(dtype, with_counts=want_counts)
        guard = self.device.type not in _ZERO_EMPTY_ROWS
        counts = self.counts() if (want_counts or guard) else None
        empty = None
        if guard:
            empty = counts == 0
            attn_mask = torch.where(empty, torch.zeros((), dtype=attn_mask.dtype, device=attn_mask.device),
                                    attn_mask)
        return attn_mask, False, counts if want_counts else None, empty


def prepare_mask(mask: Tensor | MaskMod | RankMask | None = None, *, q_len: int, k_len: int | None = None,
                 batch: int = 1, heads: int = 1, attention_mask: Tensor | None = None, is_causal: bool = False,
                 causal_offset: int = 0, device: torch.device | str | None = None) -> PreparedMask:
    """Prepare a mask once for every attention call of a forward pass (see :class:`PreparedMask`).

    ``mask`` is a bool tensor broadcastable to ``[batch, heads, q_len, k_len]`` (True = may attend; a 3-D mask is
    ``[H, Q, K]`` as in SDPA), an additive float mask, a predicate ``mod(b, h, q_idx, kv_idx)`` (rendered here), a
    :class:`RankMask`, or None. ``attention_mask`` (``[batch, k_len]``, 1 = token, 0 = padding) hides padding keys;
    ``is_causal`` adds ``j <= i + causal_offset`` (0: top-left, SDPA's; ``k_len - q_len``: right-aligned, the new
    tokens of a kv-cache). ``k_len`` defaults to ``q_len``; ``device`` to the mask's.

    Example:
        >>> pm = prepare_mask(q_len=3, is_causal=True, attention_mask=torch.tensor([[1, 1, 0]]))
        >>> pm.counts()[0, 0, :, 0].tolist(), pm.allowed()[0, 0].int().tolist()
        ([1, 2, 2], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    """
    q_len = check_len("q_len", q_len)
    k_len = q_len if k_len is None else check_len("k_len", k_len)
    batch, heads = check_len("batch", batch), check_len("heads", heads)
    check_is_causal(is_causal)
    if isinstance(causal_offset, bool) or not isinstance(causal_offset, int):
        raise TypeError(f"causal_offset must be an int, got {type(causal_offset).__name__}")
    if device is None:
        device = mask.device if isinstance(mask, (Tensor, RankMask)) else \
            attention_mask.device if isinstance(attention_mask, Tensor) else torch.device("cpu")
    device = torch.device(device)
    other = rank = key_padding = None
    if isinstance(mask, PreparedMask):
        raise TypeError("mask is already a PreparedMask: pass it to attention as it is")
    if isinstance(mask, Tensor):
        other = _mask4(mask, batch, heads, q_len, k_len, device)
    elif isinstance(mask, RankMask):
        if mask.batch not in (1, batch):
            raise ValueError(f"the RankMask has batch size {mask.batch}, the inputs {batch}")
        if mask.q_len not in (None, q_len) or mask.k_len != k_len:
            raise ValueError(f"the RankMask is for (Q, K) = ({mask.q_len}, {mask.k_len}), the inputs have "
                             f"({q_len}, {k_len})")
        rank = mask
    elif mask is not None:
        if not callable(mask):
            raise TypeError(f"mask must be a tensor, a mask predicate, a RankMask or None, got "
                            f"{type(mask).__name__}")
        if is_block_mask(mask):
            raise TypeError("a FlexAttention BlockMask goes to attention() as it is, not through prepare_mask")
        other = render_mask(mask, batch, heads, q_len, k_len, device)
    if attention_mask is not None:
        am = check_binary("attention_mask", attention_mask)
        if am.shape[-1] != k_len or am.shape[0] not in (1, batch):
            raise ValueError(f"attention_mask must be [B, K] = [{batch}, {k_len}], got {tuple(attention_mask.shape)}")
        key_padding = am.to(device).bool()
    return PreparedMask(batch=batch, heads=heads, q_len=q_len, k_len=k_len, device=device, other=other, rank=rank,
                        key_padding=key_padding, is_causal=is_causal, causal_offset=causal_offset)


def as_prepared(mask: object, *, batch: int, heads: int, q_len: int, k_len: int, is_causal: bool,
                device: torch.device) -> PreparedMask:
    """``mask`` as a :class:`PreparedMask` for inputs of this geometry (checked when it already is one)."""
    if isinstance(mask, PreparedMask):
        if is_causal:
            raise ValueError("is_causal=True with a PreparedMask: the causal flag belongs in prepare_mask(...)")
        if (mask.q_len, mask.k_len) != (q_len, k_len) or mask.batch not in (1, batch) or \
                mask.heads not in (1, heads):
            have = [mask.batch, mask.heads, mask.q_len, mask.k_len]
            raise ValueError(f"the PreparedMask is for [B, H, Q, K] = {have}, the inputs have "
                             f"{[batch, heads, q_len, k_len]}")
        return mask
    return prepare_mask(mask, q_len=q_len, k_len=k_len, batch=batch, heads=heads, is_causal=is_causal,
                        device=device)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """``(B, H, Q, K, D)`` of ``q [B, H, Q, D]``, ``k [B, H, K, D]``, ``v [B, H, K, Dv]`` (raises otherwise)."""
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


def check_dropout(dropout_p: float) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def is_block_mask(mask: object) -> bool:
    """Whether ``mask`` is a FlexAttention ``BlockMask``."""
    if mask is None or isinstance(mask, (Tensor, RankMask, PreparedMask)):
        return False
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)
