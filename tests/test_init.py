"""Tests for kexue.init: variances against their formulas, fans, orthogonality, model init, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kexue import init as ki

SHAPES = [(384, 256), (96, 48, 3, 3), (64, 32, 5)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fans(shape):
    rf = math.prod(shape[2:])
    return shape[1] * rf, shape[0] * rf


def assert_var(w: torch.Tensor, want: float, rel: float = 0.05) -> None:
    got = w.double().var().item()
    assert abs(got / want - 1) < rel, (got, want)
    assert abs(w.double().mean().item()) < 4 * math.sqrt(want / w.numel())  # mean 0 within 4 s.e.


@pytest.mark.parametrize("shape", SHAPES)
def test_calculate_fans_conv_uses_kernel_area(shape):
    assert ki.calculate_fans(torch.empty(shape)) == fans(shape)


def test_conv_layer_fans():
    conv = nn.Conv2d(16, 32, kernel_size=(3, 5))
    assert ki.calculate_fans(conv.weight) == (16 * 15, 32 * 15)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ki.MODES)
@pytest.mark.parametrize("distribution", ki.DISTRIBUTIONS)
def test_variance_scaling_matches_formula(shape, mode, distribution):
    fi, fo = fans(shape)
    fan = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]
    w = ki.variance_scaling_(torch.empty(shape), scale=1.7, mode=mode, distribution=distribution, generator=gen(1))
    assert_var(w, 1.7 / fan)
    std = math.sqrt(1.7 / fan)
    if distribution == "truncated_normal":
        # truncated at +-2 of the *corrected* std
        assert w.abs().max().item() <= 2 * std / ki.TRUNC_STD_CORRECTION + 1e-6
    if distribution == "uniform":
        assert w.abs().max().item() <= math.sqrt(3) * std + 1e-6


def test_truncation_correction_constant():
    # std of N(0,1) truncated to [-2, 2], from its closed form
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    assert ki.TRUNC_STD_CORRECTION == pytest.approx(math.sqrt(1 - 4 * phi / z), abs=1e-12)
    # without correction the variance would be 0.774 of the target: check our samples are not that
    w = ki.variance_scaling_(torch.empty(512, 512), scale=1.0, mode="fan_in", distribution="truncated_normal",
                             generator=gen(2))
    assert_var(w, 1 / 512, rel=0.02)


@pytest.mark.parametrize("shape", SHAPES)
def test_named_inits_match_formulas(shape):
    fi, fo = fans(shape)
    assert_var(ki.geometric_(torch.empty(shape), generator=gen(3)), 1 / fo)
    assert_var(ki.geometric_(torch.empty(shape), gain=math.sqrt(2), generator=gen(3)), 2 / fo)
    assert_var(ki.geometric_(torch.empty(shape), gain=0.5, distribution="uniform", generator=gen(3)), 0.25 / fo)
    assert_var(ki.lecun_normal_(torch.empty(shape), generator=gen(4)), 1 / fi)
    assert_var(ki.lecun_normal_(torch.empty(shape), distribution="normal", generator=gen(4)), 1 / fi)
    assert_var(ki.xavier_normal_(torch.empty(shape), generator=gen(5)), 2 / (fi + fo))
    assert_var(ki.xavier_normal_(torch.empty(shape), gain=2.0, generator=gen(5)), 8 / (fi + fo))
    assert_var(ki.xavier_uniform_(torch.empty(shape), generator=gen(6)), 2 / (fi + fo))
    assert_var(ki.he_normal_(torch.empty(shape), generator=gen(7)), 2 / fi)
    assert_var(ki.he_normal_(torch.empty(shape), mode="fan_out", generator=gen(7)), 2 / fo)
    assert_var(ki.he_normal_(torch.empty(shape), mode="fan_avg", generator=gen(7)), 4 / (fi + fo))
    assert_var(ki.he_normal_(torch.empty(shape), nonlinearity="leaky_relu", negative_slope=0.2,
                             generator=gen(7)), 2 / (1 + 0.04) / fi)


def test_trunc_normal_bounds_are_in_std_units():
    w = ki.trunc_normal_(torch.empty(200_000), mean=1.0, std=0.02, generator=gen(8))
    assert w.min().item() >= 1.0 - 0.04 and w.max().item() <= 1.0 + 0.04
    # the std of a +-2 sigma truncated normal is 0.8796 sigma
    assert w.std().item() == pytest.approx(0.02 * ki.TRUNC_STD_CORRECTION, rel=0.02)
    w = ki.trunc_normal_(torch.empty(200_000), std=1.0, a=-1.0, b=3.0, generator=gen(8))
    assert w.min().item() >= -1.0 and w.max().item() <= 3.0


def _truncnorm_reference(a: float, b: float) -> tuple[float, float]:
    """Mean and std of N(0, 1) truncated to [a, b] by quadrature of exp(-x^2/2) normalised on a fine grid (valid
    for any bounds, also where scipy's closed forms lose digits, e.g. very narrow windows)."""
    import numpy as np

    lo = b - 12.0 if math.isinf(a) else a  # mass beyond 12 std of the finite bound: < 1e-31 of the total
    hi = a + 12.0 if math.isinf(b) else b
    x = np.linspace(lo, hi, 400_001)
    logd = -0.5 * x * x
    w = np.exp(logd - logd.max())
    z = np.trapezoid(w, x)
    mean = np.trapezoid(x * w, x) / z
    var = np.trapezoid((x - mean) ** 2 * w, x) / z
    return float(mean), float(math.sqrt(var))


# far tails (both sides; scipy.stats.truncnorm is exact there), one-sided, very narrow, and ordinary windows
TRUNC_BOUNDS = [(8.0, 9.0), (10.0, 11.0), (-11.0, -10.0), (-9.0, -8.0), (3.0, math.inf), (-math.inf, -5.0),
                (38.0, math.inf), (-40.0, -39.0), (1.0, 1.001), (10.0, 10.0001), (-0.1, 0.1),
                (-2.0, 2.0), (-1.0, 3.0), (0.5, 0.6), (-math.inf, 0.3)]


@pytest.mark.parametrize(("a", "b"), TRUNC_BOUNDS)
def test_trunc_normal_matches_scipy_truncnorm_in_the_tails(a, b):
    """Regression: the inverse CDF went through 0.5 (1 + erf(x / sqrt 2)), which is 1.0 beyond ~8 std, so
    [10, 11] gave 11.0 for every sample and [8, 9] a std of 0.261 instead of 0.119."""
    stats = pytest.importorskip("scipy.stats")
    n = 20_000
    w = ki.trunc_normal_(torch.empty(n, dtype=torch.float64), a=a, b=b, generator=gen(21))
    assert bool(torch.isfinite(w).all()) and w.min().item() >= a and w.max().item() <= b
    ref = stats.truncnorm(a, b)
    ks = stats.kstest(w.numpy(), ref.cdf).statistic
    assert ks < 1.63 / math.sqrt(n), ks  # the 1% critical value
    mean, std = _truncnorm_reference(a, b)
    if b - a > 1e-2:  # scipy's moments agree with the quadrature there (not on 1e-4 windows: its std is off)
        assert mean == pytest.approx(ref.mean(), abs=1e-6 * max(1.0, abs(mean)))
        assert std == pytest.approx(ref.std(), rel=1e-4)
    se = std / math.sqrt(n)
    assert abs(w.mean().item() - mean) < 5 * se
    assert w.std().item() == pytest.approx(std, rel=0.05)


def test_trunc_normal_far_tail_scaled_and_in_low_precision():
    w = ki.trunc_normal_(torch.empty(4000), mean=1.0, std=0.5, a=10.0, b=11.0, generator=gen(22))
    assert w.dtype == torch.float32 and w.min().item() >= 6.0 and w.max().item() <= 6.5
    assert w.mean().item() == pytest.approx(1.0 + 0.5 * 10.098068, abs=0.01)
    assert len(torch.unique(w)) > 3000                         # not one value repeated (the old 11.0)
    h = ki.trunc_normal_(torch.empty(4000, dtype=torch.bfloat16), a=-11.0, b=-10.0, generator=gen(22))
    assert h.dtype == torch.bfloat16 and h.float().mean().item() == pytest.approx(-10.098, abs=0.02)
    g1 = ki.trunc_normal_(torch.empty(100), a=10.0, b=11.0, generator=gen(5))
    assert torch.equal(g1, ki.trunc_normal_(torch.empty(100), a=10.0, b=11.0, generator=gen(5)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_trunc_normal_refuses_non_finite_mean_and_std(bad):
    with pytest.raises(ValueError, match="mean"):
        ki.trunc_normal_(torch.empty(3), mean=bad)
    with pytest.raises(ValueError, match="std"):
        ki.trunc_normal_(torch.empty(3), std=bad)
    with pytest.raises(TypeError, match="mean"):
        ki.trunc_normal_(torch.empty(3), mean="0")
    with pytest.raises(ValueError, match="a must be < b"):
        ki.trunc_normal_(torch.empty(3), a=float("nan"))


def test_options_are_keyword_only():
    w = torch.empty(4, 4)
    for call in (lambda: ki.trunc_normal_(w, 0.0, 1.0), lambda: ki.variance_scaling_(w, 2.0),
                 lambda: ki.geometric_(w, 2.0), lambda: ki.xavier_normal_(w, 1.0), lambda: ki.xavier_uniform_(w, 1.0),
                 lambda: ki.he_normal_(w, "fan_in"), lambda: ki.orthogonal_(w, 1.0),
                 lambda: ki.initialize(nn.Linear(2, 2), "he"), lambda: ki.signal_propagation("he"),
                 lambda: ki.gain("leaky_relu", 0.2)):
        with pytest.raises(TypeError, match="positional"):
            call()


def test_generator_reproducibility():
    for fn in (ki.geometric_, ki.lecun_normal_, ki.xavier_normal_, ki.xavier_uniform_, ki.he_normal_,
               ki.orthogonal_):
        w1 = fn(torch.empty(32, 16), generator=gen(11))
        w2 = fn(torch.empty(32, 16), generator=gen(11))
        w3 = fn(torch.empty(32, 16), generator=gen(12))
        assert torch.equal(w1, w2), fn.__name__
        assert not torch.equal(w1, w3), fn.__name__
    m1 = ki.initialize(nn.Linear(8, 8), generator=gen(0))
    m2 = ki.initialize(nn.Linear(8, 8), generator=gen(0))
    assert torch.equal(m1.weight, m2.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (16, 8, 3, 3)])
def test_orthogonal(dtype, shape):
    w = ki.orthogonal_(torch.empty(shape, dtype=dtype), gain=2.0, generator=gen(9))
    assert w.dtype == dtype
    flat = w.reshape(shape[0], -1).double() / 2.0
    rows, cols = flat.shape
    gram = flat.T @ flat if rows >= cols else flat @ flat.T
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert (gram - torch.eye(min(rows, cols), dtype=torch.float64)).abs().max().item() < tol


def test_orthogonal_bf16_equals_fp32_rounded():
    w32 = ki.orthogonal_(torch.empty(48, 48), generator=gen(10))
    w16 = ki.orthogonal_(torch.empty(48, 48, dtype=torch.bfloat16), generator=gen(10))
    assert torch.equal(w16, w32.to(torch.bfloat16))


def test_low_precision_normal_inits_keep_dtype_and_variance():
    w = ki.geometric_(torch.empty(512, 256, dtype=torch.bfloat16), generator=gen(13))
    assert w.dtype == torch.bfloat16
    assert_var(w, 1 / 512)


def test_orthogonality_error():
    eye = torch.eye(5)
    assert ki.orthogonality_error(eye).item() == 0.0
    assert ki.orthogonality_error(2 * eye).item() == pytest.approx(9 / 5)
    # Corollary 2: N(0, 1/n) entries give mean squared error ~ 1/n (off-diagonal 1/n, diagonal 2/n)
    n = 300
    w = torch.randn(n, n, generator=gen(14)) / math.sqrt(n)
    assert ki.orthogonality_error(w).item() * n == pytest.approx(1 + 1 / n, rel=0.05)
    batch = torch.stack([eye, 2 * eye])
    assert ki.orthogonality_error(batch).shape == (2,)


def test_initialize_small_model():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Flatten(), nn.Linear(8 * 8 * 8, 64), nn.ReLU(),
        nn.Linear(64, 10))
    emb = nn.Embedding(50, 32, padding_idx=0)
    holder = nn.ModuleDict({"net": model, "emb": emb})
    out = ki.initialize(holder, scheme="geometric", nonlinearity="relu", generator=gen(15))
    assert out is holder
    for m in holder.modules():
        if getattr(m, "bias", None) is not None and not isinstance(m, nn.BatchNorm2d):
            assert torch.count_nonzero(m.bias) == 0
    assert torch.equal(model[1].weight, torch.ones(16))  # norm layers untouched
    # geometric: variance 2 / fan_out (relu gain)
    assert_var(model[0].weight, 2 / (16 * 9), rel=0.15)  # 432 samples only
    assert_var(model[5].weight, 2 / 64)
    # transposed conv weight is stored (in, out, k, k): its fan_out is out * k * k = 32
    assert_var(model[3].weight, 2 / 32, rel=0.15)
    # embedding = linear map from one-hot rows: fan_out = embedding_dim
    assert_var(emb.weight[1:], 2 / 32, rel=0.1)
    assert torch.count_nonzero(emb.weight[0]) == 0
    # every scheme runs, and a model still gives finite outputs
    x = torch.randn(2, 3, 4, 4)
    for scheme in ki.SCHEMES:
        ki.initialize(model, scheme=scheme, nonlinearity="relu", generator=gen(16))
        assert torch.isfinite(model(x)).all()
    ki.initialize(model, scheme="orthogonal", nonlinearity="tanh", generator=gen(17))
    w = model[5].weight.detach()
    assert ki.orthogonality_error(w.T).item() < 1e-10  # 64 x 512: orthonormal rows
    # a callable scheme
    ki.initialize(model, scheme=lambda w, generator=None: w.fill_(0.5), generator=gen(0))
    assert torch.all(model[7].weight == 0.5)


def test_signal_propagation_keeps_or_loses_norm():
    r = ki.signal_propagation(scheme="he", activation="relu", depth=50, width=128, generator=gen(18))
    assert r.shape == (51,) and r[0].item() == 1.0
    assert 0.5 < r[-1].item() < 2
    r = ki.signal_propagation(scheme="geometric", activation="linear", depth=50, width=128, generator=gen(18))
    assert 0.5 < r[-1].item() < 2
    # LeCun (no ReLU gain) loses a factor sqrt(2) per ReLU layer: 2^-25 after 50 layers
    r = ki.signal_propagation(scheme="lecun", activation="relu", depth=50, width=128, generator=gen(18))
    assert r[-1].item() < 1e-5
    # variance 1 explodes
    r = ki.signal_propagation(scheme=lambda w, generator=None: w.normal_(0, 1, generator=generator),
                              activation="linear", depth=10, width=128, generator=gen(18))
    assert r[-1].item() > 1e8
    # the geometric rule handles rectangular layers that LeCun gets wrong when widening
    widths = [32 * 2 ** min(i, 4) for i in range(11)]
    geo = ki.signal_propagation(scheme="geometric", activation="linear", depth=10, width=widths, generator=gen(19))
    lec = ki.signal_propagation(scheme="lecun", activation="linear", depth=10, width=widths, generator=gen(19))
    assert 0.8 < geo[-1].item() < 1.25
    assert lec[-1].item() > 3.5  # sqrt(16) ideally


def test_bad_inputs_raise():
    for fn in (ki.geometric_, ki.lecun_normal_, ki.xavier_normal_, ki.xavier_uniform_, ki.he_normal_,
               ki.orthogonal_):
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            fn(torch.empty(10))
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn([[1.0, 2.0]])
        with pytest.raises(TypeError, match="floating"):
            fn(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mode"):
        ki.variance_scaling_(torch.empty(3, 3), mode="fan_max")
    with pytest.raises(ValueError, match="distribution"):
        ki.variance_scaling_(torch.empty(3, 3), distribution="laplace")
    with pytest.raises(ValueError, match="scale"):
        ki.variance_scaling_(torch.empty(3, 3), scale=0.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="gain"):
            ki.geometric_(torch.empty(3, 3), gain=bad)
        with pytest.raises(ValueError, match="gain"):
            ki.orthogonal_(torch.empty(3, 3), gain=bad)
        with pytest.raises(ValueError, match="gain"):
            ki.xavier_normal_(torch.empty(3, 3), gain=bad)
    with pytest.raises(ValueError, match="nonlinearity"):
        ki.he_normal_(torch.empty(3, 3), nonlinearity="swish")
    with pytest.raises(ValueError, match="std"):
        ki.trunc_normal_(torch.empty(3), std=0.0)
    with pytest.raises(ValueError, match="a must be < b"):
        ki.trunc_normal_(torch.empty(3), a=1.0, b=-1.0)
    with pytest.raises(ValueError, match="scheme"):
        ki.initialize(nn.Linear(2, 2), scheme="fixup")
    with pytest.raises(ValueError, match="nonlinearity"):
        ki.initialize(nn.Linear(2, 2), nonlinearity="gelu")
    with pytest.raises(TypeError, match="module"):
        ki.initialize(torch.empty(2, 2))
    with pytest.raises(ValueError, match="scheme"):
        ki.signal_propagation(scheme="kaiming")
    with pytest.raises(ValueError, match="activation"):
        ki.signal_propagation(scheme="he", activation="softplus")
    with pytest.raises(ValueError, match="depth"):
        ki.signal_propagation(scheme="he", depth=0)
    with pytest.raises(ValueError, match="width"):
        ki.signal_propagation(scheme="he", depth=3, width=[4, 4])
    with pytest.raises(ValueError, match="weight"):
        ki.orthogonality_error(torch.ones(3))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       scheme=st.sampled_from(["geometric", "lecun", "xavier", "xavier_uniform", "he", "orthogonal"]),
       seed=st.integers(0, 1000))
def test_property_random_shapes(shape, scheme, seed):
    w = torch.full(shape, float("nan"))
    layer_fn = {"geometric": ki.geometric_, "lecun": ki.lecun_normal_, "xavier": ki.xavier_normal_,
                "xavier_uniform": ki.xavier_uniform_, "he": ki.he_normal_, "orthogonal": ki.orthogonal_}[scheme]
    out = layer_fn(w, generator=gen(seed))
    assert out is w and out.shape == tuple(shape)
    assert torch.isfinite(w).all()
    fi, fo = ki.calculate_fans(w)
    assert (fi, fo) == fans(shape)
    if scheme == "orthogonal":
        flat = w.reshape(shape[0], -1).double()
        gram = flat.T @ flat if flat.shape[0] >= flat.shape[1] else flat @ flat.T
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)
    elif scheme in ("xavier_uniform",):
        assert w.abs().max().item() <= math.sqrt(6 / (fi + fo)) + 1e-6
    elif scheme == "lecun":
        assert w.abs().max().item() <= 2 / ki.TRUNC_STD_CORRECTION / math.sqrt(fi) + 1e-6


# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
@pytest.mark.cuda
def test_he_normal_on_cuda_matches_cpu_statistics():
    from kexue.init import he_normal_, orthogonality_error

    w_cpu, w_gpu = torch.empty(256, 128), torch.empty(256, 128, device="cuda")
    he_normal_(w_cpu, generator=torch.Generator().manual_seed(9))
    he_normal_(w_gpu, generator=torch.Generator(device="cuda").manual_seed(9))
    for w in (w_cpu, w_gpu.cpu()):
        assert abs(float(w.var()) - 2 / 128) < 0.1 * 2 / 128
    assert float(orthogonality_error(w_gpu)) == pytest.approx(float(orthogonality_error(w_cpu)), rel=0.2)
