"""kexue.metrics.classification: accuracy, NLL, ECE and the linearity gap against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kexue.metrics.classification import (
    accuracy,
    evaluate_classifier,
    expected_calibration_error,
    linearity_gap,
    nll,
    predict_logits,
)


def ece_reference(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    """Plain loop over bins (b/n, (b+1)/n]."""
    conf, pred = probs.double().max(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inb = [i for i in range(len(conf)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] <= lo)]
        if not inb:
            continue
        acc = sum(float(pred[i] == labels[i]) for i in inb) / len(inb)
        c = sum(float(conf[i]) for i in inb) / len(inb)
        total += len(inb) / len(conf) * abs(acc - c)
    return total


def test_accuracy_and_nll():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.3, 0.9, 0.1], [1.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, y) == 0.75
    assert accuracy(torch.tensor([0, 1, 2, 1]), y) == 0.75
    assert nll(logits, y) == pytest.approx(float(F.cross_entropy(logits.double(), y)), abs=1e-12)
    p = torch.softmax(logits.double(), 1)
    assert nll(p, y, inputs="probs") == pytest.approx(nll(logits, y), abs=1e-12)


def test_ece_hand_made_cases():
    # always sure and always right: perfectly calibrated
    onehot = F.one_hot(torch.tensor([0, 2, 1, 1]), 3).float()
    assert expected_calibration_error(onehot, torch.tensor([0, 2, 1, 1])) == pytest.approx(0.0, abs=1e-12)
    # confidence 0.7 on 10 samples, 7 right -> calibrated
    p = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    y = torch.tensor([0] * 7 + [1] * 3)
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.0, abs=1e-9)
    # confidence 0.95, half right -> ECE 0.45
    p = torch.tensor([[0.95, 0.05]] * 4)
    assert expected_calibration_error(p, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.45, abs=1e-6)
    # two bins: (conf 0.95, acc 0.5) and (conf 0.75, acc 1.0), equal weight -> 0.5*0.45 + 0.5*0.25
    p = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.25, 0.75], [0.25, 0.75]])
    assert expected_calibration_error(p, torch.tensor([0, 1, 1, 1]), n_bins=10) == pytest.approx(0.35, abs=1e-6)
    # with a single bin the ECE is |mean accuracy - mean confidence|
    assert expected_calibration_error(p, torch.tensor([0, 1, 1, 1]), n_bins=1) == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_loop_reference_and_logits_equal_probs(n_bins):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5, generator=g) * 2
    y = torch.randint(0, 5, (300,), generator=g)
    probs = torch.softmax(logits.double(), 1)
    ours = expected_calibration_error(logits, y, n_bins=n_bins)
    assert ours == pytest.approx(ece_reference(probs, y, n_bins), abs=1e-10)
    assert expected_calibration_error(probs, y, n_bins=n_bins) == pytest.approx(ours, abs=1e-10)
    assert expected_calibration_error(logits, y, n_bins=n_bins, inputs="logits") == pytest.approx(ours, abs=1e-10)


class Affine(nn.Module):
    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, dtype=dtype)

    def forward(self, x):
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_linearity_gap_zero_for_affine_model(dtype, tol):
    torch.manual_seed(0)
    model = Affine(12, 4, dtype)
    xa, xb = torch.randn(50, 3, 2, 2, dtype=dtype), torch.randn(50, 3, 2, 2, dtype=dtype)
    gaps = linearity_gap(model, xa, xb, generator=torch.Generator().manual_seed(1), space="outputs",
                         reduction="none", batch_size=16)
    assert gaps.shape == (50,)
    assert float(gaps.max()) < tol * 10
    # the softmax of an affine map is not affine: a linear classifier has a positive gap on probabilities
    assert linearity_gap(model, xa, xb, generator=torch.Generator().manual_seed(1)) > 1e-3


def test_linearity_gap_matches_plain_formula_and_is_batch_invariant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    xa, xb = torch.randn(37, 6, dtype=torch.float64), torch.randn(37, 6, dtype=torch.float64)
    eps = torch.rand(37, dtype=torch.float64)
    net.train()
    ours = linearity_gap(net, xa, xb, eps=eps, reduction="none", batch_size=10)
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        e = eps[:, None]
        p = lambda z: torch.softmax(net(z), 1)  # noqa: E731
        ref = (p(e * xa + (1 - e) * xb) - (e * p(xa) + (1 - e) * p(xb))).abs().sum(1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    one_batch = linearity_gap(net, xa, xb, eps=eps, batch_size=1000)
    assert one_batch == pytest.approx(float(ref.mean()), abs=1e-12)
    g1 = linearity_gap(net, xa, xb, generator=torch.Generator().manual_seed(3))
    g2 = linearity_gap(net, xa, xb, generator=torch.Generator().manual_seed(3))
    assert g1 == g2
    # at the endpoints the gap vanishes for any model
    assert linearity_gap(net, xa, xb, eps=torch.ones(37, dtype=torch.float64)) == pytest.approx(0, abs=1e-12)
    assert linearity_gap(net, xa, xb, eps=torch.zeros(37, dtype=torch.float64)) == pytest.approx(0, abs=1e-12)


def test_linearity_gap_positive_for_trained_mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 2, generator=g) * 2 - 1
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like quadrants need a nonlinear model
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids contention on a shared machine
    try:
        for _ in range(300):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert accuracy(predict_logits(net, x), y) > 0.9
    perm = torch.randperm(400, generator=g)
    gap = linearity_gap(net, x, x[perm], generator=g)
    assert gap > 0.1
    gap_out = linearity_gap(net, x, x[perm], generator=g, space="outputs")
    assert gap_out > 0.1


def test_evaluate_classifier_agrees_with_parts():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    m = evaluate_classifier(net, x, y, batch_size=7)
    logits = net(x).detach()
    assert m["accuracy"] == pytest.approx(accuracy(logits, y))
    assert m["error"] == pytest.approx(1 - m["accuracy"])
    assert m["nll"] == pytest.approx(nll(logits, y), abs=1e-6)
    assert m["ece"] == pytest.approx(expected_calibration_error(logits, y), abs=1e-6)


def test_bad_inputs():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="same number of samples"):
        accuracy(logits, y[:3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        expected_calibration_error(logits, torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        nll(logits, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(TypeError, match="labels must be an integer"):
        accuracy(logits, y.float())
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(logits, y, n_bins=0)
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(logits, y, inputs="probs")
    with pytest.raises(ValueError, match="inputs"):
        expected_calibration_error(logits, y, inputs="scores")
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="same shape"):
        linearity_gap(net, torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="floating"):
        linearity_gap(net, torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must lie"):
        linearity_gap(net, torch.randn(2, 3), torch.randn(2, 3), eps=torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="model"):
        linearity_gap(lambda z: z, torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="space"):
        linearity_gap(net, torch.randn(2, 3), torch.randn(2, 3), space="logits")
    with pytest.raises(ValueError, match="batch_size"):
        predict_logits(net, torch.randn(2, 3), batch_size=0)


def test_options_and_generator_are_keyword_only():
    logits, y, net = torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), nn.Linear(3, 2)
    g = torch.Generator().manual_seed(0)
    for call in (lambda: linearity_gap(net, torch.randn(2, 3), torch.randn(2, 3), g),
                 lambda: nll(logits, y, "logits"), lambda: expected_calibration_error(logits, y, 10),
                 lambda: predict_logits(net, torch.randn(2, 3), 1)):
        with pytest.raises(TypeError, match="positional"):
            call()
