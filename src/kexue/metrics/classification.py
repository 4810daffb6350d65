"""Classification metrics: accuracy, NLL, expected calibration error and the linearity gap.

The linearity gap measures the property that mixup is argued to enforce (kexue.fm/archives/5693): for
held-out pairs ``(a, b)`` and ε ~ U[0, 1] it is the mean of
``‖softmax(f(ε·a + (1-ε)·b)) − (ε·softmax(f(a)) + (1-ε)·softmax(f(b)))‖₁``. It is 0 exactly when the model's
predicted distribution is affine along the segments between inputs (Jensen's equation); 2 is the maximum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_tensor, compute_dtype

__all__ = ["accuracy", "evaluate_classifier", "expected_calibration_error", "linearity_gap", "nll",
           "predict_logits"]


def _check_pred_labels(outputs: Any, labels: Any, name: str = "outputs") -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(name, outputs, min_dim=1)
    check_tensor("labels", labels, floating=False, dim=1)
    if outputs.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} and labels must have the same number of samples, "
                         f"got {outputs.shape[0]} and {labels.shape[0]}")
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one sample")
    if outputs.dim() == 2:
        if not outputs.is_floating_point():
            raise TypeError(f"{name} [N, C] must be floating scores, got dtype {outputs.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= outputs.shape[1]:
            raise ValueError(f"labels must lie in [0, {outputs.shape[1]}), got values in [{lo}, {hi}]")
    return outputs, labels


def _as_probs(outputs: torch.Tensor, inputs: str) -> torch.Tensor:
    """Probabilities in float64 from logits or probabilities (``inputs`` = ``"auto"|"logits"|"probs"``)."""
    check_choice("inputs", inputs, ("auto", "logits", "probs"))
    x = outputs.detach().double()
    if inputs == "auto":
        looks_like_probs = bool(((x >= 0) & (x <= 1)).all()) and bool(((x.sum(1) - 1).abs() < 1e-3).all())
        inputs = "probs" if looks_like_probs else "logits"
    if inputs == "logits":
        return torch.softmax(x, dim=1)
    if bool((x < 0).any()) or bool(((x.sum(1) - 1).abs() > 1e-3).any()):
        raise ValueError("probabilities must be non-negative and sum to 1 over the class dimension")
    return x


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions; ``outputs`` are scores ``[N, C]`` (argmax taken) or labels ``[N]``.

    Example:
        >>> accuracy(torch.tensor([[2.0, 0.1], [0.3, 0.9], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
        0.6666666666666666
    """
    _check_pred_labels(outputs, labels)
    pred = outputs.argmax(1) if outputs.dim() == 2 else outputs
    if pred.dim() != 1 or pred.is_floating_point():
        raise ValueError(f"outputs must be scores [N, C] or integer predictions [N], got {tuple(outputs.shape)}")
    return float((pred == labels).double().mean())


def nll(outputs: torch.Tensor, labels: torch.Tensor, *, inputs: str = "logits") -> float:
    """Mean negative log-likelihood of the true class (natural log), from logits or probabilities.

    Example:
        >>> round(nll(torch.tensor([[0.0, 0.0]]), torch.tensor([1])), 4)  # log 2
        0.6931
    """
    _check_pred_labels(outputs, labels)
    check_tensor("outputs", outputs, floating=True, dim=2)
    check_choice("inputs", inputs, ("logits", "probs"))
    if inputs == "logits":
        logp = torch.log_softmax(outputs.detach().double(), dim=1)
    else:
        logp = torch.log(_as_probs(outputs, "probs").clamp_min(torch.finfo(torch.float64).tiny))
    return float(-logp.gather(1, labels.unsqueeze(1)).mean())


