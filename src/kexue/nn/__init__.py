"""Layers and models: vision classifiers/embedders, the RoPE Transformer with pluggable attention, and the GAN
generators, discriminators and norms of article 2 (:mod:`kexue.nn.gan`).

>>> import torch
>>> from kexue.nn import SmallCNN
>>> SmallCNN(in_channels=1, num_classes=10, width=8)(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from .gan import (
    AdaIN2d,
    ConditionalBatchNorm2d,
    DCGANDiscriminator,
    DCGANGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
    SelfModulatedBatchNorm2d,
    StyleGenerator,
)
from .transformer import (
    AttentionModule,
    KVCache,
    SoftmaxAttention,
    Transformer,
    TransformerBlock,
    TransformerCache,
    TransformerOutput,
    apply_rope,
)
from .vision import BasicBlock, ResNet, SmallCNN, resnet18

__all__ = ["AdaIN2d", "AttentionModule", "BasicBlock", "ConditionalBatchNorm2d", "DCGANDiscriminator", "DCGANGenerator",
           "KVCache", "ResNet", "ResNetDiscriminator", "ResNetGenerator", "SelfModulatedBatchNorm2d", "SmallCNN",
           "SoftmaxAttention", "StyleGenerator", "Transformer", "TransformerBlock", "TransformerCache",
           "TransformerOutput", "apply_rope", "resnet18"]
