"""Initialisation schemes and diagnostics, read from the geometric view (Su Jianlin, kexue.fm/archives/7180).

The article's argument: in high dimension random vectors are nearly orthogonal, so a matrix with i.i.d.
entries of mean 0 and variance 1/m (m = output dimension, "fan_out") has W^T W ~ I, i.e. it is nearly
orthogonal and keeps ||W x|| ~ ||x||. ReLU halves the squared norm, hence the gain sqrt(2) (He).

In-place functions in the style of :mod:`torch.nn.init`; every one takes ``generator=``:

* :func:`geometric_` -- variance ``gain^2 / fan_out`` (the article's rule).
* :func:`lecun_normal_`, :func:`xavier_normal_`, :func:`xavier_uniform_`, :func:`he_normal_`.
* :func:`variance_scaling_` -- the TF/JAX family, with the truncated normal's std corrected by 0.8796...
* :func:`trunc_normal_` -- truncated normal whose bounds are given in units of std.
* :func:`orthogonal_` -- QR of a Gaussian, computed in fp32 so bf16/fp16 tensors work.
* :func:`initialize` -- apply one scheme to every Linear / Conv / Embedding of a model, biases to zero.

Fans follow PyTorch's convention: for a weight of shape ``(out, in, *kernel)``, ``fan_in = in * prod(kernel)``
and ``fan_out = out * prod(kernel)``. Diagnostics: :func:`orthogonality_error` and
:func:`signal_propagation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._checks import check_choice, check_positive, check_tensor, compute_dtype

__all__ = [
    "ACTIVATIONS",
    "SCHEMES",
    "TRUNC_STD_CORRECTION",
    "calculate_fans",
    "gain",
    "geometric_",
    "he_normal_",
    "initialize",
    "lecun_normal_",
    "orthogonal_",
    "orthogonality_error",
    "signal_propagation",
    "trunc_normal_",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_uniform_",
]

#: std of a standard normal truncated to [-2, 2]; dividing by it restores the intended std (TF/JAX value).
TRUNC_STD_CORRECTION = 0.87962566103423978
MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")
SCHEMES = ("geometric", "lecun", "xavier", "xavier_uniform", "he", "orthogonal")
ACTIVATIONS = ("linear", "tanh", "relu", "leaky_relu", "sigmoid")


def calculate_fans(tensor: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of shape ``(out, in, *kernel)``; conv fans include the kernel area.

    Example:
        >>> calculate_fans(torch.empty(64, 3, 5, 5))
        (75, 1600)
    """
    check_tensor("tensor", tensor, min_dim=2)
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def gain(nonlinearity: str, *, negative_slope: float = 0.01) -> float:
    """The norm-keeping gain of an activation, by the article's argument.

    ``linear``/``sigmoid``: 1; ``tanh``: 1 (the article: tanh(x) ~ x near 0; note torch's
    ``calculate_gain("tanh")`` is 5/3); ``relu``: sqrt(2) (ReLU zeroes half the coordinates);
    ``leaky_relu``: sqrt(2 / (1 + negative_slope^2)).

    Example:
        >>> round(gain("relu"), 4)
        1.4142
    """
    check_choice("nonlinearity", nonlinearity, ACTIVATIONS)
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + float(negative_slope) ** 2))
    return 1.0


def _check_weight(tensor: object) -> torch.Tensor:
    t = check_tensor("tensor", tensor, floating=True)
    if t.dim() < 2:
        raise ValueError(f"tensor must have at least 2 dimensions (out, in, *kernel) for a fan-based init, "
                         f"got shape {tuple(t.shape)}")
    return t


def _fan(tensor: torch.Tensor, mode: str) -> float:
    fan_in, fan_out = calculate_fans(tensor)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    if fan <= 0:
        raise ValueError(f"tensor has a zero fan ({mode}) for shape {tuple(tensor.shape)}")
    return float(fan)


