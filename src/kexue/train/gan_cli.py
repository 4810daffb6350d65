"""``kexue train --task gan`` and ``kexue sample``: train a GAN of :mod:`kexue.nn.gan` with
:func:`kexue.train.gan.train_gan` from the command line (alone or under ``torchrun``), and draw a sample grid
from its checkpoint.

Examples::

    kexue train --task gan --dataset mnist --generator dcgan --norm selfmod --steps 2000 \\
        --checkpoint-dir runs/mnist-sm --sample-every 500 --data-dir ../shared/data
    kexue train --task gan ... --checkpoint-dir runs/mnist-sm --resume        # after an interruption
    torchrun --nproc-per-node 2 -m kexue.train.gan_cli --dataset cifar10 --generator resnet --width 32
    kexue sample --checkpoint runs/mnist-sm --out grid.png --n 64

28 x 28 data is padded to 32 x 32 (``--image-size 32``, the default). ``--dataset synthetic`` needs no files
(16 x 16 grey images with a bright patch in one quadrant; what the tests use, with ``--image-size 16``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")
TASKS = ("classify", "gan")


def split_task(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--task NAME`` (or ``--task=NAME``) taken out of ``argv``: ``(name or None, the rest)``.

    Example:
        >>> split_task(["--dataset", "mnist", "--task", "gan", "--steps", "5"])
        ('gan', ['--dataset', 'mnist', '--steps', '5'])
    """
    task, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--task":
            if i + 1 >= len(argv):
                raise SystemExit(f"kexue train: --task needs a value ({' or '.join(TASKS)})")
            task, i = argv[i + 1], i + 2
            continue
        if a.startswith("--task="):
            task = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if task is not None and task not in TASKS:
        raise SystemExit(f"kexue train: --task must be {' or '.join(TASKS)}, got {task!r}")
    return task, rest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kexue train --task gan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--generator", choices=("dcgan", "resnet", "style"), default="dcgan")
    p.add_argument("--discriminator", choices=("auto", "dcgan", "resnet"), default="auto",
                   help="auto: resnet for a resnet generator, dcgan otherwise")
    p.add_argument("--norm", choices=("bn", "selfmod", "cbn", "none"), default="bn",
                   help="generator norm (ignored by the style generator, which uses AdaIN)")
    p.add_argument("--upsample", choices=("deconv", "nearest"), default="deconv")
    p.add_argument("--conditional", action="store_true",
                   help="use the class labels (implied by --norm cbn): conditional norms in G, projection in D")
    p.add_argument("--width", type=int, default=32, help="generator width")
    p.add_argument("--d-width", type=int, default=None, help="discriminator width (default: --width)")
    p.add_argument("--z-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=32, help="SELF-MOD MLP hidden units (0: linear)")
    p.add_argument("--residual-scale", type=float, default=1.0, help="ResNet generator: x + alpha f(x)")
    p.add_argument("--spectral-norm", action="store_true", help="spectral norm on every D layer")
    p.add_argument("--init", choices=("auto", "dcgan", "orthogonal", "default"), default="auto",
                   help="auto: dcgan for dcgan/style nets, orthogonal for resnet ones")
    p.add_argument("--image-size", type=int, default=32, help="16, 32, 64 or 128; smaller images are padded")
    p.add_argument("--steps", type=int, default=2000, help="generator updates")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split across torchrun ranks)")
    p.add_argument("--loss", choices=("ns", "hinge"), default="ns")
    p.add_argument("--n-dis", type=int, default=1, help="D updates per G update")
    p.add_argument("--lr-g", type=float, default=2e-4)
    p.add_argument("--lr-d", type=float, default=2e-4)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--train-size", type=int, default=None, help="random subset of the training split")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="dataset folder (default: KEXUE_DATA_DIR, then ~/.cache/kexue)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir when a checkpoint exists")
    p.add_argument("--sample-every", type=int, default=0, help="save an EMA sample grid every N steps (0: never)")
    p.add_argument("--sample-dir", default=None, help="where the grids go (default: --checkpoint-dir)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="classifier-feature KID/FID every N steps (trains a small classifier once, cached)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    p.add_argument("--history-json", default=None, help="write the history here (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still print)")
    return p


def _positive(args: argparse.Namespace, *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        v = getattr(args, name)
        if v is None:
            continue
        if v < (0 if name in allow_zero else 1):
            raise SystemExit(f"kexue train --task gan: --{name.replace('_', '-')} must be "
                             f"{'>= 0' if name in allow_zero else '>= 1'}, got {v}")


def _real_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    from .__main__ import load_dataset, subset
    from .gan import gan_images

    x, y = load_dataset(args.dataset, "train", args.data_dir)
    x, y = subset(x, y, args.train_size, args.data_seed)
    return gan_images(x, args.image_size), y


def _models(args: argparse.Namespace, channels: int, classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from ..nn.gan import build_discriminator, build_generator

    conditional = args.conditional or args.norm == "cbn"
    if conditional and args.generator == "style":
        raise SystemExit("kexue train --task gan: the style generator is unconditional; drop --conditional")
    if conditional and args.norm not in ("cbn", "selfmod"):
        raise SystemExit("kexue train --task gan: --conditional needs --norm cbn or selfmod")
    k = classes if conditional else None
    init = args.init
    g_init = init if init != "auto" else ("orthogonal" if args.generator == "resnet" else "dcgan")
    if args.generator == "style":
        gcfg: dict[str, Any] = {"name": "style", "upsample": args.upsample}
    elif args.generator == "dcgan":
        gcfg = {"name": "dcgan", "upsample": args.upsample, "norm": args.norm, "num_classes": k,
                "hidden": args.hidden}
    else:
        gcfg = {"name": "resnet", "norm": args.norm, "num_classes": k, "hidden": args.hidden,
                "residual_scale": args.residual_scale}
    gcfg.update(z_dim=args.z_dim, image_size=args.image_size, channels=channels, width=args.width, init=g_init)
    dname = args.discriminator if args.discriminator != "auto" else \
        ("resnet" if args.generator == "resnet" else "dcgan")
    d_init = init if init != "auto" else ("orthogonal" if dname == "resnet" else "dcgan")
    dcfg = {"name": dname, "image_size": args.image_size, "channels": channels,
            "width": args.d_width or args.width, "spectral_norm": args.spectral_norm, "num_classes": k,
            "init": d_init}
    gen = torch.Generator().manual_seed(args.seed)
    try:
        return build_generator(gcfg, generator=gen), build_discriminator(dcfg, generator=gen)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"kexue train --task gan: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kexue train --task gan`` (``--task gan`` may be given or left out)."""
    from .checkpoint import atomic_write_bytes
    from .gan import GANConfig, train_gan

    _, argv = split_task(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    _positive(args, "steps", "batch_size", "n_dis", "width", "d_width", "z_dim", "checkpoint_every", "log_every",
              "eval_samples", "threads", "train_size", "hidden", "sample_every", "eval_every",
              allow_zero=("hidden", "sample_every", "eval_every"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = dist.init_from_env(args.device)
    try:
        x, y = _real_data(args)
        classes = int(y.max()) + 1
        G, D = _models(args, x.shape[1], classes)
        try:
            config = GANConfig(steps=args.steps, batch_size=args.batch_size, loss=args.loss, n_dis=args.n_dis,
                               lr_g=args.lr_g, lr_d=args.lr_d, betas=(args.beta1, args.beta2),
                               ema_decay=args.ema_decay, seed=args.seed, device=args.device,
                               checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                               resume=args.resume, progress=not args.no_progress, log=True,
                               log_every=args.log_every, sample_every=args.sample_every, sample_dir=args.sample_dir,
                               eval_every=args.eval_every)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"kexue train --task gan: {e}") from e
        metrics_fn = _kid_metrics(args, x, y) if args.eval_every else None
        if info.is_main:
            from ..nn.gan import count_parameters

            print(f"kexue train --task gan: {args.dataset} {tuple(x.shape)}, G {G.config['name']} "
                  f"({count_parameters(G):,} parameters), D {D.config['name']} ({count_parameters(D):,}), "
                  f"{info.world_size} process(es), device {args.device}", flush=True)
        data = (x, y) if (getattr(G, "num_classes", None) is not None or D.num_classes is not None) else x
        history = train_gan(G, D, data, config, metrics_fn=metrics_fn)
        if info.is_main:
            last = history.last
            print(f"final: step={last['step']} d_loss={last['d_loss']:.4f} g_loss={last['g_loss']:.4f}"
                  + "".join(f" {k}={v:.4g}" for k, v in last.items()
                            if k not in ("step", "d_loss", "g_loss", "time") and isinstance(v, float)), flush=True)
            if args.history_json:
                payload = {"args": vars(args), "world_size": info.world_size, "history": history.records}
                atomic_write_bytes(args.history_json, json.dumps(payload, indent=1).encode())
    except KeyboardInterrupt:
        if info.is_main:
            hint = f"; continue with --resume --checkpoint-dir {args.checkpoint_dir}" if args.checkpoint_dir else ""
            print(f"interrupted{hint}", file=sys.stderr, flush=True)
        return 130
    finally:
        dist.cleanup()
    return 0


def _kid_metrics(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor):
    from ..metrics.generative import extract_features, kid, train_feature_classifier
    from .gan import generate

    ext = train_feature_classifier(x, y, epochs=2, progress=False)
    n_real = min(x.shape[0], max(args.eval_samples, 2000))
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.data_seed))[:n_real]
    real = extract_features(ext, x[idx])

    def metrics(G: torch.nn.Module, step: int) -> dict[str, float]:
        fake = generate(G, args.eval_samples, generator=torch.Generator().manual_seed(args.seed + 7))
        r = kid(real, extract_features(ext, fake))
        return {"kid": r.value, "kid_se": r.stderr}

    return metrics


# ------------------------------------------------------------------------------------------------ sample

def cmd_sample(args: argparse.Namespace) -> int:
    """``kexue sample``: rebuild the generator stored in a GAN checkpoint and save a sample grid."""
    from ..nn.gan import build_generator
    from .checkpoint import checkpoint_path, load_checkpoint
    from .gan import generate, refresh_batchnorm_stats, save_image_grid

    path = Path(args.checkpoint)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        print(f"kexue sample: no checkpoint at {path}", file=sys.stderr)
        return 2
    if args.n < 1:
        print(f"kexue sample: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    state = load_checkpoint(path)
    if state.get("kind") != "gan" or not state.get("generator_config"):
        print(f"kexue sample: {path} is not a GAN checkpoint with a generator config "
              "(written by kexue train --task gan or kexue.train.train_gan with a kexue.nn.gan generator)",
              file=sys.stderr)
        return 2
    G = build_generator(state["generator_config"])
    G.load_state_dict(state["trainer"]["G" if args.no_ema else "G_ema"])
    gen = torch.Generator().manual_seed(args.seed)
    if not args.no_ema:  # averaged weights: recompute the BatchNorm statistics that go with them
        refresh_batchnorm_stats(G, batch_size=64, generator=torch.Generator().manual_seed(args.seed + 1))
    labels = None
    k = getattr(G, "num_classes", None)
    if args.labels is not None:
        if k is None:
            print("kexue sample: --labels given, but the generator is unconditional", file=sys.stderr)
            return 2
        try:
            vals = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            print(f"kexue sample: --labels must be comma-separated integers, got {args.labels!r}", file=sys.stderr)
            return 2
        if not vals or min(vals) < 0 or max(vals) >= k:
            print(f"kexue sample: --labels must lie in [0, {k}), got {args.labels!r}", file=sys.stderr)
            return 2
        labels = torch.tensor(vals).repeat(args.n // len(vals) + 1)[:args.n]
    images = generate(G, args.n, labels=labels, generator=gen)
    out = save_image_grid(images, args.out, nrow=args.nrow)
    print(f"kexue sample: {args.n} samples from step {state['trainer']['step']} of {path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
