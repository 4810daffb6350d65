"""Study ``margin`` (article 7, kexue.fm/archives/8656): classification is not ranking.

Embedding networks are trained as classifiers with different softmax losses, then evaluated by cosine
retrieval among classes **never seen in training**: Fashion-MNIST and MNIST (train on classes 0-4, retrieve
among 5-9 of the test split, leave-one-out) and AT&T faces (train on people 1-30, retrieve among 31-40).
The article's claim (via post 5743's table): a margin (AM-Softmax, s=30, m=0.35) retrieves better than plain
softmax. It holds here when AM-Softmax's unseen-class top-1 beats softmax's by more than the seed spread.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kexue.losses import AMSoftmaxLoss, ArcFaceLoss, DistanceMarginLoss, NormFaceLoss, estimate_class_diameter
from kexue.metrics.retrieval import retrieval_metrics
from kexue.studies.base import Result, StudyContext, Table, register_study, seeded_global_rng

ARTICLE_TABLE = {  # post 5743 (sentence retrieval, held-out sentences), as digested in articles.md section 7
    "softmax": (0.9077, 0.9565, 0.9673),
    "am": (0.9172, 0.9607, 0.9709),
}
LOSS_NAMES = {
    "softmax": "softmax (linear + bias)",
    "normface": "NormFace (s=30, m=0)",
    "am": "AM-Softmax (s=30, m=0.35)",
    "arcface": "ArcFace (s=30, m=0.5 rad)",
    "distance": "distance margin (s=30, m=0.25, d=sqrt(1-cos))",
    "adaptive": "adaptive distance margin (m from class diameter, every epoch)",
}
MARGIN_UNITS = {"softmax": "sqrt_cosine", "normface": "sqrt_cosine", "am": "cosine", "arcface": "angle",
                "distance": "sqrt_cosine", "adaptive": "sqrt_cosine"}

QUICK: dict[str, Any] = {
    "datasets": ["fashion_mnist"], "losses": ["softmax", "am"], "seeds": 1,
    "n_train": 3000, "n_unseen": 2500, "epochs": 3, "att_epochs": 15, "att_pool": 4,
    "width": 8, "embedding_dim": 64, "batch_size": 128,
    "lr": 3e-3, "n_diameter": 1000, "n_proj": 600,
}
FULL: dict[str, Any] = {
    "datasets": ["fashion_mnist", "mnist", "att_faces"], "losses": list(LOSS_NAMES), "seeds": 3,
    "n_train": 2500, "n_unseen": 2500, "epochs": 3, "att_epochs": 15, "att_pool": 4,
    "width": 8, "embedding_dim": 64, "batch_size": 128,
    "lr": 3e-3, "n_diameter": 2000, "n_proj": 1000,
}


class SoftmaxHead(nn.Module):
    """The baseline: a linear classifier with bias on the embedding, plain cross-entropy."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(z), y)


def _make_loss(name: str, dim: int, n_cls: int, steps_per_epoch: int, gen: torch.Generator) -> nn.Module:
    if name == "softmax":
        return SoftmaxHead(dim, n_cls)
    if name == "normface":
        return NormFaceLoss(dim, n_cls, scale=30.0, generator=gen)
    if name == "am":
        return AMSoftmaxLoss(dim, n_cls, scale=30.0, margin=0.35, generator=gen)
    if name == "arcface":
        return ArcFaceLoss(dim, n_cls, scale=30.0, margin=0.5, generator=gen)
    if name == "distance":
        return DistanceMarginLoss(dim, n_cls, scale=30.0, margin=0.25, generator=gen)
    if name == "adaptive":  # the article's recipe: start at m = 0, then m := measured mean class diameter
        return DistanceMarginLoss(dim, n_cls, scale=30.0, margin=0.0, adaptive_every=steps_per_epoch,
                                  generator=gen)
    raise ValueError(f"unknown loss {name!r}")


