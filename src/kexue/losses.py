"""Margin softmax losses: NormFace, AM-Softmax (CosFace), ArcFace, the combined margin and a distance margin.

Su Jianlin, "From the triangle inequality to Margin Softmax" (kexue.fm/archives/8656): a classifier only needs
``d(z, c_t) < d(z, c_i)``, but for *ranking* (retrieval) the triangle inequality asks for
``d(z, c_t) + m < d(z, c_i)`` with ``m`` about the average class diameter. With ``d = sqrt(1 - cos)`` (a true
metric) and a little slack this becomes the cosine margin of AM-Softmax::

    L = log(1 + sum_{i != t} exp(s (cos_i + m - cos_t)))  =  CE(s * [cos_i ..., cos_t - m ...], t)

Two entry points per loss, built from one piece (the loss's target function, ``_am_target``,
``_arcface_target``, ``_combined_target``, and :func:`margin_cross_entropy`):

* functional, *logits-in* (InsightFace style): ``am_softmax(cosines, targets, scale=..., margin=...)``,
  ``arcface(...)``, ``combined_margin(...)``, ``distance_margin(...)``, ``normface(...)`` return the loss;
  the ``*_logits`` forms return the margin-adjusted, scaled logits for use with any cross-entropy;
* modules owning L2-normalised class centres (PML style): :class:`AMSoftmaxLoss`, :class:`NormFaceLoss`,
  :class:`ArcFaceLoss`, :class:`CombinedMarginLoss`, :class:`DistanceMarginLoss`. They share
  :class:`MarginSoftmaxLoss` and differ in one hook (``target_logit`` or ``similarity``), which calls the same
  target function as the functional form.

Tensors are positional; ``scale``, the margins and every other option are keyword-only, in the same order in
a function and its class (``combined_margin(c, t, scale=, m1=, m2=, m3=)`` and
``CombinedMarginLoss(dim, classes, scale=, m1=, m2=, m3=)``). All margins are in the loss's own units: cosine
units for AM-Softmax, radians in [0, pi) for ArcFace (and ``m2`` of the combined margin), distance units for
the distance margin. Inputs in fp16/bf16 are computed in fp32; results come back in the input dtype.

The fused path keeps a single ``[N, C]`` float buffer: the scaled logits are written once, the margin is put
on the target column in place (gather/scatter), the softmax is taken in place, and the backward pass turns
that same buffer into the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_positive, check_tensor, compute_dtype

__all__ = [
    "AMSoftmaxLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "DistanceMarginLoss",
    "MarginSoftmaxLoss",
    "NormFaceLoss",
    "am_softmax",
    "am_softmax_logits",
    "arcface",
    "arcface_logits",
    "combined_margin",
    "combined_margin_logits",
    "cosine_distance",
    "distance_margin",
    "distance_margin_logits",
    "estimate_class_diameter",
    "margin_cross_entropy",
    "normface",
    "normface_logits",
]

#: floor on ``1 - cos^2`` (ArcFace's sin) and on ``1 - cos`` (the distance); keeps every gradient finite.
EPS = 1e-6
_REDUCTIONS = ("mean", "sum", "none")
_DISTANCES = ("sqrt_cosine", "euclidean")


# --------------------------------------------------------------------------------------------- checks

def _check_scale(scale: float) -> float:
    return check_positive("scale", scale)


def _check_margin(name: str, margin: float) -> float:
    return check_positive(name, margin, allow_zero=True)


def _check_angle(name: str, margin: float) -> float:
    """An additive angular margin: radians in [0, pi). At pi and beyond, theta + m passes pi for every
    theta, where the fallback raises the target logit instead of lowering it (a margin given in degrees)."""
    m = _check_margin(name, margin)
    if m >= math.pi:
        raise ValueError(f"{name} is an angle in radians and must be in [0, pi), got {margin} "
                         f"(degrees? use math.radians({margin}) = {math.radians(m):.4g})")
    return m


def _check_logits_targets(cosines: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    check_tensor("cosines", cosines, floating=True, dim=2)
    check_tensor("targets", targets, floating=False, dim=1)
    if targets.shape[0] != cosines.shape[0]:
        raise ValueError(f"targets must have {cosines.shape[0]} entries (one per row of cosines), "
                         f"got {targets.shape[0]}")
    if targets.device != cosines.device:
        raise ValueError(f"targets must be on {cosines.device}, got {targets.device}")
    valid = targets != ignore_index
    if valid.any():
        tv = targets[valid]
        lo, hi = int(tv.min()), int(tv.max())
        if lo < 0 or hi >= cosines.shape[1]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets must be class indices in [0, {cosines.shape[1] - 1}] "
                             f"(or ignore_index={ignore_index}), got {bad}")


# ------------------------------------------------------------------------------- target-logit functions

def _am_target(margin: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda c: c - margin


def _identity(c: torch.Tensor) -> torch.Tensor:
    return c


def _cos_plus(c: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) from c = cos(theta) without acos: c cos m - sin(theta) sin m, sin floored at sqrt(EPS)."""
    sin = torch.sqrt(torch.clamp(1.0 - c * c, min=EPS))
    return c * math.cos(m) - sin * math.sin(m)


