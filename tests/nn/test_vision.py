"""Shapes, embedding mode, parameter counts and hookable layers of kexue.nn.vision."""

from __future__ import annotations

import pytest
import torch

from kexue.nn.vision import ResNet, SmallCNN, resnet18

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (112, 92)])
def test_small_cnn_logits_shape(hw):
    net = SmallCNN(in_channels=1, num_classes=7, width=4)
    out = net(torch.randn(3, 1, *hw))
    assert out.shape == (3, 7)
    assert net.features(torch.randn(3, 1, *hw)).shape == (3, 16 * 9)
    assert SmallCNN(1, 7, width=4, pool=1).features(torch.randn(3, 1, *hw)).shape == (3, 16)


def test_small_cnn_embedding_mode():
    net = SmallCNN(in_channels=1, num_classes=None, width=4, embedding_dim=5)
    x = torch.randn(2, 1, 28, 28)
    assert net(x).shape == (2, 5)
    net.eval()
    assert torch.equal(net(x), net.features(x))
    # embedding without explicit dim: the pooled features (4 * width * pool**2)
    assert SmallCNN(num_classes=None, width=4)(x).shape == (2, 16 * 9)
    assert SmallCNN(num_classes=None, width=4, pool=2)(x).shape == (2, 16 * 4)
    # embedding + classifier: logits on top of the embedding
    both = SmallCNN(num_classes=3, width=4, embedding_dim=6)
    assert both(x).shape == (2, 3) and both.features(x).shape == (2, 6)


def test_resnet18_shapes_and_param_counts():
    net = resnet18(in_channels=3, num_classes=10, width=8)
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    assert net.features(x).shape == (2, 64)
    emb = resnet18(num_classes=None, width=8, embedding_dim=12)
    assert emb(x).shape == (2, 12)
    # the standard CIFAR ResNet-18 (width 64) has 11,173,962 parameters; width 16 is ~1/16 of the convs
    assert n_params(resnet18(width=64)) == 11_173_962
    assert 600_000 < n_params(resnet18(width=16)) < 800_000
    assert n_params(ResNet((1, 1, 1, 1), width=8)) < n_params(resnet18(width=8))


def test_small_cnn_param_count_formula():
    w, c = 8, 10
    convs = 9 * (1 * w + w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w)
    bns = 2 * (w + w + 2 * w + 2 * w + 4 * w)
    assert n_params(SmallCNN(1, c, width=w, pool=1)) == convs + bns + 4 * w * c + c
    assert n_params(SmallCNN(1, c, width=w)) == convs + bns + 4 * w * 9 * c + c


@pytest.mark.parametrize("factory,layers", [(lambda: SmallCNN(width=4), SmallCNN.mixable_layers),
                                            (lambda: resnet18(in_channels=1, width=4), ResNet.mixable_layers)])
def test_named_layers_take_forward_hooks(factory, layers):
    net = factory()
    seen = []
    for name in layers:
        net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.shape[0])))
    x = torch.randn(2, 1, 28, 28)
    net(x)
    assert [s[0] for s in seen] == list(layers)
    # a hook that changes a layer output changes the logits (the hook point is really in the path)
    net.eval()
    base = net(x)
    h = net.get_submodule(layers[1]).register_forward_hook(lambda m, i, o: o * 0)
    changed = net(x)
    h.remove()
    assert not torch.allclose(base, changed)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SmallCNN(num_classes=0)
    with pytest.raises(TypeError, match="width"):
        SmallCNN(width=2.5)
    with pytest.raises(ValueError, match="embedding_dim"):
        resnet18(embedding_dim=-1)
    with pytest.raises(ValueError, match="channels"):
        SmallCNN(in_channels=1)(torch.randn(2, 3, 28, 28))
    with pytest.raises(TypeError, match="floating"):
        SmallCNN()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pool"):
        SmallCNN(pool=0)
    with pytest.raises(ValueError, match="blocks"):
        ResNet((2, 2, 2))


def test_backward_reaches_every_parameter():
    net = resnet18(width=4)
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
