"""``python -m kexue.train``: train an image classifier with :func:`kexue.train.fit` and print per-epoch
metrics. Works alone or under ``torchrun --nproc-per-node N`` (DDP; ``--batch-size`` is the global batch).

Examples::

    python -m kexue.train --dataset fashion-mnist --model smallcnn --epochs 5 --train-size 5000 \\
        --data-dir ../shared/data --checkpoint-dir runs/fmnist
    python -m kexue.train ... --checkpoint-dir runs/fmnist --resume      # after an interruption
    torchrun --nproc-per-node 2 -m kexue.train --dataset cifar10 --model resnet18 --epochs 30

``--dataset synthetic`` needs no files (16x16 grey images whose class is the quadrant of a bright
patch); it is what the tests use.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from kexue.nn.vision import SmallCNN, resnet18
from kexue.train import distributed as D
from kexue.train.checkpoint import atomic_write_bytes
from kexue.train.loop import TrainConfig, derive_seed, fit
from kexue.train.transforms import FlipCrop

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
MODELS = ("smallcnn", "resnet18")
AUGMENTS = ("auto", "none", "crop", "flipcrop")


def synthetic_images(n: int, seed: int = 0, classes: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 grey images ``[n, 1, size, size]``: noise plus a bright patch in quadrant ``label``.

    Example:
        >>> x, y = synthetic_images(8)
        >>> x.shape, x.dtype, int(y.max()) < 4
        (torch.Size([8, 1, 16, 16]), torch.uint8, True)
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.rand(n, 1, size, size, generator=g) * 120
    half, patch = size // 2, size // 4
    jitter = torch.randint(0, half - patch + 1, (n, 2), generator=g)
    for i in range(n):
        q = int(y[i]) % 4
        r0 = (q // 2) * half + int(jitter[i, 0])
        c0 = (q % 2) * half + int(jitter[i, 1])
        x[i, :, r0:r0 + patch, c0:c0 + patch] += 120
    return x.round().clamp(0, 255).to(torch.uint8), y


def load_dataset(name: str, split: str, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, C, H, W]`` and labels for one of :data:`DATASETS`."""
    if name == "synthetic":
        return synthetic_images(2048 if split == "train" else 512, seed=0 if split == "train" else 1)
    import kexue.data as kd

    loader = {"fashion-mnist": kd.load_fashion_mnist, "mnist": kd.load_mnist, "cifar10": kd.load_cifar10}[name]
    x, y = loader(split, data_dir)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x, y


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (but fixed by ``seed``) subset of ``n`` examples, or everything when ``n`` is None."""
    if n is None or n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx], y[idx]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kexue.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--model", choices=MODELS, default="smallcnn")
    p.add_argument("--width", type=int, default=None, help="channel width (default: 32 smallcnn, 16 resnet18)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split across torchrun ranks)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--augment", choices=AUGMENTS, default="auto",
                   help="auto: flips+crops (pad 4) on cifar10, crops (pad 2) on the 28x28 sets, none on synthetic")
    p.add_argument("--train-size", type=int, default=None, help="random subset of the training split")
    p.add_argument("--test-size", type=int, default=None, help="random subset of the test split")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/test subsets")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: KEXUE_DATA_DIR, then ~/.cache/kexue)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir when a checkpoint exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("bf16",), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    p.add_argument("--history-json", default=None, help="write the per-epoch history here (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics lines still print)")
    return p


def _augment(choice: str, dataset: str) -> FlipCrop | None:
    if choice == "auto":
        choice = {"cifar10": "flipcrop", "synthetic": "none"}.get(dataset, "crop")
    if choice == "none":
        return None
    pad = 4 if dataset == "cifar10" else 2
    return FlipCrop(padding=pad, flip=choice == "flipcrop")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    info = D.init_from_env(args.device)
    try:
        xtr, ytr = subset(*load_dataset(args.dataset, "train", args.data_dir), args.train_size, args.data_seed)
        xte, yte = subset(*load_dataset(args.dataset, "test", args.data_dir), args.test_size,
                          derive_seed(args.data_seed, 1))
        classes = int(max(ytr.max(), yte.max())) + 1
        in_ch = xtr.shape[1]
        torch.manual_seed(args.seed)  # model initialisation
        if args.model == "smallcnn":
            model: torch.nn.Module = SmallCNN(in_ch, classes, width=args.width or 32)
        else:
            model = resnet18(in_ch, classes, width=args.width or 16)
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
            warmup_epochs=args.warmup_epochs, seed=args.seed, device=args.device,
            checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=not args.no_progress, log=True,
            amp=args.amp)
        if info.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"kexue.train: {args.dataset} train {tuple(xtr.shape)} test {tuple(xte.shape)}, {args.model} "
                  f"({n_params:,} parameters), {info.world_size} process(es), device {args.device}", flush=True)
        history = fit(model, (xtr, ytr), config, augment=_augment(args.augment, args.dataset), eval_data=(xte, yte))
        if info.is_main:
            last = history.last
            print(f"final: test_error={last['test_error']:.4f} test_loss={last['test_loss']:.4f} "
                  f"train_loss={last['train_loss']:.4f}", flush=True)
            if args.history_json:
                payload: dict[str, Any] = {"args": vars(args), "world_size": info.world_size,
                                           "history": history.records}
                atomic_write_bytes(args.history_json, json.dumps(payload, indent=1).encode())
    except KeyboardInterrupt:
        if info.is_main:
            hint = f"; continue with --resume --checkpoint-dir {args.checkpoint_dir}" if args.checkpoint_dir else ""
            print(f"interrupted{hint}", file=sys.stderr, flush=True)
        return 130
    finally:
        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
