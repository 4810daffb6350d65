"""Tests for kexue.linalg: the orthogonal map taking a to b (kexue.fm/archives/8453)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kexue.linalg import KINDS, OrthogonalMap, naive_matrix, orthogonal_map

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
EXACT_DET = {"rotation": lambda d: 1.0, "householder": lambda d: -1.0, "symmetric": lambda d: (-1.0) ** (d - 1)}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def pair_with_cos(d: int, cos: float, *, batch: tuple[int, ...] = (), seed: int = 0):
    """Unit a and b (float64) with a.b = cos exactly up to rounding."""
    g = torch.Generator().manual_seed(seed)
    a = unit(torch.randn(*batch, d, dtype=torch.float64, generator=g))
    p = torch.randn(*batch, d, dtype=torch.float64, generator=g)
    p = unit(p - (p * a).sum(-1, keepdim=True) * a)
    if cos == 1.0:
        return a, a.clone()
    if cos == -1.0:
        return a, -a
    return a, cos * a + math.sqrt(1.0 - cos * cos) * p


def ortho_error(T: torch.Tensor) -> float:
    """max |T^T T - I| measured in float64 (so the check itself adds no fp32 rounding)."""
    T = T.double()
    eye = torch.eye(T.shape[-1], dtype=torch.float64)
    return (T.transpose(-1, -2) @ T - eye).abs().max().item()


COSINES = [0.3, -0.3, 0.0, 1.0, -1.0, 1 - 1e-7, -(1 - 1e-7), 1 - 1e-12, -(1 - 1e-12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [2, 3, 5, 32])
def test_maps_a_to_b_and_is_orthogonal(dtype, kind, d):
    for i, cos in enumerate(COSINES):
        a64, b64 = pair_with_cos(d, cos, batch=(4,), seed=i + 10 * d)
        a, b = a64.to(dtype), b64.to(dtype)
        m = orthogonal_map(a, b, kind=kind)
        an, bn = unit(a), unit(b)
        err = (m(an) - bn).norm(dim=-1).max().item()
        assert err < TOL[dtype], (cos, err)
        T = m.matrix()
        assert T.dtype == dtype and T.shape == (4, d, d)
        assert ortho_error(T) < TOL[dtype], cos
        # the dense matrix agrees with the O(d) apply
        assert (T @ an.unsqueeze(-1)).squeeze(-1).sub(bn).abs().max().item() < 4 * TOL[dtype]


@pytest.mark.parametrize("kind", ["householder", "rotation", "symmetric"])
@pytest.mark.parametrize("d", [2, 3, 4, 7])
def test_determinants(kind, d):
    for i, cos in enumerate(COSINES):
        a, b = pair_with_cos(d, cos, seed=i)
        m = orthogonal_map(a, b, kind=kind)
        want = EXACT_DET[kind](d)
        assert m.det().item() == want
        assert torch.linalg.det(m.matrix()).item() == pytest.approx(want, abs=1e-10)


def test_auto_picks_stable_branch_and_its_det():
    d = 5
    a, b = pair_with_cos(d, 0.5, seed=1)
    m = orthogonal_map(a, b)  # a.b >= 0: symmetric form -H(a+b)
    assert torch.allclose(m.matrix(), orthogonal_map(a, b, kind="symmetric").matrix(), atol=1e-12)
    assert m.det().item() == (-1.0) ** (d - 1)
    a, b = pair_with_cos(d, -0.5, seed=1)
    m = orthogonal_map(a, b)  # a.b < 0: Householder H(a-b)
    assert torch.allclose(m.matrix(), orthogonal_map(a, b, kind="householder").matrix(), atol=1e-12)
    assert m.det().item() == -1.0
    # a batch mixing both branches
    a = torch.stack([pair_with_cos(d, 0.5, seed=1)[0], pair_with_cos(d, -0.5, seed=1)[0]])
    b = torch.stack([pair_with_cos(d, 0.5, seed=1)[1], pair_with_cos(d, -0.5, seed=1)[1]])
    dets = orthogonal_map(a, b).det()
    assert dets.tolist() == [1.0, -1.0]
    assert torch.allclose(torch.linalg.det(orthogonal_map(a, b).matrix()), dets, atol=1e-10)


@pytest.mark.parametrize("d", [3, 6])
def test_closed_forms_match_article_for_generic_pairs(d):
    a, b = pair_with_cos(d, 0.2, batch=(3,), seed=5)
    for kind in ("householder", "rotation", "symmetric"):
        assert torch.allclose(orthogonal_map(a, b, kind=kind).matrix(), naive_matrix(a, b, kind=kind), atol=1e-12)
    a, b = pair_with_cos(d, -0.7, batch=(3,), seed=6)
    for kind in ("householder", "rotation", "symmetric"):
        assert torch.allclose(orthogonal_map(a, b, kind=kind).matrix(), naive_matrix(a, b, kind=kind), atol=1e-12)


def test_article_example_and_symmetry_properties():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    b = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0], dtype=torch.float64)
    an, bn = unit(a), unit(b)
    for kind in ("householder", "symmetric"):
        T = orthogonal_map(a, b, kind=kind).matrix()
        assert torch.allclose(T, T.T, atol=1e-14)
        assert torch.allclose(T @ bn, an, atol=1e-14)  # symmetric forms also map b to a
    R = orthogonal_map(a, b, kind="rotation").matrix()
    assert not torch.allclose(R @ bn, an, atol=1e-3)  # the rotation does not
    # on the complement of span{a, b}: rotation and householder are I, symmetric is -I
    q, _ = torch.linalg.qr(torch.stack([an, bn, torch.randn(5, dtype=torch.float64)], 1))
    z = q[:, 2]
    assert torch.allclose(R @ z, z, atol=1e-14)
    assert torch.allclose(orthogonal_map(a, b, kind="householder")(z), z, atol=1e-14)
    assert torch.allclose(orthogonal_map(a, b, kind="symmetric")(z), -z, atol=1e-14)


def test_rotation_at_antipodal_pair_uses_documented_plane():
    a = unit(torch.tensor([0.5, -0.1, 2.0, 0.3], dtype=torch.float64))
    m = orthogonal_map(a, -a, kind="rotation")
    k = 1  # smallest |a_k|
    p = torch.zeros(4, dtype=torch.float64)
    p[k] = 1.0
    p = unit(p - a[k] * a)
    # rotation by pi in span{a, p}: a -> -a, p -> -p, identity on the complement
    assert torch.allclose(m(a), -a, atol=1e-14)
    assert torch.allclose(m(p), -p, atol=1e-14)
    extra = torch.randn(2, 4, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.stack([a, p, extra[0], extra[1]], 1))
    for j in (2, 3):
        assert torch.allclose(m(q[:, j]), q[:, j], atol=1e-14)
    assert m.det().item() == 1.0
    # a = b gives exactly the identity for rotation and auto-symmetric maps a to a
    assert torch.allclose(orthogonal_map(a, a, kind="rotation").matrix(), torch.eye(4, dtype=torch.float64), atol=1e-15)


def test_rotation_near_antipodal_stays_a_rotation():
    # the naive rotation formula loses orthogonality near a = -b; ours does not
    a, b = pair_with_cos(16, -(1 - 1e-7), seed=3)
    a, b = a.float(), b.float()
    ours = orthogonal_map(a, b, kind="rotation").matrix()
    naive = naive_matrix(a, b, kind="rotation")
    assert ortho_error(ours) < 1e-6
    assert abs(torch.linalg.det(ours.double()).item() - 1) < 1e-6
    assert ortho_error(naive) > 1e-3  # documents the failure we fix


def test_naive_forms_are_nan_at_their_singularities():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert torch.isnan(naive_matrix(a, a, kind="householder")).any()
    assert torch.isnan(naive_matrix(a, -a, kind="rotation")).any()
    assert torch.isnan(naive_matrix(a, -a, kind="symmetric")).any()


@pytest.mark.parametrize("kind", KINDS)
def test_inverse(kind):
    a, b = pair_with_cos(6, -0.4, batch=(2, 3), seed=2)
    m = orthogonal_map(a, b, kind=kind)
    inv = m.inverse()
    assert isinstance(inv, OrthogonalMap)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    assert torch.allclose(inv(m(x)), x, atol=1e-13)
    assert torch.allclose(inv.matrix(), m.matrix().transpose(-1, -2), atol=1e-14)
    assert torch.allclose(inv(b), unit(a), atol=1e-14)
    assert torch.equal(inv.det(), m.det())


@pytest.mark.parametrize("kind", KINDS)
def test_batching_and_broadcasting(kind):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, 5, dtype=torch.float64, generator=g)
    m = orthogonal_map(a, b, kind=kind)
    assert m.batch_shape == (3, 4)
    T = m.matrix()
    assert T.shape == (3, 4, 5, 5)
    for i in range(3):
        for j in range(4):
            single = orthogonal_map(a[i, 0], b[j], kind=kind).matrix()
            assert torch.allclose(T[i, j], single, atol=1e-13)
    # x broadcasts against the batch shape: one x for all maps, and per-map x
    x = torch.randn(5, dtype=torch.float64, generator=g)
    assert m(x).shape == (3, 4, 5)
    assert torch.allclose(m(x), (T @ x), atol=1e-13)
    xs = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    assert torch.allclose(m(xs), (T @ xs.unsqueeze(-1)).squeeze(-1), atol=1e-13)
    # one map applied to many vectors (the fast matrix-vector path)
    m1 = orthogonal_map(a[0, 0], b[0], kind=kind)
    X = torch.randn(7, 2, 5, dtype=torch.float64, generator=g)
    X0 = X.clone()
    assert torch.allclose(m1(X), X @ m1.matrix().T, atol=1e-13)
    assert torch.equal(X, X0)  # the input is never modified
    with torch.no_grad():
        assert torch.allclose(m1(X), X @ m1.matrix().T, atol=1e-13)
    assert torch.equal(X, X0)


def test_inputs_are_normalised():
    a, b = pair_with_cos(4, 0.1, seed=4)
    for kind in KINDS:
        m1, m2 = orthogonal_map(a, b, kind=kind), orthogonal_map(3.0 * a, 0.01 * b, kind=kind)
        assert torch.allclose(m1.matrix(), m2.matrix(), atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cos", [0.4, -0.4, 1 - 1e-3, -(1 - 1e-3)])
def test_gradcheck(kind, cos):
    a0, b0 = pair_with_cos(4, cos, seed=7)
    a = (2.0 * a0).requires_grad_()
    b = (0.5 * b0).requires_grad_()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, x: orthogonal_map(a, b, kind=kind)(x), (a, b, x))
    assert torch.autograd.gradcheck(lambda a, b: orthogonal_map(a, b, kind=kind).matrix(), (a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_at_degenerate_pairs(kind):
    for a0, b0 in [pair_with_cos(5, 1.0, seed=1), pair_with_cos(5, -1.0, seed=1)]:
        a = a0.clone().requires_grad_()
        b = b0.clone().requires_grad_()
        x = torch.randn(5, dtype=torch.float64, requires_grad=True)
        orthogonal_map(a, b, kind=kind)(x).square().sum().backward()
        for t in (a, b, x):
            assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_in_same_dtype_out(dtype, kind):
    a, b = pair_with_cos(8, -0.9, batch=(3,), seed=8)
    x = torch.randn(3, 8, dtype=torch.float64)
    m = orthogonal_map(a.to(dtype), b.to(dtype), kind=kind)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    assert m.matrix().dtype == dtype
    # computed in fp32 then rounded once: close to the fp64 answer within the output dtype's resolution
    ref = orthogonal_map(a.to(dtype).double(), b.to(dtype).double(), kind=kind)(x.to(dtype).double())
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel.item() < 2 * torch.finfo(dtype).eps
    # a low-precision map applied to fp32 x computes and returns fp32
    assert m(x.float()).dtype == torch.float32


def test_bad_inputs_raise():
    a = torch.tensor([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="nonzero"):
        orthogonal_map(torch.zeros(3), a)
    with pytest.raises(ValueError, match="nonzero"):
        orthogonal_map(a, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="last dimension"):
        orthogonal_map(a, torch.ones(4))
    with pytest.raises(ValueError, match="finite"):
        orthogonal_map(torch.tensor([1.0, float("nan"), 0.0]), a)
    with pytest.raises(ValueError, match=">= 2"):
        orthogonal_map(torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="broadcast"):
        orthogonal_map(torch.ones(2, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="kind"):
        orthogonal_map(a, a, kind="cayley")
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        orthogonal_map([1.0, 0.0, 0.0], a)
    with pytest.raises(TypeError, match="floating"):
        orthogonal_map(torch.tensor([1, 0, 0]), a)
    m = orthogonal_map(a, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="last dimension 3"):
        m(torch.ones(4))
    with pytest.raises(ValueError, match="broadcast"):
        orthogonal_map(torch.ones(2, 3), torch.ones(2, 3))(torch.ones(5, 3))
    with pytest.raises(TypeError, match="x must be"):
        m([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="kind"):
        naive_matrix(a, a, kind="auto")


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 12), batch=st.lists(st.integers(1, 3), max_size=2), kind=st.sampled_from(KINDS),
       cos=st.sampled_from([None, 1.0, -1.0, 1 - 1e-7, -(1 - 1e-7), 1e-3]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10_000))
def test_property_random_shapes(d, batch, kind, cos, dtype, seed):
    if cos is None:
        g = torch.Generator().manual_seed(seed)
        a64 = torch.randn(*batch, d, dtype=torch.float64, generator=g)
        b64 = torch.randn(*batch, d, dtype=torch.float64, generator=g)
    else:
        a64, b64 = pair_with_cos(d, cos, batch=tuple(batch), seed=seed)
    a, b = a64.to(dtype), b64.to(dtype)
    m = orthogonal_map(a, b, kind=kind)
    an, bn = unit(a), unit(b)
    assert (m(an) - bn).norm(dim=-1).max().item() < TOL[dtype]
    T = m.matrix()
    assert T.shape == (*batch, d, d)
    assert ortho_error(T) < TOL[dtype]
    assert torch.allclose(torch.linalg.det(T.double()), m.det(), atol=1e-5)
    x = torch.randn(*batch, d, dtype=dtype)
    assert torch.allclose(m(x), (T @ x.unsqueeze(-1)).squeeze(-1), atol=10 * TOL[dtype])
    assert torch.allclose(m.inverse()(m(x)), x, atol=10 * TOL[dtype])


# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
@pytest.mark.cuda
def test_orthogonal_map_on_cuda():
    import torch.nn.functional as F

    from kexue.linalg import orthogonal_map

    g = torch.Generator().manual_seed(8)
    a = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    for kind in ("householder", "rotation", "symmetric"):
        m = orthogonal_map(a.to("cuda"), b.to("cuda"), kind=kind)
        torch.testing.assert_close(m(a.to("cuda")), b.to("cuda"), rtol=1e-5, atol=1e-5)
