"""``python -m kexue.train``: train an image classifier with :func:`kexue.train.fit` and print per-epoch
metrics. Works alone or under ``torchrun --nproc-per-node N`` (DDP; ``--batch-size`` is the global batch).

Examples::

    python -m kexue.train --dataset fashion-mnist --model smallcnn --epochs 5 --train-size 5000 \\
        --data-dir ../shared/data --checkpoint-dir runs/fmnist
    python -m kexue.train ... --checkpoint-dir runs/fmnist --resume      # after an interruption
    torchrun --nproc-per-node 2 -m kexue.train --dataset cifar10 --model resnet18 --epochs 30

``--dataset synthetic`` needs no files (16x16 grey images whose class is the quadrant of a bright
patch); it is what the tests use.

Bad arguments are refused before anything runs, with one line on stderr naming the argument and exit status
2: sizes and counts below 1, seeds outside [0, 2**64), non-finite or out-of-range numbers, an unusable device,
an output path that cannot be written (``--history-json``, the checkpoint in ``--checkpoint-dir``). With
``--resume``, a checkpoint written by a different run (any setting that changes the result: dataset, data
seed, subset sizes, augmentation, model, width, optimizer settings, epochs, batch size, seed, ...) or a corrupt
one is refused the same way, naming what differs; no checkpoint in the folder is said on stderr and the run
starts from scratch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from kexue.nn.vision import SmallCNN, resnet18
from kexue.train import distributed as D
from kexue.train.checkpoint import CheckpointError, atomic_write_bytes, check_output_file, checkpoint_path
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


_SEED_LIMIT = 2**64  # torch.manual_seed takes seeds in [0, 2**64)


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, epochs, widths)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    """argparse type: an integer in [0, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= value < _SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return value


def _number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in the given interval."""
    lo = f"({low:g}" if low_open else f"[{low:g}"
    hi = "inf)" if high is None else (f"{high:g})" if high_open else f"{high:g}]")
    want = f"a finite number in {lo}, {hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "python -m kexue.train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--model", choices=MODELS, default="smallcnn")
    p.add_argument("--width", type=_count, default=None, help="channel width (default: 32 smallcnn, 16 resnet18)")
    p.add_argument("--epochs", type=_count, default=10)
    p.add_argument("--batch-size", type=_count, default=128, help="global batch (split across torchrun ranks)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=_number(0, low_open=True), default=0.1)
    p.add_argument("--momentum", type=_number(0, 1, high_open=True), default=0.9)
    p.add_argument("--weight-decay", type=_number(0), default=5e-4)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup-epochs", type=_number(0), default=0.0, help="at most --epochs")
    p.add_argument("--augment", choices=AUGMENTS, default="auto",
                   help="auto: flips+crops (pad 4) on cifar10, crops (pad 2) on the 28x28 sets, none on synthetic")
    p.add_argument("--train-size", type=_count, default=None, help="random subset of the training split (>= 1)")
    p.add_argument("--test-size", type=_count, default=None, help="random subset of the test split (>= 1)")
    p.add_argument("--data-seed", type=_seed, default=0, help="seed of the train/test subsets")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: KEXUE_DATA_DIR, then ~/.cache/kexue)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write checkpoint.pt there after every epoch (with the run's settings, checked on --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir when there is one (it must come from a run "
                        "with the same settings); without one, say so and start from scratch")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("bf16",), default=None)
    p.add_argument("--threads", type=_count, default=None, help="torch intra-op threads per process")
    p.add_argument("--history-json", default=None, help="write the per-epoch history here (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics lines still print)")
    return p


def _augment_choice(choice: str, dataset: str) -> tuple[str, int]:
    """The augmentation ``choice`` means on ``dataset``: ``(name, padding)``."""
    if choice == "auto":
        choice = {"cifar10": "flipcrop", "synthetic": "none"}.get(dataset, "crop")
    return choice, (0 if choice == "none" else 4 if dataset == "cifar10" else 2)


def _augment(choice: str, dataset: str) -> FlipCrop | None:
    choice, pad = _augment_choice(choice, dataset)
    if choice == "none":
        return None
    return FlipCrop(padding=pad, flip=choice == "flipcrop")


def _check_device(name: str) -> str | None:
    """Why ``--device name`` cannot be used, or None."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        return f"must be cpu, cuda or cuda:N, got {name!r}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name!r} asked for, but torch sees no CUDA device"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def main(argv: list[str] | None = None, *, prog: str = "python -m kexue.train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def fail(message: str, status: int = 2) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return status

    # --- everything that can be checked before any work (one line on stderr, exit status 2)
    if args.warmup_epochs > args.epochs:
        return fail(f"argument --warmup-epochs: must be at most --epochs ({args.epochs}), got {args.warmup_epochs:g}")
    if args.resume and args.checkpoint_dir is None:
        return fail("argument --resume: needs --checkpoint-dir (the folder holding the checkpoint)")
    if args.data_dir is not None and args.dataset != "synthetic" and not Path(args.data_dir).is_dir():
        return fail(f"argument --data-dir: {args.data_dir} is not a folder")
    bad_device = _check_device(args.device)
    if bad_device:
        return fail(f"argument --device: {bad_device}")
    ckpt = checkpoint_path(args.checkpoint_dir) if args.checkpoint_dir is not None else None
    if _is_main_rank():
        for flag, path, what in (("--history-json", args.history_json, "file"), ("--checkpoint-dir", ckpt,
                                                                                  "checkpoint")):
            if path is not None:
                try:
                    check_output_file(path, what=what)
                except ValueError as exc:
                    return fail(f"argument {flag}: {exc}")
        if args.resume and ckpt is not None and not ckpt.is_file():
            where = "" if ckpt.parent.is_dir() else f" (the folder {ckpt.parent} does not exist)"
            print(f"{prog}: note: --resume: no checkpoint at {ckpt}{where}; starting from scratch", file=sys.stderr,
                  flush=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    width = args.width or (32 if args.model == "smallcnn" else 16)
    augment_name, augment_pad = _augment_choice(args.augment, args.dataset)
    try:
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
            warmup_epochs=args.warmup_epochs, seed=args.seed, device=args.device,
            checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=not args.no_progress, log=True,
            amp=args.amp)
    except (TypeError, ValueError) as exc:  # (the argument types above should have caught it already)
        return fail(f"--{str(exc).replace('_', '-')}")

    info = D.init_from_env(args.device)
    try:
        if args.batch_size % info.world_size:
            return fail(f"argument --batch-size: the global batch {args.batch_size} must be divisible by the "
                        f"number of processes {info.world_size}")
        try:
            xtr, ytr = subset(*load_dataset(args.dataset, "train", args.data_dir), args.train_size, args.data_seed)
            xte, yte = subset(*load_dataset(args.dataset, "test", args.data_dir), args.test_size,
                              derive_seed(args.data_seed, 1))
        except (OSError, ValueError) as exc:
            return fail(f"argument --dataset {args.dataset}: {exc}")
        classes = int(max(ytr.max(), yte.max())) + 1
        in_ch = xtr.shape[1]
        torch.manual_seed(args.seed)  # model initialisation
        if args.model == "smallcnn":
            model: torch.nn.Module = SmallCNN(in_ch, classes, width=width)
        else:
            model = resnet18(in_ch, classes, width=width)
        # everything else that changes the result: stored in the checkpoint, compared on --resume
        config.run_info = {"dataset": args.dataset, "data_seed": args.data_seed, "train_size": int(xtr.shape[0]),
                           "test_size": int(xte.shape[0]), "augment": augment_name, "augment_padding": augment_pad,
                           "model": args.model, "width": width}
        if info.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"kexue.train: {args.dataset} train {tuple(xtr.shape)} test {tuple(xte.shape)}, {args.model} "
                  f"({n_params:,} parameters), {info.world_size} process(es), device {args.device}", flush=True)
        try:
            history = fit(model, (xtr, ytr), config, augment=_augment(args.augment, args.dataset),
                          eval_data=(xte, yte))
        except CheckpointError as exc:
            return fail(f"argument --resume: {exc}")
        except FloatingPointError as exc:
            return fail(f"training diverged: {exc} (a smaller --lr may help)", status=1)
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