def _sample_into(tensor: torch.Tensor, fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Run ``fill`` on an fp32 (or the tensor's own fp32/fp64) buffer and copy it into ``tensor``."""
    with torch.no_grad():
        if tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous():
            fill(tensor)
        else:
            buf = torch.empty(tensor.shape, dtype=compute_dtype(tensor.dtype), device=tensor.device)
            fill(buf)
            tensor.copy_(buf)
    return tensor


_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _ndtri_log(log_p: torch.Tensor) -> torch.Tensor:
    """x with log Phi(x) = ``log_p`` (float64, ``log_p <= log 0.7`` or so), accurate far into the lower tail.

    Starts from ``ndtri(exp(log_p))`` where ``exp`` does not underflow, or from the asymptote
    ``log Phi(x) ~ -x^2/2 - log(-x) - log sqrt(2 pi)`` where it does, then takes Newton steps on
    ``log_ndtr(x) - log_p`` (slope ``phi(x) / Phi(x)``), which fixes the last digits of either start.
    """
    log_p = log_p.clamp_min(-1e6)  # only u = 0 with an infinite bound gets here (x ~ -1414 instead of -inf)
    tiny = log_p < -700.0
    s2 = -2.0 * log_p.clamp(max=-1.0)
    asym = -torch.sqrt((s2 - torch.log(s2) - math.log(2.0 * math.pi)).clamp_min(1.0))
    x = torch.where(tiny, asym, torch.special.ndtri(torch.exp(log_p.clamp_min(-700.0))))
    for _ in range(4):
        log_cdf = torch.special.log_ndtr(x)
        slope = torch.exp(-0.5 * x * x - _LOG_SQRT_2PI - log_cdf)
        x = x - (log_cdf - log_p) / slope
    return x


def _std_trunc_normal(shape: torch.Size, a: float, b: float, dtype: torch.dtype, device: torch.device,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal truncated to [a, b].

    Rejection (redraw the rejects) when the kept mass is >= 0.2; otherwise the inverse CDF, done so that it
    stays exact in the far tails: the interval is mirrored to the side of 0 where ``Phi`` is small (so
    ``[8, 9]`` is sampled as ``-[-9, -8]``), ``Phi`` is taken in log space (``log_ndtr``), and the inverse is
    :func:`_ndtri_log`. ``0.5 (1 + erf(x / sqrt 2))`` rounds to 1 beyond about 8 std, which made every sample
    of ``[10, 11]`` equal 11 before.
    """
    n = math.prod(shape)
    mass = 0.5 * (math.erf(b / math.sqrt(2.0)) - math.erf(a / math.sqrt(2.0)))  # exact enough above 0.2
    if mass >= 0.2:
        # draw a few percent more than the expected need, keep the accepted ones, top up if short
        kept: list[torch.Tensor] = []
        have = 0
        while have < n:
            want = n - have
            draw = int(want / mass * 1.05) + 16
            z = torch.randn(draw, dtype=dtype, device=device, generator=generator)
            z = z[(z >= a) & (z <= b)][:want]
            kept.append(z)
            have += z.numel()
        return torch.cat(kept).reshape(shape)
    flip = a + b > 0  # sample the mirror image [-b, -a], which lies mostly below 0, and negate
    lo, hi = (-b, -a) if flip else (a, b)
    f64 = dict(dtype=torch.float64, device=device)
    log_lo = torch.special.log_ndtr(torch.tensor(lo, **f64))
    log_hi = torch.special.log_ndtr(torch.tensor(hi, **f64))
    # Phi(x) = Phi(hi) * (r + u (1 - r)) with r = Phi(lo) / Phi(hi), for u ~ U[0, 1); all in log space
    one_minus_r = -torch.expm1(log_lo - log_hi)
    u = torch.rand(n, generator=generator, **f64)
    x = _ndtri_log(log_hi + torch.log1p(-(1.0 - u) * one_minus_r))
    x = x.clamp_(lo, hi)
    if flip:
        x = x.neg_()
    return x.to(dtype).reshape(shape)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def trunc_normal_(tensor: torch.Tensor, *, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill with N(mean, std^2) truncated to ``[mean + a*std, mean + b*std]`` (bounds in units of std).

    Unlike ``torch.nn.init.trunc_normal_``, whose ``a``/``b`` are absolute, the default here truncates at
    +-2 std whatever ``std`` is. The std of the result is ``std`` times the truncated-normal factor (0.8796
    for +-2); :func:`variance_scaling_` corrects for it. ``a = -inf`` or ``b = inf`` gives a one-sided
    truncation. Bounds far in a tail (``a=10, b=11``) and very narrow windows are sampled exactly (log-space
    inverse CDF, see :func:`_std_trunc_normal`), matching ``scipy.stats.truncnorm``.

    Example:
        >>> w = trunc_normal_(torch.empty(1000), std=0.02, generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= 0.04)
        True
        >>> w = trunc_normal_(torch.empty(1000), a=10.0, b=11.0, generator=torch.Generator().manual_seed(0))
        >>> round(float(w.mean()), 2)  # scipy.stats.truncnorm(10, 11).mean() = 10.098
        10.1
    """
    check_tensor("tensor", tensor, floating=True)
    mean = _check_real("mean", mean)
    check_positive("std", std)
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not a < b:
        raise ValueError(f"a must be < b (bounds in units of std), got a={a}, b={b}")
    a, b = float(a), float(b)

    def fill(t: torch.Tensor) -> None:
        t.copy_(_std_trunc_normal(t.shape, a, b, t.dtype, t.device, generator).mul_(std).add_(mean))

    return _sample_into(tensor, fill)


def variance_scaling_(tensor: torch.Tensor, *, scale: float = 1.0, mode: str = "fan_in",
                      distribution: str = "normal", generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill so that Var = ``scale / fan`` with ``fan`` per ``mode`` (``fan_in``, ``fan_out`` or ``fan_avg``).

    ``distribution``: ``"normal"`` (std sqrt(scale/fan)); ``"truncated_normal"`` (truncated at +-2 std, the
    std divided by 0.87962566103423978 so the variance is still scale/fan, as in TF/JAX); ``"uniform"``
    (U[-sqrt(3 scale/fan), +sqrt(3 scale/fan)]).

    Example:
        >>> w = variance_scaling_(torch.empty(256, 512), scale=2.0, mode="fan_out", distribution="truncated_normal",
        ...                       generator=torch.Generator().manual_seed(0))
        >>> round(float(w.var() * 256), 1)
        2.0
    """
    _check_weight(tensor)
    check_positive("scale", scale)
    check_choice("mode", mode, MODES)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if tensor.numel() == 0:
        return tensor
    var = scale / _fan(tensor, mode)
    if distribution == "normal":
        std = math.sqrt(var)
        return _sample_into(tensor, lambda t: t.normal_(0.0, std, generator=generator))
    if distribution == "truncated_normal":
        return trunc_normal_(tensor, std=math.sqrt(var) / TRUNC_STD_CORRECTION, a=-2.0, b=2.0, generator=generator)
    bound = math.sqrt(3.0 * var)
    return _sample_into(tensor, lambda t: t.uniform_(-bound, bound, generator=generator))


def geometric_(tensor: torch.Tensor, *, gain: float = 1.0, distribution: str = "normal",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The article's rule: i.i.d. entries with mean 0 and variance ``gain^2 / fan_out`` (kexue.fm/archives/7180).

    With variance 1/m for an m x n weight (m outputs), W^T W ~ I when m >= n, so ||W x|| ~ ||x||. Use
    ``gain=sqrt(2)`` before a ReLU. ``distribution`` is ``"normal"``, ``"truncated_normal"`` or ``"uniform"``
    (same variance).

    Example:
        >>> w = geometric_(torch.empty(512, 128), generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(128, generator=torch.Generator().manual_seed(1))
        >>> round(float((w @ x).norm() / x.norm()), 1)
        1.0
    """
    check_positive("gain", gain)
    return variance_scaling_(tensor, scale=gain * gain, mode="fan_out", distribution=distribution,
                             generator=generator)


def lecun_normal_(tensor: torch.Tensor, *, distribution: str = "truncated_normal",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun: variance ``1 / fan_in`` (truncated normal by default, corrected, as in JAX/Flax).

    Example:
        >>> w = lecun_normal_(torch.empty(300, 400), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.var() * 400), 1)
        1.0
    """
    return variance_scaling_(tensor, scale=1.0, mode="fan_in", distribution=distribution, generator=generator)


def xavier_normal_(tensor: torch.Tensor, *, gain: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Xavier/Glorot normal: variance ``gain^2 * 2 / (fan_in + fan_out)``.

    Example:
        >>> w = xavier_normal_(torch.empty(300, 100), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.var() * 200), 1)
        1.0
    """
    check_positive("gain", gain)
    return variance_scaling_(tensor, scale=gain * gain, mode="fan_avg", distribution="normal", generator=generator)


def xavier_uniform_(tensor: torch.Tensor, *, gain: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Xavier/Glorot uniform: U[-b, b] with ``b = gain * sqrt(6 / (fan_in + fan_out))``.

    Example:
        >>> w = xavier_uniform_(torch.empty(300, 100), generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= (6 / 400) ** 0.5)
        True
    """
    check_positive("gain", gain)
    return variance_scaling_(tensor, scale=gain * gain, mode="fan_avg", distribution="uniform",
                             generator=generator)


def he_normal_(tensor: torch.Tensor, *, mode: str = "fan_in", nonlinearity: str = "relu",
               negative_slope: float = 0.01, generator: torch.Generator | None = None) -> torch.Tensor:
    """He/Kaiming normal: variance ``gain(nonlinearity)^2 / fan`` (2/fan for ReLU); ``mode`` may be
    ``"fan_in"`` (He's choice, keeps forward norms for square layers), ``"fan_out"`` (the article's forward
    rule for rectangular layers, = :func:`geometric_` with gain sqrt(2)) or ``"fan_avg"``.

    Example:
        >>> w = he_normal_(torch.empty(256, 512), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.var() * 512), 1)
        2.0
    """
    g = gain(nonlinearity, negative_slope=negative_slope)
    return variance_scaling_(tensor, scale=g * g, mode=mode, distribution="normal", generator=generator)


def orthogonal_(tensor: torch.Tensor, *, gain: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill with a (semi-)orthogonal matrix times ``gain``: QR of a Gaussian with the sign fix (Haar).

    The weight is viewed as ``(shape[0], prod(shape[1:]))``. The Gaussian and the QR are computed in fp32 (or
    fp64 for fp64 tensors), so fp16/bf16 tensors work; the result is rounded once into the tensor's dtype.
    This is the exact form of the "approximately orthogonal" matrix the article's argument is about.

    Example:
        >>> w = orthogonal_(torch.empty(64, 64, dtype=torch.bfloat16), generator=torch.Generator().manual_seed(0))
        >>> w.dtype, float(orthogonality_error(w)) < 1e-4
        (torch.bfloat16, True)
    """
    _check_weight(tensor)
    check_positive("gain", gain)
    if tensor.numel() == 0:
        return tensor
    rows, cols = tensor.shape[0], tensor.numel() // tensor.shape[0]
    dtype = compute_dtype(tensor.dtype)
    with torch.no_grad():
        flat = torch.randn(max(rows, cols), min(rows, cols), dtype=dtype, device=tensor.device,
                           generator=generator)
        q, r = torch.linalg.qr(flat)
        d = torch.diagonal(r)
        q = q * torch.where(d < 0, -1.0, 1.0).to(dtype)  # sign fix: makes Q Haar-distributed
        if rows < cols:
            q = q.T
        tensor.copy_((gain * q).reshape(tensor.shape))
    return tensor


def orthogonality_error(weight: torch.Tensor) -> torch.Tensor:
    """Mean squared entry of ``W^T W - I`` for ``W`` of shape ``(..., m, n)`` (batched), computed in >= fp32.

    For i.i.d. N(0, 1/n) entries of an n x n matrix this is about 1/n (off-diagonal entries of W^T W have
    variance 1/n, diagonal ones 2/n).

    Example:
        >>> w = torch.randn(400, 400, generator=torch.Generator().manual_seed(0)) / 20
        >>> round(float(orthogonality_error(w)) * 400, 1)
        1.0
    """
    w = check_tensor("weight", weight, floating=True, min_dim=2)
    w = w.to(compute_dtype(w.dtype))
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return (w.transpose(-1, -2) @ w - eye).square().mean(dim=(-2, -1))


def _init_weight(weight: torch.Tensor, scheme: str | Callable, nonlinearity: str,
                 generator: torch.Generator | None) -> None:
    if callable(scheme):
        scheme(weight, generator=generator)
    elif scheme == "geometric":
        geometric_(weight, gain=gain(nonlinearity), generator=generator)
    elif scheme == "lecun":
        lecun_normal_(weight, generator=generator)
    elif scheme == "xavier":
        xavier_normal_(weight, gain=gain(nonlinearity), generator=generator)
    elif scheme == "xavier_uniform":
        xavier_uniform_(weight, gain=gain(nonlinearity), generator=generator)
    elif scheme == "he":
        he_normal_(weight, mode="fan_in",
                   nonlinearity="relu" if nonlinearity in ("linear", "tanh", "sigmoid") else nonlinearity,
                   generator=generator)
    else:  # orthogonal
        orthogonal_(weight, gain=gain(nonlinearity), generator=generator)


def _check_scheme(scheme: object) -> None:
    if not callable(scheme):
        check_choice("scheme", scheme, SCHEMES)


def initialize(module: nn.Module, *, scheme: str | Callable = "geometric", nonlinearity: str = "relu",
               generator: torch.Generator | None = None) -> nn.Module:
    """Initialise every Linear, Conv*d, ConvTranspose*d and Embedding of ``module`` in place; biases to 0.

    ``scheme`` is one of :data:`SCHEMES` -- ``"geometric"`` (variance gain^2/fan_out, the article's rule,
    kexue.fm/archives/7180), ``"lecun"`` (1/fan_in), ``"xavier"`` / ``"xavier_uniform"``
    (gain^2 * 2/(fan_in+fan_out)), ``"he"`` (2/fan_in; always the ReLU gain, or leaky_relu's) or
    ``"orthogonal"`` (gain * QR) -- or a callable ``f(weight, generator=...)``. ``nonlinearity`` picks the
    gain (:func:`gain`). Transposed convolutions use their true fans (their weight stores ``(in, out, ...)``)
    and an Embedding counts as the linear map from one-hot rows (fan_in = num_embeddings,
    fan_out = embedding_dim). Norm layers are left alone. Returns ``module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = initialize(model, scheme="geometric", nonlinearity="relu", generator=torch.Generator().manual_seed(0))
        >>> int(torch.count_nonzero(model[0].bias))
        0
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_scheme(scheme)
    check_choice("nonlinearity", nonlinearity, ACTIVATIONS)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear,) + conv):
                _init_weight(m.weight, scheme, nonlinearity, generator)
            elif isinstance(m, convt):
                _init_weight(m.weight.transpose(0, 1), scheme, nonlinearity, generator)
            elif isinstance(m, nn.Embedding):
                _init_weight(m.weight.t(), scheme, nonlinearity, generator)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            else:
                continue
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
    return module


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    check_choice("activation", name, ACTIVATIONS)
    return {"linear": lambda x: x, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
            "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.01)}[name]


def signal_propagation(*, scheme: str | Callable = "geometric", activation: str = "relu", depth: int = 50,
                       width: int | Sequence[int] = 256, batch: int = 64, dtype: torch.dtype = torch.float32,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Activation-norm ratio through a deep bias-free MLP: ``h_l = act(W_l h_{l-1})``, ``h_0 = x ~ N(0, I)``.

    Returns a float64 tensor of ``depth + 1`` ratios ``rms_l / rms_0`` (root mean square of ``||h_l||`` over
    the batch, relative to the input), so index 0 is 1. For linear/ReLU (positively homogeneous) the
    activations are rescaled every layer and the scale tracked in log space, so an exploding or vanishing
    network gives its true ratio (up to e^700) instead of inf/NaN. ``scheme`` is as in :func:`initialize`
    (the gain follows ``activation``) or a callable ``f(weight, generator=...)``. ``width`` is one width for
    every layer or a sequence of ``depth + 1`` widths (input first). A ratio in [0.5, 2] means norms are kept.

    Example:
        >>> r = signal_propagation(scheme="he", activation="relu", depth=20, width=128,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> r.shape, bool(0.5 < r[-1] < 2)
        (torch.Size([21]), True)
    """
    _check_scheme(scheme)
    act = _activation(activation)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    widths = [width] * (depth + 1) if isinstance(width, int) else list(width)
    if len(widths) != depth + 1 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"width must be a positive int or {depth + 1} positive ints, got {width!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    homogeneous = activation in ("linear", "relu", "leaky_relu")
    h = torch.randn(batch, widths[0], dtype=dtype, generator=generator)
    rms0 = h.square().sum(-1).mean().sqrt().item()
    # for positively homogeneous activations h is rescaled back to the input's RMS every layer and the scale is
    # tracked in log space, so no overflow; tanh/sigmoid see the true scale (their behaviour depends on it)
    log_scale = 0.0
    out = [1.0]
    for layer in range(depth):
        w = torch.empty(widths[layer + 1], widths[layer], dtype=dtype)
        _init_weight(w, scheme, activation, generator)
        h = act(h @ w.T)
        ratio = h.square().sum(-1).mean().sqrt().item() / rms0
        if homogeneous and ratio > 0 and math.isfinite(ratio):
            log_scale += math.log(ratio)
            h = h / ratio
            out.append(math.exp(min(log_scale, 700.0)))
        else:
            out.append(ratio)
    return torch.tensor(out, dtype=torch.float64)
