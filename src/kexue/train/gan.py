"""The GAN loop: :class:`GANConfig`, :func:`train_gan`, :class:`GANHistory`, and helpers to sample and save grids.

Built on the same foundations as :func:`kexue.train.fit`: atomic checkpoints, exact resume, DDP under
``torchrun``, a progress bar, seeded randomness that never touches the caller's RNG.

One *step* is ``n_dis`` discriminator updates followed by one generator update, with Adam (GAN betas
``(0.5, 0.999)`` by default) for both, the non-saturating (``"ns"``) or hinge loss, and an exponential moving
average (EMA) of the generator's weights, used for samples and metrics (its BatchNorm statistics are
recomputed -- "standing statistics" -- whenever it is evaluated, since averaged weights do not match the live
generator's running statistics). With ``n_dis=1`` the generator update reuses the fake batch made for the
discriminator update (``reuse_fake``, as the PyTorch examples' DCGAN does), saving one generator forward per step.

Determinism. The real batch of discriminator update ``k`` is slot ``k mod B`` of the permutation of epoch
``k // B`` (``B`` full batches per epoch), the permutation seeded by ``(seed, epoch)``; the noise and fake
labels of step ``s`` come from a generator seeded by ``(seed, s)``, and the global torch RNG is re-seeded from
``(seed, s, rank)`` inside the loop (forked, so the caller's state is untouched). A run resumed from the
checkpoint of any step therefore replays exactly the draws of an uninterrupted run: the final weights are
bitwise equal on the CPU. There is no learning-rate schedule, so ``steps`` may be raised on a resume to extend
a finished run.

Distributed. ``batch_size`` is the global batch: every rank draws the same global noise and real indices and
trains on its contiguous shard, so DDP averages the gradient of the batch a single process would use
(BatchNorm statistics per rank are the one difference).

Example:
    >>> import torch
    >>> from kexue.nn.gan import DCGANDiscriminator, DCGANGenerator
    >>> x = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
    >>> G, D = DCGANGenerator(8, 16, 1, width=4), DCGANDiscriminator(16, 1, width=4)
    >>> h = train_gan(G, D, x, GANConfig(steps=3, batch_size=16, progress=False, log_every=1))
    >>> [r["step"] for r in h], generate(h.G_ema, 5, generator=torch.Generator().manual_seed(0)).shape
    ([1, 2, 3], torch.Size([5, 1, 16, 16]))
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_betas, check_choice, check_device, check_tensor
from . import distributed as dist
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .loop import Records, _plain, _resolve_device, derive_seed

__all__ = ["GANConfig", "GANHistory", "GANTrainer", "gan_images", "generate", "d_loss", "g_loss", "image_grid",
           "refresh_batchnorm_stats", "save_image_grid", "train_gan"]

_LOSSES = ("ns", "hinge")
_TRAJECTORY_FIELDS = ("batch_size", "loss", "n_dis", "lr_g", "lr_d", "betas", "ema_decay", "ema_warmup",
                      "reuse_fake", "seed")
# streams of derive_seed(seed, ..., stream)
_SHUFFLE, _NOISE, _TORCH, _FIXED, _STANDING = 10, 11, 12, 13, 14


@dataclass
class GANConfig:
    """Hyper-parameters and run settings for :func:`train_gan` (validated on creation).

    - ``steps``: generator updates; each follows ``n_dis`` discriminator updates. ``batch_size``: the global
      batch (real and fake alike).
    - ``loss``: ``"ns"`` (non-saturating, ``softplus``) or ``"hinge"``; ``lr_g``, ``lr_d``, ``betas`` (Adam).
    - ``ema_decay``: EMA of the generator weights (0 disables it: ``G_ema`` is then a copy of ``G`` made at
      evaluation time); ``ema_warmup``: use ``min(ema_decay, (1 + t) / (10 + t))`` at step ``t`` so the average
      is useful early.
    - ``reuse_fake``: with ``n_dis == 1`` the generator update reuses the discriminator update's fake batch.
    - ``seed``: every random draw of the loop derives from it. ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    - ``checkpoint_dir``: ``checkpoint.pt`` is written there atomically every ``checkpoint_every`` steps and at
      the end; ``resume=True`` continues from it.
    - ``progress``: a tqdm bar with the losses (rank 0); ``log``: one line per record (default: ``progress``);
      ``log_every``: a history record (mean losses since the last one) every this many steps.
    - ``sample_every``: save a grid of ``sample_count`` EMA samples from fixed noise to
      ``sample_dir/samples_<step>.png`` (default folder: ``checkpoint_dir``); 0: never.
    - ``eval_every``: call ``metrics_fn(G_ema, step)`` and add its numbers to the record; 0: only at the end.

    Example:
        >>> GANConfig(steps=100).betas
        (0.5, 0.999)
    """

    steps: int = 1000
    batch_size: int = 64
    loss: str = "ns"
    n_dis: int = 1
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    ema_decay: float = 0.999
    ema_warmup: bool = True
    reuse_fake: bool = True
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    resume: bool = False
    progress: bool = True
    log: bool | None = None
    log_every: int = 100
    sample_every: int = 0
    sample_dir: str | None = None
    sample_count: int = 64
    eval_every: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        for name, lo in (("steps", 1), ("batch_size", 1), ("n_dis", 1), ("seed", 0), ("checkpoint_every", 1),
                         ("log_every", 1), ("sample_every", 0), ("sample_count", 1), ("eval_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        for name in ("lr_g", "lr_d", "ema_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite number, got {v!r}")
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ValueError(f"lr_g and lr_d must be > 0, got {self.lr_g} and {self.lr_d}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check_choice("loss", self.loss, _LOSSES)
        self.betas = check_betas(self.betas)
        check_device(self.device)
        for name in ("checkpoint_dir", "sample_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path or None, got {type(v).__name__}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if self.sample_every and self.sample_dir is None and self.checkpoint_dir is None:
            raise ValueError("sample_every > 0 needs sample_dir (or checkpoint_dir)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (stored in checkpoints)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        for k in ("device", "checkpoint_dir", "sample_dir"):
            d[k] = None if d[k] is None else str(d[k])
        return d


@dataclass
class GANHistory(Records):
    """What :func:`train_gan` returns: ``records`` (one dict per ``log_every`` steps, evaluation step or the end:
    ``step`` -- G updates done --, ``d_loss``, ``g_loss`` -- means since the previous record --, ``time`` --
    training seconds so far, evaluation excluded --, plus ``metrics_fn``'s numbers on evaluation steps), the
    trained ``G`` and ``D`` and the EMA generator ``G_ema`` (eval mode, standing BN statistics), and the step a
    resumed run started from.

    Example:
        >>> h = GANHistory([{"step": 10, "d_loss": 1.2}, {"step": 20, "d_loss": 1.1}], None, None, None)
        >>> h.column("d_loss"), h.last["step"]
        ([1.2, 1.1], 20)
    """

    records: list[dict[str, Any]]
    G: nn.Module | None
    D: nn.Module | None
    G_ema: nn.Module | None
    resumed_from: int | None = field(default=None)



# ------------------------------------------------------------------------------------------- helpers

def gan_images(images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """Real images as a GAN reads them: uint8 ``[N, C, S, S]``, with ``[N, H, W]`` grey images given a channel
    and smaller images zero-padded (centred) to ``image_size`` -- e.g. 28 x 28 MNIST to 32 x 32, the
    background staying black. Kept as uint8; :func:`train_gan` scales batches to [-1, 1] as ``x / 127.5 - 1``.

    Example:
        >>> gan_images(torch.zeros(2, 28, 28, dtype=torch.uint8), 32).shape
        torch.Size([2, 1, 32, 32])
    """
    check_tensor("images", images)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255), got dtype {images.dtype}")
    x = images.unsqueeze(1) if images.dim() == 3 else images
    if x.dim() != 4:
        raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {tuple(images.shape)}")
    if image_size is None:
        return x
    h, w = x.shape[2:]
    if h > image_size or w > image_size:
        raise ValueError(f"images of {h} x {w} do not fit image_size={image_size} (only padding is done)")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    if (h, w) == (image_size, image_size):
        return x
    return F.pad(x, (left, image_size - w - left, top, image_size - h - top))


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: str = "ns") -> torch.Tensor:
    """Discriminator loss: ``"ns"`` -- ``softplus(-D(x)) + softplus(D(G(z)))`` (binary cross-entropy on logits);
    ``"hinge"`` -- ``relu(1 - D(x)) + relu(1 + D(G(z)))``; means over the batch.

    Example:
        >>> round(float(d_loss(torch.zeros(4), torch.zeros(4))), 4)   # 2 log 2
        1.3863
    """
    check_choice("loss", loss, _LOSSES)
    if loss == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor, loss: str = "ns") -> torch.Tensor:
    """Generator loss: ``"ns"`` -- ``softplus(-D(G(z)))`` (non-saturating); ``"hinge"`` -- ``-D(G(z))``.

    Example:
        >>> round(float(g_loss(torch.zeros(4))), 4)
        0.6931
    """
    check_choice("loss", loss, _LOSSES)
    if loss == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def _z_dim(G: nn.Module) -> int:
    z = getattr(G, "z_dim", None)
    if isinstance(z, bool) or not isinstance(z, int) or z < 1:
        raise TypeError("G must have an int attribute z_dim (the noise width), as kexue.nn.gan generators do")
    return z


def _device_of(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generate(G: nn.Module, n: int, *, labels: torch.Tensor | None = None, batch_size: int = 256,
             generator: torch.Generator | None = None, train_mode: bool = False) -> torch.Tensor:
    """``n`` images from ``G`` (on the CPU, float in [-1, 1]) under ``torch.no_grad``, noise drawn on the CPU
    with ``generator``. A conditional ``G`` (``num_classes``) takes ``labels`` ``[n]`` (default: ``0, 1, 2, ...``
    cycling). ``G`` runs in eval mode (running BN statistics; ``train_mode=True``: batch statistics) and its
    mode is restored afterwards.

    Example:
        >>> from kexue.nn.gan import DCGANGenerator
        >>> generate(DCGANGenerator(8, 16, 3, width=4), 10, batch_size=4).shape
        torch.Size([10, 3, 16, 16])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    zd = _z_dim(G)
    k = getattr(G, "num_classes", None)
    if k is not None and labels is None:
        labels = torch.arange(n) % k
    if labels is not None:
        check_tensor("labels", labels, floating=False, dim=1)
        if labels.shape[0] != n:
            raise ValueError(f"labels must hold n={n} labels, got {labels.shape[0]}")
    dev = _device_of(G)
    was = G.training
    G.train(train_mode)
    out = []
    noise = torch.randn(n, zd, generator=generator)  # drawn at once: the images do not depend on batch_size
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                z = noise[s:s + batch_size].to(dev)
                y = labels[s:s + batch_size].to(dev) if labels is not None else None
                out.append(G(z, y).float().cpu())
    finally:
        G.train(was)
    return torch.cat(out)


def refresh_batchnorm_stats(G: nn.Module, *, batches: int = 8, batch_size: int = 64,
                            generator: torch.Generator | None = None) -> nn.Module:
    """Recompute the running statistics of every BatchNorm in ``G`` as the plain average over ``batches``
    forward passes of ``batch_size`` noise vectors (BigGAN's "standing statistics"), then leave ``G`` in eval
    mode. An EMA generator needs this: its averaged weights do not match the running statistics of the
    generator they were averaged from. A ``G`` without BatchNorm is only put in eval mode.

    Example:
        >>> from kexue.nn.gan import DCGANGenerator
        >>> G = refresh_batchnorm_stats(DCGANGenerator(8, 16, 1, width=4), generator=torch.Generator().manual_seed(0))
        >>> G.training, int(G.norms[0].num_batches_tracked)
        (False, 8)
    """
    bns = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return G.eval()
    zd = _z_dim(G)
    k = getattr(G, "num_classes", None)
    dev = _device_of(G)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    G.train()
    try:
        with torch.no_grad():
            for _ in range(batches):
                z = torch.randn(batch_size, zd, generator=generator).to(dev)
                y = torch.randint(0, k, (batch_size,), generator=generator).to(dev) if k is not None else None
                G(z, y)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        G.eval()
    return G


def image_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1] (float) or 0..255 (uint8), 1 or 3 channels, tiled into one uint8
    picture ``[C, rows * (H + padding) + padding, nrow * (W + padding) + padding]`` on a white background, ``nrow``
    images per row (default: about square).

    Example:
        >>> image_grid(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([1, 22, 32])
    """
    check_tensor("images", images, dim=4)
    n, c, h, w = images.shape
    if n == 0 or c not in (1, 3):
        raise ValueError(f"images must be a non-empty [N, 1 or 3, H, W] batch, got shape {tuple(images.shape)}")
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1):
        raise ValueError(f"nrow must be a positive int or None, got {nrow!r}")
    x = images.detach().cpu()
    x = x if x.dtype == torch.uint8 else ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None,
                    padding: int = 2) -> Path:
    """Save :func:`image_grid` of ``images`` as a PNG file, written atomically. Returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> p = save_image_grid(torch.zeros(5, 1, 8, 8), pathlib.Path(tempfile.mkdtemp()) / "g.png")
        >>> from PIL import Image; Image.open(p).size
        (32, 22)
    """
    from PIL import Image

    from .._io import atomic_write

    grid = image_grid(images, nrow=nrow, padding=padding)
    arr = grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).contiguous().numpy()
    img = Image.fromarray(arr)  # 2-D uint8: "L", H x W x 3 uint8: "RGB"
    return atomic_write(Path(path), lambda f: img.save(f, format="PNG"))


class _DStep(nn.Module):
    """The discriminator loss as one module call (so DDP sees one forward per backward)."""

    def __init__(self, D: nn.Module, loss: str) -> None:
        super().__init__()
        self.D, self.loss = D, loss

    def forward(self, real: torch.Tensor, fake: torch.Tensor, y_real: torch.Tensor | None,
                y_fake: torch.Tensor | None) -> torch.Tensor:
        return d_loss(self.D(real, y_real), self.D(fake, y_fake), self.loss)


def _print(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------- trainer

class GANTrainer:
    """The state of one GAN run and its step: ``G``, ``D``, ``G_ema``, the two Adam optimisers, and the data.

    :func:`train_gan` drives it; :meth:`step` is one full training step (``n_dis`` D updates and one G update)
    and is what ``kexue bench gan`` times. ``data``: uint8 images ``[N, C, H, W]`` (scaled to [-1, 1] per batch)
    or float images already in [-1, 1], or an ``(images, labels)`` pair for a conditional ``G``/``D``.

    Example:
        >>> from kexue.nn.gan import DCGANDiscriminator, DCGANGenerator
        >>> x = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
        >>> tr = GANTrainer(DCGANGenerator(8, 16, 1, width=4), DCGANDiscriminator(16, 1, width=4), x,
        ...                 GANConfig(batch_size=16, progress=False))
        >>> d, g = tr.step(0); tr.done
        1
    """

    def __init__(self, G: nn.Module, D: nn.Module, data: Any, config: GANConfig) -> None:
        if not isinstance(config, GANConfig):
            raise TypeError(f"config must be a GANConfig, got {type(config).__name__}")
        config.validate()
        for name, m in (("G", G), ("D", D)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        self.config = config
        self.z_dim = _z_dim(G)
        self.info = dist.init_from_env(str(config.device))
        self.rank, self.world = self.info.rank, self.info.world_size
        self.device = _resolve_device(str(config.device), self.info)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size (the global batch) must be divisible by the world size {self.world}, "
                             f"got {config.batch_size}")
        self.num_classes = getattr(G, "num_classes", None)
        d_classes = getattr(D, "num_classes", None)
        if d_classes is not None and self.num_classes is not None and d_classes != self.num_classes:
            raise ValueError(f"G and D disagree on num_classes: {self.num_classes} vs {d_classes}")
        self.d_conditional = d_classes is not None
        self.classes = self.num_classes if self.num_classes is not None else d_classes
        self._set_data(data)
        self.G, self.D = G.to(self.device), D.to(self.device)
        self.G_ema = copy.deepcopy(G).eval()
        for p in self.G_ema.parameters():
            p.requires_grad_(False)
        self.opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=config.lr_g,
                                      betas=config.betas)
        self.opt_d = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=config.lr_d,
                                      betas=config.betas)
        self.d_step_module = _DStep(D, config.loss)
        self.g_runner: nn.Module = G
        self.d_runner: nn.Module = self.d_step_module
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_runner = nn.parallel.DistributedDataParallel(G, device_ids=ids)
            self.d_runner = nn.parallel.DistributedDataParallel(self.d_step_module, device_ids=ids)
        self.done = 0  # G steps completed
        self._perm_epoch, self._perm = -1, None
        self._ema_params = [p for p in self.G_ema.parameters()]
        self._g_params = [p for p in G.parameters()]

    # -- data
    def _set_data(self, data: Any) -> None:
        labels = None
        if isinstance(data, (tuple, list)) and len(data) == 2:
            data, labels = data
        check_tensor("data", data, dim=4)
        if data.dtype != torch.uint8 and not data.is_floating_point():
            raise TypeError(f"data must be uint8 images or float images in [-1, 1], got dtype {data.dtype}")
        n = data.shape[0]
        if self.classes is not None:
            if labels is None:
                raise ValueError("a conditional G or D (num_classes) needs data=(images, labels)")
            check_tensor("labels", labels, floating=False, dim=1)
            if labels.shape[0] != n:
                raise ValueError(f"labels must have one entry per image ({n}), got {labels.shape[0]}")
            if n and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
                raise ValueError(f"labels must lie in [0, {self.classes}), got [{int(labels.min())}, "
                                 f"{int(labels.max())}]")
        self.x = data
        self.y = labels if self.classes is not None else None
        self.n = n
        self.per_epoch = n // self.config.batch_size
        if self.per_epoch == 0:
            raise ValueError(f"data has {n} images: fewer than one batch of {self.config.batch_size}")

    def _real_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        epoch, slot = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                derive_seed(cfg.seed, epoch, _SHUFFLE)))
            self._perm_epoch = epoch
        idx = self._perm[slot * cfg.batch_size:(slot + 1) * cfg.batch_size]
        if self.world > 1:
            idx = dist.shard(idx, self.rank, self.world)
        x = self.x[idx].to(self.device, non_blocking=True)
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        y = self.y[idx].to(self.device) if self.y is not None else None
        return x, y

    def _noise(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.config.batch_size
        z = torch.randn(b, self.z_dim, generator=gen)
        y = torch.randint(0, self.classes, (b,), generator=gen) if self.classes is not None else None
        if self.world > 1:
            z = dist.shard(z, self.rank, self.world)
            y = dist.shard(y, self.rank, self.world) if y is not None else None
        return z.to(self.device), (y.to(self.device) if y is not None else None)

    # -- one step
    def step(self, s: int | None = None) -> tuple[float, float]:
        """One training step -- ``n_dis`` D updates, one G update, the EMA update -- as G update number ``s``
        (default: the next one); returns the last D loss and the G loss as floats."""
        d, g = self.step_tensors(s)
        return float(d), float(g)

    def step_tensors(self, s: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` returning the two losses as detached 0-dim tensors (no device synchronisation)."""
        cfg = self.config
        s = self.done if s is None else s
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, s, _NOISE))
        G, Dm = self.G, self.D
        G.train()
        Dm.train()
        reuse = cfg.reuse_fake and cfg.n_dis == 1
        fake = y_fake = None
        dl = torch.zeros(())
        for j in range(cfg.n_dis):
            real, y_real = self._real_batch(s * cfg.n_dis + j)
            z, y_fake = self._noise(gen)
            yg = y_fake if self.num_classes is not None else None
            if reuse:
                fake = self.g_runner(z, yg)
            else:
                with torch.no_grad():
                    fake = self.g_runner(z, yg)
            yd_real = y_real if self.d_conditional else None
            yd_fake = y_fake if self.d_conditional else None
            loss_d = self.d_runner(real, fake.detach(), yd_real, yd_fake)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            dl = loss_d.detach()
        if not reuse:
            z, y_fake = self._noise(gen)
            fake = self.g_runner(z, y_fake if self.num_classes is not None else None)
        Dm.requires_grad_(False)
        try:
            loss_g = g_loss(Dm(fake, y_fake if self.d_conditional else None), cfg.loss)
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        finally:
            Dm.requires_grad_(True)
        self.opt_g.step()
        self._update_ema(s)
        self.done = s + 1
        return dl, loss_g.detach()

    def _update_ema(self, s: int) -> None:
        cfg = self.config
        if cfg.ema_decay == 0:
            return
        decay = min(cfg.ema_decay, (1 + s) / (10 + s)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, [p.detach() for p in self._g_params], 1.0 - decay)

    def ema_for_eval(self, step: int) -> nn.Module:
        """``G_ema`` ready to sample: buffers copied from ``G``, BatchNorm statistics recomputed (seeded by the
        step), eval mode. With ``ema_decay == 0`` the weights are copied from ``G`` first."""
        cfg = self.config
        with torch.no_grad():
            if cfg.ema_decay == 0:
                for pe, p in zip(self._ema_params, self._g_params):
                    pe.copy_(p)
            for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
                be.copy_(b)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, _STANDING))
        return refresh_batchnorm_stats(self.G_ema, batch_size=cfg.batch_size, generator=gen)

    def fixed_samples(self) -> torch.Tensor:
        """``sample_count`` EMA samples from the run's fixed noise (the same at every step)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _FIXED))
        labels = torch.arange(cfg.sample_count) % self.num_classes if self.num_classes is not None else None
        return generate(self.G_ema, cfg.sample_count, labels=labels, generator=gen)

    # -- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.G_ema.load_state_dict(state["G_ema"])
        except RuntimeError as e:
            raise ValueError(f"the checkpoint's networks do not match G and D: {str(e)[:500]}") from e
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.done = int(state["step"])


def _check_compatible(state: dict[str, Any], config: GANConfig, world: int, n: int, path: Path) -> None:
    saved = state.get("config", {})
    now = config.to_dict()
    diffs = [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in _TRAJECTORY_FIELDS
             if k in saved and saved[k] != now[k]]
    if state.get("world_size", 1) != world:
        diffs.append(f"world_size: checkpoint {state.get('world_size')} vs now {world}")
    if state.get("n_data") != n:
        diffs.append(f"training-set size: checkpoint {state.get('n_data')} vs now {n}")
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run differs from the checkpoint in " + "; ".join(diffs))


def _fmt(rec: dict[str, Any], steps: int) -> str:
    parts = [f"step {rec['step']}/{steps}"]
    for k, v in rec.items():
        if k != "step":
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def train_gan(G: nn.Module, D: nn.Module, data: Any, config: GANConfig | None = None, *,
              metrics_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None) -> GANHistory:
    """Train generator ``G`` against discriminator ``D`` on ``data`` with ``config``; return a :class:`GANHistory`.

    - ``data``: uint8 images ``[N, C, H, W]`` (see :func:`gan_images` for padding and grey images) or float
      images in [-1, 1]; ``(images, labels)`` for a conditional ``G`` (class-conditional norms) or ``D``
      (projection). Fake labels are drawn uniformly.
    - ``G(z, y=None)`` must have ``z_dim`` (and ``num_classes`` when conditional), as the generators of
      :mod:`kexue.nn.gan`; ``D(x, y=None)`` returns logits ``[N]``.
    - ``metrics_fn(G_ema, step) -> dict``: numbers added to the record every ``eval_every`` steps and at the
      end (``G_ema`` in eval mode with standing BN statistics; called on every rank, rank 0's kept).

    With ``config.checkpoint_dir`` an atomic checkpoint (G, D, G_ema, both optimisers, step, history, config,
    the generator and discriminator configs when they have ``.config``) is written every ``checkpoint_every``
    steps and at the end; ``config.resume=True`` continues from it and reaches the same weights as an
    uninterrupted run. Under ``torchrun`` G and D are wrapped in DDP (gloo on CPU, NCCL on CUDA).

    Example:
        >>> from kexue.nn.gan import DCGANDiscriminator, DCGANGenerator
        >>> x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
        >>> h = train_gan(DCGANGenerator(8, 16, 3, width=4), DCGANDiscriminator(16, 3, width=4), x,
        ...               GANConfig(steps=2, batch_size=32, loss="hinge", progress=False),
        ...               metrics_fn=lambda G, step: {"mean": float(generate(G, 8).mean())})
        >>> sorted(h.last)
        ['d_loss', 'g_loss', 'mean', 'step', 'time']
    """
    if config is None:
        config = GANConfig()
    if metrics_fn is not None and not callable(metrics_fn):
        raise TypeError(f"metrics_fn must be callable, got {type(metrics_fn).__name__}")
    tr = GANTrainer(G, D, data, config)
    main = tr.rank == 0
    verbose = main and (config.progress if config.log is None else config.log)
    history: list[dict[str, Any]] = []
    acc = {"d": 0.0, "g": 0.0, "n": 0}
    elapsed = 0.0
    resumed_from = None
    ckpt = checkpoint_path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    sample_dir = Path(config.sample_dir or config.checkpoint_dir) if config.sample_every else None
    if config.resume and ckpt is not None and ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=tr.device)
        _check_compatible(state, config, tr.world, tr.n, ckpt)
        tr.load_state_dict(state["trainer"])
        history = list(state["history"])
        acc = dict(state["acc"])
        elapsed = float(state["elapsed"])
        resumed_from = tr.done
        if verbose:
            _print(f"resumed from {ckpt} after step {tr.done}/{config.steps}")
    elif ckpt is not None and ckpt.is_file() and verbose:
        _print(f"note: {ckpt} exists and resume=False: starting from scratch and overwriting it")

    def save() -> None:
        if ckpt is not None and main:
            save_checkpoint(ckpt, {
                "format": 1, "kind": "gan", "trainer": tr.state_dict(), "history": history, "acc": acc,
                "elapsed": elapsed, "config": config.to_dict(), "world_size": tr.world, "n_data": tr.n,
                "generator_config": getattr(G, "config", None), "discriminator_config": getattr(D, "config", None),
                "rng": {"seed": config.seed, "scheme": "derive_seed(seed, step, stream[, rank])"},
            })

    from tqdm.auto import tqdm

    cuda_devices = [tr.device.index] if tr.device.type == "cuda" else []
    bar = tqdm(total=config.steps, initial=min(tr.done, config.steps), desc="GAN", leave=False,
               disable=not (config.progress and main))
    sums = torch.zeros(2, dtype=torch.float64)  # D and G losses since the last flush, kept without syncing

    def flush() -> None:
        d_val, g_val = sums.tolist()
        sums.zero_()
        if not (math.isfinite(d_val) and math.isfinite(g_val)):
            raise FloatingPointError(f"GAN losses became d={d_val}, g={g_val} by step {tr.done}")
        acc["d"] += d_val
        acc["g"] += g_val

    try:
        with torch.random.fork_rng(devices=cuda_devices):
            while tr.done < config.steps:
                s = tr.done
                seed = derive_seed(config.seed, s, _TORCH, tr.rank)
                torch.default_generator.manual_seed(seed)
                if tr.device.type == "cuda":
                    with torch.cuda.device(tr.device):
                        torch.cuda.manual_seed(seed)
                t0 = time.perf_counter()
                dl, gl = tr.step_tensors(s)
                sums += torch.stack([dl, gl]).double().cpu()
                acc["n"] += 1
                elapsed += time.perf_counter() - t0
                step = tr.done
                bar.update(1)
                if not bar.disable and step % 10 == 0:
                    bar.set_postfix(d_loss=f"{float(dl):.3f}", g_loss=f"{float(gl):.3f}")
                last = step == config.steps
                evaluate = metrics_fn is not None and (last or (config.eval_every > 0
                                                                and step % config.eval_every == 0))
                sample = sample_dir is not None and (last or step % config.sample_every == 0)
                if evaluate or sample:
                    G_eval = tr.ema_for_eval(step)
                    if sample and main:
                        save_image_grid(tr.fixed_samples(), sample_dir / f"samples_{step:06d}.png")
                if last or evaluate or step % config.log_every == 0:
                    flush()
                    n = max(acc["n"], 1)
                    rec: dict[str, Any] = {"step": step, "d_loss": acc["d"] / n, "g_loss": acc["g"] / n,
                                           "time": elapsed}
                    acc = {"d": 0.0, "g": 0.0, "n": 0}
                    if evaluate:
                        extra = metrics_fn(G_eval, step)
                        if not isinstance(extra, dict):
                            raise TypeError(f"metrics_fn must return a dict, got {type(extra).__name__}")
                        for k, v in extra.items():
                            if k in rec:
                                raise ValueError(f"metrics_fn may not return the reserved key {k!r}")
                            rec[str(k)] = _plain(v, k)
                    history.append(rec)
                    if verbose:
                        _print(_fmt(rec, config.steps))
                if last or step % config.checkpoint_every == 0:
                    flush()
                    save()
                    dist.barrier()
    finally:
        bar.close()
    G_ema = tr.ema_for_eval(tr.done)
    G.train(False)
    D.train(False)
    return GANHistory(history, G, D, G_ema, resumed_from)
