"""Mixing regularizers: mixup, SamplePairing, CutMix and manifold mixup.

Su Jianlin, "从SamplePairing到mixup：神奇的正则项" (kexue.fm/archives/5693): SamplePairing and mixup are not
data augmentation but a regularizer in disguise. Training on ``(ε·x_a + (1-ε)·x_b, ε·y_a + (1-ε)·y_b)``
asks the model to satisfy ``f(ε·a + (1-ε)·b) = ε·f(a) + (1-ε)·f(b)`` -- Jensen's functional equation,
whose continuous solutions are the affine maps -- so among equally accurate models it picks the one
closest to linear. Su suggests drawing ε from the uniform distribution (``alpha="uniform"``, which is
Beta(1, 1)) instead of tuning the Beta(α, α) of the mixup paper.

Every function here pairs the samples of a batch through a random permutation drawn with the given
``torch.Generator`` (odd batch sizes are fine), accepts any floating tensor whose first dimension is the
batch (images, sequences, embeddings), and leaves the caller's tensors untouched unless ``inplace=True``.

The training-step wrappers (:class:`Mixup`, :class:`CutMix`, :class:`SamplePairing` and
:meth:`ManifoldMixup.batch_transform`) share the call shape ``(x, y, *, generator=None, epoch=None) ->
(x, targets)`` (the ``batch_transform`` of :func:`kexue.train.fit`) and the loss :func:`mixed_loss`
understands every ``targets`` they return. Tensors are positional, every option keyword-only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_positive, check_tensor, compute_dtype

__all__ = [
    "CutMix",
    "ManifoldMixup",
    "MixedTargets",
    "Mixup",
    "SamplePairing",
    "SamplePairingSchedule",
    "cutmix",
    "mixed_cross_entropy",
    "mixed_loss",
    "mixup",
    "sample_beta",
    "sample_pairing",
    "soft_targets",
]

class MixedTargets(NamedTuple):
    """The label side of a mixed batch: the loss is ``lam * L(y_a) + (1 - lam) * L(y_b)``.

    ``lam`` is a 0-dim tensor (one λ for the batch) or a ``[B]`` tensor (one λ per sample).
    """

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# random draws (torch RNG only)


def _alpha(alpha: Any) -> float:
    if isinstance(alpha, str):
        if alpha != "uniform":
            raise ValueError(f"alpha must be a number > 0 or 'uniform', got {alpha!r}")
        return 1.0
    return check_positive("alpha", alpha)


def _log_gamma_samples(shape: float, n: int, generator: torch.Generator | None,
                       device: torch.device) -> torch.Tensor:
    """log of ``n`` Gamma(shape, 1) draws in float64 (Marsaglia-Tsang; boosted for shape < 1)."""
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        m = todo.numel()
        z = torch.randn(m, generator=generator, dtype=torch.float64, device=device)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=device)
        v = (1.0 + c * z) ** 3
        pos = v > 0
        logv = torch.log(torch.where(pos, v, torch.ones_like(v)))
        ok = pos & (torch.log(u) < 0.5 * z * z + d - d * v + d * logv)
        out[todo[ok]] = math.log(d) + logv[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device).clamp_min(1e-300)
        out = out + torch.log(u) / shape
    return out


_SCALAR_MAX = 4  # up to this many draws, the scalar path (two RNG calls per draw) is faster
_BLOCK = 6  # Marsaglia-Tsang candidates drawn at once per Gamma in the scalar path


def _log_gamma_scalar(a: float, z: list[float], u: list[float]) -> float | None:
    """First accepted Marsaglia-Tsang candidate (shape ``a`` >= 1) from the given normals/uniforms."""
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    for zi, ui in zip(z, u):
        v = (1.0 + c * zi) ** 3
        if v > 0 and math.log(max(ui, 1e-300)) < 0.5 * zi * zi + d - d * v + d * math.log(v):
            return math.log(d) + math.log(v)
    return None


def _beta_scalar(a: float, generator: torch.Generator | None, device: torch.device) -> float:
    """One Beta(a, a) draw from two RNG calls (same algorithm as the batched path, in Python floats)."""
    boost = a < 1.0
    shape = a + 1.0 if boost else a
    logs = []
    while len(logs) < 2:
        z = torch.randn(_BLOCK, generator=generator, dtype=torch.float64, device=device).tolist()
        u = torch.rand(_BLOCK + 1, generator=generator, dtype=torch.float64, device=device).tolist()
        lg = _log_gamma_scalar(shape, z, u[:_BLOCK])
        if lg is None:
            continue
        if boost:
            lg += math.log(max(u[_BLOCK], 1e-300)) / a
        logs.append(lg)
    diff = logs[1] - logs[0]
    return 1.0 / (1.0 + math.exp(diff)) if diff < 700 else 0.0


def sample_beta(alpha: float | str, n: int = 1, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` draws of ε ~ Beta(alpha, alpha) as float32, using only the torch RNG ``generator``.

    ``alpha="uniform"`` and ``alpha=1.0`` both draw ε ~ U[0, 1] (one ``torch.rand`` call, so the two give
    identical samples). Other values use two Gamma draws in log space, stable for small alpha.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> eps = sample_beta(0.2, 4, generator=g)
        >>> bool(((eps >= 0) & (eps <= 1)).all())
        True
    """
    a = _alpha(alpha)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if a == 1.0:
        lam = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
    elif n <= _SCALAR_MAX:
        lam = torch.tensor([_beta_scalar(a, generator, gen_device) for _ in range(n)], dtype=torch.float64)
    else:
        g1 = _log_gamma_samples(a, n, generator, gen_device)
        g2 = _log_gamma_samples(a, n, generator, gen_device)
        lam = torch.sigmoid(g1 - g2)  # G1 / (G1 + G2) without underflow
    lam = lam.to(torch.float32)
    return lam if device is None else lam.to(device)


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _check_batch(x: Any, y: Any, *, min_dim: int = 1, name_x: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(name_x, x, min_dim=min_dim)
    if not x.is_floating_point():
        raise TypeError(f"{name_x} must be a floating-point tensor (convert integer images with "
                        f"x.float() / 255), "
                        f"got dtype {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError(f"{name_x} must hold at least one sample, got shape {tuple(x.shape)}")
    check_tensor("y", y, min_dim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _check_labels(name: str, y: torch.Tensor, num_classes: int | None) -> None:
    """Integer labels in ``[0, num_classes)`` or soft labels ``[B, C]`` (C == num_classes when given)."""
    if y.is_floating_point():
        if y.dim() != 2:
            raise ValueError(f"{name} as soft labels must have shape [batch, classes], got {tuple(y.shape)}")
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"{name} has {y.shape[1]} classes, expected num_classes={num_classes}")
        return
    if y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class labels or float soft labels, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name} as integer labels must have shape [batch], got {tuple(y.shape)}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise ValueError(f"{name} has a negative class label ({lo}); labels must lie in [0, num_classes)")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{name} has label {hi}, out of range for num_classes={num_classes}")


def _check_num_classes(num_classes: Any) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    return num_classes


def _check_lam(lam: Any, batch: int) -> torch.Tensor:
    """``lam`` as a tensor after checking it is a mixing weight: a number, a 0-dim tensor or one per sample
    (``[batch]``), every value in [0, 1] (NaN is refused too)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"lam must be a number or a tensor, got {type(lam).__name__}")
    if isinstance(lam, torch.Tensor):
        if lam.is_complex() or lam.dtype == torch.bool:
            raise TypeError(f"lam must be a real number or tensor, got dtype {lam.dtype}")
        if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != batch):
            raise ValueError(f"lam must be a scalar or have shape [{batch}], got {tuple(lam.shape)}")
        inside = bool(((lam >= 0) & (lam <= 1)).all())  # NaN fails both comparisons
        lam_t = lam
    else:
        inside = 0.0 <= lam <= 1.0
        lam_t = torch.tensor(float(lam), dtype=torch.float64)
    if not inside:
        shown = lam if not isinstance(lam, torch.Tensor) or lam.numel() <= 8 else "a tensor"
        raise ValueError(f"lam must lie in [0, 1] (it is the weight of y_a; y_b gets 1 - lam), got {shown}")
    return lam_t


def _lam_view(lam: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """λ as a tensor that broadcasts over ``ref``'s non-batch dims."""
    if lam.dim() == 0:
        return lam
    return lam.reshape(lam.shape[0], *([1] * (ref.dim() - 1)))


def _mix(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` in fp32 for half types, returned in x's dtype."""
    other = x[perm]  # advanced indexing copies, so the in-place path below is safe
    cdt = compute_dtype(x.dtype)
    if cdt != x.dtype:
        w = _lam_view(1.0 - lam.to(cdt), x)
        mixed = torch.lerp(x.to(cdt), other.to(cdt), w).to(x.dtype)
        return x.copy_(mixed) if inplace else mixed
    w = _lam_view((1.0 - lam).to(x.dtype), x)
    return x.lerp_(other, w) if inplace else torch.lerp(x, other, w)


# ---------------------------------------------------------------------------------------------------------
# mixup


def mixup(x: torch.Tensor, y: torch.Tensor, *, alpha: float | str = 1.0, per: str = "batch",
          generator: torch.Generator | None = None, num_classes: int | None = None,
          inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixup (kexue.fm/archives/5693): ``x_mixed = lam * x + (1 - lam) * x[perm]``.

    Args:
        x: floating batch ``[B, ...]`` of any shape (images, sequences, embeddings).
        y: integer labels ``[B]`` or soft / one-hot labels ``[B, C]``.
        alpha: ε ~ Beta(alpha, alpha); ``"uniform"`` (Su's suggestion, ε ~ U[0, 1]) is the same as ``1.0``.
        per: ``"batch"`` draws one λ for the batch, ``"sample"`` one λ per sample (broadcast over the
            non-batch dims).
        generator: the ``torch.Generator`` for the permutation and λ (same seed, same mixed batch).
        num_classes: when given, integer labels are checked to lie in ``[0, num_classes)``.
        inplace: overwrite ``x`` with the mixed batch instead of allocating a new tensor.

    Returns:
        ``(x_mixed, y_a, y_b, lam)`` with ``y_a = y``, ``y_b = y[perm]`` and ``lam`` a float32 tensor
        (0-dim for ``per="batch"``, ``[B]`` for ``per="sample"``). Train with
        :func:`mixed_cross_entropy` or with soft targets from :func:`soft_targets`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
        >>> xm, ya, yb, lam = mixup(x, y, alpha="uniform", generator=g)
        >>> logits = torch.randn(5, 3)
        >>> loss = mixed_cross_entropy(logits, ya, yb, lam)
    """
    _check_batch(x, y)
    a = _alpha(alpha)
    check_choice("per", per, ("batch", "sample"))
    _check_labels("y", y, _check_num_classes(num_classes))
    n = x.shape[0]
    perm = _permutation(n, generator, x.device)
    lam = sample_beta(a, 1 if per == "batch" else n, generator=generator, device=x.device)
    if per == "batch":
        lam = lam[0]
    mixed = _mix(x, perm, lam, inplace)
    return mixed, y, y[perm], lam


def soft_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor | float, *,
                 num_classes: int | None = None,
                 label_smoothing: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The mixed target ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)`` as ``[B, C]`` in ``dtype``.

    Integer labels are one-hot encoded (``num_classes`` required); labels that are already one-hot or soft
    (float ``[B, C]``) are used as they are. ``label_smoothing`` mixes in the uniform distribution. ``lam``
    (a number, a 0-dim tensor or one per sample ``[B]``) must lie in [0, 1]: anything else (or NaN) raises
    ``ValueError``, since a weight outside it gives targets with negative entries.

    Example:
        >>> soft_targets(torch.tensor([0, 2]), torch.tensor([1, 2]), 0.25, num_classes=3)
        tensor([[0.2500, 0.7500, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    num_classes = _check_num_classes(num_classes)
    check_tensor("y_a", y_a, min_dim=1)
    check_tensor("y_b", y_b, min_dim=1)
    if y_a.shape[0] != y_b.shape[0]:
        raise ValueError(f"y_a and y_b must have the same batch size, got {y_a.shape[0]} and {y_b.shape[0]}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    def onehot(name: str, y: torch.Tensor) -> torch.Tensor:
        _check_labels(name, y, num_classes)
        if y.is_floating_point():
            return y.to(dtype)
        if num_classes is None:
            raise ValueError(f"num_classes is required to one-hot encode integer labels {name}")
        return F.one_hot(y, num_classes).to(dtype)

    ta, tb = onehot("y_a", y_a), onehot("y_b", y_b)
    if ta.shape != tb.shape:
        raise ValueError(f"y_a and y_b give targets of different shapes {tuple(ta.shape)} and "
                         f"{tuple(tb.shape)}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    lam_t = _check_lam(lam, ta.shape[0]).to(dtype=dtype, device=ta.device)
    out = torch.lerp(tb, ta, lam_t.reshape(-1, 1) if lam_t.dim() == 1 else lam_t)
    if label_smoothing:
        out = out * (1.0 - label_smoothing) + label_smoothing / out.shape[1]
    return out


def _per_sample_ce(logp: torch.Tensor, y: torch.Tensor, name: str, label_smoothing: float) -> torch.Tensor:
    num_classes = logp.shape[1]
    _check_labels(name, y, num_classes)
    if y.shape[0] != logp.shape[0]:
        raise ValueError(f"{name} must have batch size {logp.shape[0]}, got {y.shape[0]}")
    if y.is_floating_point():
        target = y.to(logp.dtype)
        if label_smoothing:
            target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
        return -(target * logp).sum(1)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    if label_smoothing:
        return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(1)
    return nll


def mixed_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor | float, *,
                        label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``, which equals CE against the mixed soft label.

    Cross-entropy is linear in its target, so this "mix the losses" form is exactly the soft-label loss of
    mixup while keeping integer labels. ``lam`` may be a float, a 0-dim tensor or one λ per sample ``[B]``,
    each in [0, 1] (outside it, or NaN, raises ``ValueError``: the loss would be a negative cross-entropy).
    Labels may be integer ``[B]`` or soft ``[B, C]``; ``label_smoothing`` follows ``F.cross_entropy``.
    Computed in fp32 (fp64 stays fp64) and returned in the logits' dtype.

    Example:
        >>> logits = torch.randn(4, 3)
        >>> loss = mixed_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2]), 0.3)
    """
    check_tensor("logits", logits, floating=True, dim=2)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logp = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=1)
    ce_a = _per_sample_ce(logp, y_a, "y_a", label_smoothing)
    ce_b = _per_sample_ce(logp, y_b, "y_b", label_smoothing)
    lam_t = _check_lam(lam, logits.shape[0]).to(dtype=logp.dtype, device=logp.device)
    loss = torch.lerp(ce_b, ce_a, lam_t)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)


def mixed_loss(outputs: torch.Tensor, targets: MixedTargets | torch.Tensor, *,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss for any ``targets`` the wrappers return: mixed CE for :class:`MixedTargets`, plain
    cross-entropy for integer or soft label tensors (ERM, SamplePairing).

    Example:
        >>> m = Mixup(alpha="uniform", generator=torch.Generator().manual_seed(0))
        >>> x, t = m(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss = mixed_loss(torch.randn(6, 3), t)
    """
    if isinstance(targets, MixedTargets):
        return mixed_cross_entropy(outputs, targets.y_a, targets.y_b, targets.lam,
                                   label_smoothing=label_smoothing)
    check_tensor("targets", targets, min_dim=1)
    check_tensor("outputs", outputs, floating=True, dim=2)
    ce = _per_sample_ce(torch.log_softmax(outputs.to(compute_dtype(outputs.dtype)), 1), targets, "targets",
                        label_smoothing)
    return ce.mean().to(outputs.dtype)


# ---------------------------------------------------------------------------------------------------------
# SamplePairing


def sample_pairing(x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
                   inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SamplePairing (Inoue 2018; read as a regularizer in kexue.fm/archives/5693): ``(x + x[perm]) / 2``
    with the label of the first sample.

    Over both orderings of a pair this is mixup with ε = 1/2 and a label drawn from the two, whose
    expected target is ``(y_a + y_b) / 2``. Returns ``(x_paired, y)``; ``y`` is returned unchanged.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> xp, yp = sample_pairing(torch.randn(7, 3, 4, 4), torch.arange(7), generator=g)
    """
    _check_batch(x, y)
    _check_labels("y", y, None)
    perm = _permutation(x.shape[0], generator, x.device)
    half = torch.tensor(0.5, dtype=torch.float32, device=x.device)
    return _mix(x, perm, half, inplace), y


class SamplePairingSchedule:
    """When SamplePairing is on: off before ``start``, then ``on`` epochs on / ``off`` epochs off, and off
    again from ``stop`` (fine-tuning). The defaults are the paper's policy (100, 800, 8, 2), as in
    torchbearer's ``SamplePairing.default_policy``. Epochs are counted from 0.

    Example:
        >>> s = SamplePairingSchedule()
        >>> [s.active(e) for e in (99, 100, 107, 108, 110, 800)]
        [False, True, True, False, True, False]
    """

    def __init__(self, *, start: int = 100, stop: int = 800, on: int = 8, off: int = 2) -> None:
        for name, v in (("start", start), ("stop", stop), ("on", on), ("off", off)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if stop < start:
            raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
        if on < 1:
            raise ValueError(f"on must be >= 1, got {on}")
        self.start, self.stop, self.on, self.off = start, stop, on, off

    @classmethod
    def scaled(cls, epochs: int, *, reference_epochs: int = 1000, on: int | None = None,
               off: int | None = None) -> SamplePairingSchedule:
        """The paper's policy shrunk to a run of ``epochs`` epochs.

        ``start`` and ``stop`` keep their fractions of ``reference_epochs`` (100/1000 and 800/1000); the
        on/off cycle keeps its 4:1 ratio with ``on = max(1, round(8 * epochs / reference_epochs))`` unless
        given. Example: ``scaled(20)`` is start 2, stop 16, 1 on / 1 off -- pass ``on=4, off=1`` to keep 4:1.

        Example:
            >>> SamplePairingSchedule.scaled(20, on=4, off=1)
            SamplePairingSchedule(start=2, stop=16, on=4, off=1)
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        f = epochs / reference_epochs
        if on is None:
            on = max(1, round(8 * f))
        if off is None:
            off = max(1, round(on / 4))
        return cls(start=round(100 * f), stop=round(800 * f), on=on, off=off)

    def active(self, epoch: int) -> bool:
        """Whether pairing is on during ``epoch`` (0-based)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not self.start <= epoch < self.stop:
            return False
        return (epoch - self.start) % (self.on + self.off) < self.on

    def __repr__(self) -> str:
        return f"SamplePairingSchedule(start={self.start}, stop={self.stop}, on={self.on}, off={self.off})"


# ---------------------------------------------------------------------------------------------------------
# CutMix


def _cut_boxes(n: int, h: int, w: int, lam0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Boxes ``[n, 4]`` (top, bottom, left, right), int64, area ≈ (1 - lam0)·h·w, clipped to the image."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    ratio = torch.sqrt(1.0 - lam0.double().to(gen_device))
    ch = (ratio * h).floor().long()
    cw = (ratio * w).floor().long()
    cy = torch.randint(0, h, (n,), generator=generator, device=gen_device)
    cx = torch.randint(0, w, (n,), generator=generator, device=gen_device)
    top = (cy - ch // 2).clamp(0, h)
    bottom = (cy + ch - ch // 2).clamp(0, h)
    left = (cx - cw // 2).clamp(0, w)
    right = (cx + cw - cw // 2).clamp(0, w)
    return torch.stack([top, bottom, left, right], 1)


def _box_mask(boxes: torch.Tensor, h: int, w: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[n, h, w]``: True inside each box (the region taken from the partner)."""
    boxes = boxes.to(device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_r = (rows[None, :] >= boxes[:, 0:1]) & (rows[None, :] < boxes[:, 1:2])
    in_c = (cols[None, :] >= boxes[:, 2:3]) & (cols[None, :] < boxes[:, 3:4])
    return in_r[:, :, None] & in_c[:, None, :]


def cutmix(x: torch.Tensor, y: torch.Tensor, *, alpha: float | str = 1.0, per: str = "batch",
           generator: torch.Generator | None = None, num_classes: int | None = None,
           inplace: bool = False, return_boxes: bool = False):
    """CutMix (Yun et al. 2019; beyond the article): paste a box from the partner ``x[perm]`` into ``x``.

    A box of area ``(1 - λ₀)·H·W`` (λ₀ ~ Beta(alpha, alpha)) is centred at a uniform pixel and clipped to
    the image; the returned ``lam`` is then corrected to the exact kept fraction ``1 - box_area / (H·W)``,
    so the label weights match the pixels. The last two dims of ``x`` are the spatial ones (``[B, H, W]`` or
    ``[B, C, H, W]``, any leading channel dims). ``per="sample"`` draws one box and λ per sample.

    Returns ``(x_mixed, y_a, y_b, lam)`` like :func:`mixup`, plus the boxes ``[B or 1, 4]`` (top, bottom,
    left, right) when ``return_boxes=True``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> xm, ya, yb, lam = cutmix(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), generator=g)
    """
    _check_batch(x, y, min_dim=3)
    a = _alpha(alpha)
    check_choice("per", per, ("batch", "sample"))
    _check_labels("y", y, _check_num_classes(num_classes))
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    perm = _permutation(n, generator, x.device)
    k = 1 if per == "batch" else n
    lam0 = sample_beta(a, k, generator=generator)
    boxes = _cut_boxes(k, h, w, lam0, generator)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    lam = (1.0 - area.double() / (h * w)).float().to(x.device)
    out = x if inplace else x.clone()
    if per == "batch":
        t, b, lft, r = (int(v) for v in boxes[0])
        out[..., t:b, lft:r] = x[..., t:b, lft:r][perm]
        lam = lam[0]
    else:
        mask = _box_mask(boxes, h, w, x.device)
        mask = mask.reshape(n, *([1] * (x.dim() - 3)), h, w)
        out = torch.where(mask, x[perm], x) if not inplace else x.copy_(torch.where(mask, x[perm], x))
    result = (out, y, y[perm], lam)
    return (*result, boxes) if return_boxes else result


# ---------------------------------------------------------------------------------------------------------
# training-step modules


class _Transform(nn.Module):
    """Shared plumbing: own generator, probability of applying, and the ``batch_transform`` call shape."""

    def __init__(self, *, prob: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self.generator = generator

    def _gen(self, generator: torch.Generator | None) -> torch.Generator | None:
        return generator if generator is not None else self.generator

    def _skip(self, gen: torch.Generator | None) -> bool:
        if not self.training:
            return True
        if self.prob >= 1.0:
            return False
        gen_device = gen.device if gen is not None else torch.device("cpu")
        return bool(torch.rand((), generator=gen, device=gen_device) >= self.prob)


class _MixTransform(_Transform):
    """Shared body of :class:`Mixup` and :class:`CutMix`: they differ only in the mixing function ``_mix``."""

    _mix: Any

    def __init__(self, *, alpha: float | str = 1.0, per: str = "batch", prob: float = 1.0,
                 num_classes: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(prob=prob, generator=generator)
        self.alpha = _alpha(alpha)
        self.per = check_choice("per", per, ("batch", "sample"))
        self.num_classes = _check_num_classes(num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
                epoch: int | None = None) -> tuple[torch.Tensor, MixedTargets | torch.Tensor]:
        gen = self._gen(generator)
        if self._skip(gen):
            return x, y
        xm, ya, yb, lam = self._mix(x, y, alpha=self.alpha, per=self.per, generator=gen,
                                    num_classes=self.num_classes)
        return xm, MixedTargets(ya, yb, lam)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, per={self.per!r}, prob={self.prob}"


class Mixup(_MixTransform):
    """mixup as a training-step transform (kexue.fm/archives/5693); usable as ``fit(batch_transform=...)``.

    ``Mixup(alpha=a)(x, y, generator=None, epoch=None)`` returns ``(x_mixed, MixedTargets(y_a, y_b, lam))``
    in training mode (``(x, y)`` unchanged in eval mode or with probability ``1 - prob``); train with
    :func:`mixed_loss`.

    Example:
        >>> m = Mixup(alpha="uniform", generator=torch.Generator().manual_seed(0))
        >>> x, t = m(torch.randn(5, 8), torch.tensor([0, 1, 1, 0, 2]))
        >>> loss = mixed_loss(torch.randn(5, 3), t)
    """

    _mix = staticmethod(mixup)


class CutMix(_MixTransform):
    """CutMix as a training-step transform, with the exact kept-area λ (see :func:`cutmix`).

    Example:
        >>> c = CutMix(alpha=1.0, generator=torch.Generator().manual_seed(0))
        >>> x, t = c(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    """

    _mix = staticmethod(cutmix)


class SamplePairing(_Transform):
    """SamplePairing as a training-step transform, switched on and off by a :class:`SamplePairingSchedule`.

    ``schedule=None`` pairs at every training step; with a schedule, ``epoch`` must be passed (as
    ``fit`` does) and pairing happens only when ``schedule.active(epoch)``. Returns ``(x_paired, y)``.

    Example:
        >>> sp = SamplePairing(schedule=SamplePairingSchedule(start=2, stop=8, on=2, off=1))
        >>> x, y = sp(torch.randn(5, 4), torch.arange(5), generator=torch.Generator().manual_seed(0), epoch=2)
    """

    def __init__(self, *, schedule: SamplePairingSchedule | None = None, prob: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(prob=prob, generator=generator)
        if schedule is not None and not isinstance(schedule, SamplePairingSchedule):
            raise TypeError(f"schedule must be a SamplePairingSchedule or None, "
                            f"got {type(schedule).__name__}")
        self.schedule = schedule

    def active(self, epoch: int | None) -> bool:
        if self.schedule is None:
            return True
        if epoch is None:
            raise ValueError("epoch is required when SamplePairing has a schedule")
        return self.schedule.active(epoch)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
                epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self._gen(generator)
        if not self.active(epoch) or self._skip(gen):
            return x, y
        return sample_pairing(x, y, generator=gen)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, prob={self.prob}"


class ManifoldMixup:
    """Manifold mixup (Verma et al. 2019; beyond the article): mix hidden states at one named layer.

    Forward hooks are registered once on the named submodules (no monkey-patching of ``forward``).
    :meth:`batch_transform` draws a permutation, a λ and one layer uniformly among ``layers`` (``"input"``
    is allowed and mixes the input itself), and arms the hook of that layer for the *next* forward pass
    only: that layer's output is replaced by ``lam * h + (1 - lam) * h[perm]``; every other layer runs
    untouched. It returns ``(x, MixedTargets)``, so it drops into ``fit(batch_transform=...)`` with
    :func:`mixed_loss`. :meth:`remove` takes the hooks off. With ``torch.compile``, create it before the
    compiled model's first call: the compiled code does not see hooks added afterwards (a later
    ``batch_transform`` then raises, rather than train on mixed targets with unmixed inputs).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> mm = ManifoldMixup(net, ["0", "1"], alpha=2.0, generator=torch.Generator().manual_seed(0))
        >>> x, t = mm.batch_transform(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> loss = mixed_loss(net(x), t)
        >>> mm.remove()
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, alpha: float | str = 2.0, per: str = "batch",
                 num_classes: int | None = None, generator: torch.Generator | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty list of submodule names, got {layers!r}")
        modules = dict(model.named_modules())
        for name in layers:
            if name != "input" and name not in modules:
                known = ", ".join(repr(k) for k in list(modules)[1:12])
                raise ValueError(f"layers: model has no submodule {name!r} (some names: {known})")
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.alpha = _alpha(alpha)
        self.per = check_choice("per", per, ("batch", "sample"))
        self.num_classes = _check_num_classes(num_classes)
        self.generator = generator
        self.last_layer: str | None = None  # the layer mixed by the most recent forward pass
        self._armed: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._handles = [modules[name].register_forward_hook(self._make_hook(name))
                         for name in self.layers if name != "input"]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self._armed is None or self._armed[0] != name:
                return None
            _, perm, lam = self._armed
            self._armed = None
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                raise TypeError(f"manifold mixup at layer {name!r} needs a floating tensor output, "
                                f"got {type(output).__name__}")
            if output.shape[0] != perm.shape[0]:
                raise ValueError(f"layer {name!r} output has batch size {output.shape[0]}, "
                                 f"expected {perm.shape[0]}")
            self.last_layer = name
            return _mix(output, perm.to(output.device), lam.to(output.device), inplace=False)

        return hook

    def batch_transform(self, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
                        epoch: int | None = None) -> tuple[torch.Tensor, MixedTargets | torch.Tensor]:
        """Arm one layer for the next forward pass; return ``(x, MixedTargets)`` (``(x, y)`` in eval mode)."""
        _check_batch(x, y)
        _check_labels("y", y, self.num_classes)
        if not self.model.training:
            return x, y
        if self._armed is not None:         # the previous batch's mix never happened: its targets were wrong
            layer = self._armed[0]
            self._armed = None
            raise RuntimeError(
                f"manifold mixup: layer {layer!r}, armed by the previous batch_transform, was never run by a "
                "forward pass, so that batch trained on mixed targets with unmixed inputs. Run one forward "
                "pass of the model after each batch_transform; if the model is compiled, create the "
                "ManifoldMixup before the first call of torch.compile(model) (hooks added later are not seen).")
        gen = generator if generator is not None else self.generator
        gen_device = gen.device if gen is not None else torch.device("cpu")
        idx = int(torch.randint(0, len(self.layers), (), generator=gen, device=gen_device))
        layer = self.layers[idx]
        n = x.shape[0]
        perm = _permutation(n, gen, x.device)
        lam = sample_beta(self.alpha, 1 if self.per == "batch" else n, generator=gen, device=x.device)
        lam = lam[0] if self.per == "batch" else lam
        if layer == "input":
            self._armed = None
            self.last_layer = "input"
            x = _mix(x, perm, lam, inplace=False)
        else:
            self._armed = (layer, perm, lam)
        return x, MixedTargets(y, y[perm], lam)

    __call__ = batch_transform

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = None

    def __enter__(self) -> ManifoldMixup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
