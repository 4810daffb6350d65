"""Training loops: :func:`fit` for image classification / metric learning with checkpoints, exact resume
and DDP (see :mod:`kexue.train.loop`), torch-only augmentations (:mod:`kexue.train.transforms`), atomic
checkpoints (:mod:`kexue.train.checkpoint`) and ``torchrun`` helpers (:mod:`kexue.train.distributed`).

Example:
    >>> import torch
    >>> from kexue.train import TrainConfig, fit
    >>> x = torch.randn(32, 3); y = (x.sum(1) > 0).long()
    >>> h = fit(torch.nn.Linear(3, 2), (x, y), TrainConfig(epochs=1, batch_size=8, progress=False))
    >>> len(h)
    1

``python -m kexue.train --help`` trains an image classifier from the command line (also under torchrun);
:func:`train_gan` (:mod:`kexue.train.gan`) trains a GAN, ``kexue train --task gan`` from the command line.
"""

from kexue.train import distributed, mlm
from kexue.train.checkpoint import (
    CheckpointError,
    check_output_file,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from kexue.train.gan import GANConfig, GANHistory, generate, train_gan
from kexue.train.loop import TrainConfig, TrainHistory, derive_seed, evaluate, fit, lr_factor
from kexue.train.transforms import FlipCrop, random_crop, random_horizontal_flip

__all__ = ["TrainConfig", "TrainHistory", "fit", "evaluate", "lr_factor", "derive_seed", "FlipCrop",
           "random_crop", "random_horizontal_flip", "save_checkpoint", "load_checkpoint", "checkpoint_path",
           "CheckpointError", "check_output_file", "distributed", "mlm", "GANConfig", "GANHistory", "train_gan",
           "generate"]