def _load(name: str, ctx: StudyContext, cfg: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    """Seen-class training images and unseen-class retrieval images, as float [N, 1, H, W] in [0, 1]."""
    from kexue import data as kd

    if name in ("fashion_mnist", "mnist"):
        loader = kd.load_fashion_mnist if name == "fashion_mnist" else kd.load_mnist
        xtr, ytr = loader("train", ctx.data_dir)
        xte, yte = loader("test", ctx.data_dir)
        seen = ytr < 5
        xs, ys = xtr[seen], ytr[seen]
        idx = torch.randperm(len(ys), generator=gen)[:cfg["n_train"]]
        xs, ys = xs[idx], ys[idx]
        unseen = yte >= 5
        xu, yu = xte[unseen], yte[unseen] - 5
        if cfg["n_unseen"] is not None:
            idx = torch.randperm(len(yu), generator=gen)[:cfg["n_unseen"]]
            xu, yu = xu[idx], yu[idx]
        prep = lambda x: x.unsqueeze(1).float().div_(255.0)  # noqa: E731
        return {"train": (prep(xs), ys), "unseen": (prep(xu), yu), "classes": 5,
                "desc": f"{name}: train {len(ys)} images of classes 0-4 (train split); retrieve among "
                        f"{len(yu)} test images of classes 5-9 (leave-one-out)"}
    if name == "att_faces":
        x, y = kd.load_att_faces(ctx.data_dir)
        p = cfg["att_pool"]
        x = F.avg_pool2d(x.unsqueeze(1).float().div_(255.0), p)  # 112x92 -> 28x23 for p = 4
        seen = y < 30
        return {"train": (x[seen], y[seen]), "unseen": (x[~seen], y[~seen] - 30), "classes": 30,
                "desc": f"att_faces ({x.shape[2]}x{x.shape[3]}): train on 300 images of people 1-30; retrieve "
                        "among the 100 images of people 31-40 (leave-one-out)"}
    raise ValueError(f"unknown dataset {name!r}")


@torch.no_grad()
def _embed(model: nn.Module, x: torch.Tensor, device: str, batch: int = 1000) -> torch.Tensor:
    model.eval()
    out = [model(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def _train_one(ds: dict[str, Any], loss_name: str, seed: int, cfg: dict[str, Any], device: str, epochs: int,
               batch_size: int, proj_idx: torch.Tensor | None) -> dict[str, Any]:
    """One training run and its evaluation, as plain JSON-able values (``ctx.cached_run`` stores them).

    The whole run draws from the global RNG seeded by ``seed`` (model construction) and leaves it as it was.
    With ``proj_idx``, the run also returns the 2-D PCA of those unseen-class embeddings for the figure.
    """
    from kexue.nn.vision import SmallCNN
    from kexue.train import TrainConfig, fit

    with seeded_global_rng(seed, device=device):
        model = SmallCNN(in_channels=1, num_classes=None, width=cfg["width"], embedding_dim=cfg["embedding_dim"])
        n = len(ds["train"][1])
        steps = math.ceil(n / batch_size)
        loss = _make_loss(loss_name, cfg["embedding_dim"], ds["classes"], steps,
                          torch.Generator().manual_seed(seed))
        tc = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=cfg["lr"], weight_decay=1e-4,
                         schedule="cosine", warmup_epochs=0, seed=seed, device=device, progress=False)
        t0 = time.perf_counter()
        hist = fit(model, ds["train"], tc, loss_fn=loss)
        train_s = time.perf_counter() - t0
        zu = _embed(model, ds["unseen"][0], device)
        yu = ds["unseen"][1]
        m = retrieval_metrics(zu, yu, ks=(1, 5, 10))
        xs, ys = ds["train"]
        k = min(cfg["n_diameter"], len(ys))
        zs = _embed(model, xs[:k], device)
    units = MARGIN_UNITS[loss_name]
    out = {
        **m, "train_s": train_s, "final_train_loss": hist.last["train_loss"],
        "diam_seen": float(estimate_class_diameter(zs, ys[:k], distance="sqrt_cosine")),
        "diam_unseen": float(estimate_class_diameter(zu, yu, distance="sqrt_cosine")),
        "diam_seen_own_units": float(estimate_class_diameter(zs, ys[:k], distance=units)),
        "margin": float(getattr(loss, "margin", 0.0)),
        "margin_history": [[int(s), float(v)] for s, v in getattr(loss, "margin_history", [])],
    }
    if proj_idx is not None:
        out["proj"] = _pca2(zu[proj_idx]).tolist()
        out["proj_labels"] = yu[proj_idx].tolist()
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(v) > 1 else 0.0)


def _pca2(z: torch.Tensor) -> torch.Tensor:
    z = F.normalize(z.double(), dim=1)
    z = z - z.mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    return (z @ v[:2].t()).float()


@register_study("margin", article=7, title="From the triangle inequality to Margin Softmax: retrieval on unseen "
                "classes", quick_budget_s=140,
                full_time="about 10 min on 2 CPU cores (575 s measured; 25 min on shared, busy cores)",
                datasets=("fashion-mnist", "mnist", "att-faces"))
def run(ctx: StudyContext) -> Result:
    return run_config(ctx, QUICK if ctx.quick else FULL)


def run_config(ctx: StudyContext, cfg: dict[str, Any]) -> Result:
    """Run the study with an explicit configuration (``QUICK``, ``FULL`` or a variant of them)."""
    cfg = dict(cfg)
    seeds = [ctx.seed + i for i in range(cfg["seeds"])]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    data_desc: dict[str, str] = {}
    jobs = [(d, lo, s) for d in cfg["datasets"] for s in seeds for lo in cfg["losses"]]
    bar = ctx.pbar(total=len(jobs), desc="margin")
    cache: dict[str, dict[str, Any]] = {}
    proj_idx: dict[str, torch.Tensor] = {}
    for d, lo, s in jobs:
        if d not in cache:
            cache.clear()
            cache[d] = _load(d, ctx, cfg, ctx.generator(17))
            data_desc[d] = cache[d]["desc"]
            if d == cfg["datasets"][0]:  # the projection figure: a fixed subset per loss, first seed
                g = ctx.generator(99)
                n_unseen = len(cache[d]["unseen"][1])
                proj_idx = {name: torch.randperm(n_unseen, generator=g)[:cfg["n_proj"]] for name in cfg["losses"]}
        att = d == "att_faces"
        epochs, batch_size = (cfg["att_epochs"], 32) if att else (cfg["epochs"], cfg["batch_size"])
        proj = proj_idx.get(lo) if d == cfg["datasets"][0] and s == seeds[0] else None
        key = {"dataset": d, "loss": lo, "seed": s, "base_seed": ctx.seed, "epochs": epochs,
               "batch_size": batch_size, "projection": proj is not None, "cfg": cfg}
        r = ctx.cached_run(key, functools.partial(_train_one, cache[d], lo, s, cfg, ctx.device, epochs, batch_size,
                                                  proj))
        results.setdefault((d, lo), []).append(r)
        if ctx.progress:
            bar.write(f"margin {d} {lo} seed {s}: top1 {r['top1']:.4f} top5 {r['top5']:.4f} top10 {r['top10']:.4f}"
                      f" mAP@R {r['map@r']:.4f} margin {r['margin']:.3f} ({r['train_s']:.0f} s)")
        bar.update(1)
    bar.close()

    # ---- tables
    rows = []
    for d in cfg["datasets"]:
        for lo in cfg["losses"]:
            rs = results[(d, lo)]
            row: list[Any] = [d, LOSS_NAMES[lo], len(rs)]
            for key in ("top1", "top5", "top10", "map@r"):
                mu, sd = _mean_std([r[key] for r in rs])
                row += [round(mu, 4), round(sd, 4)]
            row += [round(_mean_std([r["diam_unseen"] for r in rs])[0], 4),
                    round(_mean_std([r["train_s"] for r in rs])[0], 1)]
            rows.append(row)
    main = Table("margin_retrieval", ["dataset", "loss", "seeds", "top1", "top1 sd", "top5", "top5 sd", "top10",
                                      "top10 sd", "mAP@R", "mAP@R sd", "unseen diameter (sqrt(1-cos))",
                                      "train s/run"], rows,
                 "Cosine retrieval among classes never seen in training (leave-one-out), mean and seed standard "
                 "deviation. Diameter = 2 x mean sqrt(1-cos) distance to the class mean direction.")
    art = Table("margin_article_5743", ["loss", "top1", "top5", "top10"],
                [["softmax", *ARTICLE_TABLE["softmax"]], ["AM-Softmax (s=30, m=0.35)", *ARTICLE_TABLE["am"]]],
                "The article's companion table (post 5743: GRU sentence encoder, held-out synonymous questions; "
                "not our data) for comparison of the direction and size of the effect.")
    drows = []
    for d in cfg["datasets"]:
        for lo in cfg["losses"]:
            rs = results[(d, lo)]
            drows.append([d, lo, MARGIN_UNITS[lo], round(_mean_std([r["margin"] for r in rs])[0], 4),
                          round(_mean_std([r["diam_seen_own_units"] for r in rs])[0], 4),
                          round(_mean_std([r["diam_seen"] for r in rs])[0], 4),
                          round(_mean_std([r["diam_unseen"] for r in rs])[0], 4)])
    diam = Table("margin_diameters", ["dataset", "loss", "margin units", "margin (final)",
                                      "seen-class diameter (margin units)", "seen diameter sqrt(1-cos)",
                                      "unseen diameter sqrt(1-cos)"], drows,
                 "The article says the margin should be about the average class diameter. Measured on training "
                 "images of the seen classes and test images of the unseen ones.")

    # ---- verdict: AM vs softmax on unseen-class top-1, beyond the seed spread
    verdicts, details = [], []
    for d in cfg["datasets"]:
        if (d, "am") not in results or (d, "softmax") not in results:
            continue
        am_mu, am_sd = _mean_std([r["top1"] for r in results[(d, "am")]])
        sm_mu, sm_sd = _mean_std([r["top1"] for r in results[(d, "softmax")]])
        diff = am_mu - sm_mu
        spread = math.sqrt(am_sd ** 2 + sm_sd ** 2)
        beyond = diff > spread if len(seeds) > 1 else None
        verdicts.append((diff > 0, beyond))
        details.append(f"{d}: AM-Softmax top-1 {am_mu:.4f}±{am_sd:.4f} vs softmax {sm_mu:.4f}±{sm_sd:.4f} "
                       f"(diff {diff:+.4f}, spread {spread:.4f}, {len(seeds)} seed(s))")
    if len(seeds) > 1:
        n_beyond = sum(1 for _, b in verdicts if b)
        verdict = ("holds" if n_beyond == len(verdicts) else "partly holds" if n_beyond > 0
                   else "does not hold")
        rule = "holds when AM-Softmax beats softmax by more than sqrt(sd_am^2 + sd_softmax^2) on every dataset"
    else:
        n_pos = sum(1 for p, _ in verdicts if p)
        verdict = "partly holds" if n_pos == len(verdicts) and n_pos > 0 else "does not hold"
        rule = ("one seed (quick mode): the spread is not measured, so a positive difference counts only as "
                "'partly holds'")
    detail = "; ".join(details) + f". Rule: {rule}."

    # ---- figures
    _figure_diameters(ctx, cfg, results)
    _figure_projection(ctx, cfg, results)

    notes = [
        "Training: SmallCNN(width={width}, embedding {embedding_dim}) + loss, AdamW lr {lr}, cosine schedule, "
        "{epochs} epochs on {n_train} images (AT&T: {att_epochs} epochs, batch 32).".format(**cfg),
        "Retrieval is by cosine similarity of the embeddings (the class centres are discarded), as in the "
        "article's implementation sketch.",
        "The article (8656) has no experiments; its numbers come from post 5743 on a private sentence corpus, "
        "so only the direction of the effect is comparable.",
    ]
    return Result(
        study="margin", title="From the triangle inequality to Margin Softmax", article="kexue.fm/archives/8656",
        claim="Ranking needs a stronger condition than classification: d(z,c_t) + m < d(z,c_i) with m about the "
              "class diameter. A margin softmax (AM-Softmax, s=30, m=0.35) therefore retrieves better than plain "
              "softmax on classes not seen in training.",
        verdict=verdict, verdict_detail=detail, tables=[main, art, diam],
        data=data_desc, config={k: v for k, v in cfg.items()}, notes=notes)


def _figure_diameters(ctx: StudyContext, cfg: dict[str, Any], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d0 = cfg["datasets"][0]
    losses = cfg["losses"]
    has_adapt = (d0, "adaptive") in results
    fig, axes = plt.subplots(1, 2 if has_adapt else 1, figsize=(11 if has_adapt else 6, 3.8), squeeze=False)
    ax = axes[0, 0]
    xs = range(len(losses))
    meas = [_mean_std([r["diam_seen_own_units"] for r in results[(d0, lo)]])[0] for lo in losses]
    marg = [_mean_std([r["margin"] for r in results[(d0, lo)]])[0] for lo in losses]
    ax.bar([x - 0.2 for x in xs], meas, 0.4, label="measured seen-class diameter")
    ax.bar([x + 0.2 for x in xs], marg, 0.4, label="margin m (final)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{lo}\n[{MARGIN_UNITS[lo]}]" for lo in losses], fontsize=7)
    ax.set_ylabel("in the loss's margin units")
    ax.set_title(f"{d0}: class diameter vs margin")
    ax.legend(fontsize=7)
    if has_adapt:
        ax = axes[0, 1]
        for i, r in enumerate(results[(d0, "adaptive")]):
            h = r["margin_history"]
            ax.plot([s for s, _ in h], [m for _, m in h], "o-", label=f"seed {i}")
        ax.set_xlabel("training step")
        ax.set_ylabel("m = measured diameter, sqrt(1-cos)")
        ax.set_title("adaptive margin (re-estimated every epoch)")
        ax.legend(fontsize=7)
    ctx.save_figure(fig, "margin_diameters", "Measured mean class diameter (2 x mean distance to the class "
                    "centre, in each loss's margin units) against its margin; right: the adaptive margin over "
                    "training.")


def _figure_projection(ctx: StudyContext, cfg: dict[str, Any], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d0 = cfg["datasets"][0]
    losses = cfg["losses"]
    n = len(losses)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for i, lo in enumerate(losses):
        ax = axes[i // cols, i % cols]
        r = results[(d0, lo)][0]
        p = torch.tensor(r["proj"])
        ax.scatter(p[:, 0], p[:, 1], c=r["proj_labels"], cmap="tab10", s=4, vmin=0, vmax=9)
        ax.set_title(f"{lo}: top1 {r['top1']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(n, rows * cols):
        axes[j // cols, j % cols].axis("off")
    ctx.save_figure(fig, "margin_projection", f"PCA of the normalised embeddings of the unseen classes ({d0} test "
                    "split, first seed), one panel per loss, coloured by class.")
