"""Margin softmax losses: the article's identities, the fused path against the plain reference, the peer
(pytorch-metric-learning) values, finite gradients at cos = +-1, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kexue import losses as L

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _cosines(n: int, c: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cos = (torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    return cos, t


# ------------------------------------------------------------------------------------------ identities

@pytest.mark.parametrize("scale,margin", [(30.0, 0.35), (10.0, 0.0), (64.0, 0.5)])
def test_am_softmax_equals_log1p_sum_form(scale, margin):
    cos, t = _cosines(32, 7)
    ours = L.am_softmax(cos, t, scale=scale, margin=margin, reduction="none")
    ct = cos.gather(1, t[:, None])
    terms = torch.exp(scale * (cos + margin - ct))
    terms = terms.masked_fill(F.one_hot(t, 7).bool(), 0.0)
    article = torch.log1p(terms.sum(1))
    torch.testing.assert_close(ours, article, rtol=1e-10, atol=1e-12)


def test_margin_zero_is_normface():
    cos, t = _cosines(16, 5)
    torch.testing.assert_close(L.am_softmax(cos, t, scale=30.0, margin=0.0), L.normface(cos, t, scale=30.0))
    torch.testing.assert_close(L.am_softmax(cos, t, scale=30.0, margin=0.0), F.cross_entropy(30.0 * cos, t))
    am, nf = L.AMSoftmaxLoss(6, 5, margin=0.0), L.NormFaceLoss(6, 5)
    nf.load_state_dict(am.state_dict())
    z = torch.randn(9, 6)
    y = torch.randint(0, 5, (9,))
    torch.testing.assert_close(am(z, y), nf(z, y))


def test_distance_margin_equals_article_formula():
    cos, t = _cosines(20, 6)
    s, m = 20.0, 0.3
    for dist, k in (("sqrt_cosine", 1.0), ("euclidean", math.sqrt(2.0))):
        d = k * torch.sqrt(1.0 - cos)
        dt = d.gather(1, t[:, None])
        terms = torch.exp(s * (dt + m - d)).masked_fill(F.one_hot(t, 6).bool(), 0.0)
        ref = torch.log1p(terms.sum(1))
        ours = L.distance_margin(cos, t, scale=s, margin=m, distance=dist, reduction="none")
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_sqrt_one_minus_cos_is_a_metric_but_one_minus_cos_is_not():
    g = torch.Generator().manual_seed(1)
    x, y, z = (F.normalize(torch.randn(3, 20000, 5, generator=g, dtype=torch.float64), dim=-1))
    cxy, cyz, cxz = (x * y).sum(-1), (y * z).sum(-1), (x * z).sum(-1)
    d = L.cosine_distance
    for dist in ("sqrt_cosine", "euclidean"):
        assert bool((d(cxz, distance=dist) <= d(cxy, distance=dist) + d(cyz, distance=dist) + 1e-12).all())
    # 1 - cos: x at 0, y at 45, z at 90 degrees: 1 > 2 (1 - cos 45) = 0.586
    a = torch.tensor([0.0, math.pi / 4, math.pi / 2], dtype=torch.float64)
    p = torch.stack([a.cos(), a.sin()], 1)
    one_minus = lambda u, v: 1 - (u * v).sum()  # noqa: E731
    assert one_minus(p[0], p[2]) > one_minus(p[0], p[1]) + one_minus(p[1], p[2]) + 0.4
    sq = lambda u, v: d((u * v).sum(), distance="sqrt_cosine")  # noqa: E731
    assert sq(p[0], p[2]) <= sq(p[0], p[1]) + sq(p[1], p[2])


def test_combined_margin_special_cases():
    cos, t = _cosines(24, 9)
    cm, cml = L.combined_margin, L.combined_margin_logits
    torch.testing.assert_close(cm(cos, t, scale=30.0, m1=1.0, m2=0.0, m3=0.35),
                               L.am_softmax(cos, t, scale=30.0, margin=0.35))
    torch.testing.assert_close(cm(cos, t, scale=64.0, m1=1.0, m2=0.5, m3=0.0),
                               L.arcface(cos, t, scale=64.0, margin=0.5))
    torch.testing.assert_close(cm(cos, t, scale=30.0, m1=1.0, m2=0.0, m3=0.0), L.normface(cos, t, scale=30.0))
    torch.testing.assert_close(cml(cos, t, scale=64.0, m1=1.0, m2=0.5, m3=0.0),
                               L.arcface_logits(cos, t, scale=64.0, margin=0.5))
    # m1 > 1 (SphereFace-style): cos(m1 theta) on the target where m1 theta <= pi
    c = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    lg = L.combined_margin_logits(c, torch.tensor([0]), scale=1.0, m1=2.0, m2=0.0, m3=0.0)
    torch.testing.assert_close(lg[0, 0], torch.cos(2 * torch.acos(c[0, 0])))
    torch.testing.assert_close(lg[0, 1], c[0, 1])


def test_arcface_logits_values_and_fallback():
    m = 0.5
    c = torch.tensor([[0.3, 0.0], [-0.95, 0.0], [1.0, 0.0]], dtype=torch.float64)
    lg = L.arcface_logits(c, torch.tensor([0, 0, 0]), scale=1.0, margin=m)
    theta = torch.acos(c[0, 0])
    torch.testing.assert_close(lg[0, 0], torch.cos(theta + m))
    # -0.95 < -cos(0.5): theta + m > pi, fallback c - m sin m
    torch.testing.assert_close(lg[1, 0], c[1, 0] - m * math.sin(m))
    assert abs(float(lg[2, 0]) - math.cos(m)) < 1e-3  # cos(0 + m), sin floored at sqrt(EPS)
    easy = L.arcface_logits(c, torch.tensor([0, 0, 0]), scale=1.0, margin=m, easy_margin=True)
    torch.testing.assert_close(easy[1, 0], c[1, 0])


# ----------------------------------------------------------------------------- fused vs plain reference

_FUNCS = {
    "am": lambda x, t, **kw: L.am_softmax(x, t, scale=30.0, margin=0.35, **kw),
    "normface": lambda x, t, **kw: L.normface(x, t, scale=16.0, **kw),
    "arcface": lambda x, t, **kw: L.arcface(x, t, scale=64.0, margin=0.5, **kw),
    "combined": lambda x, t, **kw: L.combined_margin(x, t, scale=32.0, m1=1.2, m2=0.2, m3=0.1, **kw),
    "distance": lambda x, t, **kw: L.distance_margin(x, t, scale=30.0, margin=0.25, **kw),
}


@pytest.mark.parametrize("name", list(_FUNCS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_matches_reference(name, dtype, reduction):
    cos, t = _cosines(19, 11, dtype=dtype, seed=3)
    t[4] = -100  # ignored row
    cos[0, t[0]] = 1.0  # exactly aligned with its centre
    cos[1, t[1]] = -1.0
    outs, grads = [], []
    for fused in (True, False):
        x = cos.clone().requires_grad_(True)
        out = _FUNCS[name](x, t, reduction=reduction, fused=fused)
        assert out.dtype == dtype
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(dtype)
        (out * w).sum().backward()
        outs.append(out.double())
        grads.append(x.grad.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    assert bool(torch.isfinite(grads[0]).all())
    assert float(grads[0][4].abs().max()) == 0.0


def test_fused_low_precision_computed_in_fp32():
    cos, t = _cosines(33, 50, dtype=torch.bfloat16, seed=5)
    x = cos.clone().requires_grad_(True)
    x32 = cos.float().requires_grad_(True)
    out = L.am_softmax(x, t)
    ref = L.am_softmax(x32, t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float())
    out.backward()
    ref.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), x32.grad.to(torch.bfloat16).float())


def test_fused_backward_twice_raises():
    cos, t = _cosines(4, 3, dtype=torch.float32)
    x = cos.requires_grad_(True)
    out = L.am_softmax(x, t)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.backward()


def test_fused_precise_when_loss_is_tiny():
    cos = torch.tensor([[0.9, 0.0]], dtype=torch.float32)
    exact = torch.log1p(torch.exp(torch.tensor(30.0 * (0.0 + 0.35 - 0.9), dtype=torch.float64)))
    torch.testing.assert_close(L.am_softmax(cos, torch.tensor([0])).double(), exact, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------ modules

def _modules(d: int, c: int) -> dict[str, L.MarginSoftmaxLoss]:
    g = torch.Generator().manual_seed(0)
    return {
        "am": L.AMSoftmaxLoss(d, c, generator=g),
        "normface": L.NormFaceLoss(d, c, generator=g),
        "arcface": L.ArcFaceLoss(d, c, generator=g),
        "combined": L.CombinedMarginLoss(d, c, m1=1.5, m2=0.2, m3=0.1, generator=g),
        "distance": L.DistanceMarginLoss(d, c, generator=g),
        "distance_euclid": L.DistanceMarginLoss(d, c, distance="euclidean", generator=g),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_gradients_at_cos_plus_minus_one(dtype):
    d, c = 8, 5
    for name, loss in _modules(d, c).items():
        loss = loss.to(dtype)
        w = loss.weight.detach()
        z = torch.cat([w[:3], -w[3:5]]).clone().requires_grad_(True)  # cos = +1 for rows 0-2, -1 for 3-4
        y = torch.tensor([0, 1, 2, 3, 4])
        out = loss(z, y)
        out.backward()
        assert out.dtype == dtype, name
        assert bool(torch.isfinite(out)), name
        assert bool(torch.isfinite(z.grad).all()), name
        assert bool(torch.isfinite(loss.weight.grad).all()), name


def _pml():
    # pytorch-metric-learning is in the test extra: a missing peer is a failure, never a skip
    import pytorch_metric_learning.losses as pml_losses

    return pml_losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_equal_pytorch_metric_learning(dtype):
    pml = _pml()
    n, d, c = 64, 16, 40
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    margin_deg = 28.6
    pairs = [
        (pml.CosFaceLoss(c, d, margin=0.35, scale=30), L.AMSoftmaxLoss(d, c, scale=30.0, margin=0.35)),
        (pml.ArcFaceLoss(c, d, margin=margin_deg, scale=64),
         L.ArcFaceLoss(d, c, scale=64.0, margin=math.radians(margin_deg))),
    ]
    for peer, ours in pairs:
        peer, ours = peer.to(dtype), ours.to(dtype)
        with torch.no_grad():
            ours.weight.copy_(peer.W.t())  # PML stores W as [D, C]
        zp = z.clone().requires_grad_(True)
        zo = z.clone().requires_grad_(True)
        lp, lo = peer(zp, y), ours(zo, y)
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-5)
        lp.backward()
        lo.backward()
        torch.testing.assert_close(zo.grad, zp.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.weight.grad, peer.W.grad.t(), rtol=1e-4, atol=1e-6)


def test_module_matches_functional_and_get_logits():
    d, c = 12, 7
    z = torch.randn(10, d)
    y = torch.randint(0, c, (10,))
    mods = _modules(d, c)
    cos = F.normalize(z) @ F.normalize(mods["am"].weight).t()
    torch.testing.assert_close(mods["am"](z, y), L.am_softmax(cos, y, scale=30.0, margin=0.35))
    cos = F.normalize(z) @ F.normalize(mods["arcface"].weight).t()
    torch.testing.assert_close(mods["arcface"](z, y), L.arcface(cos, y, scale=64.0, margin=0.5))
    cos = F.normalize(z) @ F.normalize(mods["distance"].weight).t()
    torch.testing.assert_close(mods["distance"](z, y), L.distance_margin(cos, y, scale=30.0, margin=0.25))
    torch.testing.assert_close(mods["distance"].get_logits(z), -30.0 * L.cosine_distance(cos))
    lg = mods["am"].get_logits(z.to(torch.bfloat16))
    assert lg.shape == (10, c) and lg.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ diameter and adaptive

def test_estimate_class_diameter_hand_made():
    # class 0: two unit vectors at +-30 deg around e1; class 1: three copies of e2 (diameter 0)
    a = math.radians(30)
    z = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)], [0, 2.0], [0, 3.0], [0, 1.0]],
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    per = L.estimate_class_diameter(z, y, distance="angle", reduction="none")
    torch.testing.assert_close(per, torch.tensor([2 * a, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    per = L.estimate_class_diameter(z, y, distance="sqrt_cosine", reduction="none")
    torch.testing.assert_close(per[0], torch.tensor(2 * math.sqrt(1 - math.cos(a)), dtype=torch.float64))
    mean = L.estimate_class_diameter(z, y, distance="cosine")
    torch.testing.assert_close(mean, torch.tensor((2 * (1 - math.cos(a)) + 0.0) / 2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # with explicit centres e1 and e1: class 1 is now at 90 degrees
    cen = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    per = L.estimate_class_diameter(z, y, cen, distance="angle", reduction="none")
    torch.testing.assert_close(per, torch.tensor([2 * a, math.pi], dtype=torch.float64))


def test_adaptive_margin_tracks_measured_diameter():
    d, c, k = 6, 4, 3
    loss = L.DistanceMarginLoss(d, c, margin=0.0, adaptive_every=k, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    zs, ys = [], []
    for step in range(k):
        z = torch.randn(8, d, generator=g)
        y = torch.arange(8) % c
        loss(z, y)
        zs.append(z)
        ys.append(y)
        if step < k - 1:
            assert loss.margin == 0.0
    expect = L.estimate_class_diameter(torch.cat(zs), torch.cat(ys), loss.weight.detach(),
                                       distance="sqrt_cosine")
    assert loss.margin == pytest.approx(float(expect), rel=1e-5)
    assert loss.margin_history[-1] == (k, loss.margin)
    assert loss.class_diameter(torch.cat(zs), torch.cat(ys)).item() == pytest.approx(loss.margin, rel=1e-5)
    loss.eval()
    loss(torch.randn(8, d), torch.arange(8) % c)  # no adaptation outside training
    assert len(loss.margin_history) == 2
    am = L.AMSoftmaxLoss(d, c, margin=0.0, adaptive_every=1)
    z = torch.randn(5, d)
    am(z, torch.arange(5) % c)
    assert am.margin == pytest.approx(float(am.class_diameter(z, torch.arange(5) % c)), rel=1e-5)


# ------------------------------------------------------------------------------------------ bad input

def test_bad_input():
    cos, t = _cosines(4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="targets"):
        L.am_softmax(cos, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        L.arcface(cos, torch.tensor([0, 1, -2, 0]))
    with pytest.raises(ValueError, match="targets"):
        L.am_softmax(cos, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="targets"):
        L.am_softmax(cos, torch.zeros(4))
    with pytest.raises(TypeError, match="cosines"):
        L.am_softmax(cos.long(), t)
    with pytest.raises(ValueError, match="cosines"):
        L.am_softmax(cos[0], t)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="scale"):
            L.am_softmax(cos, t, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            L.AMSoftmaxLoss(4, 3, scale=bad)
    with pytest.raises(ValueError, match="margin"):
        L.am_softmax(cos, t, margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        L.ArcFaceLoss(4, 3, margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        L.distance_margin(cos, t, margin=-0.1)
    with pytest.raises(ValueError, match="m1"):
        L.CombinedMarginLoss(4, 3, m1=0.5)
    with pytest.raises(ValueError, match="m3"):
        L.combined_margin(cos, t, m3=-0.2)
    with pytest.raises(ValueError, match="distance"):
        L.DistanceMarginLoss(4, 3, distance="manhattan")
    with pytest.raises(ValueError, match="reduction"):
        L.am_softmax(cos, t, reduction="avg")
    with pytest.raises(ValueError, match="adaptive_every"):
        L.AMSoftmaxLoss(4, 3, adaptive_every=0)
    with pytest.raises(ValueError, match="adaptive"):
        L.CombinedMarginLoss(4, 3, adaptive_every=2)
    with pytest.raises(ValueError, match="num_classes"):
        L.AMSoftmaxLoss(4, 0)
    loss = L.AMSoftmaxLoss(4, 3)
    with pytest.raises(ValueError, match="embeddings must have 4 columns"):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        loss(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        L.estimate_class_diameter(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="centres"):
        L.estimate_class_diameter(torch.randn(3, 2), torch.tensor([0, 1, 1]), torch.randn(2, 3))


@pytest.mark.parametrize("bad", [math.pi, 3.5, 28.6, 180.0, float("inf"), float("nan")])
def test_arcface_margin_must_be_an_angle_below_pi(bad):
    """Regression: above pi the fallback raised the target logit (margin=28.6, a user passing degrees, was
    accepted). Function and class forms of ArcFace and m2 of the combined margin refuse it."""
    cos, t = _cosines(4, 3)
    calls = [lambda: L.arcface(cos, t, margin=bad), lambda: L.arcface_logits(cos, t, margin=bad),
             lambda: L.ArcFaceLoss(4, 3, margin=bad)]
    for call in calls:
        with pytest.raises(ValueError, match="margin"):
            call()
    for call in (lambda: L.combined_margin(cos, t, m2=bad), lambda: L.combined_margin_logits(cos, t, m2=bad),
                 lambda: L.CombinedMarginLoss(4, 3, m2=bad)):
        with pytest.raises(ValueError, match="m2"):
            call()


def test_arcface_margin_just_below_pi_and_degrees_hint():
    cos, t = _cosines(4, 3)
    m = math.nextafter(math.pi, 0.0)
    assert torch.isfinite(L.arcface(cos, t, margin=m))
    assert torch.isfinite(L.combined_margin(cos, t, m2=m))
    with pytest.raises(ValueError, match="radians"):
        L.arcface(cos, t, margin=28.6)


def test_adaptive_arcface_margin_stays_below_pi():
    torch.manual_seed(0)
    loss = L.ArcFaceLoss(8, 4, margin=0.0, adaptive_every=1)
    z = -loss.weight.detach()[torch.tensor([0, 1, 2, 3])]  # each embedding opposite its centre: radius pi
    loss(z, torch.arange(4))
    assert loss.margin < math.pi
    assert torch.isfinite(loss(z, torch.arange(4)))


def test_function_and_class_forms_share_one_argument_order():
    import inspect

    for fn, cls in ((L.am_softmax, L.AMSoftmaxLoss), (L.arcface, L.ArcFaceLoss), (L.normface, L.NormFaceLoss),
                    (L.combined_margin, L.CombinedMarginLoss), (L.distance_margin, L.DistanceMarginLoss)):
        f = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
        c = [p for p in inspect.signature(cls).parameters.values() if p.kind == p.KEYWORD_ONLY]
        names_f = [p.name for p in f if p.name not in ("reduction", "ignore_index", "fused")]
        assert names_f == [p.name for p in c][:len(names_f)], (fn.__name__, names_f, [p.name for p in c])
        assert all(p.default == next(q.default for q in f if q.name == p.name) for p in c if p.name in names_f)
    cos, t = _cosines(4, 3)
    with pytest.raises(TypeError, match="positional"):
        L.am_softmax(cos, t, 30.0)
    with pytest.raises(TypeError, match="positional"):
        L.CombinedMarginLoss(4, 3, 1.0)
    with pytest.raises(TypeError, match="positional"):
        L.cosine_distance(cos, "euclidean")


# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
@pytest.mark.cuda
def test_margin_losses_on_cuda_match_cpu():
    from kexue.losses import am_softmax, arcface

    g = torch.Generator().manual_seed(8)
    cos = torch.rand(16, 10, generator=g) * 2 - 1
    t = torch.randint(0, 10, (16,), generator=g)
    for fn in (am_softmax, arcface):
        c1 = cos.clone().requires_grad_(True)
        c2 = cos.to("cuda").requires_grad_(True)
        a, b = fn(c1, t), fn(c2, t.to("cuda"))
        a.backward()
        b.backward()
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c2.grad.cpu(), c1.grad, rtol=1e-5, atol=1e-6)