def _arcface_target(margin: float, easy_margin: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    cos_m, sin_m = math.cos(margin), math.sin(margin)

    def fn(c: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(c, -1.0, 1.0)
        main = _cos_plus(c, margin)
        if easy_margin:
            return torch.where(c > 0, main, c)
        # theta + m > pi  <=>  c < -cos(m): cos(theta + m) would start to rise again; fall back to the
        # monotone c - m sin(m) (InsightFace's threshold trick, also what PML does).
        return torch.where(c >= -cos_m, main, c - margin * sin_m)

    return fn


def _combined_target(m1: float, m2: float, m3: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if m1 == 1.0:
        arc = _arcface_target(m2, False) if m2 > 0 else _identity
        return lambda c: arc(torch.clamp(c, -1.0, 1.0)) - m3
    limit = math.pi - m2

    def fn(c: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(c, -1.0, 1.0)
        # theta through atan2 of a floored sin: finite gradient at c = +-1 (acos has an infinite one there)
        sin = torch.sqrt(torch.clamp(1.0 - c * c, min=EPS))
        theta = torch.atan2(sin, c)
        main = torch.cos(m1 * theta + m2) - m3
        return torch.where(m1 * theta <= limit, main, c - m3 - m2 * math.sin(m2) - (m1 - 1.0))

    return fn


# ---------------------------------------------------------------------------------- the fused kernel

class _FusedMarginCE(torch.autograd.Function):
    """Cross-entropy over ``scale * x`` with the target column replaced by ``scale * target_fn(x_t)``.

    One float buffer of shape ``[N, C]``: logits -> softmax (in place) -> gradient (in place in backward).
    """

    @staticmethod
    def forward(ctx, x, targets, scale, target_fn, reduction, ignore_index):  # type: ignore[override]
        cdt = compute_dtype(x.dtype)
        valid = targets != ignore_index
        t = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)
        buf = x.to(cdt)
        buf = buf.mul_(scale) if buf.data_ptr() != x.data_ptr() else buf.mul(scale)
        xt = x.gather(1, t).squeeze(1).to(cdt)
        with torch.enable_grad():
            ct = xt.detach().requires_grad_(True)
            ft = target_fn(ct)
            (dft,) = torch.autograd.grad(ft.sum(), ct, allow_unused=True)
        ft = ft.detach()
        if dft is None:
            dft = torch.zeros_like(ct)
        lt = (ft * scale).unsqueeze(1)
        buf.scatter_(1, t, lt)
        mx = buf.amax(dim=1, keepdim=True)
        buf.sub_(mx).exp_()
        # loss = log(sum_j e^{l_j}) - l_t, computed without cancellation when the target is (near) the max:
        # with a = mx - l_t >= 0, e_t = e^{-a} and S = sum_{j != t} e^{l_j - mx}, loss = log1p(S / e_t) for
        # small a, and a + log(e_t + S) otherwise.
        a = (mx - lt).squeeze(1)
        e_t = torch.exp(-a)
        buf.scatter_(1, t, torch.zeros_like(lt))
        s_other = buf.sum(dim=1)
        buf.scatter_(1, t, e_t.unsqueeze(1))
        sumexp = (s_other + e_t).unsqueeze(1)
        buf.div_(sumexp)
        losses = torch.where(a < 1.0, torch.log1p(s_other / e_t), a + torch.log(sumexp.squeeze(1)))
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        n_valid = int(valid.sum())
        ctx.probs = buf
        ctx.save_for_backward(t, dft, valid)
        ctx.scale, ctx.reduction, ctx.n_valid, ctx.in_dtype = scale, reduction, n_valid, x.dtype
        if reduction == "mean":
            out = losses.sum() / max(n_valid, 1)
        elif reduction == "sum":
            out = losses.sum()
        else:
            out = losses
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.probs is None:
            raise RuntimeError("the fused margin loss frees its buffer in backward; backward twice "
                               "(retain_graph=True) is not supported, use fused=False")
        t, dft, valid = ctx.saved_tensors
        grad = ctx.probs
        ctx.probs = None
        g = grad_out.to(grad.dtype)
        if ctx.reduction == "mean":
            g = g / max(ctx.n_valid, 1)
        row = (g * ctx.scale) * valid.to(grad.dtype)
        if row.dim() == 0:
            row = row.expand(grad.shape[0])
        grad.mul_(row.unsqueeze(1))
        pt = grad.gather(1, t).squeeze(1)
        grad.scatter_(1, t, ((pt - row) * dft).unsqueeze(1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


def _reference_margin_ce(x: torch.Tensor, targets: torch.Tensor, scale: float,
                         target_fn: Callable[[torch.Tensor], torch.Tensor], reduction: str,
                         ignore_index: int) -> torch.Tensor:
    """Plain autograd version of :class:`_FusedMarginCE` (the reference the fused path is tested against)."""
    logits = _margin_logits(x, targets, scale, target_fn, ignore_index)
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index).to(x.dtype)


def _margin_logits(x: torch.Tensor, targets: torch.Tensor, scale: float,
                   target_fn: Callable[[torch.Tensor], torch.Tensor], ignore_index: int) -> torch.Tensor:
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    valid = targets != ignore_index
    t = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)
    xt = xc.gather(1, t).squeeze(1)
    ft = torch.where(valid, target_fn(xt), xt)
    return xc.scatter(1, t, ft.unsqueeze(1)) * scale


def margin_cross_entropy(x: torch.Tensor, targets: torch.Tensor, target_fn: Callable[[torch.Tensor], torch.Tensor],
                         *, scale: float, reduction: str = "mean", ignore_index: int = -100,
                         fused: bool = True) -> torch.Tensor:
    """Cross-entropy over ``scale * x`` whose target column is ``scale * target_fn(x_t)``.

    The building block of every loss here. ``x`` is ``[N, C]`` (cosines, or negative distances), ``target_fn``
    an elementwise differentiable function of the target entries. ``fused=True`` keeps one ``[N, C]`` fp32
    buffer for logits, softmax and gradient; ``fused=False`` is the plain autograd reference (supports double
    backward). Rows whose target is ``ignore_index`` contribute nothing.

    Example:
        >>> cos = torch.tensor([[0.9, 0.1], [0.2, 0.7]])
        >>> loss = margin_cross_entropy(cos, torch.tensor([0, 1]), lambda c: c - 0.35, scale=30.0)
        >>> torch.allclose(loss, am_softmax(cos, torch.tensor([0, 1])))
        True
    """
    _check_logits_targets(x, targets, ignore_index)
    check_choice("reduction", reduction, _REDUCTIONS)
    scale = _check_scale(scale)
    if fused:
        return _FusedMarginCE.apply(x, targets, scale, target_fn, reduction, ignore_index)
    return _reference_margin_ce(x, targets, scale, target_fn, reduction, ignore_index)


def _loss(cosines: torch.Tensor, targets: torch.Tensor, target_fn: Callable[[torch.Tensor], torch.Tensor],
          scale: float, reduction: str, ignore_index: int, fused: bool) -> torch.Tensor:
    return margin_cross_entropy(cosines, targets, target_fn, scale=scale, reduction=reduction,
                                ignore_index=ignore_index, fused=fused)


def _logits(cosines: torch.Tensor, targets: torch.Tensor, target_fn: Callable[[torch.Tensor], torch.Tensor],
            scale: float, ignore_index: int) -> torch.Tensor:
    _check_logits_targets(cosines, targets, ignore_index)
    return _margin_logits(cosines, targets, _check_scale(scale), target_fn, ignore_index)


# ----------------------------------------------------------------------------------------- functional

def am_softmax(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 30.0, margin: float = 0.35,
               reduction: str = "mean", ignore_index: int = -100, fused: bool = True) -> torch.Tensor:
    """AM-Softmax / CosFace loss on cosine logits (kexue.fm/archives/8656, arXiv 1801.05599).

    Target logit ``s (cos_t - m)``, other logits ``s cos_i``, then cross-entropy; this equals the article's
    ``log(1 + sum_{i != t} exp(s (cos_i + m - cos_t)))``. ``cosines`` is ``[N, C]``, ``targets`` ``[N]``.

    Example:
        >>> cos = torch.tensor([[0.5, 0.1, -0.2]])
        >>> round(float(am_softmax(cos, torch.tensor([0]))), 4)
        0.2014
    """
    fn = _am_target(_check_margin("margin", margin))
    return _loss(cosines, targets, fn, scale, reduction, ignore_index, fused)


def am_softmax_logits(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 30.0,
                      margin: float = 0.35, ignore_index: int = -100) -> torch.Tensor:
    """The AM-Softmax logits ``s (cos - m * onehot(t))`` (fp32 for low-precision input), for any CE.

    Example:
        >>> am_softmax_logits(torch.tensor([[0.5, 0.0]]), torch.tensor([0]), scale=10.0, margin=0.2)
        tensor([[3., 0.]])
    """
    return _logits(cosines, targets, _am_target(_check_margin("margin", margin)), scale, ignore_index)


def normface(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 30.0, reduction: str = "mean",
             ignore_index: int = -100, fused: bool = True) -> torch.Tensor:
    """NormFace: cross-entropy over ``s cos`` (AM-Softmax with ``m = 0``).

    Example:
        >>> cos = torch.tensor([[0.8, 0.1]])
        >>> torch.allclose(normface(cos, torch.tensor([0])), am_softmax(cos, torch.tensor([0]), margin=0.0))
        True
    """
    return _loss(cosines, targets, _identity, scale, reduction, ignore_index, fused)


def normface_logits(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 30.0,
                    ignore_index: int = -100) -> torch.Tensor:
    """``s cos`` (fp32 for low-precision input); ``targets`` are only checked.

    Example:
        >>> normface_logits(torch.tensor([[0.5, 0.0]]), torch.tensor([0]), scale=2.0)
        tensor([[1., 0.]])
    """
    return _logits(cosines, targets, _identity, scale, ignore_index)


def arcface(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 64.0, margin: float = 0.5,
            easy_margin: bool = False, reduction: str = "mean", ignore_index: int = -100,
            fused: bool = True) -> torch.Tensor:
    """ArcFace (additive angular margin, arXiv 1801.07698): target logit ``s cos(theta_t + m)``, ``m`` in radians.

    NaN-safe: ``cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m)`` with ``sin(theta)`` computed as
    ``sqrt(max(1 - cos^2, EPS))`` — no ``acos``, so the gradient is finite at ``cos = +-1``. Where
    ``theta + m > pi`` (``cos_t < -cos m``) the target logit falls back to ``s (cos_t - m sin m)``, which
    stays monotone (InsightFace's threshold; PML does the same). ``easy_margin=True`` applies the margin only
    where ``cos_t > 0``. ``margin`` must lie in [0, pi) (``ValueError`` otherwise: a margin in degrees such as
    28.6 would raise the target logit instead of lowering it).

    Example:
        >>> cos = torch.tensor([[1.0, 0.0]], requires_grad=True)
        >>> arcface(cos, torch.tensor([0])).backward()
        >>> bool(torch.isfinite(cos.grad).all())
        True
    """
    fn = _arcface_target(_check_angle("margin", margin), easy_margin)
    return _loss(cosines, targets, fn, scale, reduction, ignore_index, fused)


def arcface_logits(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 64.0, margin: float = 0.5,
                   easy_margin: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """The ArcFace logits: ``s cos(theta_t + m)`` on the target column, ``s cos`` elsewhere.

    Example:
        >>> arcface_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), scale=1.0, margin=0.0)
        tensor([[1., 0.]])
    """
    fn = _arcface_target(_check_angle("margin", margin), easy_margin)
    return _logits(cosines, targets, fn, scale, ignore_index)


def _check_combined(m1: float, m2: float, m3: float) -> tuple[float, float, float]:
    m1 = check_positive("m1", m1)
    if m1 < 1.0:
        raise ValueError(f"m1 must be >= 1 (a multiplicative angular margin), got {m1}")
    return m1, _check_angle("m2", m2), _check_margin("m3", m3)


def combined_margin(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 64.0, m1: float = 1.0,
                    m2: float = 0.5, m3: float = 0.0, reduction: str = "mean", ignore_index: int = -100,
                    fused: bool = True) -> torch.Tensor:
    """Combined margin (InsightFace): target logit ``s (cos(m1 theta + m2) - m3)``.

    ``(m1, m2, m3) = (1, m, 0)`` is ArcFace, ``(1, 0, m)`` is CosFace / AM-Softmax, ``m1 > 1`` a
    SphereFace-style multiplicative margin; ``m2`` is an angle in [0, pi). Where ``m1 theta + m2 > pi`` the
    target logit falls back to the monotone ``cos_t - m3 - m2 sin m2 - (m1 - 1)``. ``theta`` comes from
    ``atan2`` of a floored sine, so gradients stay finite at ``cos = +-1``.

    Example:
        >>> cos, t = torch.tensor([[0.3, 0.1]]), torch.tensor([0])
        >>> torch.allclose(combined_margin(cos, t, scale=30.0, m1=1.0, m2=0.0, m3=0.35),
        ...                am_softmax(cos, t, scale=30.0, margin=0.35))
        True
    """
    fn = _combined_target(*_check_combined(m1, m2, m3))
    return _loss(cosines, targets, fn, scale, reduction, ignore_index, fused)


def combined_margin_logits(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 64.0, m1: float = 1.0,
                           m2: float = 0.5, m3: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    """The combined-margin logits ``s (cos(m1 theta_t + m2) - m3)`` on the target column, ``s cos`` elsewhere.

    Example:
        >>> combined_margin_logits(torch.tensor([[0.5, 0.0]]), torch.tensor([0]), scale=2.0, m1=1.0, m2=0.0,
        ...                        m3=0.25)
        tensor([[0.5000, 0.0000]])
    """
    fn = _combined_target(*_check_combined(m1, m2, m3))
    return _logits(cosines, targets, fn, scale, ignore_index)


def cosine_distance(cosines: torch.Tensor, *, distance: str = "sqrt_cosine") -> torch.Tensor:
    """A true metric from cosines: ``sqrt(1 - cos)`` or the Euclidean ``sqrt(2 - 2 cos)`` of unit vectors.

    ``1 - cos`` itself violates the triangle inequality; its square root does not. The argument of the root
    is floored at ``EPS`` so the gradient at ``cos = 1`` (distance 0) is 0 instead of infinite.

    Example:
        >>> cosine_distance(torch.tensor([0.0, -1.0]))
        tensor([1.0000, 1.4142])
    """
    check_tensor("cosines", cosines, floating=True)
    check_choice("distance", distance, _DISTANCES)
    d = torch.sqrt(torch.clamp(1.0 - cosines, min=EPS))
    return d * math.sqrt(2.0) if distance == "euclidean" else d


def _neg_distance(cosines: torch.Tensor, distance: str) -> torch.Tensor:
    """The distance margin's similarity ``-d(cos)``, in the compute dtype (its class's ``similarity`` hook)."""
    return -cosine_distance(cosines.to(compute_dtype(cosines.dtype)), distance=distance)


def distance_margin(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 30.0, margin: float = 0.25,
                    distance: str = "sqrt_cosine", reduction: str = "mean", ignore_index: int = -100,
                    fused: bool = True) -> torch.Tensor:
    """The article's distance-margin loss: ``log(1 + sum_{i != t} exp(s [d(z, c_t) + m - d(z, c_i)]))``.

    ``d = sqrt(1 - cos)`` (``distance="sqrt_cosine"``) or the Euclidean distance of the normalised vectors
    (``"euclidean"``), both true metrics, so the triangle-inequality argument of kexue.fm/archives/8656 holds
    exactly. It is cross-entropy over logits ``-s d`` with ``m`` added to the target distance; needs one extra
    ``[N, C]`` tensor (the distances) beyond the fused buffer.

    Example:
        >>> cos = torch.tensor([[0.9, 0.0]])
        >>> d = cosine_distance(cos)
        >>> ref = torch.log1p(torch.exp(30.0 * (d[0, 0] + 0.25 - d[0, 1])))
        >>> torch.allclose(distance_margin(cos, torch.tensor([0])), ref)
        True
    """
    fn = _am_target(_check_margin("margin", margin))
    _check_logits_targets(cosines, targets, ignore_index)
    return _loss(_neg_distance(cosines, distance), targets, fn, scale, reduction, ignore_index,
                 fused).to(cosines.dtype)


def distance_margin_logits(cosines: torch.Tensor, targets: torch.Tensor, *, scale: float = 30.0,
                           margin: float = 0.25, distance: str = "sqrt_cosine",
                           ignore_index: int = -100) -> torch.Tensor:
    """The distance-margin logits ``-s (d + m * onehot(t))``.

    Example:
        >>> distance_margin_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), scale=1.0, margin=0.5)
        tensor([[-0.5010, -1.0000]])
    """
    _check_logits_targets(cosines, targets, ignore_index)
    fn = _am_target(_check_margin("margin", margin))
    return _logits(_neg_distance(cosines, distance), targets, fn, scale, ignore_index)


# ------------------------------------------------------------------------------------ class diameter

def _radius(cos_t: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - cos_t
    if distance == "angle":
        return torch.acos(torch.clamp(cos_t, -1.0, 1.0))
    return cosine_distance(cos_t, distance=distance)


def estimate_class_diameter(embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor | None = None,
                            *, distance: str = "sqrt_cosine", reduction: str = "mean") -> torch.Tensor:
    """Class diameter = 2 x the mean distance of a class's embeddings to its centre (the article's margin).

    The article's sufficient condition ``d(z1,c1) + [d(z3,c1) + d(z2,c2)] < d(z1,c2)`` has the bracket, two
    sample-to-centre distances, as the margin: on average twice the class radius. ``centres`` (``[C, D]``,
    e.g. a loss's learned class centres) default to the normalised mean direction of each class.
    ``distance``: ``"sqrt_cosine"`` / ``"euclidean"`` (metrics; the distance margin's units), ``"cosine"``
    (``1 - cos``, AM-Softmax's units) or ``"angle"`` (radians, ArcFace's units). ``reduction="none"`` returns
    one value per class present in ``labels`` (sorted by label); ``"mean"`` their mean.

    Example:
        >>> z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
        >>> d = estimate_class_diameter(z, torch.tensor([0, 0, 1, 1]), distance="cosine")
        >>> round(float(d), 4)  # each point is 45 degrees from its class centre
        0.5858
    """
    check_tensor("embeddings", embeddings, floating=True, dim=2)
    check_tensor("labels", labels, floating=False, dim=1)
    check_choice("distance", distance, (*_DISTANCES, "cosine", "angle"))
    check_choice("reduction", reduction, ("mean", "none"))
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have {embeddings.shape[0]} entries, got {labels.shape[0]}")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings must hold at least one row")
    z = F.normalize(embeddings.to(compute_dtype(embeddings.dtype)), dim=1)
    classes, inv = torch.unique(labels, return_inverse=True)
    if centres is None:
        sums = torch.zeros(len(classes), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, inv, z)
        c = F.normalize(sums, dim=1)[inv]
    else:
        check_tensor("centres", centres, floating=True, dim=2)
        if centres.shape[1] != z.shape[1]:
            raise ValueError(f"centres must have {z.shape[1]} columns (the embedding dimension), "
                             f"got {centres.shape[1]}")
        if int(labels.min()) < 0 or int(labels.max()) >= centres.shape[0]:
            raise ValueError(f"labels must index the {centres.shape[0]} centres")
        c = F.normalize(centres.to(z.dtype), dim=1)[labels]
    r = _radius((z * c).sum(1), distance)
    per_class = torch.zeros(len(classes), dtype=z.dtype, device=z.device).index_add_(0, inv, r)
    per_class = 2.0 * per_class / torch.bincount(inv, minlength=len(classes)).to(z.dtype)
    out = per_class.mean() if reduction == "mean" else per_class
    return out.to(embeddings.dtype)


# -------------------------------------------------------------------------------------------- modules

class MarginSoftmaxLoss(nn.Module):
    """Base class: L2-normalised class centres (no bias) and a margin softmax over their cosines.

    Subclasses change one hook: :meth:`target_logit` (the margin on the target column, in similarity units)
    or :meth:`similarity` (cosines -> the similarity that is scaled, e.g. a negative distance); each hook calls
    the same target function as the functional form of its loss, so a class and its function agree by
    construction. The loss is cross-entropy over ``scale * similarity`` with the target entry replaced by
    ``scale * target_logit`` (:func:`margin_cross_entropy`). ``embedding_dim`` and ``num_classes`` are
    positional, every option keyword-only.

    ``adaptive_every=K`` turns on the article's adaptive margin: the mean class diameter (2 x the mean distance
    of embeddings to their own centre, in the margin's units, over the last K training steps) becomes the new
    margin every K steps; start with ``margin=0.0`` to follow the article. ``margin_history`` records
    ``(step, margin)``.
    """

    #: units of the margin, passed to :func:`estimate_class_diameter`; None = no adaptive margin
    margin_units: str | None = "cosine"

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.0,
                 reduction: str = "mean", ignore_index: int = -100, adaptive_every: int | None = None,
                 fused: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        for name, v in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.scale = _check_scale(scale)
        self.margin = self._check_margin(margin)
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)
        self.ignore_index, self.fused = ignore_index, fused
        if adaptive_every is not None:
            if isinstance(adaptive_every, bool) or not isinstance(adaptive_every, int) or adaptive_every < 1:
                raise ValueError(f"adaptive_every must be a positive int or None, got {adaptive_every!r}")
            if self.margin_units is None:
                raise ValueError(f"{type(self).__name__} has no adaptive margin")
        self.adaptive_every = adaptive_every
        w = torch.randn(num_classes, embedding_dim, generator=generator)
        self.weight = nn.Parameter(F.normalize(w, dim=1))
        self.register_buffer("_radius_sum", torch.zeros(num_classes), persistent=False)
        self.register_buffer("_radius_count", torch.zeros(num_classes), persistent=False)
        self._steps = 0
        self.margin_history: list[tuple[int, float]] = [(0, self.margin)]

    # ---- hooks
    @staticmethod
    def _check_margin(margin: float) -> float:
        """Validate a margin given to the constructor (the same check as the functional form's)."""
        return _check_margin("margin", margin)

    @staticmethod
    def _adapted_margin(margin: float) -> float:
        """The margin to use when the adaptive rule measures ``margin`` (as is here)."""
        return margin

    def similarity(self, cosines: torch.Tensor) -> torch.Tensor:
        """Cosines -> the similarity that is scaled (identity here)."""
        return cosines

    def target_logit(self, sim_t: torch.Tensor) -> torch.Tensor:
        """The target entry's similarity after the margin (identity here: no margin)."""
        return sim_t

    # ---- shared machinery
    def _check_embeddings(self, embeddings: torch.Tensor) -> None:
        check_tensor("embeddings", embeddings, floating=True, dim=2)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have {self.embedding_dim} columns (embedding_dim), "
                             f"got {embeddings.shape[1]}")

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` cosines between the embeddings and the class centres, in fp32 for low precision."""
        self._check_embeddings(embeddings)
        cdt = compute_dtype(embeddings.dtype)
        z = F.normalize(embeddings.to(cdt), dim=1)
        w = F.normalize(self.weight.to(cdt), dim=1)
        return z @ w.t()

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Inference logits ``scale * similarity`` (no margin), in the embeddings' dtype.

        Example:
            >>> loss = AMSoftmaxLoss(4, 3)
            >>> loss.get_logits(torch.randn(2, 4)).shape
            torch.Size([2, 3])
        """
        return (self.similarity(self.cosines(embeddings)) * self.scale).to(embeddings.dtype)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(embeddings)
        sim = self.similarity(cos)
        loss = _loss(sim, targets, self.target_logit, self.scale, self.reduction, self.ignore_index, self.fused)
        if self.adaptive_every is not None and self.training and torch.is_grad_enabled():
            self._adapt(cos, targets)
        return loss.to(embeddings.dtype)

    @torch.no_grad()
    def _adapt(self, cos: torch.Tensor, targets: torch.Tensor) -> None:
        valid = targets != self.ignore_index
        t = targets[valid]
        r = _radius(cos[valid].gather(1, t.unsqueeze(1)).squeeze(1), self.margin_units or "cosine")
        self._radius_sum.index_add_(0, t, r.to(self._radius_sum.dtype))
        self._radius_count.index_add_(0, t, torch.ones_like(r, dtype=self._radius_count.dtype))
        self._steps += 1
        if self._steps % self.adaptive_every == 0:  # type: ignore[operator]
            seen = self._radius_count > 0
            if seen.any():
                measured = float(2.0 * (self._radius_sum[seen] / self._radius_count[seen]).mean())
                self.margin = self._adapted_margin(measured)
                self.margin_history.append((self._steps, self.margin))
            self._radius_sum.zero_()
            self._radius_count.zero_()

    def class_diameter(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean class diameter of ``embeddings`` around this loss's centres, in the margin's units."""
        self._check_embeddings(embeddings)
        return estimate_class_diameter(embeddings, labels, self.weight.detach(),
                                       distance=self.margin_units or "cosine")

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, adaptive_every={self.adaptive_every}")


class NormFaceLoss(MarginSoftmaxLoss):
    """NormFace: cross-entropy over ``scale * cos`` with normalised centres and embeddings (no margin);
    the class form of :func:`normface`.

    Example:
        >>> loss = NormFaceLoss(8, 5)
        >>> loss(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])).shape
        torch.Size([])
    """

    margin_units = None

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 30.0, **kw) -> None:
        super().__init__(embedding_dim, num_classes, scale=scale, margin=0.0, **kw)

    def target_logit(self, sim_t: torch.Tensor) -> torch.Tensor:
        return _identity(sim_t)


class AMSoftmaxLoss(MarginSoftmaxLoss):
    """AM-Softmax / CosFace with learned normalised centres: target logit ``s (cos_t - m)``; the class form of
    :func:`am_softmax`.

    The loss of kexue.fm/archives/8656 (``s=30, m=0.35`` as in post 5743 and arXiv 1801.05599).

    Example:
        >>> loss = AMSoftmaxLoss(8, 5, scale=30.0, margin=0.35)
        >>> z = torch.randn(4, 8, requires_grad=True)
        >>> loss(z, torch.tensor([0, 1, 2, 3])).backward()
        >>> z.grad.shape, loss.weight.grad.shape
        (torch.Size([4, 8]), torch.Size([5, 8]))
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.35,
                 **kw) -> None:
        super().__init__(embedding_dim, num_classes, scale=scale, margin=margin, **kw)

    def target_logit(self, sim_t: torch.Tensor) -> torch.Tensor:
        return _am_target(self.margin)(sim_t)


class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace with learned centres: target logit ``s cos(theta_t + m)``, ``m`` in radians in [0, pi); the class
    form of :func:`arcface`.

    With ``adaptive_every`` the measured class diameter (in radians) replaces the margin, capped just below pi.

    Example:
        >>> loss = ArcFaceLoss(8, 5)
        >>> float(loss(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))) > 0
        True
    """

    margin_units = "angle"

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, **kw) -> None:
        super().__init__(embedding_dim, num_classes, scale=scale, margin=margin, **kw)
        self.easy_margin = easy_margin

    @staticmethod
    def _check_margin(margin: float) -> float:
        return _check_angle("margin", margin)

    @staticmethod
    def _adapted_margin(margin: float) -> float:
        return min(margin, math.nextafter(math.pi, 0.0))

    def target_logit(self, sim_t: torch.Tensor) -> torch.Tensor:
        return _arcface_target(self.margin, self.easy_margin)(sim_t)


class CombinedMarginLoss(MarginSoftmaxLoss):
    """Combined margin ``s (cos(m1 theta_t + m2) - m3)`` with learned centres; the class form of
    :func:`combined_margin`, with its options in the same order (``scale, m1, m2, m3``).

    Example:
        >>> loss = CombinedMarginLoss(8, 5, m1=1.0, m2=0.5, m3=0.0)  # = ArcFace
        >>> loss(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])).dim()
        0
    """

    margin_units = None

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, **kw) -> None:
        self.m1, self.m2, self.m3 = _check_combined(m1, m2, m3)
        super().__init__(embedding_dim, num_classes, scale=scale, margin=0.0, **kw)
        self._fn = _combined_target(self.m1, self.m2, self.m3)

    def target_logit(self, sim_t: torch.Tensor) -> torch.Tensor:
        return self._fn(sim_t)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m1={self.m1}, m2={self.m2}, m3={self.m3}"


class DistanceMarginLoss(AMSoftmaxLoss):
    """The article's own loss: ``log(1 + sum_{i != t} exp(s [d(z,c_t) + m - d(z,c_i)]))`` with a true metric;
    the class form of :func:`distance_margin`.

    ``d = sqrt(1 - cos)`` (``distance="sqrt_cosine"``) or ``sqrt(2 - 2 cos)`` (``"euclidean"``), so
    the triangle inequality that motivates the margin holds (kexue.fm/archives/8656). Same as AM-Softmax with
    the cosine replaced by ``-d``; the gradient at ``d = 0`` is finite (the root's argument is floored).
    With ``adaptive_every=K`` the margin tracks the measured class diameter in the same distance.

    Example:
        >>> loss = DistanceMarginLoss(8, 5, scale=30.0, margin=0.25)
        >>> float(loss(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))) > 0
        True
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.25,
                 distance: str = "sqrt_cosine", **kw) -> None:
        self.distance = check_choice("distance", distance, _DISTANCES)
        self.margin_units = distance
        super().__init__(embedding_dim, num_classes, scale=scale, margin=margin, **kw)

    def similarity(self, cosines: torch.Tensor) -> torch.Tensor:
        return _neg_distance(cosines, self.distance)
