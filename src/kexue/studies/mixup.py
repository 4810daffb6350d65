"""Study ``mixup`` (article 1, kexue.fm/archives/5693): SamplePairing and mixup as a regularizer.

Su's claim: mixing ``(ε·x_a + (1-ε)·x_b, ε·y_a + (1-ε)·y_b)`` with ε ~ U[0, 1] is a regularizer that pulls the
model towards a function that is linear between training points, and so, among models that fit the data,
picks the more linear one and generalizes better, most visibly on small data sets. We train the same network
with the same epochs and schedule four ways -- ERM, SamplePairing (with a scaled on/off schedule), mixup with
ε ~ U[0, 1] (Su) and mixup with ε ~ Beta(0.2, 0.2) (the mixup paper's ImageNet setting) -- on small subsets
of Fashion-MNIST and CIFAR-10, over several seeds, and measure the test error, the calibration (ECE) and the
linearity gap on held-out test pairs (:func:`kexue.metrics.classification.linearity_gap`), which is the
regularizer's own quantity.

Which regime each configuration tests (a regularizer can only help once plain training fits the data):

- ``QUICK`` (``kexue reproduce mixup --quick``, about 30 s): Fashion-MNIST 1k, 5 epochs, one seed. A smoke test
  in the *under-fitted* regime -- ERM has not fitted its training set -- so its verdict says nothing about
  the claim.
- ``SHORT`` (``run_config(ctx, SHORT)``; the full mode before issue 23): 12 epochs on Fashion-MNIST 5k and
  10k and CIFAR-10 5k (ResNet-18 width 8 with flips and crops), 3 seeds. The *short-training* regime: ERM itself
  is under-fitted (its clean training loss ends at 0.15-0.18 on Fashion-MNIST and 1.1 on CIFAR-10), so a
  regularizer can only cost accuracy there.
- ``FULL`` (``kexue reproduce mixup --full``): the *over-fitting* regime the claim is about. Each setting is
  trained until ERM's clean training loss is near zero and its test error has stopped improving: Fashion-MNIST
  5k with the SmallCNN (width 8) for 80 epochs, and CIFAR-10 5k with the ResNet-18 of width 8 **without flips
  and crops** for 40 epochs. Why that CIFAR-10 setting: with flips and crops the same network ends 12 epochs
  at a clean training loss of 1.1 and would need hundreds of epochs to fit 5k images, beyond the 3 hours on 2
  CPU cores this study may take; without augmentation it fits them well inside a 40-epoch cosine schedule
  and then over-fits, so weight decay and the mixing are the only regularizers, as on
  Fashion-MNIST (which is never augmented). The network and subset are the ones of the short-training
  table, so the two tables differ in training length (and, on CIFAR-10, the augmentation) only.

Verdict, judged at the end of training against ERM: the claim holds on a setting when mixup (ε ~ U[0, 1])
lowers both the test error and the linearity gap relative to ERM by more than the seed spread (the two means
differ by more than the sum of the two standard deviations). The article's own framing -- does mixup's
advantage grow as ERM over-fits? -- is judged from the learning curves: the advantage (ERM's test error minus
the method's, paired by seed, averaged over a 5-epoch window) when ERM has just fitted its training set
(the first epoch at which ERM's mean clean training loss is at most ``FIT_LOSS``) against the advantage over the
last 5 epochs; it grows when the increase exceeds its seed standard deviation.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..augment import Mixup, SamplePairing, SamplePairingSchedule, mixed_loss, mixup, sample_pairing
from ..metrics.classification import evaluate_classifier, linearity_gap, predict_logits
from .base import Result, StudyContext, Table, register_study, seeded_global_rng, torch_threads

METHODS = ("ERM", "SamplePairing", "mixup U[0,1] (Su)", "mixup Beta(0.2,0.2)")
SU = "mixup U[0,1] (Su)"
FIT_LOSS = 0.1  # ERM "has fitted its training set" once its mean clean training loss is at most this
NEAR_ZERO = 0.05  # ... and is "near zero" at the end of training when at most this
PLATEAU_PT = 0.5  # its test error "has stopped improving" when the last quarter gains at most this (points)
WINDOW = 5  # epochs averaged for a point on a learning curve
COLORS = {"ERM": "C0", "SamplePairing": "C1", "mixup U[0,1] (Su)": "C2", "mixup Beta(0.2,0.2)": "C3"}

# Each setting names its dataset, training-subset size, network and width, and optionally whether CIFAR-style
# flips and crops are applied ("flip_crop", default False) and its own number of epochs (default: the
# configuration's "epochs"); every method of a setting trains on the same schedule.
QUICK: dict[str, Any] = {
    "regime": "short training, under-fitted: a smoke test (ERM has not fitted its training set)",
    "settings": [{"dataset": "fashion_mnist", "n_train": 1000, "net": "cnn", "width": 8, "flip_crop": False}],
    "epochs": 5, "seeds": 1, "batch_size": 50, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4,
    "warmup_epochs": 0.5, "curve_test": 500, "final_test": 2000, "gap_pairs": 1000, "train_probe": 500,
}
SHORT: dict[str, Any] = {
    "regime": "short training (12 epochs), under-fitted: ERM itself has not fitted its training set",
    "settings": [{"dataset": "fashion_mnist", "n_train": 5000, "net": "cnn", "width": 8, "flip_crop": False},
                 {"dataset": "fashion_mnist", "n_train": 10000, "net": "cnn", "width": 8, "flip_crop": False},
                 {"dataset": "cifar10", "n_train": 5000, "net": "resnet18", "width": 8, "flip_crop": True}],
    "epochs": 12, "seeds": 3, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "warmup_epochs": 1, "curve_test": 1000, "final_test": None, "gap_pairs": 5000, "train_probe": 1000,
}
FULL: dict[str, Any] = {
    "regime": "long training, over-fitting: each setting runs until ERM's clean training loss is near zero and "
              "its test error has stopped improving",
    "settings": [{"dataset": "fashion_mnist", "n_train": 5000, "net": "cnn", "width": 8, "flip_crop": False,
                  "epochs": 80},
                 {"dataset": "cifar10", "n_train": 5000, "net": "resnet18", "width": 8, "flip_crop": False,
                  "epochs": 40}],
    "epochs": 80, "seeds": 3, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "warmup_epochs": 1, "curve_test": 2000, "final_test": None, "gap_pairs": 5000, "train_probe": 1000,
}


def sample_pairing_schedule(epochs: int) -> SamplePairingSchedule:
    """The paper's policy (off for 100 epochs, 8 on / 2 off until 800, then off) scaled to ``epochs``:
    start at 10% and stop at 80% of the run, and alternate 4 epochs on / 1 off in between (the paper's 4:1)."""
    return SamplePairingSchedule.scaled(epochs, on=4, off=1) if epochs >= 5 else \
        SamplePairingSchedule(start=0, stop=max(1, epochs - 1), on=4, off=1)


def _load(dataset: str, data_dir: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    from .. import data as kd

    if dataset == "fashion_mnist":
        xtr, ytr = kd.load_fashion_mnist("train", data_dir)
        xte, yte = kd.load_fashion_mnist("test", data_dir)
        return xtr.unsqueeze(1), ytr, xte.unsqueeze(1), yte, "fashion-mnist"
    xtr, ytr = kd.load_cifar10("train", data_dir)
    xte, yte = kd.load_cifar10("test", data_dir)
    return xtr, ytr, xte, yte, kd.cifar10_source(data_dir)


def _balanced_subset(y: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices with (as near as possible) the same count per class, drawn with ``generator``."""
    classes = int(y.max()) + 1
    per = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    out = []
    for c in range(classes):
        idx = (y == c).nonzero().squeeze(1)
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:per[c]]])
    idx = torch.cat(out)
    return idx[torch.randperm(idx.numel(), generator=generator)]


def _make_net(setting: dict[str, Any], in_channels: int) -> torch.nn.Module:
    from ..nn.vision import SmallCNN, resnet18

    if setting["net"] == "cnn":
        return SmallCNN(in_channels=in_channels, num_classes=10, width=setting["width"])
    return resnet18(in_channels=in_channels, num_classes=10, width=setting["width"])


def _transform(method: str, epochs: int):
    if method == "ERM":
        return None
    if method == "SamplePairing":
        return SamplePairing(schedule=sample_pairing_schedule(epochs))
    if method == SU:
        return Mixup(alpha="uniform", num_classes=10)
    return Mixup(alpha=0.2, num_classes=10)


def _setting_epochs(cfg: dict[str, Any], setting: dict[str, Any]) -> int:
    return int(setting.get("epochs", cfg["epochs"]))


def _setting_name(setting: dict[str, Any]) -> str:
    n = setting["n_train"]
    return f"{setting['dataset']} {n // 1000}k" if n % 1000 == 0 else f"{setting['dataset']} {n}"


def _curve(runs: list[list[dict[str, Any]]], key: str) -> torch.Tensor:
    """One learning-curve quantity of several runs (one list of per-epoch records each): ``[runs, epochs]``."""
    return torch.tensor([[rec[key] for rec in run] for run in runs], dtype=torch.float64)


def _window(values: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mean over the last axis of ``WINDOW`` consecutive epochs centred on the 0-based ``epoch``, shifted to stay
    inside the run (so the last epoch's window is the last ``WINDOW`` epochs)."""
    n = values.shape[-1]
    lo = max(0, min(epoch - WINDOW // 2, n - WINDOW))
    return values[..., lo:lo + WINDOW].mean(-1)


def erm_regime(erm: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Where plain training (ERM) stands on its learning curves (one list of per-epoch records per seed, with
    ``clean_train_loss`` and ``test_error``), averaged over seeds.

    Returns the number of epochs; ``fit_epoch``, the first (1-based) epoch at which the mean clean training
    loss is at most ``FIT_LOSS`` (None if never); ``best_epoch`` and ``best_error``, where the mean test error
    is lowest; ``final_error``; ``end_clean_loss``; ``last_quarter_gain_pt``, how many points the (windowed)
    test error still fell over the last quarter of training; and ``reached``: whether ERM is in the
    over-fitting regime -- it fitted, its clean training loss ends at most ``NEAR_ZERO`` and its test error
    fell by at most ``PLATEAU_PT`` points over the last quarter.

    Example:
        >>> recs = [{"clean_train_loss": 1.0 / (e + 1) ** 2, "test_error": max(0.1, 0.5 - 0.05 * e)}
        ...         for e in range(20)]
        >>> r = erm_regime([recs])
        >>> r["fit_epoch"], r["best_epoch"], r["reached"]
        (4, 9, True)
    """
    loss = _curve(erm, "clean_train_loss").mean(0)
    err = _curve(erm, "test_error").mean(0)
    n = err.numel()
    fit = next((e for e in range(n) if loss[e] <= FIT_LOSS), None)
    best = int(err.argmin())
    gain = 100 * float(_window(err, (3 * n) // 4) - _window(err, n - 1))
    end_loss = float(loss[-1])
    return {"epochs": n, "fit_epoch": None if fit is None else fit + 1, "best_epoch": best + 1,
            "best_error": float(err[best]), "final_error": float(err[-1]), "end_clean_loss": end_loss,
            "last_quarter_gain_pt": gain,
            "reached": fit is not None and end_loss <= NEAR_ZERO and gain <= PLATEAU_PT}


def advantage(erm: list[list[dict[str, Any]]], other: list[list[dict[str, Any]]], epoch: int) -> torch.Tensor:
    """Per seed, ERM's test error minus ``other``'s in points (> 0: ``other`` is better), each averaged over the
    ``WINDOW`` epochs around the 0-based ``epoch``. Runs are paired by position (same seed, subset and initial
    weights).

    Example:
        >>> erm = [[{"test_error": 0.25}] * 6]
        >>> mix = [[{"test_error": 0.125}] * 6]
        >>> advantage(erm, mix, 5).tolist()
        [12.5]
    """
    return 100 * (_window(_curve(erm, "test_error"), epoch) - _window(_curve(other, "test_error"), epoch))


def growth(erm: list[list[dict[str, Any]]], other: list[list[dict[str, Any]]], fit_epoch: int | None
           ) -> dict[str, Any]:
    """Does ``other``'s advantage over ERM grow once ERM has fitted its training set? The advantage
    (:func:`advantage`) at the 1-based ``fit_epoch`` and over the last ``WINDOW`` epochs, and their difference
    per seed; ``grows`` when the mean difference is positive and larger than its standard deviation over seeds
    (None when ERM never fitted, ``fit_epoch=None``).

    Example:
        >>> erm = [[{"test_error": 0.20}] * 10, [{"test_error": 0.22}] * 10]
        >>> mix = [[{"test_error": 0.20}] * 5 + [{"test_error": 0.15}] * 5,
        ...        [{"test_error": 0.22}] * 5 + [{"test_error": 0.18}] * 5]
        >>> g = growth(erm, mix, 1)
        >>> round(g["growth"], 6), g["grows"]
        (4.5, True)
    """
    n = len(erm[0])
    end = advantage(erm, other, n - 1)
    if fit_epoch is None:
        return {"at_fit": None, "at_fit_sd": None, "at_end": float(end.mean()), "at_end_sd": _sd(end),
                "growth": None, "growth_sd": None, "grows": None}
    at_fit = advantage(erm, other, fit_epoch - 1)
    diff = end - at_fit
    mean, sd = float(diff.mean()), _sd(diff)
    return {"at_fit": float(at_fit.mean()), "at_fit_sd": _sd(at_fit), "at_end": float(end.mean()),
            "at_end_sd": _sd(end), "growth": mean, "growth_sd": sd, "grows": mean > 0 and mean > sd}


def _sd(v: torch.Tensor) -> float:
    return float(v.std()) if v.numel() > 1 else 0.0


def _r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _lowered(erm: list[float], mix: list[float]) -> tuple[bool, float, float]:
    """Does ``mix`` lower ``erm`` beyond the seed spread? Returns (verdict, difference, spread)."""
    me, se = _mean_std(erm)
    mm, sm = _mean_std(mix)
    diff, spread = me - mm, se + sm
    return diff > spread, diff, spread


def _example_grid(ctx: StudyContext, sets: list[tuple[str, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 6
    rows = ["x_a", "x_b (partner)", "mixup U[0,1]", "mixup Beta(.2,.2)", "SamplePairing"]
    fig, axes = plt.subplots(len(rows) * len(sets), k, figsize=(1.5 * k, 1.55 * len(rows) * len(sets)))
    for si, (name, x) in enumerate(sets):
        both = x[:2 * k].float() / 255
        ylab = torch.arange(both.shape[0])
        # every function draws its permutation first, so equally seeded generators give the same partners
        mu, _, partner, lam_u = mixup(both, ylab, alpha="uniform", per="sample", generator=ctx.generator(900))
        mb, _, _, lam_b = mixup(both, ylab, alpha=0.2, per="sample", generator=ctx.generator(900))
        sp, _ = sample_pairing(both, ylab, generator=ctx.generator(900))
        imgs = [(both[:k], [""] * k), (both[partner[:k]], [""] * k),
                (mu[:k], [f"ε={v:.2f}" for v in lam_u[:k].tolist()]),
                (mb[:k], [f"ε={v:.2f}" for v in lam_b[:k].tolist()]), (sp[:k], ["ε=0.50, label y_a"] * k)]
        for ri, (batch, titles) in enumerate(imgs):
            for ci in range(k):
                ax = axes[si * len(rows) + ri, ci]
                im = batch[ci]
                if im.shape[0] == 1:
                    ax.imshow(im[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(im.permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if titles[ci]:
                    ax.set_title(titles[ci], fontsize=7)
                if ci == 0:
                    ax.set_ylabel(f"{name}\n{rows[ri]}" if ri == 0 else rows[ri], fontsize=7)
    fig.tight_layout()
    ctx.save_figure(fig, "mixup_examples", "Each column: x_a, its partner x_b, the mixup images "
                    "ε·x_a + (1−ε)·x_b with ε ~ U[0,1] and ε ~ Beta(0.2, 0.2), and the SamplePairing image "
                    "(x_a + x_b)/2, which keeps the label of x_a.")


def _curves_figure(ctx: StudyContext, curves: dict[str, dict[str, list[list[dict[str, Any]]]]],
                   regimes: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.3 * len(names)), squeeze=False)
    for r, setting in enumerate(names):
        for method, runs in curves[setting].items():
            ep = [rec["epoch"] + 1 for rec in runs[0]]
            for c, key in enumerate(("clean_train_loss", "test_error")):
                vals = _curve(runs, key)
                mean = vals.mean(0)
                line, = axes[r, c].plot(ep, mean.tolist(), label=method, color=COLORS[method])
                if vals.shape[0] > 1:
                    sd = vals.std(0)
                    axes[r, c].fill_between(ep, (mean - sd).tolist(), (mean + sd).tolist(),
                                            color=line.get_color(), alpha=0.15)
        reg = regimes[setting]
        for c in range(2):
            if reg["fit_epoch"] is not None:
                axes[r, c].axvline(reg["fit_epoch"], color="grey", ls=":", lw=1)
            axes[r, c].axvline(reg["best_epoch"], color="black", ls="--", lw=0.8)
            axes[r, c].set_xlabel("epoch")
            axes[r, c].grid(alpha=0.3)
        axes[r, 0].set_title(f"{setting}: training loss on clean (unmixed) data", fontsize=9)
        axes[r, 1].set_title(f"{setting}: test error (ERM lowest at epoch {reg['best_epoch']})", fontsize=9)
        axes[r, 0].set_yscale("log")
        # zoom on where the methods part: from just below the lowest mean to the ERM curve's level a quarter in
        means = torch.stack([_curve(runs, "test_error").mean(0) for runs in curves[setting].values()])
        erm_err = _curve(curves[setting]["ERM"], "test_error").mean(0)
        lo, hi = float(means.min()), float(_window(erm_err, erm_err.numel() // 4))
        if hi > lo:
            axes[r, 1].set_ylim(lo - 0.1 * (hi - lo), hi + 0.6 * (hi - lo))
        axes[r, 1].legend(fontsize=7)
    fig.tight_layout()
    ctx.save_figure(fig, "mixup_learning_curves", "Learning curves (mean ± std over seeds): the training loss "
                    "measured on clean training images, and the test error on a fixed test subset, per epoch. "
                    f"Dotted: the first epoch at which ERM's clean training loss is ≤ {FIT_LOSS}; dashed: the epoch "
                    "of ERM's lowest mean test error.")


def _advantage_figure(ctx: StudyContext, curves: dict[str, dict[str, list[list[dict[str, Any]]]]],
                      regimes: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    for i, setting in enumerate(names):
        ax = axes[0, i]
        erm = curves[setting]["ERM"]
        n = len(erm[0])
        ep = list(range(1, n + 1))
        for method in METHODS[1:]:
            a = torch.stack([advantage(erm, curves[setting][method], e) for e in range(n)], 1)  # [seeds, epochs]
            mean = a.mean(0)
            line, = ax.plot(ep, mean.tolist(), label=method, color=COLORS[method])
            if a.shape[0] > 1:
                sd = a.std(0)
                ax.fill_between(ep, (mean - sd).tolist(), (mean + sd).tolist(), color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="black", lw=0.8)
        reg = regimes[setting]
        if reg["fit_epoch"] is not None:
            ax.axvline(reg["fit_epoch"], color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("advantage over ERM (test-error points)")
        ax.grid(alpha=0.3)
        gap = _curve(erm, "test_loss").mean(0) - _curve(erm, "clean_train_loss").mean(0)
        tw = ax.twinx()
        tw.plot(ep, gap.tolist(), color="grey", ls="--", lw=1, label="ERM: test loss − clean train loss")
        tw.set_ylabel("ERM generalisation gap (nats)", color="grey", fontsize=8)
        ax.set_title(f"{setting}", fontsize=9)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = tw.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right", framealpha=0.8)
    fig.tight_layout()
    ctx.save_figure(fig, "mixup_advantage_curves", f"Each method's advantage over ERM (ERM's test error minus the "
                    f"method's, paired by seed, {WINDOW}-epoch moving average; mean ± std over seeds) against the "
                    "epoch, and ERM's over-fitting (dashed, right axis: its test loss minus its clean training loss). "
                    f"Dotted: the first epoch at which ERM's clean training loss is ≤ {FIT_LOSS}.")


def _gap_figure(ctx: StudyContext, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in runs))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    markers = dict(zip(METHODS, "osD^"))
    for i, s in enumerate(settings):
        ax = axes[0, i]
        for m in METHODS:
            pts = [(r["gap"], r["error"]) for r in runs if r["setting"] == s and r["method"] == m]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[m], label=m)
        ax.set_xlabel("linearity gap (held-out pairs)")
        ax.set_ylabel("test error")
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    ctx.save_figure(fig, "mixup_gap_vs_error", "Each point is one trained model: its linearity gap on held-out "
                    "test pairs against its test error.")


@register_study("mixup", article=1, title="From SamplePairing to mixup: a regularizer in disguise",
                quick_budget_s=140,
                full_time="about 2.5 hours on 2 idle CPU cores (24 runs of one thread each: 2 settings x 4 methods x "
                          "3 seeds; Fashion-MNIST 80 epochs, about 5 min a run, CIFAR-10 40 epochs, about 8 min a run; "
                          "until ERM over-fits; longer when the cores are shared)",
                datasets=("fashion-mnist", "cifar10"))
def run(ctx: StudyContext) -> Result:
    """Quick mode: the under-fitted smoke test (``QUICK``); full mode: the over-fitting regime (``FULL``)."""
    return run_config(ctx, QUICK if ctx.quick else FULL)


def run_config(ctx: StudyContext, cfg: dict[str, Any]) -> Result:
    """Run the study with an explicit configuration (``QUICK``, ``SHORT``, ``FULL`` or a variant of them).

    On the CPU the runs use one intra-op thread (restored afterwards): these small convolutions gain
    little from a second thread and lose several-fold when the cores are shared.
    """
    with torch_threads(1 if str(ctx.device).startswith("cpu") else None):
        return _run(ctx, cfg)


def _train_one(ctx: StudyContext, cfg: dict[str, Any], setting: dict[str, Any], name: str, method: str, seed: int,
               train: tuple, curve_eval: tuple, final: tuple, gap_pairs: tuple, metrics_fn: Callable,
               augment: Any) -> dict[str, Any]:
    """One training run of the study and its evaluation, as plain JSON-able values. The whole run draws from
    the global RNG seeded by ``seed`` (the initial weights: every method gets the same ones for a seed) and
    leaves it as it was."""
    from ..train import TrainConfig, fit

    epochs = _setting_epochs(cfg, setting)
    with seeded_global_rng(seed, device=ctx.device):
        net = _make_net(setting, train[0].shape[1])
        tc = TrainConfig(epochs=epochs, batch_size=cfg["batch_size"], optimizer="sgd", lr=cfg["lr"],
                         momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], schedule="cosine",
                         warmup_epochs=cfg["warmup_epochs"], seed=seed, device=ctx.device, progress=False, log=False)
        hist = fit(net, train, tc, loss_fn=mixed_loss, batch_transform=_transform(method, epochs), augment=augment,
                   eval_data=curve_eval, metrics_fn=metrics_fn)
        net = hist.model
        ev = evaluate_classifier(net, *final)
        gap_a, gap_b, gap_eps = gap_pairs
        gap = linearity_gap(net, gap_a, gap_b, eps=gap_eps)
    errs = [r["test_error"] for r in hist.records]
    best = min(range(len(errs)), key=errs.__getitem__)
    run = {"setting": name, "method": method, "seed": seed, "epochs": epochs, "error": ev["error"], "ece": ev["ece"],
           "nll": ev["nll"], "gap": gap, "clean_train_loss": hist.last["clean_train_loss"],
           "clean_train_error": hist.last["clean_train_error"], "curve_final_error": errs[-1],
           "curve_best_error": errs[best], "curve_best_epoch": best + 1,
           "time_s": sum(r["time"] for r in hist.records)}
    curve = [{k: r[k] for k in ("epoch", "train_loss", "clean_train_loss", "clean_train_error", "test_error",
                                "test_loss")} for r in hist.records]
    return {"run": run, "curve": curve}


def _run(ctx: StudyContext, cfg: dict[str, Any]) -> Result:
    from ..train import FlipCrop

    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    data_used: dict[str, Any] = {}
    examples: list[tuple[str, torch.Tensor]] = []
    loaded: dict[str, tuple] = {}
    schedules: dict[str, str] = {}
    total = len(cfg["settings"]) * len(METHODS) * cfg["seeds"]
    bar = ctx.pbar(total=total, desc="mixup study")
    for setting in cfg["settings"]:
        ds = setting["dataset"]
        if ds not in loaded:
            loaded[ds] = _load(ds, ctx.data_dir)
            examples.append((ds, loaded[ds][2][:12]))
        xtr_all, ytr_all, xte_u8, yte_all, source = loaded[ds]
        data_used[ds] = source
        name = _setting_name(setting)
        if name in curves:
            raise ValueError(f"two settings of the configuration are both named {name!r}")
        schedules[name] = repr(sample_pairing_schedule(_setting_epochs(cfg, setting)))
        curves[name] = {m: [] for m in METHODS}
        g_test = ctx.generator(500)
        final_idx = (torch.arange(yte_all.numel()) if cfg["final_test"] is None
                     else _balanced_subset(yte_all, cfg["final_test"], g_test))
        curve_idx = _balanced_subset(yte_all, cfg["curve_test"], g_test)
        x_final = xte_u8[final_idx].float() / 255
        y_final = yte_all[final_idx]
        # held-out pairs and their ε: the same for every method and seed (a paired comparison)
        n_gap = min(cfg["gap_pairs"], x_final.shape[0])
        gap_perm = torch.randperm(x_final.shape[0], generator=g_test)[:n_gap]
        gap_a = x_final[gap_perm]
        gap_b = x_final[torch.roll(gap_perm, 1)]
        gap_eps = torch.rand(n_gap, generator=g_test, dtype=torch.float64)
        augment = FlipCrop(padding=4) if setting.get("flip_crop", False) else None
        for s in range(cfg["seeds"]):
            seed = ctx.seed + s
            sub = _balanced_subset(ytr_all, setting["n_train"], ctx.generator(1000 + s))
            xtr, ytr = xtr_all[sub], ytr_all[sub]
            probe = sub[: cfg["train_probe"]]
            x_probe, y_probe = xtr_all[probe].float() / 255, ytr_all[probe]

            def metrics_fn(model: torch.nn.Module, epoch: int, x_probe=x_probe, y_probe=y_probe) -> dict[str, float]:
                logits = predict_logits(model, x_probe)
                return {"clean_train_loss": float(torch.nn.functional.cross_entropy(logits, y_probe)),
                        "clean_train_error": float((logits.argmax(1) != y_probe).double().mean())}

            for method in METHODS:
                job = functools.partial(_train_one, ctx, cfg, setting, name, method, seed, (xtr, ytr),
                                        (xte_u8[curve_idx], yte_all[curve_idx]), (x_final, y_final),
                                        (gap_a, gap_b, gap_eps), metrics_fn, augment)
                key = {"setting": setting, "method": method, "seed": seed, "base_seed": ctx.seed, "source": source,
                       "cfg": {k: v for k, v in cfg.items() if k not in ("settings", "regime")}}
                done = ctx.cached_run(key, job)
                runs.append(done["run"])
                curves[name][method].append(done["curve"])
                bar.update(1)
    bar.close()
    return _report(ctx, cfg, runs, curves, data_used, examples, schedules)


def _report(ctx: StudyContext, cfg: dict[str, Any], runs: list[dict[str, Any]],
            curves: dict[str, dict[str, list[list[dict[str, Any]]]]], data_used: dict[str, Any],
            examples: list[tuple[str, torch.Tensor]], schedules: dict[str, str]) -> Result:
    settings = list(curves)
    epochs_of = {name: len(curves[name]["ERM"][0]) for name in settings}
    regimes = {name: erm_regime(curves[name]["ERM"]) for name in settings}

    # ----- end of training against ERM (the verdict)
    main_rows, best_rows, verdict_rows, holds = [], [], [], []
    for name in settings:
        by = {m: [r for r in runs if r["setting"] == name and r["method"] == m] for m in METHODS}
        for m in METHODS:
            rr = by[m]
            row: list[Any] = [name, m, len(rr), epochs_of[name]]
            for key, scale in (("error", 100.0), ("ece", 100.0), ("gap", 1.0), ("nll", 1.0),
                               ("clean_train_loss", 1.0)):
                mu, sd = _mean_std([r[key] * scale for r in rr])
                row += [round(mu, 4), round(sd, 4)]
            main_rows.append(row)
            brow: list[Any] = [name, m, epochs_of[name]]
            for key in ("curve_final_error", "curve_best_error"):
                mu, sd = _mean_std([100 * r[key] for r in rr])
                brow += [round(mu, 3), round(sd, 3)]
            brow += [round(statistics.fmean(r["curve_best_epoch"] for r in rr), 1),
                     round(100 * statistics.fmean(r["clean_train_error"] for r in rr), 3)]
            best_rows.append(brow)
        for m in METHODS[1:]:
            e_ok, e_d, e_s = _lowered([r["error"] for r in by["ERM"]], [r["error"] for r in by[m]])
            g_ok, g_d, g_s = _lowered([r["gap"] for r in by["ERM"]], [r["gap"] for r in by[m]])
            verdict_rows.append([name, m, round(100 * e_d, 3), round(100 * e_s, 3), e_ok, round(g_d, 4),
                                 round(g_s, 4), g_ok, e_ok and g_ok])
            if m == SU:
                holds.append((name, e_ok, g_ok, e_d, e_s, g_d, g_s))
    n_hold = sum(1 for h in holds if h[1] and h[2])
    if n_hold == len(holds):
        verdict = "holds"
    elif n_hold == 0 and not any(h[1] or h[2] for h in holds):
        verdict = "does not hold"
    else:
        verdict = "partly holds"

    # ----- the article's framing: does the advantage grow once ERM has fitted (and then over-fits)?
    regime_rows, adv_rows, framing = [], [], []
    for name in settings:
        reg = regimes[name]
        regime_rows.append([name, reg["epochs"], round(reg["end_clean_loss"], 4), reg["fit_epoch"], reg["best_epoch"],
                            round(100 * reg["best_error"], 3), round(100 * reg["final_error"], 3),
                            round(reg["last_quarter_gain_pt"], 3), reg["reached"]])
        for m in METHODS[1:]:
            g = growth(curves[name]["ERM"], curves[name][m], reg["fit_epoch"])
            mid = advantage(curves[name]["ERM"], curves[name][m], epochs_of[name] // 2)
            nums = (g["at_fit"], g["at_fit_sd"], float(mid.mean()), _sd(mid), g["at_end"], g["at_end_sd"],
                    g["growth"], g["growth_sd"])
            adv_rows.append([name, m, reg["fit_epoch"], *(_r3(v) for v in nums), g["grows"]])
            if m == SU:
                framing.append((name, reg, g))

    parts = []
    for name, e_ok, g_ok, e_d, e_s, g_d, g_s in holds:
        parts.append(f"{name}: error ERM−mixup = {100 * e_d:+.2f} pt (spread {100 * e_s:.2f}) "
                     f"{'beyond' if e_ok else 'NOT beyond'} spread; linearity gap ERM−mixup = {g_d:+.4f} "
                     f"(spread {g_s:.4f}) {'beyond' if g_ok else 'NOT beyond'} spread")
    frame_parts = []
    for name, reg, g in framing:
        where = ("ERM in the over-fitting regime" if reg["reached"] else
                 f"ERM NOT in the over-fitting regime (clean train loss {reg['end_clean_loss']:.3f} at the end, test "
                 f"error still falling {reg['last_quarter_gain_pt']:.2f} pt over the last quarter)")
        if g["grows"] is None:
            frame_parts.append(f"{name}: ERM never fitted its training set (clean loss ≤ {FIT_LOSS}); {where}")
        else:
            frame_parts.append(
                f"{name}: advantage {g['at_fit']:+.2f} ± {g['at_fit_sd']:.2f} pt when ERM fitted (epoch "
                f"{reg['fit_epoch']}) → {g['at_end']:+.2f} ± {g['at_end_sd']:.2f} pt at the end: "
                f"{'grows' if g['grows'] else 'does not grow'} ({g['growth']:+.2f} ± {g['growth_sd']:.2f}); "
                f"ERM's lowest test error at epoch {reg['best_epoch']} of {reg['epochs']}; {where}")
    seeds_note = "" if cfg["seeds"] > 1 else " Single seed: the spread is 0, so any difference counts."
    detail = (f"Regime: {cfg.get('regime', 'unspecified')}. At the end of training, mixup with ε ~ U[0,1] vs ERM, "
              f"{cfg['seeds']} seed(s): " + "; ".join(parts) + f". Claim holds on {n_hold}/{len(holds)} settings. "
              "Does mixup's advantage grow as ERM over-fits? " + "; ".join(frame_parts) + "." + seeds_note)
    rise = [name for name in settings
            if _mean_std([r["clean_train_loss"] for r in runs if r["setting"] == name and r["method"] == SU])[0]
            > _mean_std([r["clean_train_loss"] for r in runs if r["setting"] == name and r["method"] == "ERM"])[0]]
    notes = [
        f"Regime tested: {cfg.get('regime', 'unspecified')}.",
        "SamplePairing schedule scaled to each setting's epochs: "
        + "; ".join(f"{name}: {sched}" for name, sched in schedules.items())
        + " (the paper: off for 100 epochs, 8 on / 2 off until epoch 800, then off; we start at 10% and stop at "
        "80% of the run with 4 on / 1 off, the paper's 4:1). Its label is y_a, weight 1/2, partners from a random "
        "permutation of the batch.",
        "Training loss on clean data is higher with mixup U[0,1] than with ERM on "
        f"{len(rise)}/{len(settings)} settings ({', '.join(rise) or 'none'}) -- the regularizer's signature.",
        "Linearity gap: mean ‖softmax f(εa+(1−ε)b) − (ε softmax f(a) + (1−ε) softmax f(b))‖₁ on "
        f"{cfg['gap_pairs']} held-out test pairs with fixed ε ~ U[0,1], identical for every model.",
        f"Learning curves use a fixed class-balanced subset of {cfg['curve_test']} test images (the 'best' test "
        "error is the lowest point of that curve: chosen on the test subset, so optimistic for every method "
        "alike); the final numbers use "
        + ("the full test set." if cfg["final_test"] is None else f"{cfg['final_test']} test images."),
        f"ERM has fitted its training set at the first epoch its mean clean training loss (on {cfg['train_probe']} "
        f"training images) is ≤ {FIT_LOSS}; it is in the over-fitting regime when that loss ends ≤ {NEAR_ZERO} and "
        f"its test error falls by ≤ {PLATEAU_PT} pt over the last quarter of training. The advantage over ERM is "
        f"paired by seed and averaged over {WINDOW} epochs.",
        "Training subsets are class-balanced and drawn per seed; every method sees the same subset and the "
        "same initial weights for a given seed.",
    ]
    _curves_figure(ctx, curves, regimes)
    _advantage_figure(ctx, curves, regimes)
    _example_grid(ctx, examples)
    _gap_figure(ctx, runs)
    cols = ["setting", "method", "seeds", "epochs"]
    for k in ("test error %", "ECE %", "linearity gap", "NLL", "clean train loss"):
        cols += [f"{k} mean", f"{k} std"]
    tables = [
        Table("mixup_results", cols, main_rows, "At the end of training: mean and standard deviation over seeds, "
              "per setting and method (test error, ECE and NLL on the full test set or the final test subset)."),
        Table("mixup_verdict", ["setting", "method", "Δerror pt (ERM−method)", "error spread pt",
                                "error lowered beyond spread", "Δgap (ERM−method)", "gap spread",
                                "gap lowered beyond spread", "both"], verdict_rows,
              "At the end of training, against ERM; spread = std(ERM) + std(method). The claim is judged on mixup "
              "U[0,1] (Su)."),
        Table("mixup_final_vs_best", ["setting", "method", "epochs", "final test error % (curve subset) mean",
                                      "std", "best test error % (curve subset) mean", "std", "best epoch (mean)",
                                      "final clean train error %"], best_rows,
              "Final and best (lowest over the epochs) test error on the learning-curve test subset."),
        Table("mixup_erm_regime", ["setting", "epochs", "ERM clean train loss at end",
                                   f"ERM fitted (loss ≤ {FIT_LOSS}) at epoch", "ERM lowest test error at epoch",
                                   "ERM lowest test error %",
                                   "ERM final test error %", "ERM test error gain over last quarter pt",
                                   "over-fitting regime reached"], regime_rows,
              "Where plain training stands (mean curves over seeds, learning-curve test subset)."),
        Table("mixup_advantage", ["setting", "method", "ERM fitted at epoch", "advantage at fit pt", "sd",
                                  "advantage at mid-run pt", "sd", "advantage at end pt", "sd", "growth (end − fit) pt",
                                  "sd", "grows beyond sd"], adv_rows,
              f"Advantage = ERM's test error − the method's (points, paired by seed, {WINDOW}-epoch average on the "
              "learning-curve subset); > 0 means the method is better. The article's framing: it should grow as ERM "
              "over-fits."),
        Table("mixup_runs", ["setting", "method", "seed", "epochs", "test error", "ECE", "linearity gap", "NLL",
                             "clean train loss", "best curve error", "best epoch", "train time s"],
              [[r["setting"], r["method"], r["seed"], r["epochs"], round(r["error"], 4), round(r["ece"], 4),
                round(r["gap"], 4), round(r["nll"], 4), round(r["clean_train_loss"], 4),
                round(r["curve_best_error"], 4), r["curve_best_epoch"], round(r["time_s"], 1)] for r in runs],
              "Every run."),
    ]
    config = {k: v for k, v in cfg.items()}
    config["sample_pairing_schedule"] = schedules
    config["optimizer"] = "sgd, cosine schedule"
    config["augment"] = {_setting_name(st): ("FlipCrop(padding=4)" if st.get("flip_crop", False) else "none")
                         for st in cfg["settings"]}
    return Result(
        study="mixup", title="From SamplePairing to mixup: a regularizer in disguise",
        article="kexue.fm/archives/5693",
        claim="mixup with ε ~ U[0,1] acts as a regularizer that pulls the model towards being linear between "
              "samples; among models that fit the data it should pick the more linear one, lowering the test error "
              "and the linearity gap relative to plain training (ERM), most visibly on small data and as plain "
              "training over-fits.",
        verdict=verdict, verdict_detail=detail, tables=tables, data=data_used, config=config, notes=notes)
