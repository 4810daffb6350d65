"""``kexue bench augment``: per-batch cost of our mixup, CutMix and SamplePairing against torchbearer's
callbacks, and as a fraction of one training step of the mixup study's ResNet.

torchbearer's callbacks read and write a ``Trial`` state dict; we drive them the way ``Trial`` does, by
calling ``on_sample(state)`` on a fresh minimal state (input, target, device) for every batch. Its
CutMix writes into the input in place, so ours runs with ``inplace=True`` in that row (and the
out-of-place cost is reported beside it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..augment import cutmix, mixup, sample_pairing
from ..studies.base import seeded_global_rng
from .base import BenchOptions, BenchRow, compare, register_bench, time_call

BATCH, SHAPE, CLASSES = 256, (3, 32, 32), 10
TARGET = "no slower than the peer; <= 2% of a training step"


def _torchbearer() -> Any | None:
    try:
        import torchbearer
        from torchbearer.callbacks import CutMix as TbCutMix
        from torchbearer.callbacks import Mixup as TbMixup
        from torchbearer.callbacks import SamplePairing as TbSamplePairing
    except Exception:  # noqa: BLE001 - any import failure means the peer is unavailable
        return None
    return torchbearer, TbMixup, TbCutMix, TbSamplePairing


def _train_step_seconds(x: torch.Tensor, y: torch.Tensor, device: str, repeats: int) -> float:
    """Seconds of one SGD step (forward, backward, update) of the study's CIFAR ResNet-18 (width 8)."""
    from ..nn.vision import resnet18

    with seeded_global_rng(0):  # the same initial weights every time, without reseeding the caller's RNG
        net = resnet18(in_channels=3, num_classes=CLASSES, width=8).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return time_call(step, device=device, repeats=repeats, warmup=1)


@register_bench("augment")
def run(opts: BenchOptions) -> list[BenchRow]:
    device = opts.device
    repeats = 3 if opts.quick else opts.repeats
    rounds = 2 if opts.quick else 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, *SHAPE, generator=g).to(device)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)
    buf = x.clone()
    step_s = _train_step_seconds(x, y, device, max(3, repeats // 2))

    tb = _torchbearer()
    peer_note = {} if tb is not None else {"note": "torchbearer is not installed: peer not measured"}
    if tb is not None:
        torchbearer, TbMixup, TbCutMix, TbSamplePairing = tb
        tb_mixup = TbMixup(alpha=1.0)
        tb_cutmix = TbCutMix(1.0, classes=CLASSES, mixup_loss=True)
        tb_pairing = TbSamplePairing(policy=lambda state: True)

        def state(inp: torch.Tensor) -> dict:
            return {torchbearer.X: inp, torchbearer.Y_TRUE: y, torchbearer.DEVICE: device,
                    torchbearer.EPOCH: 0}

        peers = {
            "mixup": lambda: tb_mixup.on_sample(state(x)),
            "cutmix": lambda: tb_cutmix.on_sample(state(buf)),
            "pairing": lambda: tb_pairing.on_sample(state(x)),
        }
    else:
        peers = {"mixup": None, "cutmix": None, "pairing": None}

    cases = [
        ("mixup, per-batch λ ~ Beta(1,1)", "kexue.augment.mixup", "torchbearer Mixup(alpha=1)",
         lambda: mixup(x, y, alpha=1.0, generator=g), peers["mixup"]),
        ("CutMix, per-batch box, in place", "cutmix(inplace=True)", "torchbearer CutMix(1, mixup_loss)",
         lambda: cutmix(buf, y, alpha=1.0, generator=g, inplace=True), peers["cutmix"]),
        ("SamplePairing (x_a + x_b) / 2", "kexue.augment.sample_pairing", "torchbearer SamplePairing",
         lambda: sample_pairing(x, y, generator=g), peers["pairing"]),
    ]
    rows = []
    for case, ours_name, peer_name, ours_fn, peer_fn in cases:
        timing = compare(ours_fn, peer_fn, device=device, repeats=repeats, rounds=rounds)
        extra = {"fraction of a ResNet-18(w8) step": f"{timing[0] / step_s:.3%}", **peer_note}
        rows.append(BenchRow.of(f"{case} [{BATCH}x3x32x32]", ours_name, peer_name if peer_fn else "-", timing,
                                TARGET, extra))
    # beyond the peer: what ours costs in the other modes
    extras = [
        ("mixup, per-sample λ ~ Beta(0.2,0.2)", "mixup(alpha=0.2, per='sample')",
         lambda: mixup(x, y, alpha=0.2, per="sample", generator=g)),
        ("CutMix, per-sample boxes, new tensor", "cutmix(per='sample')",
         lambda: cutmix(x, y, alpha=1.0, per="sample", generator=g)),
        ("CutMix, per-batch box, new tensor", "cutmix()", lambda: cutmix(x, y, alpha=1.0, generator=g)),
    ]
    for case, ours_name, fn in extras:
        ours_s = time_call(fn, device=device, repeats=repeats)
        rows.append(BenchRow(f"{case} [{BATCH}x3x32x32]", ours_name, "(no peer for this mode)", ours_s, None,
                             "<= 2% of a training step",
                             {"fraction of a ResNet-18(w8) step": f"{ours_s / step_s:.3%}"}))
    rows.append(BenchRow("one SGD step, ResNet-18 width 8 (the study's)", "forward+backward+step", "-",
                         step_s, None, "reference for the fractions above"))
    return rows
