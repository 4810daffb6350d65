"""Linear attention (article 5, kexue.fm/archives/8338: "Transformer upgrade path 3: from Performer to linear
attention"): feature maps, the exact chunked causal and recurrent forms, and a layer for :class:`kexue.nn.Transformer`.

Linear attention replaces ``exp(q . k)`` by ``phi(q) . phi(k)`` with non-negative features ``phi``::

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)

so ``sum_j phi(k_j) v_j^T`` (an ``m x d`` state) is shared by every query: O(L m d) instead of O(L^2 d).

Feature maps (each a small module; the article's citation in its docstring):

* :class:`ExpFeatureMap` (``"exp"``) — Su's conclusion: ``phi(x) = e^x`` after q/k are projected to ``m`` dims;
* :class:`Elu1FeatureMap` (``"elu1"``) — ``1 + elu(x)`` (Katharopoulos et al. 2020); :class:`ReluFeatureMap`
  (``"relu"``);
* :class:`FavorPlus` (``"favor"``) — Performer's positive random features ``e^{w.x - |x|^2/2} / sqrt(m)`` with
  orthogonal blocks, an explicit redraw policy and every draw from a ``generator=``;
* :class:`FavorPlusHyperbolic` (``"favor_hyp"``) — Performer's two-sided hyperbolic estimator (SM-hyp+, cosh).

Functions: :func:`linear_attention` (non-causal in O(L m d); causal in chunks: a masked matmul inside a chunk and a
running state between chunks, fp32 state for fp16/bf16 inputs, any L; key padding excluded; a state in and out),
:func:`linear_attention_step` (one token of recurrent decoding in O(m d)), :func:`linear_attention_reference`
(the plain O(L^2) form, optionally cut to a local window) and :func:`linear_attention_weights` (its matrix).
:class:`LinearAttention` implements the block attention protocol of :mod:`kexue.nn.transformer`.

**Stabilisation without looking ahead.** The exponential maps (exp, FAVOR+, hyperbolic) give features
``e^{a}`` that overflow fp32 once ``a > 88``. The **query** side is shifted by its own row maximum
``a_i -> a_i - max_r a_ir``: exact, because the normalised output is unchanged when ``phi(q_i)`` is multiplied by
any positive number -- the scale invariance the article proves. The **key** side cannot be shifted per key (that
reweights the keys), and a shift by the maximum over the whole sequence -- what performer-pytorch does -- lets
future keys change past outputs in causal mode (its issue #82). Here the keys are shifted by the **running
maximum** ``C_i = max_{j <= i} max_r log phi_r(k_j)``, which depends only on the current and earlier positions:
query ``i`` sums ``phi(k_j) e^{-C_i}`` over its keys, and the state carried between positions is rescaled by
``e^{C_before - C_after}`` (<= 1) when the maximum grows -- the online-softmax trick. Every key a query sums over is
weighted by the same ``e^{-C_i}``, which cancels between numerator and denominator: the result is exact (not an
approximation), it cannot overflow, and the outputs before ``t`` are bit-identical whatever the keys and values at
``t`` and later are (the tests check this). The chunked form keeps the per-chunk sums at the running maximum of an
earlier chunk end (so one cumulative sum gives every chunk's state) and starts a new reference when the maximum has
grown by more than 40 (fp32; 300 in fp64), so no factor exceeds ``e^40``; where it starts one is decided by the
chunks already summed, never by later ones. A fixed shift was rejected: ``e^x`` on learned ``q/k`` has no a-priori
bound, and FAVOR+'s bound ``|w|^2/2`` (~30-50 for ``d = 64``) is so loose that typical keys would underflow.
Non-causal attention sees every key anyway and shifts by the maximum over the visible (non-padding) keys.

Example:
    >>> import torch
    >>> from kexue.attention import linear_attention, linear_attention_reference
    >>> q, k, v = torch.randn(3, 1, 2, 100, 16, dtype=torch.float64)
    >>> out = linear_attention(q, k, v, feature_map="elu1", causal=True)
    >>> bool(torch.allclose(out, linear_attention_reference(q, k, v, feature_map="elu1", causal=True)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kexue._checks import check_tensor, compute_dtype

from .masks import check_binary
from .prepared import PreparedMask

__all__ = [
    "FEATURE_MAPS", "FeatureMap", "ExpFeatureMap", "Elu1FeatureMap", "ReluFeatureMap", "FavorPlus",
    "FavorPlusHyperbolic", "make_feature_map", "random_features", "LinearAttentionState", "linear_attention",
    "linear_attention_step", "linear_attention_reference", "linear_attention_weights", "LinearAttention",
    "LinearAttentionCache",
]

# A shift below every finite log-feature: the running maximum before the first real key (an empty state). Every
# exponent formed from it is a difference "earlier - later" <= 0, so it only ever produces 0 or 1, never inf.
_FLOOR = -1e30
# Chunks per pass of the causal form: their states are materialised together (one batched matmul, one cumulative
# sum); longer sequences take several passes with the state carried over.
_BLOCK_CHUNKS = 64
# Positions per pass when the chunk allows it: small enough that a pass's feature tensors (``B H rows m``) come
# from memory the allocator reuses and stay near the cache, large enough that the per-pass overhead is small.
_BLOCK_ROWS = 512
# The causal form pads [v, 1] with zero columns to a multiple of this: matrix products with an odd width (d + 1)
# run up to ~15 % slower on a CPU.
_ALIGN = 8


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ------------------------------------------------------------------------------------------------------
# Random features
# ------------------------------------------------------------------------------------------------------
def random_features(num_features: int, head_dim: int, *, orthogonal: bool = True,
                    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """``num_features`` random directions ``w_r`` in ``R^head_dim`` (``[m, d]``) for FAVOR+ (Choromanski et al.
    2021, "Rethinking attention with Performers", section 2.4; kexue.fm/archives/8338).

    ``orthogonal=False``: i.i.d. ``N(0, I_d)`` rows. ``orthogonal=True``: rows in blocks of ``d`` that are exactly
    orthogonal within a block (the Q of a QR of a Gaussian matrix, with the signs of R's diagonal put back so the
    block is Haar-distributed), each row then given the length of an independent ``N(0, I_d)`` vector
    (chi-distributed with ``d`` degrees of freedom), so every row is still marginally ``N(0, I_d)`` and the
    estimator stays unbiased, with lower variance. Every draw comes from ``generator``.

    Example:
        >>> w = random_features(8, 4, generator=torch.Generator().manual_seed(0))
        >>> w.shape, bool((w[:4] @ w[:4].T - torch.diag((w[:4] ** 2).sum(1))).abs().max() < 1e-5)
        (torch.Size([8, 4]), True)
    """
    m, d = _check_int("num_features", num_features), _check_int("head_dim", head_dim)
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal must be a bool, got {type(orthogonal).__name__}")
    if not orthogonal:
        return torch.randn(m, d, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    g = torch.randn(-(-m // d), d, d, generator=generator, dtype=torch.float64)
    qm, r = torch.linalg.qr(g)                                   # every block at once
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    w = (qm * sign[:, None, :]).transpose(1, 2).reshape(-1, d)[:m]   # rows orthonormal, Haar-distributed blocks
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)   # chi_d lengths
    return (w * norms[:, None]).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# Feature maps
# ------------------------------------------------------------------------------------------------------
class FeatureMap(nn.Module):
    """A non-negative feature map ``phi`` for linear attention, applied to the last dim of q and k.

    Subclasses either compute ``phi`` directly (:meth:`features`) or -- exponential maps, ``exponential = True``
    -- give its logarithm in two parts (:meth:`log_parts`), so :func:`linear_attention` can exponentiate with the
    causal-safe shifts of the module docstring. ``num_features(head_dim)`` is the feature dimension ``m``.
    ``forward(x, is_query=False)`` returns ``phi(x)`` (unshifted: it may overflow where the attention kernels do not).
    """

    exponential: bool = False
    # log_parts returns tensors of its own (not q/k, views of them or anything the map keeps), which the attention
    # may then overwrite in place
    _fresh_logs: bool = False

    def num_features(self, head_dim: int) -> int:
        return head_dim

    def log_parts(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        """``(a, row)`` with ``log phi(x) = a + row[..., None]``; ``row`` (a per-vector term, or None) may be left
        out for queries (the attention ignores any positive per-query factor). Exponential maps only."""
        raise NotImplementedError(f"{type(self).__name__} is not an exponential feature map")

    def log_features(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        """``log phi(x)`` with every term (exponential maps only)."""
        a, row = self.log_parts(x, is_query=is_query)
        if row is None:
            return a
        return a + row[..., None]

    def features(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        """``phi(x)``, non-negative, ``[..., num_features]``."""
        if self.exponential:
            return torch.exp(self.log_features(x, is_query=is_query))
        raise NotImplementedError(f"{type(self).__name__} must define features() (or set exponential = True and "
                                  "define log_parts())")

    def forward(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        return self.features(x, is_query=is_query)


class Elu1FeatureMap(FeatureMap):
    """``phi(x) = 1 + elu(x)``: ``1 + x`` for ``x >= 0`` and ``e^x`` below (Katharopoulos et al. 2020, "Transformers
    are RNNs", arXiv 2006.16236). The article (kexue.fm/archives/8338) notes ``1 + x`` is the first-order Taylor
    expansion of ``e^x``, so this map is already close to the exponential. ``m = d``.

    Example:
        >>> Elu1FeatureMap()(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)).tolist() == [math.exp(-1), 1, 3]
        True
    """

    def features(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        return F.elu(x).add_(1.0)                     # (elu's backward reads its input, not its output)


class ReluFeatureMap(FeatureMap):
    """``phi(x) = relu(x)`` (the "generalized attention" kernel of Performer, Choromanski et al. 2021). A query or
    key whose features are all zero has no weight; a row with no weight at all outputs 0. ``m = d``.

    Example:
        >>> ReluFeatureMap()(torch.tensor([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """

    def features(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        return F.relu(x)


class ExpFeatureMap(FeatureMap):
    """Su's exponential map ``phi(x) = e^x`` (kexue.fm/archives/8338): reading Performer backwards, the random
    matrix ``w`` can be merged into the q/k projections and the ``e^{-|q|^2/2}`` factor dropped exactly (scale
    invariance) -- what remains is ``e^x`` on q/k projected to ``m`` dimensions, a learnable version with at least
    Performer's capacity.

    ``num_features=None``: ``e^x`` on the given dims (``m`` = the width of q/k). This is the article's form when
    the model's own q/k layers already output ``m`` dims per head: ``Transformer(attention="linear",
    feature_map="exp", num_features=m)`` builds its blocks that way (``qk_dim=m``).

    ``num_features=m`` (needs ``head_dim``), for q/k that come in ``d`` wide: learnable projections ``W_q, W_k``
    (``m x d``, no bias) applied after them, both initialised to Performer's ``w * d^{-1/4}`` (orthogonal random
    features drawn from ``generator``), so at initialisation ``phi(q) . phi(k)`` is FAVOR+ without the key norm
    factor. Stacked on a ``d``-wide q/k layer this is the merged projection restricted to rank ``d``.

    Example:
        >>> fm = ExpFeatureMap(head_dim=4, num_features=8, generator=torch.Generator().manual_seed(0))
        >>> fm(torch.zeros(2, 4), is_query=True).tolist() == [[1.0] * 8] * 2
        True
    """

    exponential = True

    def __init__(self, head_dim: int | None = None, num_features: int | None = None, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.m = None if num_features is None else _check_int("num_features", num_features)
        if self.m is not None:
            if head_dim is None:
                raise ValueError("ExpFeatureMap with num_features needs head_dim (the q/k size it projects from)")
            d = _check_int("head_dim", head_dim)
            w = random_features(self.m, d, generator=generator) * d ** -0.25
            self.proj_q = nn.Parameter(w.clone())
            self.proj_k = nn.Parameter(w.clone())
        elif head_dim is not None:
            _check_int("head_dim", head_dim)
        self.head_dim = head_dim

    @property
    def _fresh_logs(self) -> bool:                  # projected: log_parts returns a new tensor (else q/k itself)
        return self.m is not None

    def num_features(self, head_dim: int) -> int:
        if self.m is not None and head_dim != self.head_dim:
            raise ValueError(f"this ExpFeatureMap projects head_dim={self.head_dim}, got q/k with head dim {head_dim}")
        return head_dim if self.m is None else self.m

    def log_parts(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, None]:
        if self.m is None:
            return x, None
        w = self.proj_q if is_query else self.proj_k
        return F.linear(x, w.to(x.dtype)), None

    def extra_repr(self) -> str:
        return "" if self.m is None else f"head_dim={self.head_dim}, num_features={self.m}"


class FavorPlus(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al. 2021, "Rethinking attention with Performers"; the
    starting point of kexue.fm/archives/8338)::

        phi(x) = e^{w_r . x - |x|^2 / 2} / sqrt(m),  r = 1..m,   E_w[phi(q) . phi(k)] = e^{q . k}

    with ``w_r`` from :func:`random_features` (``orthogonal=True``: orthogonal blocks with chi-distributed lengths,
    lower variance than i.i.d.). ``scale`` multiplies q and k first: ``"standard"`` is ``d^{-1/4}``, so
    ``phi(q) . phi(k)`` estimates softmax attention's ``e^{q . k / sqrt(d)}``; pass ``1.0`` to estimate
    ``e^{q . k}`` itself.

    Draws: the features are a buffer ``omega`` drawn at construction from ``generator`` (kept for redraws);
    :meth:`redraw_` draws anew. The redraw policy is explicit: ``redraw=None`` (default) never redraws by
    itself; ``redraw=n`` redraws every ``n`` calls of :meth:`step` -- :class:`LinearAttention` calls it once per
    forward pass in training mode only, so evaluation (``model.eval()``) is deterministic.

    Example:
        >>> fm = FavorPlus(4, num_features=4096, scale=1.0, generator=torch.Generator().manual_seed(0))
        >>> q, k = torch.full((4,), 0.3), torch.full((4,), -0.2)
        >>> est, exact = float(fm(q, is_query=True) @ fm(k)), math.exp(float(q @ k))
        >>> abs(est - exact) / exact < 0.05
        True
    """

    exponential = True
    two_sided = False
    _fresh_logs = True

    def __init__(self, head_dim: int, *, num_features: int | None = None, orthogonal: bool = True,
                 redraw: int | None = None, scale: str | float = "standard",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        d = _check_int("head_dim", head_dim)
        m = 4 * d if num_features is None else _check_int("num_features", num_features)
        if redraw is not None:
            _check_int("redraw", redraw)
        if scale == "standard":
            s = d ** -0.25
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or math.isinf(scale):
            raise ValueError(f"scale must be 'standard' or a positive finite number, got {scale!r}")
        else:
            s = float(scale)
        if not isinstance(orthogonal, bool):
            raise TypeError(f"orthogonal must be a bool, got {type(orthogonal).__name__}")
        self.head_dim, self.m, self.orthogonal, self.redraw, self.scale = d, m, orthogonal, redraw, s
        self.generator = generator
        self.register_buffer("omega", random_features(m, d, orthogonal=orthogonal, generator=generator))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def num_features(self, head_dim: int) -> int:
        if head_dim != self.head_dim:
            raise ValueError(f"this {type(self).__name__} was drawn for head_dim={self.head_dim}, got q/k with head "
                             f"dim {head_dim}")
        return 2 * self.m if self.two_sided else self.m

    @torch.no_grad()
    def redraw_(self, *, generator: torch.Generator | None = None) -> None:
        """Draw new features (from ``generator``, else the one given at construction, else torch's global RNG)."""
        g = generator if generator is not None else self.generator
        self.omega.copy_(random_features(self.m, self.head_dim, orthogonal=self.orthogonal, generator=g))

    def step(self) -> bool:
        """Count one training forward pass; redraw every ``redraw`` of them. Returns whether it redrew."""
        if self.redraw is None:
            return False
        self.calls += 1
        if int(self.calls) % self.redraw == 0:
            self.redraw_()
            return True
        return False

    def _exponent(self, x: Tensor) -> Tensor:
        """``w_r . (s x)`` (and its negation for the two-sided map): ``[..., num_features]``."""
        a = F.linear(x, self.omega.to(x.dtype) * self.scale)
        return torch.cat([a, -a], dim=-1) if self.two_sided else a

    def _row(self, x: Tensor, m: int) -> Tensor:
        """``-|s x|^2 / 2 - log(m) / 2``: the per-vector part of ``log phi``."""
        return (x * x).sum(-1) * (-0.5 * self.scale ** 2) - 0.5 * math.log(m)

    def log_parts(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        a = self._exponent(x)
        if is_query:
            return a, None                            # -|q|^2/2 and 1/sqrt(m): per-query factors, dropped exactly
        return a, self._row(x, a.shape[-1])

    def log_features(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        a = self._exponent(x)
        return a + self._row(x, a.shape[-1])[..., None]

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_features={self.m}, orthogonal={self.orthogonal}, "
                f"redraw={self.redraw}, scale={self.scale:.4g}")


class FavorPlusHyperbolic(FavorPlus):
    """Performer's two-sided hyperbolic positive random features (SM-hyp+, Choromanski et al. 2021, Lemma 1), which
    no PyTorch peer ships (performer-pytorch issue #73)::

        phi(x) = e^{-|x|^2/2} / sqrt(2m) [e^{w_r . x}, e^{-w_r . x}]_{r=1..m},  E[phi(q) . phi(k)] = e^{q . k}

    (``e^{q.k} = E[e^{-|q|^2/2 - |k|^2/2} cosh(w . (q + k))]``); ``2m`` features from ``m`` draws, with lower
    variance than :class:`FavorPlus` for the same draws. Same options as :class:`FavorPlus`.

    Example:
        >>> fm = FavorPlusHyperbolic(4, num_features=8, generator=torch.Generator().manual_seed(0))
        >>> fm(torch.randn(3, 4)).shape
        torch.Size([3, 16])
    """

    two_sided = True


FEATURE_MAPS = ("exp", "elu1", "relu", "favor", "favor_hyp")


def make_feature_map(name: str, *, head_dim: int | None = None, num_features: int | None = None,
                     orthogonal: bool = True, redraw: int | None = None,
                     generator: torch.Generator | None = None) -> FeatureMap:
    """A feature map by name: ``"exp"`` (:class:`ExpFeatureMap`; with ``num_features`` it projects to ``m``
    dims), ``"elu1"``, ``"relu"``, ``"favor"`` (:class:`FavorPlus`) or ``"favor_hyp"``
    (:class:`FavorPlusHyperbolic`); the random ones need ``head_dim`` and draw from ``generator``.

    Example:
        >>> make_feature_map("favor", head_dim=16, num_features=64).num_features(16)
        64
    """
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))} or a FeatureMap, "
                         f"got {name!r}")
    if name in ("elu1", "relu") and num_features is not None and num_features != head_dim:
        raise ValueError(f"feature_map={name!r} has m = head_dim features; num_features={num_features} is for "
                         "'exp', 'favor' and 'favor_hyp'")
    if name == "elu1":
        return Elu1FeatureMap()
    if name == "relu":
        return ReluFeatureMap()
    if name == "exp":
        return ExpFeatureMap(head_dim, num_features, generator=generator)
    if head_dim is None:
        raise ValueError(f"feature_map={name!r} needs head_dim (the random features are drawn for it)")
    cls = FavorPlus if name == "favor" else FavorPlusHyperbolic
    return cls(head_dim, num_features=num_features, orthogonal=orthogonal, redraw=redraw, generator=generator)


