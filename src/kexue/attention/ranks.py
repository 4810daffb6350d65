"""The masks of article 3 as O(L) rank vectors: :class:`RankMask`, for kernels that read ranks instead of an
L x L mask (kexue.fm/archives/6933).

Every mask of the article has the form "query i sees key j iff rank(j) <= rank(i)" (plus a document id for packed
sequences and a causal offset): the LM mask, the MLM mask with padding, UniLM (rank = cumsum of the segment ids),
the prefix-LM and the permutation LM. A :class:`RankMask` stores those vectors; it is also a mask predicate, so
:func:`~kexue.attention.render_mask`, :func:`~kexue.attention.to_block_mask`, :func:`~kexue.attention.attention`
and :func:`~kexue.attention.prepare_mask` take it as it is. The optional fused GPU kernel
(:mod:`kexue.attention.kernels`) reads it directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue._checks import check_tensor

from .masks import check_binary, check_len, check_order, rank_of, render_mask

__all__ = ["RankMask"]

HIDDEN = 1 << 30          # ranks and groups live in [0, 2**30], so a kernel reads them as int32


def _check_ids(name: str, value: Tensor | None, upper: int) -> Tensor | None:
    """None, or an integer tensor ``[L]`` / ``[B, L]`` with values in ``[0, upper]``, as an int32 copy
    ``[B|1, L]`` (a copy: a change to the caller's tensor must not reach the mask)."""
    if value is None:
        return None
    t = check_tensor(name, value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [L] or [B, L], got shape {tuple(t.shape)}")
    if t.numel() and not torch.compiler.is_compiling() and not bool(((t >= 0) & (t <= upper)).all()):
        raise ValueError(f"{name} must hold integers in [0, {upper}], got range [{int(t.min())}, {int(t.max())}]")
    t = t.to(torch.int32, copy=True)
    return t if t.dim() == 2 else t.unsqueeze(0)


class RankMask:
    """A mask stored as O(L) numbers instead of an L x L tensor: query ``i`` sees key ``j`` iff

    * ``k_rank[j] <= q_rank[i]`` (a missing ``q_rank`` means every query ranks above every visible key, a missing
      ``k_rank`` means every key has rank 0; a key of rank :attr:`HIDDEN` is seen by no query),
    * ``k_group[j] == q_group[i]`` when groups are given (packed sequences: one group per document), and
    * ``j <= i + causal_offset`` when ``causal_offset`` is not None (0: the top-left causal mask of SDPA's
      ``is_causal``; ``K - Q``: the right-aligned mask of a kv-cache).

    Tensors are ``[L]`` (shared by the batch) or ``[B, L]``, integers in ``[0, 2**30]``. ``q_len`` / ``k_len`` are
    taken from the tensors; give them for a mask with no tensor on that side (e.g. :meth:`causal`).
    ``q_len=None`` on such a side means "any number of queries" (a padding mask).

    Example:
        >>> from kexue.attention import unilm_mask
        >>> m = RankMask.unilm(torch.tensor([[0, 0, 1, 1]]))
        >>> render_mask(m, 1, 1, 4, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
        >>> torch.equal(m.to_dense(), unilm_mask(torch.tensor([[0, 0, 1, 1]])))
        True
    """

    HIDDEN = HIDDEN

    def __init__(self, q_rank: Tensor | None = None, k_rank: Tensor | None = None, *,
                 q_group: Tensor | None = None, k_group: Tensor | None = None, causal_offset: int | None = None,
                 q_len: int | None = None, k_len: int | None = None) -> None:
        q_rank = _check_ids("q_rank", q_rank, HIDDEN - 1)
        k_rank = _check_ids("k_rank", k_rank, HIDDEN)
        q_group = _check_ids("q_group", q_group, HIDDEN)
        k_group = _check_ids("k_group", k_group, HIDDEN)
        if (q_group is None) != (k_group is None):
            raise ValueError("q_group and k_group must be given together")
        if causal_offset is not None and (isinstance(causal_offset, bool) or not isinstance(causal_offset, int)):
            raise TypeError(f"causal_offset must be an int or None, got {type(causal_offset).__name__}")
        self._set(q_rank, k_rank, q_group, k_group, causal_offset, q_len, k_len)

    def _set(self, q_rank: Tensor | None, k_rank: Tensor | None, q_group: Tensor | None, k_group: Tensor | None,
             causal_offset: int | None, q_len: int | None, k_len: int | None) -> None:
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
               k_len: int | None = None, device: torch.device | str | None = None) -> RankMask:
        """A mask from tensors valid by construction (the constructors'): no value check, hence no device sync."""
        def as2d(t: Tensor | None) -> Tensor | None:
            return None if t is None else (t if t.dim() == 2 else t.unsqueeze(0)).to(torch.int32)

        m = cls.__new__(cls)
        m._set(as2d(q_rank), as2d(k_rank), as2d(q_group), as2d(k_group), causal_offset, q_len, k_len)
        if device is not None:
            m.device = torch.device(device)
        return m

    @staticmethod
    def _length(side: str, given: int | None, tensors: tuple[Tensor | None, ...]) -> int | None:
        lens = {t.shape[-1] for t in tensors if t is not None}
        if given is not None:
            lens.add(check_len(f"{side}_len", given))
        if len(lens) > 1:
            raise ValueError(f"{side}_rank, {side}_group and {side}_len disagree on the length: {sorted(lens)}")
        return lens.pop() if lens else None

    # ---- as a predicate
    @staticmethod
    def _at(t: Tensor, b: Tensor, idx: Tensor) -> Tensor:
        return t[b if t.shape[0] > 1 else torch.zeros_like(b), idx]

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self.k_rank is None and self.q_rank is None:
            ok = torch.ones((), dtype=torch.bool, device=kv_idx.device)
        else:
            kr = self._at(self.k_rank, b, kv_idx) if self.k_rank is not None else torch.zeros_like(kv_idx)
            if self.q_rank is not None:
                ok = kr <= self._at(self.q_rank, b, q_idx)
            else:
                ok = (kr < HIDDEN) | (q_idx < 0)         # (q_idx only to broadcast over the rows)
        if self.q_group is not None:
            ok = ok & (self._at(self.k_group, b, kv_idx) == self._at(self.q_group, b, q_idx))
        if self.causal_offset is not None:
            ok = ok & (kv_idx <= q_idx + self.causal_offset)
        return ok

    def query_length(self, q_len: int | None = None) -> int:
        """The number of query rows: the mask's own, or ``q_len`` for a mask that takes any number."""
        if self.q_len is not None:
            if q_len is not None and q_len != self.q_len:
                raise ValueError(f"the mask has {self.q_len} query rows, the input {q_len}")
            return self.q_len
        if q_len is None:
            raise ValueError("q_len must be given: this mask takes any number of query rows")
        return check_len("q_len", q_len)

    def to_dense(self, q_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """The same mask as a bool tensor ``[B|1, 1, Q, K]`` (``[B|1, 1, 1, K]`` when it is the same for every
        query and no ``q_len`` is given)."""
        if self.q_len is None and q_len is None:
            if self.causal_offset is not None or self.q_group is not None:
                raise ValueError("q_len must be given: this mask differs between query rows")
            q = 1
        else:
            q = self.query_length(q_len)
        dev = torch.device(device) if device is not None else self.device
        return render_mask(self, self.batch, 1, q, self.k_len, dev).contiguous()

    def row_counts(self, q_len: int | None = None) -> Tensor | None:
        """Keys each query row sees, int64 ``[B|1, Q]``, worked out from the ranks in O(L log L) -- or None when the
        mask has groups or a causal offset (count its :meth:`to_dense` form then)."""
        if self.q_group is not None or self.causal_offset is not None:
            return None
        q = self.query_length(q_len)
        kr = self.k_rank if self.k_rank is not None else torch.zeros(1, self.k_len, dtype=torch.int32,
                                                                      device=self.device)
        sorted_k = kr.long().sort(dim=-1).values
        if self.q_rank is None:         # every query sees every key that is not hidden
            vis = (sorted_k < HIDDEN).sum(-1, keepdim=True)
            return vis.expand(kr.shape[0], q).contiguous()
        qr = self.q_rank.long()
        if sorted_k.shape[0] != qr.shape[0]:
            b = max(sorted_k.shape[0], qr.shape[0])
            sorted_k, qr = sorted_k.expand(b, -1).contiguous(), qr.expand(b, -1).contiguous()
        return torch.searchsorted(sorted_k, qr, right=True)

    # ---- constructors for the masks of article 3
    @classmethod
    def causal(cls, q_len: int, k_len: int | None = None, *, device: torch.device | str | None = None) -> RankMask:
        """The LM mask (:func:`~kexue.attention.causal_mask`): right-aligned when ``k_len > q_len`` (a kv-cache)."""
        q_len = check_len("q_len", q_len)
        k_len = q_len if k_len is None else check_len("k_len", k_len)
        if k_len < q_len:
            raise ValueError(f"k_len must be >= q_len for a right-aligned causal mask, got q_len={q_len}, "
                             f"k_len={k_len}")
        return cls._built(causal_offset=k_len - q_len, q_len=q_len, k_len=k_len, device=device)

    @classmethod
    def padding(cls, attention_mask: Tensor) -> RankMask:
        """Hide the padding keys (``attention_mask`` 0/1 ``[B, L]``); any number of queries."""
        am = check_binary("attention_mask", attention_mask)
        return cls._built(k_rank=(1 - am) * HIDDEN)

    @classmethod
    def unilm(cls, segment_ids: Tensor, attention_mask: Tensor | None = None) -> RankMask:
        """UniLM seq2seq (:func:`~kexue.attention.unilm_mask`): ``rank = cumsum(segment_ids)``; padding keys hidden."""
        s = check_binary("segment_ids", segment_ids)
        c = s.cumsum(-1)
        kr = c
        if attention_mask is not None:
            am = check_binary("attention_mask", attention_mask)
            if am.shape != s.shape:
                raise ValueError(f"attention_mask must have the shape of segment_ids {tuple(segment_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            kr = torch.where(am.bool(), c, HIDDEN)
        return cls._built(c, kr)

    @classmethod
    def prefix_lm(cls, prefix_len: int | Tensor, seq_len: int, *,
                  device: torch.device | str | None = None) -> RankMask:
        """Prefix-LM (:func:`~kexue.attention.prefix_lm_mask`): ``rank = max(position, prefix_len - 1)``."""
        L = check_len("seq_len", seq_len)
        if isinstance(prefix_len, Tensor):
            if prefix_len.is_floating_point() or prefix_len.dtype == torch.bool or prefix_len.dim() != 1:
                raise TypeError(f"prefix_len must be an int or a 1-D integer tensor [B], got dtype "
                                f"{prefix_len.dtype} and shape {tuple(prefix_len.shape)}")
            if prefix_len.numel() and bool(((prefix_len < 0) | (prefix_len > L)).any()):
                raise ValueError(f"prefix_len must lie in [0, seq_len={L}], got {prefix_len.tolist()}")
            dev = device if device is not None else prefix_len.device
            p = prefix_len.to(dev).long()[:, None]
        else:
            p_int = check_len("prefix_len", prefix_len)
            if p_int > L:
                raise ValueError(f"prefix_len must be <= seq_len={L}, got {p_int}")
            dev = device
            p = torch.tensor([[p_int]], device=dev)
        r = torch.maximum(torch.arange(L, device=dev)[None], p - 1)
        return cls._built(r, r)

    @classmethod
    def permutation(cls, order: Tensor) -> RankMask:
        """Permutation LM (:func:`~kexue.attention.permutation_mask`): ``rank`` = the step a position is generated."""
        r = rank_of(check_order("order", order))
        return cls._built(r, r)

    @classmethod
    def documents(cls, document_ids: Tensor, *, causal: bool = False) -> RankMask:
        """Packed sequences (:func:`~kexue.attention.document_mask`): a token sees the tokens of its own document
        (``document_ids`` ``[L]`` or ``[B, L]``), bidirectionally or, with ``causal=True``, up to itself."""
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        return cls(q_group=document_ids, k_group=document_ids, causal_offset=0 if causal else None)

    def with_key_padding(self, attention_mask: Tensor) -> RankMask:
        """This mask with the padding keys of ``attention_mask`` (0/1 ``[B, K]``) hidden as well."""
        am = check_binary("attention_mask", attention_mask)
        if am.shape[-1] != self.k_len:
            raise ValueError(f"attention_mask must have {self.k_len} keys, got shape {tuple(attention_mask.shape)}")
        am = am.to(self.device)
        kr = self.k_rank if self.k_rank is not None else torch.zeros(1, self.k_len, dtype=torch.int32,
                                                                      device=self.device)
        return RankMask._built(self.q_rank, torch.where(am.bool(), kr, HIDDEN), q_group=self.q_group,
                               k_group=self.k_group, causal_offset=self.causal_offset, q_len=self.q_len,
                               k_len=self.k_len, device=self.device)

    def with_causal(self, offset: int = 0) -> RankMask:
        """This mask ANDed with ``j <= i + offset`` (kept as the tighter offset when it already has one)."""
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, got {type(offset).__name__}")
        off = offset if self.causal_offset is None else min(offset, self.causal_offset)
        return RankMask._built(self.q_rank, self.k_rank, q_group=self.q_group, k_group=self.k_group,
                               causal_offset=off, q_len=self.q_len, k_len=self.k_len, device=self.device)

    def __repr__(self) -> str:
        parts = [f"batch={self.batch}", f"q_len={self.q_len}", f"k_len={self.k_len}"]
        if self.q_rank is not None or self.k_rank is not None:
            parts.append("ranks")
        if self.q_group is not None:
            parts.append("groups")
        if self.causal_offset is not None:
            parts.append(f"causal_offset={self.causal_offset}")
        return f"RankMask({', '.join(parts)})"
