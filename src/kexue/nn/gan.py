"""GAN generators and discriminators from DCGAN to SELF-MOD (Su Jianlin, kexue.fm/archives/6549).

The article reads the history of image-GAN *generators* as DCGAN -> ResNet -> self-modulated BN (SELF-MOD) ->
StyleGAN, the last being a SELF-MOD variant built on AdaIN. This module has each piece:

Normalisations, all called ``norm(x, cond)``:

* :class:`ConditionalBatchNorm2d` -- BN without affine, then ``gamma(y) * x_hat + beta(y)`` from class embeddings
  (``gamma`` starts at 1, ``beta`` at 0; de Vries et al. 2017, the projection cGAN, SAGAN, BigGAN).
* :class:`SelfModulatedBatchNorm2d` -- ``gamma(z) = 1 + MLP(z)``, ``beta(z) = MLP(z)``, one-hidden-layer ReLU MLPs
  (``hidden=0``: linear) whose output layers start at zero, so the layer *is* plain BN at initialisation
  (Chen et al., "On Self Modulation for Generative Adversarial Networks", arXiv 1810.01365). With
  ``num_classes`` it takes the article's cGAN form ``z' = z + E(c) + E'(c) * z``.
* :class:`AdaIN2d` -- per-sample instance statistics (no running statistics) and a style-dependent affine map
  (Huang and Belongie 2017, StyleGAN).

Normalisation follows PyTorch's BN: ``(x - mu) / sqrt(var + eps)``; the article writes ``sigma + eps``.

Generators, all ``G(z, y=None) -> images in [-1, 1]`` of shape ``[N, channels, image_size, image_size]`` for
``image_size`` a power of two from 16 to 128 (28 x 28 data is padded to 32 by the data pipeline):

* :class:`DCGANGenerator` -- dense -> 4 x 4, then stride-2 4 x 4 transposed convs with norm + ReLU, tanh out
  (``upsample="deconv"``), or nearest-neighbour upsampling + a stride-1 3 x 3 conv (``upsample="nearest"``).
* :class:`ResNetGenerator` -- SNGAN-style residual up-blocks (nearest upsample, 3 x 3 convs), with the
  article's damped residual ``x + alpha * f(x)`` as ``residual_scale``.
* :class:`StyleGenerator` -- the article's reading of StyleGAN: a learned constant input, a mapping MLP, and
  AdaIN after every layer of a DCGAN-shaped body (no noise inputs, no progressive growing).

Discriminators :class:`DCGANDiscriminator` (strided 4 x 4 convs, LeakyReLU 0.2) and :class:`ResNetDiscriminator`
(average-pool down-sampling), with spectral norm (``torch.nn.utils.parametrizations.spectral_norm``) and
projection conditioning (Miyato and Koyama 2018) as options. Weights are initialised with :mod:`kexue.init`:
``init="dcgan"`` (N(0, 0.02), the DCGAN paper) or ``"orthogonal"`` (BigGAN), or left at PyTorch's defaults
(``"default"``); every constructor takes ``generator=`` for a reproducible initialisation.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> G = DCGANGenerator(z_dim=16, image_size=32, channels=3, width=8, norm="selfmod", generator=g)
    >>> D = DCGANDiscriminator(image_size=32, channels=3, width=8, spectral_norm=True, generator=g)
    >>> x = G(torch.randn(4, 16, generator=g))
    >>> x.shape, bool(x.abs().max() <= 1), D(x).shape
    (torch.Size([4, 3, 32, 32]), True, torch.Size([4]))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_choice, check_tensor

__all__ = [
    "AdaIN2d", "ConditionalBatchNorm2d", "DCGANDiscriminator", "DCGANGenerator", "DISCRIMINATORS", "GENERATORS",
    "GAN_INITS", "GAN_NORMS", "ResNetDiscriminator", "ResNetGenerator", "SelfModulatedBatchNorm2d", "StyleGenerator",
    "UPSAMPLES", "build_discriminator", "build_generator", "count_parameters", "init_gan_weights",
]

GAN_NORMS = ("bn", "selfmod", "cbn", "none")
UPSAMPLES = ("deconv", "nearest")
GAN_INITS = ("dcgan", "orthogonal", "default")
_SIZES = (16, 32, 64, 128)


# ------------------------------------------------------------------------------------------------ checks

def _check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size not in _SIZES:
        raise ValueError(f"image_size must be a power of two from 16 to 128 ({', '.join(map(str, _SIZES))}), "
                         f"got {image_size}; pad 28 x 28 images to 32")
    return int(math.log2(image_size)) - 2  # number of 2x resamplings between 4 x 4 and image_size


def _check_labels(y: Any, n: int, num_classes: int, name: str = "y") -> torch.Tensor:
    check_tensor(name, y, floating=False, dim=1)
    if y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype torch.bool")
    if y.shape[0] != n:
        raise ValueError(f"{name} must hold one label per sample ({n}), got shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    return y


def _check_condition(y: Any, n: int, num_classes: int | None, who: str) -> None:
    """Labels ``y`` for a conditional model (``num_classes`` set), None for an unconditional one."""
    if num_classes is None:
        if y is not None:
            raise ValueError(f"y given, but this {who} is unconditional (num_classes=None)")
    elif y is None:
        raise ValueError(f"y (labels in [0, {num_classes})) is required: num_classes={num_classes}")
    else:
        _check_labels(y, n, num_classes)


def _check_x(x: Any, channels: int, name: str = "x") -> torch.Tensor:
    check_tensor(name, x, floating=True, dim=4)
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (shape [N, {channels}, H, W]), got {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------------ normalisations

class _ModulatedNorm(nn.Module):
    """Base of the conditional norms: knows how to put its modulation back to the identity."""

    def reset_modulation(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class ConditionalBatchNorm2d(_ModulatedNorm):
    """Conditional BN: ``BN(x)`` without affine, then ``gamma(y) * x_hat + beta(y)`` with per-class ``gamma``
    (embeddings starting at 1) and ``beta`` (starting at 0), so at initialisation it is plain BN for every class.

    ``forward(x, y)``: ``x`` ``[N, C, H, W]``, ``y`` integer labels ``[N]`` in ``[0, num_classes)``. Running
    statistics are kept as in :class:`torch.nn.BatchNorm2d` (used in eval mode).

    Example:
        >>> import torch
        >>> cbn = ConditionalBatchNorm2d(4, num_classes=3)
        >>> x = torch.randn(8, 4, 5, 5)
        >>> torch.allclose(cbn(x, torch.randint(0, 3, (8,))), torch.nn.BatchNorm2d(4)(x), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, num_classes: int, *, eps: float = 1e-5, momentum: float | None = 0.1
                 ) -> None:
        super().__init__()
        _check_int("num_features", num_features)
        _check_int("num_classes", num_classes)
        self.num_features, self.num_classes = num_features, num_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        self.reset_modulation()

    def reset_modulation(self) -> None:
        """``gamma = 1``, ``beta = 0`` for every class."""
        with torch.no_grad():
            self.gamma.weight.fill_(1.0)
            self.beta.weight.zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.num_features)
        _check_labels(y, x.shape[0], self.num_classes)
        h = self.bn(x)
        return h * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class SelfModulatedBatchNorm2d(_ModulatedNorm):
    """Self-modulated BN (SELF-MOD, arXiv 1810.01365): ``gamma(z) * BN(x) + beta(z)`` with
    ``gamma(z) = 1 + W2_g ReLU(W1_g z + b1_g) + b2_g`` and ``beta(z) = W2_b ReLU(W1_b z + b1_b) + b2_b``.

    Two separate MLPs with ``hidden`` units (32 as the official compare_gan code; ``hidden=0`` makes each a
    single linear map). Their output layers are zero-initialised, so the layer is exactly plain BN at
    initialisation (the ``1 +`` is Su's ``h * (gamma + 1) + beta``; compare_gan puts 1 in the output bias).

    With ``num_classes`` (the article's cGAN form) the MLPs read ``z' = z + E(c) + E'(c) * z`` with class
    embeddings ``E, E'`` (starting at 0, so ``z' = z`` at first); ``forward(x, z, y)`` then needs labels.

    Example:
        >>> import torch
        >>> sm = SelfModulatedBatchNorm2d(4, z_dim=8)
        >>> x, z = torch.randn(6, 4, 3, 3), torch.randn(6, 8)
        >>> torch.equal(sm(x, z), torch.nn.functional.batch_norm(x, None, None, training=True))
        True
    """

    def __init__(self, num_features: int, z_dim: int, hidden: int = 32, *, num_classes: int | None = None,
                 eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        _check_int("num_features", num_features)
        _check_int("z_dim", z_dim)
        _check_int("hidden", hidden, minimum=0)
        _check_int("num_classes", num_classes, allow_none=True)
        self.num_features, self.z_dim, self.hidden, self.num_classes = num_features, z_dim, hidden, num_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = _mlp(z_dim, hidden, num_features)
        self.beta = _mlp(z_dim, hidden, num_features)
        if num_classes is not None:
            self.embed = nn.Embedding(num_classes, z_dim)
            self.embed_scale = nn.Embedding(num_classes, z_dim)
        else:
            self.embed = self.embed_scale = None
        self.reset_modulation()

    def reset_modulation(self) -> None:
        """Zero the output layers (and the class embeddings): the layer becomes plain BN again."""
        with torch.no_grad():
            for head in (self.gamma, self.beta):
                head[-1].weight.zero_()
                head[-1].bias.zero_()
            if self.embed is not None:
                self.embed.weight.zero_()
                self.embed_scale.weight.zero_()

    def condition(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The MLPs' input: ``z``, or ``z + E(y) + E'(y) * z`` for the conditional form."""
        check_tensor("z", z, floating=True, dim=2)
        if z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [N, z_dim={self.z_dim}], got {tuple(z.shape)}")
        _check_condition(y, z.shape[0], self.num_classes, "SelfModulatedBatchNorm2d")
        return z if y is None else z + self.embed(y) + self.embed_scale(y) * z

    def forward(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_x(x, self.num_features)
        c = self.condition(z, y)
        if c.shape[0] != x.shape[0]:
            raise ValueError(f"z must have one row per sample of x ({x.shape[0]}), got {c.shape[0]}")
        h = self.bn(x)
        gamma = 1.0 + self.gamma(c)
        return h * gamma[:, :, None, None] + self.beta(c)[:, :, None, None]


class AdaIN2d(_ModulatedNorm):
    """Adaptive instance normalisation: ``gamma(s) * (x - mu_i) / sqrt(var_i + eps) + beta(s)`` with mean and
    (biased) variance per sample and channel, so a sample's output never depends on the rest of the batch and
    there are no running statistics. ``gamma(s) = 1 + A_g s``, ``beta(s) = A_b s`` are linear maps of the
    style vector ``s`` ``[N, style_dim]`` (their biases start at 0, i.e. gamma's at 1).

    Example:
        >>> import torch
        >>> ada = AdaIN2d(4, style_dim=8)
        >>> x, s = torch.randn(3, 4, 5, 5), torch.randn(3, 8)
        >>> torch.allclose(ada(x[:1], s[:1]), ada(x, s)[:1], atol=1e-6)
        True
    """

    def __init__(self, num_features: int, style_dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        _check_int("num_features", num_features)
        _check_int("style_dim", style_dim)
        self.num_features, self.style_dim, self.eps = num_features, style_dim, float(eps)
        self.gamma = nn.Linear(style_dim, num_features)
        self.beta = nn.Linear(style_dim, num_features)
        self.reset_modulation()

    def reset_modulation(self) -> None:
        """Zero the biases (gamma = 1 + A_g s, beta = A_b s); the weights keep their initialisation."""
        with torch.no_grad():
            self.gamma.bias.zero_()
            self.beta.bias.zero_()

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.num_features)
        check_tensor("style", style, floating=True, dim=2)
        if style.shape != (x.shape[0], self.style_dim):
            raise ValueError(f"style must have shape [N={x.shape[0]}, style_dim={self.style_dim}], "
                             f"got {tuple(style.shape)}")
        h = F.instance_norm(x, eps=self.eps)
        gamma = 1.0 + self.gamma(style)
        return h * gamma[:, :, None, None] + self.beta(style)[:, :, None, None]


def _make_norm(kind: str, channels: int, z_dim: int, num_classes: int | None, hidden: int) -> nn.Module | None:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "selfmod":
        return SelfModulatedBatchNorm2d(channels, z_dim, hidden, num_classes=num_classes)
    if kind == "cbn":
        return ConditionalBatchNorm2d(channels, num_classes)
    return None


def _apply_norm(norm: nn.Module | None, h: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if norm is None:
        return h
    if isinstance(norm, SelfModulatedBatchNorm2d):
        return norm(h, z, y)
    if isinstance(norm, ConditionalBatchNorm2d):
        return norm(h, y)
    return norm(h)


# ----------------------------------------------------------------------------------------------- init

def init_gan_weights(module: nn.Module, scheme: str = "dcgan", *, generator: torch.Generator | None = None
                     ) -> nn.Module:
    """Initialise every Linear, Conv2d, ConvTranspose2d and Embedding of ``module`` with :func:`kexue.init.initialize`
    (biases to 0), then put the conditional norms' modulation back to the identity.

    ``scheme``: ``"dcgan"`` -- N(0, 0.02) (DCGAN, Radford et al. 2015; Su's code); ``"orthogonal"`` -- gain-1
    orthogonal (BigGAN); ``"default"`` -- leave PyTorch's initialisation. BatchNorm weights are left at 1 and 0.
    Returns ``module``.

    Example:
        >>> import torch
        >>> G = DCGANGenerator(8, 16, 1, width=4, init="default")
        >>> _ = init_gan_weights(G, "dcgan", generator=torch.Generator().manual_seed(0))
        >>> round(float(G.fc.weight.detach().std()), 2)
        0.02
    """
    from .. import init as ki

    check_choice("scheme", scheme, GAN_INITS)
    if scheme != "default":
        if scheme == "dcgan":
            def fill(w: torch.Tensor, generator: torch.Generator | None = None) -> None:
                nn.init.normal_(w, 0.0, 0.02, generator=generator)
            fn: Any = fill
        else:
            fn = "orthogonal"
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
                ki.initialize(m, scheme=fn, nonlinearity="linear", generator=generator)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _ModulatedNorm):
                m.reset_modulation()
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters.

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- generators

class _Generator(nn.Module):
    """Shared input checks and bookkeeping of the generators."""

    z_dim: int
    num_classes: int | None
    image_size: int
    channels: int
    config: dict[str, Any]

    def _check_inputs(self, z: Any, y: Any) -> None:
        check_tensor("z", z, floating=True, dim=2)
        if z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [N, z_dim={self.z_dim}], got {tuple(z.shape)}")
        _check_condition(y, z.shape[0], self.num_classes, "generator")

    def _finish(self, init: str, generator: torch.Generator | None) -> None:
        init_gan_weights(self, init, generator=generator)


def _check_common(z_dim: Any, channels: Any, width: Any, norm: str, num_classes: Any, hidden: Any,
                  init: str) -> None:
    _check_int("z_dim", z_dim)
    _check_int("channels", channels)
    _check_int("width", width)
    _check_int("hidden", hidden, minimum=0)
    _check_int("num_classes", num_classes, allow_none=True)
    check_choice("norm", norm, GAN_NORMS)
    check_choice("init", init, GAN_INITS)
    if norm == "cbn" and num_classes is None:
        raise ValueError("norm='cbn' needs num_classes")
    if num_classes is not None and norm not in ("cbn", "selfmod"):
        raise ValueError(f"num_classes={num_classes} needs norm='cbn' or 'selfmod' (the labels enter through the "
                         f"norms), got norm={norm!r}")


def _up(kind: str, cin: int, cout: int, bias: bool) -> nn.Module:
    if kind == "deconv":
        return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=bias))


class DCGANGenerator(_Generator):
    """The article's DCGAN generator: ``z`` -> dense -> ``[C0, 4, 4]`` -> norm -> ReLU, then one 2x up-layer per
    doubling with norm + ReLU, the last up-layer to ``channels`` followed by tanh (no norm).

    Channels halve at every up-layer, from ``C0 = width * 2**(k - 1)`` at 4 x 4 (``k = log2(image_size) - 2``
    up-layers) down to ``width`` before the output layer; e.g. 32 x 32 with ``width=64``: 256 -> 128 -> 64 -> 3
    (as Su's reference code: ``image_size * 8`` channels at 4 x 4 for 128 px with ``width=64``).

    - ``upsample="deconv"``: 4 x 4 stride-2 transposed convs (DCGAN); ``"nearest"``: nearest-neighbour 2x
      upsampling and a stride-1 3 x 3 conv (no checkerboard pattern, the article's point).
    - ``norm``: ``"bn"``, ``"selfmod"`` (:class:`SelfModulatedBatchNorm2d` with ``hidden`` units, driven by z),
      ``"cbn"`` (:class:`ConditionalBatchNorm2d`, needs ``num_classes``) or ``"none"`` (convs get biases).
    - ``num_classes`` with ``norm="selfmod"``: SELF-MOD's cGAN form; with ``"cbn"``: class-conditional BN.

    Example:
        >>> import torch
        >>> G = DCGANGenerator(z_dim=8, image_size=16, channels=1, width=4, upsample="nearest")
        >>> G(torch.randn(2, 8)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, z_dim: int = 128, image_size: int = 32, channels: int = 3, width: int = 64, *,
                 upsample: str = "deconv", norm: str = "bn", num_classes: int | None = None, hidden: int = 32,
                 init: str = "dcgan", generator: torch.Generator | None = None) -> None:
        super().__init__()
        k = _check_image_size(image_size)
        _check_common(z_dim, channels, width, norm, num_classes, hidden, init)
        check_choice("upsample", upsample, UPSAMPLES)
        self.z_dim, self.num_classes, self.image_size, self.channels = z_dim, num_classes, image_size, channels
        self.config = {"name": "dcgan", "z_dim": z_dim, "image_size": image_size, "channels": channels,
                       "width": width, "upsample": upsample, "norm": norm, "num_classes": num_classes,
                       "hidden": hidden, "init": init}
        widths = [width * 2 ** (k - 1 - i) for i in range(k)]  # at 4x4, 8x8, ..., image_size/2
        bias = norm == "none"
        self.c0 = widths[0]
        self.fc = nn.Linear(z_dim, self.c0 * 16, bias=bias)
        self.norms = nn.ModuleList()
        self.ups = nn.ModuleList()
        norm0 = _make_norm(norm, self.c0, z_dim, num_classes, hidden)
        self.norms.append(norm0 if norm0 is not None else nn.Identity())
        for i in range(k):
            cout = widths[i + 1] if i + 1 < k else channels
            last = i + 1 == k
            self.ups.append(_up(upsample, widths[i], cout, bias or last))
            if not last:
                n = _make_norm(norm, cout, z_dim, num_classes, hidden)
                self.norms.append(n if n is not None else nn.Identity())
        self._finish(init, generator)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(z, y)
        h = self.fc(z).view(z.shape[0], self.c0, 4, 4)
        for i, up in enumerate(self.ups):
            norm = self.norms[i]
            h = F.relu(_apply_norm(None if isinstance(norm, nn.Identity) else norm, h, z, y))
            h = up(h)
        return torch.tanh(h)


class _GBlock(nn.Module):
    """Residual up-block: norm -> ReLU -> up -> conv3 -> norm -> ReLU -> conv3, plus up -> conv1 shortcut."""

    def __init__(self, cin: int, cout: int, norm: str, z_dim: int, num_classes: int | None, hidden: int,
                 residual_scale: float) -> None:
        super().__init__()
        bias = norm == "none"
        self.norm1 = _make_norm(norm, cin, z_dim, num_classes, hidden)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.norm2 = _make_norm(norm, cout, z_dim, num_classes, hidden)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = F.relu(_apply_norm(self.norm1, x, z, y))
        h = self.conv1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(_apply_norm(self.norm2, h, z, y)))
        s = self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))
        return s + self.residual_scale * h if self.residual_scale != 1.0 else s + h


class ResNetGenerator(_Generator):
    """ResNet generator (SNGAN/BigGAN layout, the article's list): dense -> ``[width, 4, 4]``, one residual
    up-block per doubling (nearest upsample, 3 x 3 convs, stride 1 everywhere, a 1 x 1 conv on the upsampled
    shortcut), then norm -> ReLU -> 3 x 3 conv -> tanh. Every block has ``width`` channels.

    ``residual_scale`` is the article's damping ``x + alpha * f(x)`` (e.g. 0.1); ``norm``, ``num_classes`` and
    ``hidden`` as in :class:`DCGANGenerator`. Orthogonal initialisation by default (BigGAN).

    Example:
        >>> import torch
        >>> G = ResNetGenerator(z_dim=8, image_size=16, channels=3, width=8, norm="selfmod", residual_scale=0.1)
        >>> G(torch.randn(2, 8)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, z_dim: int = 128, image_size: int = 32, channels: int = 3, width: int = 64, *,
                 norm: str = "bn", num_classes: int | None = None, hidden: int = 32, residual_scale: float = 1.0,
                 init: str = "orthogonal", generator: torch.Generator | None = None) -> None:
        super().__init__()
        k = _check_image_size(image_size)
        _check_common(z_dim, channels, width, norm, num_classes, hidden, init)
        if isinstance(residual_scale, bool) or not isinstance(residual_scale, (int, float)) \
                or not 0 < residual_scale <= 1:
            raise ValueError(f"residual_scale must be a number in (0, 1], got {residual_scale!r}")
        self.z_dim, self.num_classes, self.image_size, self.channels = z_dim, num_classes, image_size, channels
        self.config = {"name": "resnet", "z_dim": z_dim, "image_size": image_size, "channels": channels,
                       "width": width, "norm": norm, "num_classes": num_classes, "hidden": hidden,
                       "residual_scale": float(residual_scale), "init": init}
        self.width = width
        self.fc = nn.Linear(z_dim, width * 16)
        self.blocks = nn.ModuleList(_GBlock(width, width, norm, z_dim, num_classes, hidden, float(residual_scale))
                                    for _ in range(k))
        self.norm_out = _make_norm(norm, width, z_dim, num_classes, hidden)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self._finish(init, generator)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(z, y)
        h = self.fc(z).view(z.shape[0], self.width, 4, 4)
        for block in self.blocks:
            h = block(h, z, y)
        h = F.relu(_apply_norm(self.norm_out, h, z, y))
        return torch.tanh(self.conv_out(h))


class StyleGenerator(_Generator):
    """The article's reading of StyleGAN as a SELF-MOD variant: (1) the noise input at the top is replaced by a
    learned constant ``[C0, 4, 4]``; (2) every BN is replaced by :class:`AdaIN2d`; (3) the condition is
    ``w = mapping(z)``, an MLP of ``mapping_layers`` (Linear + LeakyReLU 0.2) layers, projected separately to each
    AdaIN's gamma and beta. The body is :class:`DCGANGenerator`'s (same channel schedule and ``upsample``).
    No per-pixel noise inputs and no progressive growing (the article sets PGGAN's training strategy aside).

    Example:
        >>> import torch
        >>> G = StyleGenerator(z_dim=8, image_size=16, channels=3, width=4, mapping_layers=2)
        >>> G(torch.randn(2, 8)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, z_dim: int = 128, image_size: int = 32, channels: int = 3, width: int = 64, *,
                 mapping_layers: int = 4, style_dim: int | None = None, upsample: str = "deconv",
                 init: str = "dcgan", generator: torch.Generator | None = None) -> None:
        super().__init__()
        k = _check_image_size(image_size)
        _check_common(z_dim, channels, width, "none", None, 0, init)
        _check_int("mapping_layers", mapping_layers, minimum=0)
        _check_int("style_dim", style_dim, allow_none=True)
        check_choice("upsample", upsample, UPSAMPLES)
        style_dim = z_dim if style_dim is None else style_dim
        if mapping_layers == 0 and style_dim != z_dim:
            raise ValueError(f"mapping_layers=0 needs style_dim == z_dim ({z_dim}), got {style_dim}")
        self.z_dim, self.num_classes, self.image_size, self.channels = z_dim, None, image_size, channels
        self.config = {"name": "style", "z_dim": z_dim, "image_size": image_size, "channels": channels,
                       "width": width, "mapping_layers": mapping_layers, "style_dim": style_dim,
                       "upsample": upsample, "init": init}
        widths = [width * 2 ** (k - 1 - i) for i in range(k)]
        self.c0 = widths[0]
        layers: list[nn.Module] = []
        for i in range(mapping_layers):
            layers += [nn.Linear(z_dim if i == 0 else style_dim, style_dim), nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*layers)
        self.const = nn.Parameter(torch.empty(1, self.c0, 4, 4))
        self.norms = nn.ModuleList([AdaIN2d(self.c0, style_dim)])
        self.ups = nn.ModuleList()
        for i in range(k):
            last = i + 1 == k
            cout = channels if last else widths[i + 1]
            self.ups.append(_up(upsample, widths[i], cout, last))
            if not last:
                self.norms.append(AdaIN2d(cout, style_dim))
        self._finish(init, generator)
        with torch.no_grad():
            self.const.normal_(0.0, 1.0, generator=generator)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(z, y)
        w = self.mapping(z)
        h = self.const.expand(z.shape[0], -1, -1, -1)
        for norm, up in zip(self.norms, self.ups):
            h = up(F.relu(norm(h, w)))
        return torch.tanh(h)


# --------------------------------------------------------------------------------------- discriminators

class _Discriminator(nn.Module):
    num_classes: int | None
    image_size: int
    channels: int
    config: dict[str, Any]

    def _setup_head(self, feat_dim: int, num_classes: int | None) -> None:
        self.linear = nn.Linear(feat_dim, 1)
        self.embed = nn.Embedding(num_classes, feat_dim) if num_classes is not None else None

    def _check_inputs(self, x: Any, y: Any) -> None:
        _check_x(x, self.channels)
        if x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"x must be {self.image_size} x {self.image_size} images, got {tuple(x.shape)}")
        _check_condition(y, x.shape[0], self.num_classes, "discriminator")

    def _head(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)  # projection discriminator
        return out

    def _finish(self, init: str, spectral_norm: bool, generator: torch.Generator | None) -> None:
        init_gan_weights(self, init, generator=generator)
        if spectral_norm:
            from torch.nn.utils.parametrizations import spectral_norm as sn

            # spectral_norm draws its power-iteration vectors from the global RNG: seed it from `generator`
            # (in a forked RNG state) so the initialisation is reproducible and the caller's RNG untouched
            seed = int(torch.randint(0, 2 ** 62, (), generator=generator)) if generator is not None else None
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                for m in list(self.modules()):
                    if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                        sn(m)


class DCGANDiscriminator(_Discriminator):
    """DCGAN discriminator: 4 x 4 stride-2 convs with LeakyReLU(0.2) down to 4 x 4 (no norm after the first
    conv, BN after the others when ``norm="bn"``), then flatten and one linear unit. Channels double at each
    conv from ``width``. Returns logits ``[N]``.

    ``spectral_norm=True`` wraps every conv and linear layer in
    :func:`torch.nn.utils.parametrizations.spectral_norm` (SNGAN); ``norm`` defaults to ``"none"`` then and to
    ``"bn"`` otherwise. ``num_classes`` adds the projection term ``<embed(y), h>`` (Miyato and Koyama 2018).

    Example:
        >>> import torch
        >>> D = DCGANDiscriminator(image_size=16, channels=1, width=4, num_classes=10)
        >>> D(torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 9])).shape
        torch.Size([3])
    """

    def __init__(self, image_size: int = 32, channels: int = 3, width: int = 64, *, spectral_norm: bool = False,
                 norm: str | None = None, num_classes: int | None = None, init: str = "dcgan",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        k = _check_image_size(image_size)
        _check_int("channels", channels)
        _check_int("width", width)
        _check_int("num_classes", num_classes, allow_none=True)
        check_choice("init", init, GAN_INITS)
        norm = ("none" if spectral_norm else "bn") if norm is None else norm
        check_choice("norm", norm, ("bn", "none"))
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.config = {"name": "dcgan", "image_size": image_size, "channels": channels, "width": width,
                       "spectral_norm": bool(spectral_norm), "norm": norm, "num_classes": num_classes, "init": init}
        layers: list[nn.Module] = []
        cin = channels
        for i in range(k):
            cout = width * 2 ** i
            use_bn = norm == "bn" and i > 0
            layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2))
            cin = cout
        self.body = nn.Sequential(*layers)
        self._setup_head(cin * 16, num_classes)
        self._finish(init, spectral_norm, generator)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, y)
        return self._head(self.body(x).flatten(1), y)


class _DBlock(nn.Module):
    """Residual down-block (SNGAN): [ReLU] -> conv3 -> ReLU -> conv3 -> [avgpool], shortcut conv1 (+ avgpool)."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if (down or cin != cout) else None
        self.down, self.first = down, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # optimised first block: pool, then project
            s = self.shortcut(F.avg_pool2d(s, 2) if self.down else s)
        elif self.shortcut is not None:
            s = self.shortcut(s)
            if self.down:
                s = F.avg_pool2d(s, 2)
        return h + s


class ResNetDiscriminator(_Discriminator):
    """ResNet discriminator (SNGAN layout): an optimised first block, residual blocks with 2 x 2 average-pool
    down-sampling down to 4 x 4, one more block at 4 x 4, ReLU, global sum pooling and a linear unit (plus the
    projection term with ``num_classes``). Every block has ``width`` channels. Returns logits ``[N]``.

    Example:
        >>> import torch
        >>> D = ResNetDiscriminator(image_size=16, channels=3, width=8, spectral_norm=True)
        >>> D(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2])
    """

    def __init__(self, image_size: int = 32, channels: int = 3, width: int = 64, *, spectral_norm: bool = False,
                 num_classes: int | None = None, init: str = "orthogonal", generator: torch.Generator | None = None
                 ) -> None:
        super().__init__()
        k = _check_image_size(image_size)
        _check_int("channels", channels)
        _check_int("width", width)
        _check_int("num_classes", num_classes, allow_none=True)
        check_choice("init", init, GAN_INITS)
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.config = {"name": "resnet", "image_size": image_size, "channels": channels, "width": width,
                       "spectral_norm": bool(spectral_norm), "num_classes": num_classes, "init": init}
        blocks = [_DBlock(channels, width, True, True)]
        blocks += [_DBlock(width, width, True, False) for _ in range(k - 1)]
        blocks.append(_DBlock(width, width, False, False))
        self.blocks = nn.Sequential(*blocks)
        self._setup_head(width, num_classes)
        self._finish(init, spectral_norm, generator)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, y)
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self._head(h, y)


# ------------------------------------------------------------------------------------------- registries

GENERATORS: dict[str, type[_Generator]] = {"dcgan": DCGANGenerator, "resnet": ResNetGenerator,
                                           "style": StyleGenerator}
DISCRIMINATORS: dict[str, type[_Discriminator]] = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator}


def build_generator(config: dict[str, Any], *, generator: torch.Generator | None = None) -> nn.Module:
    """A generator from its ``config`` dict (``{"name": "dcgan" | "resnet" | "style", **kwargs}``, as stored in
    ``G.config`` and in GAN checkpoints).

    Example:
        >>> G = DCGANGenerator(8, 16, 1, width=4)
        >>> type(build_generator(G.config)).__name__
        'DCGANGenerator'
    """
    return _build(config, GENERATORS, "generator", generator)


def build_discriminator(config: dict[str, Any], *, generator: torch.Generator | None = None) -> nn.Module:
    """A discriminator from its ``config`` dict (``{"name": "dcgan" | "resnet", **kwargs}``).

    Example:
        >>> D = ResNetDiscriminator(16, 1, width=4)
        >>> type(build_discriminator(D.config)).__name__
        'ResNetDiscriminator'
    """
    return _build(config, DISCRIMINATORS, "discriminator", generator)


def _build(config: Any, registry: dict[str, type], what: str, generator: torch.Generator | None) -> nn.Module:
    if not isinstance(config, dict) or "name" not in config:
        raise TypeError(f"config must be a dict with a 'name' key, got {config!r}")
    kwargs = dict(config)
    name = kwargs.pop("name")
    check_choice(f"{what} name", name, tuple(registry))
    return registry[name](**kwargs, generator=generator)
