"""Study ``init`` (article 4, kexue.fm/archives/7180): initialisation from the geometric view.

Three measurements on generated data (no download):

1. Orthogonality error ``mean((W^T W - I)^2)`` of an n x n matrix with i.i.d. N(0, 1/n) or
   U[-sqrt(3/n), sqrt(3/n)] entries, against n, with the 1/n line (Corollaries 2 and 3).
2. Singular values of square (variance 1/n) and tall m = 8n (variance 1/m) random matrices: the
   approximation is entrywise and for a fixed x, not uniform over x (quarter-circle law on [0, 2] for square,
   Marchenko-Pastur edges 1 +- sqrt(n/m) for tall).
3. Activation norms through a deep bias-free MLP for each scheme and activation (linear, tanh, relu), plus two
   controls (variance 1, variance 0.5/n) and widening/narrowing stacks (Corollary 4: fan_out vs fan_in).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import init as ki
from .base import Result, StudyContext, Table, register_study, torch_threads

QUICK: dict[str, Any] = {
    "ns": [16, 32, 64, 128, 256, 512], "trials": 3, "square_n": 400, "tall_n": 100, "tall_ratio": 8,
    "depth": 50, "width": 256, "batch": 32, "networks_per_curve": 3, "rect_widths": [32, 512],
}
FULL: dict[str, Any] = {
    "ns": [16, 32, 64, 128, 256, 512, 1024, 2048], "trials": 10, "square_n": 1000, "tall_n": 250, "tall_ratio": 8,
    "depth": 100, "width": 512, "batch": 128, "networks_per_curve": 5, "rect_widths": [64, 1024],
}

CLAIM = ("A matrix with i.i.d. mean-0, variance-1/n entries is approximately orthogonal (error shrinks like 1/n, "
         "for normal and uniform entries alike), so variance 1/fan_out (times 2 before ReLU) keeps activation "
         "norms from exploding or vanishing through depth.")


def _quarter_circle_median() -> float:
    """Median of the quarter-circle law p(s) = sqrt(4 - s^2) / pi on [0, 2], by bisection."""
    def cdf(s: float) -> float:
        return (s * math.sqrt(4 - s * s) / 2 + 2 * math.asin(s / 2)) / math.pi

    lo, hi = 0.0, 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.5 else (lo, mid)
    return (lo + hi) / 2


def _orth_error_vs_n(ctx: StudyContext, ns: list[int], trials: int) -> tuple[Table, dict[str, Any]]:
    g = ctx.generator(1)
    rows, normal, uniform = [], [], []
    for n in ctx.pbar(ns, desc="init: orthogonality error"):
        en, eu = [], []
        reps = max(trials, 2048 // n)  # small n are cheap and noisy: average more of them
        for _ in range(reps):
            w = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
            en.append(ki.orthogonality_error(w).item())
            c = math.sqrt(3 / n)
            w = (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * c
            eu.append(ki.orthogonality_error(w).item())
        mn, mu = sum(en) / reps, sum(eu) / reps
        normal.append(mn)
        uniform.append(mu)
        rows.append([n, mn, mu, 1 / n, n * mn, n * mu, (n + 1) / n**2, (n - 0.2) / n**2])
    # slope of log(error) against log(n)
    x = torch.log(torch.tensor(ns, dtype=torch.float64))
    slopes = {}
    for name, ys in (("normal", normal), ("uniform", uniform)):
        y = torch.log(torch.tensor(ys, dtype=torch.float64))
        xc = x - x.mean()
        slopes[name] = float((xc * (y - y.mean())).sum() / xc.square().sum())
    table = Table(
        "init_orthogonality_error",
        ["n", "normal N(0,1/n)", "uniform U(±√(3/n))", "1/n", "n·err normal", "n·err uniform",
         "theory normal (n+1)/n²", "theory uniform (n−0.2)/n²"],
        rows,
        caption=f"mean((WᵀW − I)²) averaged over max({trials}, 2048/n) matrices per n. Off-diagonal entries of "
                "WᵀW have variance 1/n; diagonal ones 2/n (normal) or 0.8/n (uniform), hence the exact expectations "
                f"in the last two columns. Log-log slope: normal {slopes['normal']:.3f}, uniform "
                f"{slopes['uniform']:.3f} (1/n is −1).")
    return table, {"ns": ns, "normal": normal, "uniform": uniform, "slopes": slopes}


def _singular_values(ctx: StudyContext, n_sq: int, n_tall: int, ratio: int) -> tuple[Table, dict[str, Any]]:
    g = ctx.generator(2)
    w = torch.randn(n_sq, n_sq, generator=g, dtype=torch.float64) / math.sqrt(n_sq)
    s_sq = torch.linalg.svdvals(w)
    m = ratio * n_tall
    wt = torch.randn(m, n_tall, generator=g, dtype=torch.float64) / math.sqrt(m)
    s_tall = torch.linalg.svdvals(wt)
    # a fixed random x: ||Wx|| / ||x|| concentrates near 1 even for the square matrix
    x = torch.randn(n_sq, 2000, generator=g, dtype=torch.float64)
    r_sq = (w @ x).norm(dim=0) / x.norm(dim=0)
    xt = torch.randn(n_tall, 2000, generator=g, dtype=torch.float64)
    r_tall = (wt @ xt).norm(dim=0) / xt.norm(dim=0)
    edge = math.sqrt(n_tall / m)
    med_pred = _quarter_circle_median()
    rows = [
        [f"square {n_sq}×{n_sq}, var 1/n", s_sq.min().item(), s_sq.median().item(), s_sq.max().item(),
         f"[0, 2], median {med_pred:.3f}", r_sq.mean().item(), r_sq.std().item()],
        [f"tall {m}×{n_tall}, var 1/m", s_tall.min().item(), s_tall.median().item(), s_tall.max().item(),
         f"[{1 - edge:.3f}, {1 + edge:.3f}]", r_tall.mean().item(), r_tall.std().item()],
    ]
    table = Table(
        "init_singular_values",
        ["matrix", "σ_min", "σ_median", "σ_max", "predicted support", "mean ‖Wx‖/‖x‖ (2000 random x)",
         "std ‖Wx‖/‖x‖"],
        rows,
        caption="Singular values of one random matrix. For a fixed random x the norm ratio is ≈ 1 with a small "
                "spread, but over all x it ranges from σ_min to σ_max: the square matrix is orthogonal only "
                "entrywise (quarter-circle law), the tall one becomes uniformly close as m/n grows.")
    return table, {"s_sq": s_sq, "s_tall": s_tall, "edge": edge, "r_sq": r_sq, "r_tall": r_tall,
                   "med_pred": med_pred, "n_sq": n_sq, "m": m, "n_tall": n_tall}


def _controls() -> dict[str, Any]:
    def std1(w: torch.Tensor, generator: torch.Generator | None = None) -> None:
        w.normal_(0.0, 1.0, generator=generator)

    def half(w: torch.Tensor, generator: torch.Generator | None = None) -> None:
        w.normal_(0.0, math.sqrt(0.5 / w.shape[0]), generator=generator)

    def torch_tanh(w: torch.Tensor, generator: torch.Generator | None = None) -> None:
        ki.geometric_(w, gain=5 / 3, generator=generator)

    return {"control: var 1": std1, "control: var 0.5/fan_out": half, "geometric, gain 5/3 (torch tanh)": torch_tanh}


def _status(r: torch.Tensor) -> str:
    last = r[-1].item()
    if not math.isfinite(last) or last > 2:
        return "explodes"
    if last < 0.5:
        return "vanishes"
    return "kept"


def _propagation(ctx: StudyContext, depth: int, width: int, batch: int, reps: int,
                 rect_widths: list[int]) -> tuple[Table, Table, dict]:
    schemes: dict[str, Any] = {s: s for s in ki.SCHEMES}
    controls = _controls()
    curves: dict[str, dict[str, torch.Tensor]] = {}
    rows = []
    acts = ("linear", "tanh", "relu")
    jobs = [(name, act) for act in acts for name in list(schemes) + list(controls)
            if not (name.startswith("geometric, gain 5/3") and act != "tanh")]
    for i, (name, act) in enumerate(ctx.pbar(jobs, desc="init: signal propagation")):
        scheme = schemes.get(name, controls.get(name))
        runs = torch.stack([ki.signal_propagation(scheme=scheme, activation=act, depth=depth, width=width,
                                                  batch=batch, generator=ctx.generator(1000 * rep + 100 + i))
                            for rep in range(reps)])
        # geometric mean over independent networks: a finite-width net's log-norm does a random walk
        # (std ~ sqrt(5 L / n) / 2 for ReLU), so one net alone can leave the band by chance
        r = runs.clamp_min(1e-300).log().mean(0).exp()
        curves.setdefault(act, {})[name] = r
        rows.append([name, act, r[10].item() if depth >= 10 else None, r[-1].item(),
                     runs[:, -1].min().item(), runs[:, -1].max().item(), r.min().item(), r.max().item(),
                     _status(r)])
    table = Table(
        "init_signal_propagation",
        ["scheme", "activation", "ratio @ layer 10", f"ratio @ layer {depth}", "final: min net",
         "final: max net", "min over depth", "max over depth", "status"],
        rows,
        caption=f"RMS activation norm relative to the input through a {depth}-layer bias-free MLP of width {width} "
                f"(batch {batch}, square layers), geometric mean over {reps} independent networks (the per-net "
                "range of the final ratio is shown). 'kept' = final ratio in [0.5, 2]. Gains follow the article: "
                "1 for linear and tanh, √2 for ReLU (he always uses 2/fan_in; lecun has no gain).")
    # rectangular stacks: fan_out (geometric) vs fan_in (lecun) vs fan_avg (xavier), linear activation
    lo, hi = rect_widths
    half_depth = 20
    up = [round(lo * (hi / lo) ** (i / half_depth)) for i in range(half_depth + 1)]
    rect_rows = []
    for j, (label, widths) in enumerate((("widening", up), ("narrowing", up[::-1]))):
        for k, name in enumerate(("geometric", "lecun", "xavier")):
            r = ki.signal_propagation(scheme=name, activation="linear", depth=half_depth, width=widths, batch=batch,
                                      generator=ctx.generator(300 + 10 * j + k))
            rect_rows.append([f"{label} {widths[0]}→{widths[-1]}", name, r[-1].item(), _status(r)])
    rect = Table(
        "init_rectangular",
        ["stack (linear, 20 layers)", "scheme", "final ratio", "status"],
        rect_rows,
        caption="Corollary 4: with variance 1/fan_out, E‖Wx‖² = ‖x‖² for any layer shape, so the forward norm is "
                f"kept whether the width grows or shrinks; 1/fan_in scales it by √(m/n) per layer (overall "
                f"√({hi}/{lo}) = {math.sqrt(hi / lo):.0f}× or its inverse).")
    return table, rect, {"curves": curves, "rows": rows, "rect_rows": rect_rows}


def _figures(ctx: StudyContext, orth: dict, sv: dict, prop: dict, depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ns = orth["ns"]
    ax.loglog(ns, orth["normal"], "o-", label="normal N(0, 1/n)")
    ax.loglog(ns, orth["uniform"], "s--", label="uniform U(±√(3/n))")
    ax.loglog(ns, [1 / n for n in ns], "k:", label="1/n")
    ax.set_xlabel("n")
    ax.set_ylabel("mean((WᵀW − I)²)")
    ax.legend()
    ax.set_title("Random matrices are nearly orthogonal")
    ctx.save_figure(fig, "init_orth_error", "Orthogonality error against n, with the 1/n line.")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    s = sv["s_sq"].numpy()
    axes[0].hist(s, bins=40, density=True, alpha=0.6, label=f"{sv['n_sq']}×{sv['n_sq']} singular values")
    grid = torch.linspace(0, 2, 200)
    axes[0].plot(grid, torch.sqrt(4 - grid**2) / math.pi, "k-", label="quarter-circle √(4−σ²)/π")
    tw = axes[0].twinx()
    tw.hist(sv["r_sq"].numpy(), bins=40, density=True, alpha=0.4, color="C1", label="‖Wx‖/‖x‖, 2000 random x")
    tw.set_ylabel("density of ‖Wx‖/‖x‖", color="C1")
    axes[0].set_xlabel("σ")
    axes[0].set_ylabel("density of σ")
    axes[0].legend(fontsize=8, loc="upper left")
    tw.legend(fontsize=8, loc="upper right")
    axes[0].set_title("square, var 1/n: σ spread over [0, 2]")
    st = sv["s_tall"].numpy()
    axes[1].hist(st, bins=30, density=True, alpha=0.6, label=f"{sv['m']}×{sv['n_tall']} singular values")
    for e in (1 - sv["edge"], 1 + sv["edge"]):
        axes[1].axvline(e, color="k", ls=":")
    tw = axes[1].twinx()
    tw.hist(sv["r_tall"].numpy(), bins=40, density=True, alpha=0.4, color="C1", label="‖Wx‖/‖x‖, 2000 random x")
    tw.set_ylabel("density of ‖Wx‖/‖x‖", color="C1")
    axes[1].set_xlabel("σ")
    axes[1].legend(fontsize=8, loc="upper left")
    tw.legend(fontsize=8, loc="upper right")
    axes[1].set_title("tall m = 8n, var 1/m: σ in 1 ± √(n/m)")
    ctx.save_figure(fig, "init_singular_values",
                    "Singular values (entrywise orthogonality is not uniform orthogonality) and the norm ratio "
                    "for fixed random inputs.")

    curves = prop["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(15, 4.2))
    for ax, (act, by_scheme) in zip(axes, curves.items()):
        for name, r in by_scheme.items():
            ls = "--" if name.startswith("control") else "-"
            ax.semilogy(range(len(r)), r.clamp(1e-300, 1e300).numpy(), ls, label=name)
        ax.axhspan(0.5, 2.0, color="green", alpha=0.1)
        ax.set_ylim(1e-9, 1e9)
        ax.set_title(f"activation: {act}")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("‖h_l‖ / ‖h_0‖ (RMS)")
    axes[-1].legend(fontsize=7, loc="lower left")
    axes[1].set_ylim(1e-3, 1e2)
    axes[1].legend(fontsize=7, loc="lower left")
    ctx.save_figure(fig, "init_signal_propagation",
                    f"Activation norm through {depth} layers per scheme (log scale; curves leave the plot when "
                    "they explode or vanish); the band is [0.5, 2].")


@register_study("init", article=4, title="Initialisation from the geometric view", quick_budget_s=25,
                full_time="about 3 min on 2 CPU cores (154 s measured on a loaded machine)")
def run(ctx: StudyContext) -> Result:
    return run_config(ctx, QUICK if ctx.quick else FULL)


def run_config(ctx: StudyContext, cfg: dict[str, Any]) -> Result:
    """Run the study with an explicit configuration (``QUICK``, ``FULL`` or a variant of them)."""
    cfg = dict(cfg)
    ns, trials, n_sq, n_tall, ratio = cfg["ns"], cfg["trials"], cfg["square_n"], cfg["tall_n"], cfg["tall_ratio"]
    depth, width, batch, reps = cfg["depth"], cfg["width"], cfg["batch"], cfg["networks_per_curve"]
    config = {"ns": ns, "trials": trials, "square_n": n_sq, "tall": [ratio * n_tall, n_tall], "depth": depth,
              "width": width, "batch": batch, "networks_per_curve": reps,
              "dtype": "float64 (matrices), float32 (propagation)"}

    with torch_threads(1):  # many small matmuls/QRs: threading only adds overhead (and contention)
        t_orth, orth = _orth_error_vs_n(ctx, ns, trials)
        t_sv, sv = _singular_values(ctx, n_sq, n_tall, ratio)
        t_prop, t_rect, prop = _propagation(ctx, depth, width, batch, reps, cfg["rect_widths"])
    _figures(ctx, orth, sv, prop, depth)

    # verdict from the numbers
    n_err = [n * e for n, e in zip(ns, orth["normal"])] + [n * e for n, e in zip(ns, orth["uniform"])]
    # against the exact expectations (n+1)/n^2 and (n-0.2)/n^2, and the 1/n slope
    theory = [(n + 1) / n**2 for n in ns] + [(n - 0.2) / n**2 for n in ns]
    rel = [e / t for e, t in zip(orth["normal"] + orth["uniform"], theory)]
    c1 = all(0.85 < v < 1.15 for v in rel) and all(abs(s + 1) < 0.1 for s in orth["slopes"].values())
    fixed_x_ok = abs(sv["r_sq"].mean().item() - 1) < 0.05 and abs(sv["r_tall"].mean().item() - 1) < 0.05
    status = {(r[0], r[1]): r[-1] for r in prop["rows"]}
    geo_lin, geo_tanh, geo_relu = (status[("geometric", a)] for a in ("linear", "tanh", "relu"))
    controls_ok = all(status[("control: var 1", a)] == "explodes" for a in ("linear", "relu")) and all(
        status[("control: var 0.5/fan_out", a)] == "vanishes" for a in ("linear", "tanh", "relu"))
    rect = {(r[0].split()[0], r[1]): r[3] for r in prop["rect_rows"]}
    rect_ok = rect[("widening", "geometric")] == "kept" and rect[("narrowing", "geometric")] == "kept"
    core = c1 and fixed_x_ok and geo_lin == "kept" and geo_relu == "kept" and controls_ok
    if core and geo_tanh == "kept" and rect_ok:
        verdict = "holds"
    elif core:
        verdict = "partly holds"
    else:
        verdict = "does not hold"
    kept = sorted(f"{s}/{a}" for (s, a), v in status.items() if v == "kept")
    final = {(r[0], r[1]): r[3] for r in prop["rows"]}
    detail = (
        f"n·mean((WᵀW−I)²) ranges {min(n_err):.3f}–{max(n_err):.3f} over n={ns[0]}..{ns[-1]} (normal and uniform), "
        f"{min(rel):.3f}–{max(rel):.3f} of the exact expectation; "
        f"log-log slopes {orth['slopes']['normal']:.3f} / {orth['slopes']['uniform']:.3f} (1/n law: −1). "
        f"Fixed random x: mean ‖Wx‖/‖x‖ = {sv['r_sq'].mean().item():.3f} (square), "
        f"{sv['r_tall'].mean().item():.3f} (tall), but square σ ∈ [{sv['s_sq'].min().item():.2g}, "
        f"{sv['s_sq'].max().item():.3f}] — orthogonal entrywise, not uniformly. "
        f"Depth {depth}: geometric keeps linear ({final[('geometric', 'linear')]:.3f}) and ReLU with gain √2 "
        f"({final[('geometric', 'relu')]:.3f}); tanh with the article's gain 1 ends at "
        f"{final[('geometric', 'tanh')]:.3f} ({geo_tanh}) versus "
        f"{final[('geometric, gain 5/3 (torch tanh)', 'tanh')]:.3f} with gain 5/3; lecun (no ReLU gain) under "
        f"ReLU ends at {final[('lecun', 'relu')]:.2e}; controls var 1 → {final[('control: var 1', 'linear')]:.2e}, "
        f"var 0.5/n → {final[('control: var 0.5/fan_out', 'linear')]:.2e}. "
        f"Rectangular stacks with 1/fan_out: widening {rect[('widening', 'geometric')]}, narrowing "
        f"{rect[('narrowing', 'geometric')]}. Kept in [0.5, 2]: {', '.join(kept)}.")
    notes = ["No dataset: all matrices and inputs are generated from the seed (ctx.seed).",
             "The tanh gain: the article argues tanh(x) ≈ x so no gain is needed; the per-layer contraction of "
             "tanh is second order but compounds with depth, which the table measures.",
             "'control: var 1' under tanh keeps the norm only because every unit saturates at ±1 (norm ≈ √width, "
             "like the input); the signal itself is destroyed. 'he' under linear/tanh uses the ReLU gain by "
             "definition, so it grows where no ReLU halves the norm.",
             "Matrices are small, so the study runs torch single-threaded (restored afterwards)."]
    return Result(study="init", title="Initialisation from the geometric view", article="kexue.fm/archives/7180",
                  claim=CLAIM, verdict=verdict, verdict_detail=detail, tables=[t_orth, t_sv, t_prop, t_rect],
                  data={"dataset": "generated (Gaussian/uniform matrices, N(0, I) inputs)"}, config=config,
                  notes=notes)