class _Callable(FeatureMap):
    """A plain callable ``x -> phi(x) >= 0`` used for queries and keys alike."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def features(self, x: Tensor, *, is_query: bool = False) -> Tensor:
        return self.fn(x)


_DEFAULTS = {"exp": ExpFeatureMap, "elu1": Elu1FeatureMap, "relu": ReluFeatureMap}


def _as_feature_map(feature_map: object) -> FeatureMap:
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map in _DEFAULTS:
            return _DEFAULTS[feature_map]()
        if feature_map in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r} draws random features: pass a module, e.g. "
                             f"make_feature_map({feature_map!r}, head_dim=..., generator=...)")
        raise ValueError(f"feature_map must be one of 'exp', 'elu1', 'relu', a FeatureMap or a callable, got "
                         f"{feature_map!r}")
    if callable(feature_map):
        return _Callable(feature_map)
    raise TypeError(f"feature_map must be a name, a FeatureMap or a callable, got {type(feature_map).__name__}")


# ------------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------------
@dataclass
class LinearAttentionState:
    """What linear attention carries from earlier keys to later queries (the recurrent state).

    ``sums`` ``[B, H, m, Dv + 1]``: ``sum_j phi(k_j) [v_j, 1]^T * e^{-shift}`` -- ``sums[..., :Dv]`` the key-value
    sum, ``sums[..., Dv]`` the key sum (the normaliser) -- in fp32 for fp16/bf16 inputs (fp64 for fp64).
    ``shift`` ``[B, H]``: the log-scale of the sums for exponential feature maps (the running maximum of the key
    log-features; see the module docstring), None for the others. Made by :func:`linear_attention` with
    ``return_state=True`` or :func:`linear_attention_step`; treat it as read-only (the functions return new ones).

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 4)
        >>> _, st = linear_attention(q, k, v, feature_map="elu1", causal=True, return_state=True)
        >>> st.kv.shape, st.k_sum.shape
        (torch.Size([1, 2, 4, 4]), torch.Size([1, 2, 4]))
    """

    sums: Tensor
    shift: Tensor | None = None

    @property
    def kv(self) -> Tensor:
        return self.sums[..., :-1]

    @property
    def k_sum(self) -> Tensor:
        return self.sums[..., -1]

    def index_select(self, index: Tensor) -> LinearAttentionState:
        """The state of batch rows ``index`` (beam search)."""
        return LinearAttentionState(self.sums.index_select(0, index),
                                    None if self.shift is None else self.shift.index_select(0, index))


def _check_state(state: object, B: int, H: int, m: int, dv: int, exponential: bool) -> LinearAttentionState:
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"initial_state must be a LinearAttentionState (from return_state=True), got "
                        f"{type(state).__name__}")
    want = (B, H, m, dv + 1)
    if tuple(state.sums.shape) != want:
        raise ValueError(f"initial_state.sums must have shape [B, H, m, Dv + 1] = {list(want)}, got "
                         f"{list(state.sums.shape)}")
    if exponential and state.shift is None:
        raise ValueError("initial_state has no shift, but the feature map is exponential: pass the state returned "
                         "with the same feature map")
    if not exponential and state.shift is not None:
        raise ValueError("initial_state has a shift (it comes from an exponential feature map), but this feature "
                         "map is not exponential")
    if state.shift is not None and tuple(state.shift.shape) != (B, H):
        raise ValueError(f"initial_state.shift must have shape [B, H] = [{B}, {H}], got {list(state.shift.shape)}")
    return state


# ------------------------------------------------------------------------------------------------------
# Input checks and features
# ------------------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, floating=True, dim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, H, K, D] = [{B}, {H}, K, {D}] like q, got {list(k.shape)}")
    Lk = k.shape[2]
    if v.shape[0] != B or v.shape[1] != H or v.shape[2] != Lk:
        raise ValueError(f"v must have shape [B, H, K, Dv] = [{B}, {H}, {Lk}, Dv], got {list(v.shape)}")
    if D == 0 or v.shape[3] == 0:
        raise ValueError("q, k and v must have a non-empty last dimension")
    return B, H, Lq, Lk, D, v.shape[3]


def _key_valid(attention_mask: Tensor | None, B: int, Lk: int, device: torch.device) -> Tensor | None:
    """``attention_mask`` ``[B|1, K]`` (1/True = real key) as bool ``[B, K]``, or None when every key is real."""
    if attention_mask is None:
        return None
    am = check_binary("attention_mask", attention_mask)
    if am.shape[-1] != Lk or am.shape[0] not in (1, B):
        raise ValueError(f"attention_mask must be [B, K] = [{B}, {Lk}] (1 = real key, 0 = padding), got "
                         f"{list(attention_mask.shape)}")
    return am.to(device=device, dtype=torch.bool).expand(B, Lk)


def _features(fm: FeatureMap, q: Tensor, k: Tensor, valid: Tensor | None, *, causal: bool,
              shift0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(fq, fk, shift, key_scale)``: query and key features ``[B, H, L, m]`` (q's dtype) such that
    ``phi(k_j) e^{-C_j} = fk_j * key_scale_j``, with, for exponential maps, the key shift ``C`` -- ``[B, H, Lk]``,
    the running maximum (causal, including ``shift0``), or ``[B, H, 1]``, the maximum over the valid keys -- and the
    per-key factor ``key_scale [B, H, Lk]`` (<= 1; 0 at padding); both None for the other maps.

    An exponential map's features are computed as ``e^{a - max_r a}`` rows times a per-row factor: for a query
    the factor is dropped (scale invariance; the rows go through the fused softmax kernel), for key ``j`` it is
    ``e^{max_r a_jr + row_j - C_j}``, applied to ``[v_j, 1]`` (a vector, not another ``L x m`` pass). The shift
    ``C_j`` is the running maximum of ``max_r a_jr + row_j`` (any shift that is the same for all the keys a query
    sums over is exact; this one is causal and keeps every factor <= 1)."""
    if not fm.exponential:
        fq, fk = fm.features(q, is_query=True), fm.features(k, is_query=False)
        return fq, fk, None, None
    aq, _ = fm.log_parts(q, is_query=True)
    ak, row = fm.log_parts(k, is_query=False)
    top = ak.detach().amax(-1)                                       # [B, H, Lk]: max_r a_jr
    if fm._fresh_logs and not torch.is_grad_enabled():               # the map's own new tensors: work in place
        fq = aq.sub_(aq.amax(-1, keepdim=True)).exp_()               # exact: a positive factor per query row
        fk = ak.sub_(top[..., None]).exp_()                          # rows with maximum 1
    else:
        fq = torch.softmax(aq, dim=-1)
        fk = (ak - top[..., None]).exp_()
    if row is not None:
        top = top + row
    ref = top.detach()
    if valid is not None:
        ref = ref.masked_fill(~valid[:, None, :], float("-inf"))
    if causal:
        if shift0 is not None and ref.shape[-1]:
            ref = torch.cat([torch.maximum(ref[..., :1], shift0.to(ref.dtype)[..., None]), ref[..., 1:]], dim=-1)
        c = torch.cummax(ref, dim=-1).values if ref.shape[-1] else ref
    else:
        c = ref.amax(-1, keepdim=True) if ref.shape[-1] else ref.new_full(ref.shape[:-1] + (1,), _FLOOR)
        if shift0 is not None:
            c = torch.maximum(c, shift0.to(c.dtype)[..., None])
    c = c.clamp_min(_FLOOR)
    expo = top - c
    if valid is not None:
        expo = expo.masked_fill(~valid[:, None, :], float("-inf"))     # padding: 0, and a zero gradient
    return fq, fk, c, torch.exp(expo)


