"""Layers and models: vision classifiers/embedders and the RoPE Transformer with pluggable attention.

>>> import torch
>>> from kexue.nn import SmallCNN
>>> SmallCNN(in_channels=1, num_classes=10, width=8)(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

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

__all__ = ["AttentionModule", "BasicBlock", "KVCache", "ResNet", "SmallCNN", "SoftmaxAttention", "Transformer",
           "TransformerBlock", "TransformerCache", "TransformerOutput", "apply_rope", "resnet18"]
