"""A small image problem shared by the CUDA training tests and the DDP script they launch (importable from the
tests and from a subprocess with tests/train on its path)."""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------------------------- training loop

def small_problem(ckdir, device="cuda", plain=False, **cfg_kw):
    """A small image problem on ``device``; ``plain`` swaps the BatchNorm CNN for a BN-free one (per-process
    BatchNorm statistics are the one expected difference under DDP)."""
    from kexue.nn.vision import SmallCNN
    from kexue.train import TrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127.5).long()          # learnable: brightness above the median
    torch.manual_seed(0)
    if plain:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                  torch.nn.Flatten(), torch.nn.Linear(32, 2))
    else:
        net = SmallCNN(1, 2, width=8)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer="adamw", lr=3e-3, warmup_epochs=0.5, progress=False,
                      checkpoint_dir=str(ckdir), seed=3, device=device, **cfg_kw)
    return net, (x, y), cfg