def _check_feature_dims(fq: Tensor, fk: Tensor, st: LinearAttentionState | None) -> int:
    """The feature dimension ``m``, checked to agree between queries, keys and the incoming state."""
    m = fq.shape[-1]
    if fk.shape[-1] != m or (st is not None and st.sums.shape[-2] != m):
        raise ValueError(f"the feature map gives {m} query features and {fk.shape[-1]} key features"
                         + ("" if st is None else f"; initial_state has {st.sums.shape[-2]}"))
    return m


def _augment(v: Tensor, valid: Tensor | None, scale: Tensor | None) -> Tensor:
    """``[v, 1]`` along the last dim (one matmul then gives numerator and normaliser), rows times the key factor
    ``scale`` and zero at padding."""
    va = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
    if scale is not None:
        va = va * scale[..., None]
    if valid is not None:
        va = va.masked_fill(~valid[:, None, :, None], 0.0)
    return va


def _normalise(o: Tensor) -> Tensor:
    """``o[..., :-1] / o[..., -1]``, and 0 where the normaliser is 0 (a row that sees no key) -- never NaN."""
    num, den = o[..., :-1], o[..., -1:]
    ok = den > 0
    if not (torch.is_grad_enabled() and o.requires_grad):
        return (num / den).masked_fill_(~ok, 0.0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


# ------------------------------------------------------------------------------------------------------
# The fast paths
# ------------------------------------------------------------------------------------------------------
def _noncausal(fq: Tensor, fk: Tensor, va: Tensor, c: Tensor | None, st: LinearAttentionState | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(o, sums, shift)`` with ``o = phi(Q) S`` (unnormalised, ``[.., Lq, Dv + 1]``), ``S`` the new state."""
    sums = fk.transpose(-1, -2) @ va                                  # [B, H, m, e]
    shift = None
    if c is not None:
        shift = c[..., 0]
    if st is not None:
        prev = st.sums.to(sums.dtype)
        if shift is not None:
            prev = prev * torch.exp(st.shift.to(shift.dtype) - shift)[..., None, None]
        sums = sums + prev
    return fq @ sums, sums, shift


def _segments(ends: Tensor, limit: float) -> list[tuple[int, int]]:
    """Runs of chunks ``[a, b)`` whose running maxima ``E_n`` (``ends [G, N]``) stay within ``limit`` of ``E_a``
    in every head (usually one run). A run is closed by chunk ``n``'s own maximum, which only affects the states
    of later chunks: the split never depends on anything a query could not see."""
    N = ends.shape[1]
    out, a = [], 0
    while a < N:
        over = ((ends[:, a:] - ends[:, a:a + 1]).amax(0) > limit).nonzero()
        b = a + int(over[0]) if over.numel() else N
        out.append((a, b))
        a = b
    return out


def _causal_chunks(fq: Tensor, fk: Tensor, va: Tensor, c: Tensor | None, s0: Tensor | None, c0: Tensor | None,
                   chunk: int, want_final: bool = True) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention over ``L = N * chunk`` positions in chunks (shapes ``[G, L, .]``, ``G = B * H``).

    Inside a chunk: the masked matrix ``(phi(Q_n) phi(K_n)^T) * D`` times ``[V_n, 1]``, where ``D_ij = e^{C_j - C_i}``
    for ``j <= i`` (1 without a shift) and 0 above the diagonal. Between chunks: the state before chunk ``n`` is
    ``S_0`` plus the sum of ``U_n' = phi(K_n')^T (e^{C - R} [V_n', 1])`` over the earlier chunks -- one batched matmul
    and one cumulative sum for all chunks -- kept at a reference shift ``R`` (the running maximum at the end of the
    run's first chunk; a new run starts when the maximum has grown by more than ``limit``, so ``e^{C - R}`` stays
    finite), and query ``i`` reads ``e^{R - C_i} phi(q_i) S_n`` (<= 1). Returns ``(o, final sums at shift E_{N-1})``;
    with ``want_final=False`` and a single chunk (training at L <= chunk) no state is formed and None is returned.
    """
    G, L, m = fq.shape
    e = va.shape[-1]
    n = L // chunk
    q4, k4, v4 = fq.view(G, n, chunk, m), fk.view(G, n, chunk, m), va.view(G, n, chunk, e)
    grad = torch.is_grad_enabled() and (fq.requires_grad or fk.requires_grad or va.requires_grad
                                        or (s0 is not None and s0.requires_grad))
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).triu_(1)
    scores = q4 @ k4.transpose(-1, -2)                                 # [G, n, chunk, chunk]
    if c is None:
        runs = [(0, n)]
        scores = scores.masked_fill(upper, 0.0) if grad else scores.masked_fill_(upper, 0.0)
    else:
        c3 = c.view(G, n, chunk)
        ends = c3[:, :, -1]
        runs = _segments(ends, 40.0 if fq.dtype.itemsize <= 4 else 300.0)
        dmat = (c3[..., None, :] - c3[..., :, None]).masked_fill_(upper, float("-inf")).exp_()
        scores = scores * dmat if grad else scores.mul_(dmat)
    if n == 1 and not want_final:                                      # one chunk: only the incoming state
        first = q4 @ s0[:, None] if s0 is not None else fq.new_zeros(G, 1, chunk, e)
        if c is not None:
            first = first * torch.exp(c0[:, None, None] - c3)[..., None]
        o = torch.baddbmm(first.reshape(G, chunk, e), scores.reshape(G, chunk, chunk), v4.reshape(G, chunk, e))
        return o.view(G, L, e), None
    # the states: sums[:, j] = the state after chunk j (inclusive), at reference refs[:, j]
    parts, refs = [], []
    carry, carry_ref = s0, c0
    for a, b in runs:
        if c is None:
            vw = v4[:, a:b]
        else:
            r = ends[:, a]
            vw = v4[:, a:b] * torch.exp(c3[:, a:b] - r[:, None, None])[..., None]
            refs.append(r[:, None].expand(G, b - a))
        u = k4[:, a:b].transpose(-1, -2) @ vw                          # U_n: [G, b - a, m, e]
        if carry is not None:
            base = carry if c is None else carry * torch.exp(carry_ref - r)[:, None, None]
            if grad:
                u = torch.cat([(u[:, 0] + base)[:, None], u[:, 1:]], dim=1)
            else:
                u[:, 0] += base
        u = u.cumsum(1) if grad else u.cumsum_(1)
        parts.append(u)
        carry, carry_ref = u[:, -1], (None if c is None else r)
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)    # [G, n, m, e]
    # inter-chunk term: chunk j >= 1 reads sums[:, j - 1]; flattened over (head, chunk) both are one batch
    qf, sf = q4.reshape(G * n, chunk, m), sums.reshape(G * n, m, e)
    first = (q4[:, 0] @ s0 if s0 is not None else fq.new_zeros(G, chunk, e))
    if grad:
        inter = torch.cat([first.new_zeros(1, chunk, e), torch.bmm(qf[1:], sf[:-1])]).view(G, n, chunk, e)
        inter = torch.cat([first[:, None], inter[:, 1:]], dim=1)
    else:
        inter = torch.empty(G * n, chunk, e, dtype=fq.dtype, device=fq.device)
        torch.bmm(qf[1:], sf[:-1], out=inter[1:])
        inter = inter.view(G, n, chunk, e)
        inter[:, 0] = first
    if c is not None:
        ref_state = torch.cat([c0[:, None], torch.cat(refs, dim=1)[:, :-1]], dim=1)   # reference of S_j
        rows = torch.exp(ref_state[..., None] - c3)[..., None]
        inter = inter * rows if grad else inter.mul_(rows)
    o = torch.baddbmm(inter.reshape(G * n, chunk, e), scores.reshape(G * n, chunk, chunk),
                      v4.reshape(G * n, chunk, e))
    final = sums[:, -1]
    if c is not None:
        final = final * torch.exp(refs[-1][:, -1] - ends[:, -1])[:, None, None]
    return o.view(G, L, e), final


