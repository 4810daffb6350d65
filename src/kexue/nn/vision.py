"""Small image classifiers and embedders for CPU-sized experiments.

Two families, both returning class logits by default, or an embedding for metric learning when
``num_classes=None``:

- :class:`SmallCNN` — five 3x3 conv layers with batch norm in three named blocks, then a 3x3 adaptive
  average pool (``pool=1`` for global average pooling).
  Sized for 28x28 grey images (MNIST, Fashion-MNIST, AT&T faces resized), works for any input size.
- :func:`resnet18` — the CIFAR-style ResNet-18 (3x3 stem, no max-pool, four stages of two basic
  blocks), with a ``width`` knob: ``width=64`` is the standard 11M-parameter network, the default
  ``width=16`` (0.7M parameters) trains in minutes on a CPU.

Every stage is a named child module (``block1``/``block2``/``block3`` for the CNN, ``stem``/``layer1`` ..
``layer4`` for the ResNet) and ``model.mixable_layers`` lists them, so forward hooks (e.g. manifold
mixup) can target a layer by name: ``model.get_submodule("layer2").register_forward_hook(...)``.
``model.features(x)`` returns the penultimate representation (the embedding when one is configured).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from kexue._checks import check_tensor

__all__ = ["SmallCNN", "ResNet", "BasicBlock", "resnet18"]


def _check_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _Head(nn.Module, ABC):
    """Shared tail: optional linear embedding, then optional classifier."""

    def _build_head(self, feature_dim: int, num_classes: int | None, embedding_dim: int | None) -> None:
        _check_int("num_classes", num_classes, allow_none=True)
        _check_int("embedding_dim", embedding_dim, allow_none=True)
        self.num_classes = num_classes
        self.embed = nn.Linear(feature_dim, embedding_dim) if embedding_dim is not None else None
        self.feature_dim = embedding_dim if embedding_dim is not None else feature_dim
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes is not None else None

    @abstractmethod
    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional body: images -> flat features (each network defines it)."""

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor("x", x, floating=True, dim=4)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (shape [N, {self.in_channels}, H, W]), "
                             f"got shape {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation ``[N, feature_dim]`` (the embedding when ``embedding_dim`` is set)."""
        self._check_input(x)
        h = self._trunk(x)
        return self.embed(h) if self.embed is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]``, or the embedding ``[N, feature_dim]`` when ``num_classes`` is None."""
        h = self.features(x)
        return self.fc(h) if self.fc is not None else h


class SmallCNN(_Head):
    """A small VGG-style CNN: ``block1`` (2 convs, max-pool), ``block2`` (2 convs, max-pool), ``block3``
    (1 conv, adaptive average pool to ``pool x pool``, flatten), then an optional ``embed`` linear layer
    and the ``fc`` classifier. Any input size works.

    ``width`` sets the channel count (width, 2·width, 4·width); the penultimate features have
    4·width·pool² dimensions, or ``embedding_dim`` when given. With ``num_classes=None`` the network is an
    embedder. ``pool=3`` keeps a coarse spatial layout; on 2,000 Fashion-MNIST images (width 16, 3 epochs,
    SGD lr 0.05) it reached train loss 0.48 / test accuracy 0.79 where global average pooling (``pool=1``)
    reached 0.72 / 0.74.

    Example:
        >>> import torch
        >>> net = SmallCNN(in_channels=1, num_classes=10, width=8)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> SmallCNN(num_classes=None, embedding_dim=16, width=8)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 16])
        >>> SmallCNN(num_classes=None, width=8, pool=1).features(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 32])
    """

    mixable_layers = ("block1", "block2", "block3")

    def __init__(self, in_channels: int = 1, num_classes: int | None = 10, width: int = 32,
                 embedding_dim: int | None = None, pool: int = 3) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("width", width)
        _check_int("pool", pool)
        self.in_channels = in_channels
        w = width
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn_relu(2 * w, 4 * w), nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self._build_head(4 * w * pool * pool, num_classes, embedding_dim)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(x)))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(_Head):
    """CIFAR-style ResNet: 3x3 ``stem`` (no max-pool), ``layer1`` .. ``layer4`` of basic blocks at
    widths (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global average pool, optional ``embed``, ``fc``.

    Example:
        >>> import torch
        >>> ResNet((1, 1, 1, 1), in_channels=3, num_classes=10, width=8)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    mixable_layers = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3, num_classes: int | None = 10,
                 width: int = 64, embedding_dim: int | None = None) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("width", width)
        if len(blocks) != 4 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks must be 4 positive ints, got {blocks!r}")
        self.in_channels = in_channels
        w = width
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, w))
        widths = (w, 2 * w, 4 * w, 8 * w)
        cin = w
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = cout
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self._build_head(8 * w, num_classes, embedding_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.pool(h)


def resnet18(in_channels: int = 3, num_classes: int | None = 10, width: int = 16,
             embedding_dim: int | None = None) -> ResNet:
    """CIFAR-style ResNet-18 (He et al. 2016, the 3x3-stem variant used for 32x32 images).

    ``width=64`` is the standard network (11.2M parameters with 10 classes); the default ``width=16``
    has 16x fewer parameters (0.70M) for CPU runs. ``num_classes=None`` returns an embedding of
    ``embedding_dim`` (or 8·width) dimensions instead of logits.

    Example:
        >>> import torch
        >>> net = resnet18(num_classes=10, width=8)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> net.features(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """
    return ResNet((2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, width=width,
                  embedding_dim=embedding_dim)