def expected_calibration_error(probs_or_logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15,
                               inputs: str = "auto") -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins.

    ``ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|`` where the confidence is the top-class
    probability and bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]``. ``inputs="auto"`` treats rows
    that are non-negative and sum to 1 as probabilities, anything else as logits.

    Example:
        >>> p = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.25, 0.75], [0.25, 0.75]])
        >>> round(expected_calibration_error(p, torch.tensor([0, 1, 1, 1]), n_bins=10), 4)
        0.35
    """
    _check_pred_labels(probs_or_logits, labels, "probs_or_logits")
    check_tensor("probs_or_logits", probs_or_logits, floating=True, dim=2)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    probs = _as_probs(probs_or_logits, inputs)
    conf, pred = probs.max(1)
    correct = (pred == labels.to(pred.device)).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    idx = torch.bucketize(conf, edges, right=False)
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    return float((sum_acc - sum_conf).abs().sum() / conf.numel())


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class _EvalMode:
    """Put a model in eval mode for a block and restore its previous mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Model outputs on ``x`` in batches, in eval mode and without gradients (float32, on CPU).

    Example:
        >>> predict_logits(nn.Linear(4, 3), torch.randn(10, 4), batch_size=4).shape
        torch.Size([10, 3])
    """
    check_tensor("x", x, min_dim=1)
    _check_batch_size(batch_size)
    dev = _model_device(model)
    outs = []
    with _EvalMode(model):
        for i in range(0, x.shape[0], batch_size):
            outs.append(model(x[i:i + batch_size].to(dev)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def linearity_gap(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, *, generator: torch.Generator | None = None,
                  eps: torch.Tensor | None = None, batch_size: int = 512, space: str = "probs",
                  reduction: str = "mean") -> float | torch.Tensor:
    """How far the model is from linear between inputs -- the regularizer behind mixup (kexue.fm/archives/5693).

    For each pair ``(x_a[i], x_b[i])`` and ``ε_i ~ U[0, 1]`` (drawn with ``generator``, or given as ``eps``)
    this is ``‖p(ε·a + (1-ε)·b) − (ε·p(a) + (1-ε)·p(b))‖₁`` with ``p = softmax(model(·))``
    (``space="probs"``) or ``p = model(·)`` as is (``space="outputs"``: use it when the model already outputs
    probabilities, or to test Jensen's identity on the raw outputs). Runs in eval mode under ``no_grad``
    in batches, in float32 at least; the model's mode is restored. Returns the mean (a float), or the
    per-pair gaps ``[N]`` with ``reduction="none"``.

    Note that the softmax of an affine map is not affine, so a linear classifier has a positive gap in
    probability space; the gap is 0 only for models whose predicted distribution is affine along segments.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> xa, xb = torch.randn(32, 4), torch.randn(32, 4)
        >>> gap = linearity_gap(net, xa, xb, generator=torch.Generator().manual_seed(0))
        >>> 0.0 <= gap <= 2.0
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_tensor("x_a", x_a, floating=True, min_dim=1)
    check_tensor("x_b", x_b, floating=True, min_dim=1)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    check_choice("space", space, ("probs", "outputs"))
    check_choice("reduction", reduction, ("mean", "none"))
    _check_batch_size(batch_size)
    n = x_a.shape[0]
    if n == 0:
        raise ValueError("x_a must hold at least one pair")
    if eps is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
    else:
        check_tensor("eps", eps, floating=True, dim=1)
        if eps.shape[0] != n:
            raise ValueError(f"eps must have shape [{n}], got {tuple(eps.shape)}")
        if bool(((eps < 0) | (eps > 1)).any()):
            raise ValueError("eps must lie in [0, 1]")
    dev = _model_device(model)
    gaps = []
    with _EvalMode(model):
        for i in range(0, n, batch_size):
            a = x_a[i:i + batch_size].to(dev)
            b = x_b[i:i + batch_size].to(dev)
            e = eps[i:i + batch_size].to(dev)
            work = compute_dtype(a.dtype)
            ex = e.to(a.dtype).reshape(-1, *([1] * (a.dim() - 1)))
            mixed = ex * a + (1 - ex) * b
            outs = model(torch.cat([mixed, a, b]))
            outs = outs.to(work).reshape(3, a.shape[0], -1)
            p = torch.softmax(outs, dim=-1) if space == "probs" else outs
            ep = e.to(work).unsqueeze(1)
            gaps.append((p[0] - (ep * p[1] + (1 - ep) * p[2])).abs().sum(1).cpu())
    per_pair = torch.cat(gaps)
    return float(per_pair.mean()) if reduction == "mean" else per_pair


def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512,
                        n_bins: int = 15) -> dict[str, float]:
    """Accuracy, error, NLL and ECE of ``model`` on ``(x, y)`` in one batched eval-mode pass.

    Example:
        >>> m = evaluate_classifier(nn.Linear(4, 3), torch.randn(20, 4), torch.randint(0, 3, (20,)))
        >>> sorted(m)
        ['accuracy', 'ece', 'error', 'nll']
    """
    logits = predict_logits(model, x, batch_size=batch_size)
    acc = accuracy(logits, y)
    return {"accuracy": acc, "error": 1.0 - acc, "nll": nll(logits, y),
            "ece": expected_calibration_error(logits, y, n_bins=n_bins, inputs="logits")}