def _causal(fm: FeatureMap, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
            st: LinearAttentionState | None, chunk: int, want_state: bool = True
            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(o, sums, shift)`` for causal attention over all L positions, ``q, k, v`` in the compute dtype.

    The sequence goes in blocks of whole chunks (at most ``_BLOCK_CHUNKS`` chunks and, where the chunk allows,
    about ``_BLOCK_ROWS`` positions), then the rest as one chunk; the state and the key shift are carried from
    block to block, exactly as between two calls with ``initial_state``. Each block computes its own features:
    the block's tensors stay small (no fresh multi-megabyte allocation per call, which on a CPU costs as much as
    the arithmetic) and the chunk states in memory stay ``O(B H _BLOCK_CHUNKS m d)`` whatever L."""
    B, H, L, D = q.shape
    G = B * H
    e = v.shape[-1] + 1                                   # [v, 1]: numerator and normaliser
    ep = -(-e // _ALIGN) * _ALIGN                         # zero columns up to an aligned width: faster GEMMs
    s = None if st is None else F.pad(st.sums.reshape(G, -1, e).to(q.dtype), (0, ep - e))
    shift0 = None if st is None else st.shift             # [B, H]: the key shift of everything seen so far
    chunk = min(chunk, max(L, 1))
    main = (L // chunk) * chunk
    block = chunk * max(1, min(_BLOCK_CHUNKS, _BLOCK_ROWS // chunk))
    pieces = [(lo, min(lo + block, main), chunk) for lo in range(0, main, block)]
    if L > main:
        pieces.append((main, L, L - main))
    outs, m = [], None
    for i, (lo, hi, size) in enumerate(pieces or [(0, 0, 1)]):
        vb = None if valid is None else valid[:, lo:hi]
        fq, fk, c, kscale = _features(fm, q[:, :, lo:hi], k[:, :, lo:hi], vb, causal=True, shift0=shift0)
        if m is None:
            m = _check_feature_dims(fq, fk, st)
        if not pieces:
            break
        va = F.pad(_augment(v[:, :, lo:hi], vb, kscale), (0, ep - e))
        cg = None if c is None else c.reshape(G, hi - lo)
        c0 = None
        if cg is not None:
            c0 = shift0.reshape(G).to(q.dtype) if shift0 is not None else q.new_full((G,), _FLOOR)
        o, s = _causal_chunks(fq.reshape(G, hi - lo, m), fk.reshape(G, hi - lo, m), va.reshape(G, hi - lo, ep),
                              cg, s, c0, size, want_final=want_state or i < len(pieces) - 1)
        if cg is not None:
            shift0 = cg[:, -1].reshape(B, H)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else (torch.cat(outs, dim=1) if outs else q.new_zeros(G, 0, ep))
    o = o[..., :e].reshape(B, H, L, e)
    if s is None:                                   # L = 0 (nothing seen, state unchanged) or no state wanted
        if not want_state:
            return o, None, None
        s = q.new_zeros(G, m, ep)
    shift = None
    if fm.exponential:
        shift = shift0 if shift0 is not None else q.new_full((B, H), _FLOOR)
        shift = shift.to(q.dtype)
    return o, s[..., :e].reshape(B, H, m, e), shift


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str | FeatureMap | Callable,
                     causal: bool = False, attention_mask: Tensor | None = None, chunk_size: int = 64,
                     initial_state: LinearAttentionState | None = None, return_state: bool = False
                     ) -> Tensor | tuple[Tensor, LinearAttentionState]:
    """Linear attention ``out_i = sum_j (phi(q_i).phi(k_j)) v_j / sum_j phi(q_i).phi(k_j)`` (kexue.fm/archives/8338).

    ``q [B, H, Lq, D]``, ``k [B, H, Lk, D]``, ``v [B, H, Lk, Dv]`` as for :func:`~kexue.attention.attention`.
    ``feature_map``: a :class:`FeatureMap`, a name of a parameter-free one (``"exp"``, ``"elu1"``, ``"relu"``) or a
    callable ``x -> phi(x) >= 0`` used for q and k alike.

    * ``causal=False``: every query sees every key (and the state), in O(L m d).
    * ``causal=True`` (``Lq == Lk``): query ``i`` sees keys ``j <= i`` and the state; computed in chunks of
      ``chunk_size`` positions (a masked matmul inside a chunk, a running state between chunks; any L). Outputs
      before position ``t`` do not depend on anything at ``t`` or later, bit for bit.
    * ``attention_mask`` ``[B, Lk]`` (1 = real key, 0 = padding) excludes padding keys from every sum; a query
      that sees no key outputs 0 (never NaN).
    * ``initial_state`` continues from an earlier call (the keys it summed count as seen by every query here);
      ``return_state=True`` returns ``(out, state)``: processing a sequence in pieces equals one pass.

    Sums and state are fp32 for fp16/bf16 inputs (fp64 for fp64); the output has the input dtype. Exponential
    maps are stabilised without looking ahead (module docstring).

    Example:
        >>> q, k, v = torch.randn(3, 2, 4, 50, 8)
        >>> a = linear_attention(q, k, v, feature_map="exp", causal=True)
        >>> h1, st = linear_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], feature_map="exp", causal=True,
        ...                           return_state=True)
        >>> h2 = linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], feature_map="exp", causal=True,
        ...                       initial_state=st)
        >>> bool(torch.allclose(a, torch.cat([h1, h2], dim=2), atol=1e-5))
        True
    """
    B, H, Lq, Lk, D, dv = _check_inputs(q, k, v)
    fm = _as_feature_map(feature_map)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_int("chunk_size", chunk_size)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {type(return_state).__name__}")
    if causal and Lq != Lk:
        raise ValueError(f"causal=True needs as many queries as keys (earlier keys go in initial_state), got "
                         f"Lq={Lq}, Lk={Lk}")
    m = fm.num_features(D)
    st = None if initial_state is None else _check_state(initial_state, B, H, m, dv, fm.exponential)
    valid = _key_valid(attention_mask, B, Lk, q.device)
    cd = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if causal:
        o, sums, shift = _causal(fm, qc, kc, vc, valid, st, chunk_size, want_state=return_state)
    else:
        fq, fk, c, kscale = _features(fm, qc, kc, valid, causal=False, shift0=None if st is None else st.shift)
        _check_feature_dims(fq, fk, st)
        o, sums, shift = _noncausal(fq, fk, _augment(vc, valid, kscale), c, st)
    out = _normalise(o).to(q.dtype)
    if return_state:
        return out, LinearAttentionState(sums, shift)
    return out


def linear_attention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, state: LinearAttentionState | None, *,
                          feature_map: str | FeatureMap | Callable, key_valid: Tensor | None = None
                          ) -> tuple[Tensor, LinearAttentionState]:
    """One token of causal linear attention in recurrent form: O(m d) whatever the position.

    ``q_t, k_t`` ``[B, H, D]`` (or ``[B, H, 1, D]``), ``v_t`` ``[B, H, Dv]`` (same rank); ``state`` from an
    earlier step or :func:`linear_attention` (``return_state=True``), or None at the start. ``key_valid``
    (bool ``[B]``, optional) marks a padding token, whose key is not added. Returns ``(out_t, new_state)``;
    stepping through a sequence equals ``linear_attention(..., causal=True)``.

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 6, 4, dtype=torch.float64)
        >>> st, outs = None, []
        >>> for t in range(6):
        ...     o, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, feature_map="exp")
        ...     outs.append(o)
        >>> bool(torch.allclose(torch.stack(outs, 2), linear_attention(q, k, v, feature_map="exp", causal=True)))
        True
    """
    four = q_t.dim() == 4
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_tensor(name, t, floating=True)
        if t.dim() != q_t.dim() or t.dim() not in (3, 4) or (t.dim() == 4 and t.shape[2] != 1):
            raise ValueError(f"q_t, k_t, v_t must all be [B, H, D] or all [B, H, 1, D], got {name} of shape "
                             f"{list(t.shape)}")
    q4, k4, v4 = (t if four else t.unsqueeze(2) for t in (q_t, k_t, v_t))
    B, H, _, _, D, dv = _check_inputs(q4, k4, v4)
    fm = _as_feature_map(feature_map)
    m = fm.num_features(D)
    st = None
    if state is not None:
        m = state.sums.shape[2] if isinstance(state, LinearAttentionState) and state.sums.dim() == 4 else m
        st = _check_state(state, B, H, m, dv, fm.exponential)
    valid = None
    if key_valid is not None:
        check_tensor("key_valid", key_valid)
        if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (B,):
            raise ValueError(f"key_valid must be a bool tensor [B] = [{B}], got {key_valid.dtype} "
                             f"{list(key_valid.shape)}")
        valid = key_valid[:, None].to(q_t.device)
    cd = compute_dtype(q_t.dtype)
    fq, fk, c, kscale = _features(fm, q4.to(cd), k4.to(cd), valid, causal=True,
                                  shift0=None if st is None else st.shift)
    if fq.shape[-1] != m or fk.shape[-1] != m:
        raise ValueError(f"the feature map gives {fq.shape[-1]} query and {fk.shape[-1]} key features, the state "
                         f"has {m}")
    va = _augment(v4.to(cd), valid, kscale)[:, :, 0]                   # [B, H, e]
    fq, fk = fq[:, :, 0], fk[:, :, 0]                                  # [B, H, m]
    add = fk[..., :, None] * va[..., None, :]                          # phi(k_t) [v_t, 1]^T, shift C_t
    shift = None if c is None else c[:, :, 0]
    if st is None:
        sums = add
    elif c is None:
        sums = st.sums.to(cd) + add
    else:
        sums = torch.addcmul(add, st.sums.to(cd), torch.exp(st.shift.to(cd) - shift)[..., None, None])
    o = _normalise((fq[..., None, :] @ sums)[..., 0, :]).to(q_t.dtype)
    return (o.unsqueeze(2) if four else o), LinearAttentionState(sums, shift)


# ------------------------------------------------------------------------------------------------------
# The plain form
# ------------------------------------------------------------------------------------------------------
def linear_attention_weights(q: Tensor, k: Tensor, *, feature_map: str | FeatureMap | Callable,
                             causal: bool = False, attention_mask: Tensor | None = None,
                             window: int | None = None) -> Tensor:
    """The normalised linear-attention matrix ``[B, H, Lq, Lk]``: ``phi(q_i).phi(k_j)`` over the visible keys,
    each row divided by its sum (an all-zero row where nothing is visible or every weight is 0).

    Visible: not padding (``attention_mask [B, Lk]``); with ``causal`` key ``j <= i + (Lk - Lq)`` (queries are the
    last ``Lq`` positions); with ``window=w`` only keys within ``w`` positions, ``|i - j| < w`` (causal:
    ``0 <= i - j < w``) -- the article's linear attention "cut to a local window", which is no longer linear in L.
    Materialises ``L x L``: for reference and analysis.

    Example:
        >>> q = k = torch.randn(1, 1, 5, 4)
        >>> w = linear_attention_weights(q, k, feature_map="elu1", causal=True, window=2)
        >>> w[0, 0].count_nonzero(dim=-1).tolist(), bool(torch.allclose(w.sum(-1), torch.ones(1, 1, 5)))
        ([1, 2, 2, 2, 2], True)
    """
    B, H, Lq, Lk, D, _ = _check_inputs(q, k, k[..., :1])
    fm = _as_feature_map(feature_map)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        _check_int("window", window)
    if causal and Lq > Lk:
        raise ValueError(f"causal=True needs Lq <= Lk (queries are the last Lq positions), got Lq={Lq}, Lk={Lk}")
    valid = _key_valid(attention_mask, B, Lk, q.device)
    cd = compute_dtype(q.dtype)
    qc, kc = q.to(cd), k.to(cd)
    if fm.exponential:
        lq = fm.log_features(qc, is_query=True)
        fq = torch.exp(lq - lq.amax(-1, keepdim=True))
        lk = fm.log_features(kc, is_query=False)
        top = lk.amax(-1)
        if valid is not None:
            top = top.masked_fill(~valid[:, None, :], float("-inf"))
        shift = top.amax(-1, keepdim=True).clamp_min(_FLOOR).detach()       # one shift for every key: exact
        lk = lk - shift[..., None]
        if valid is not None:
            lk = lk.masked_fill(~valid[:, None, :, None], float("-inf"))
        fk = torch.exp(lk)
    else:
        fq, fk = fm.features(qc, is_query=True), fm.features(kc, is_query=False)
    if fk.shape[-1] != fq.shape[-1]:
        raise ValueError(f"the feature map gives {fq.shape[-1]} query features but {fk.shape[-1]} key features")
    scores = fq @ fk.transpose(-1, -2)                                        # [B, H, Lq, Lk]
    i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq if causal else 0)
    j = torch.arange(Lk, device=q.device)[None, :]
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j < window) & ((j - i < window) if not causal else True)
    allowed = allowed[None, None]
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, 0.0)
    den = scores.sum(-1, keepdim=True)
    ok = den > 0
    return torch.where(ok, scores / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(scores))


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str | FeatureMap | Callable,
                               causal: bool = False, attention_mask: Tensor | None = None,
                               window: int | None = None) -> Tensor:
    """The plain O(L^2) linear attention every fast path is tested against: materialise ``phi(Q) phi(K)^T``, mask,
    normalise, multiply by ``V`` (:func:`linear_attention_weights` then ``@ v``). Same conventions as
    :func:`linear_attention`; ``window`` cuts the attention to a local window (article 5's experiment). Computes
    in fp32 for fp16/bf16 (fp64 stays fp64), returns the input dtype.

    Example:
        >>> q, k, v = torch.randn(3, 2, 2, 9, 4, dtype=torch.float64)
        >>> ref = linear_attention_reference(q, k, v, feature_map="elu1", attention_mask=torch.tensor([[1] * 9,
        ...                                  [1] * 5 + [0] * 4]))
        >>> ref.shape
        torch.Size([2, 2, 9, 4])
    """
    _check_inputs(q, k, v)
    w = linear_attention_weights(q, k, feature_map=feature_map, causal=causal, attention_mask=attention_mask,
                                 window=window)
    return (w @ v.to(w.dtype)).to(q.dtype)


# ------------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------------
class LinearAttentionCache:
    """One layer's recurrent state for incremental decoding (made by :meth:`LinearAttention.new_cache`): the
    :class:`LinearAttentionState` of the tokens seen so far and their number. O(m d) memory whatever the length.

    Example:
        >>> c = LinearAttention("elu1").new_cache()
        >>> c.state is None, len(c)
        (True, 0)
    """

    def __init__(self) -> None:
        self.state: LinearAttentionState | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search)."""
        if self.state is not None:
            self.state = self.state.index_select(index)


class LinearAttention(nn.Module):
    """Linear attention as a block attention module of :class:`kexue.nn.Transformer` (kexue.fm/archives/8338).

    ``attn(q, k, v, *, mask, cache=None) -> [B, H, Lq, Dv]``: ``mask`` is the model's
    :class:`~kexue.attention.PreparedMask`, of which it reads ``is_causal`` and ``key_padding``; any other mask
    (UniLM, permutation, a bias) has no linear-time form and is refused with a ``ValueError``. ``cache`` is a
    :class:`LinearAttentionCache` from :meth:`new_cache`: it holds the recurrent state, so generation costs
    O(m d) per token and layer (one token: :func:`linear_attention_step`; a prompt: the chunked form).

    ``feature_map``: a :class:`FeatureMap` or a name (:func:`make_feature_map`; ``head_dim`` and
    ``num_features`` are passed on, the random maps draw from ``generator``). ``window=w`` computes the
    article's linear attention cut to a local window through the O(L^2) :func:`linear_attention_reference`
    (an experiment, no cache). A FAVOR+ map with a ``redraw`` policy is stepped once per training forward.
    :meth:`entropy` gives the per-row entropy of the attention matrix.

    Example:
        >>> from kexue.attention import prepare_mask
        >>> attn = LinearAttention("favor", head_dim=8, num_features=32, generator=torch.Generator().manual_seed(0))
        >>> q = k = v = torch.randn(2, 4, 10, 8)
        >>> attn(q, k, v, mask=prepare_mask(q_len=10, is_causal=True)).shape
        torch.Size([2, 4, 10, 8])
    """

    def __init__(self, feature_map: str | FeatureMap = "exp", *, head_dim: int | None = None,
                 num_features: int | None = None, chunk_size: int = 64, window: int | None = None,
                 orthogonal: bool = True, redraw: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(feature_map, str):
            feature_map = make_feature_map(feature_map, head_dim=head_dim, num_features=num_features,
                                           orthogonal=orthogonal, redraw=redraw, generator=generator)
        elif not isinstance(feature_map, FeatureMap):
            raise TypeError(f"feature_map must be a name or a FeatureMap, got {type(feature_map).__name__}")
        self.feature_map = feature_map
        self.chunk_size = _check_int("chunk_size", chunk_size)
        self.window = None if window is None else _check_int("window", window)

    def _mask_parts(self, mask: object, q: Tensor, k: Tensor, past: int) -> tuple[bool, Tensor | None]:
        if mask is None:
            return False, None
        if not isinstance(mask, PreparedMask):
            raise TypeError(f"mask must be a PreparedMask (kexue.attention.prepare_mask) or None, got "
                            f"{type(mask).__name__}")
        if mask.has_other_mask:
            raise ValueError("LinearAttention supports the causal mask and key padding only: this mask has another "
                             "part (e.g. UniLM, permutation or a dense mask), which linear attention cannot apply "
                             "without materialising L x L")
        B, Lq = q.shape[0], q.shape[2]
        if mask.q_len != Lq or mask.k_len != past + Lq or mask.batch not in (1, B):
            raise ValueError(f"the mask is for [B, Q, K] = [{mask.batch}, {mask.q_len}, {mask.k_len}], the inputs "
                             f"have [{B}, {Lq}, {past + Lq}] ({past} cached tokens)")
        if mask.is_causal and mask.causal_offset != past:
            raise ValueError(f"causal_offset must be the number of cached tokens ({past}), got {mask.causal_offset}")
        kp = mask.key_padding
        if kp is not None:
            kp = kp.expand(B, -1)
        return mask.is_causal, kp

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: object = None,
                cache: LinearAttentionCache | None = None) -> Tensor:
        if cache is not None and not isinstance(cache, LinearAttentionCache):
            raise TypeError(f"cache must be a LinearAttentionCache (from new_cache()), got {type(cache).__name__}")
        past = 0 if cache is None else cache.length
        causal, kp = self._mask_parts(mask, q, k, past)
        step = getattr(self.feature_map, "step", None)
        if self.training and step is not None:
            step()
        if self.window is not None:
            if cache is not None:
                raise ValueError("a windowed LinearAttention has no recurrent form: no cache")
            return linear_attention_reference(q, k, v, feature_map=self.feature_map, causal=causal,
                                              attention_mask=kp, window=self.window)
        new_kp = None if kp is None else kp[:, past:]
        if cache is None:
            return linear_attention(q, k, v, feature_map=self.feature_map, causal=causal, attention_mask=new_kp,
                                    chunk_size=self.chunk_size)
        if q.shape[2] == 1 and causal:
            out, cache.state = linear_attention_step(q, k, v, cache.state, feature_map=self.feature_map,
                                                     key_valid=None if new_kp is None else new_kp[:, 0])
        else:
            out, cache.state = linear_attention(q, k, v, feature_map=self.feature_map, causal=causal,
                                                attention_mask=new_kp, chunk_size=self.chunk_size,
                                                initial_state=cache.state, return_state=True)
        cache.length += q.shape[2]
        return out

    @torch.no_grad()
    def entropy(self, q: Tensor, k: Tensor, *, mask: object = None) -> Tensor:
        """Per-row entropy (nats) of the normalised attention matrix, ``[B, H, Lq]`` (0 for an empty row)."""
        causal, kp = self._mask_parts(mask, q, k, 0)
        w = linear_attention_weights(q, k, feature_map=self.feature_map, causal=causal, attention_mask=kp,
                                     window=self.window)
        return -(w * torch.log(torch.where(w > 0, w, torch.ones_like(w)))).sum(-1)

    def new_cache(self) -> LinearAttentionCache:
        return LinearAttentionCache()

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}" + ("" if self.window is None else f", window={self.window}")
