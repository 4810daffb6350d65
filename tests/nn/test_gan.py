"""kexue.nn.gan: shapes and gradients of every generator / discriminator, the norms against plain references,
the article's checks (SELF-MOD = BN at init, AdaIN per-sample, spectral norm), initialisation and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kexue.nn.gan import (
    AdaIN2d,
    ConditionalBatchNorm2d,
    DCGANDiscriminator,
    DCGANGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
    SelfModulatedBatchNorm2d,
    StyleGenerator,
    build_discriminator,
    build_generator,
    count_parameters,
    init_gan_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (16, 32, 64, 128)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _finite_grads(module):
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


# ------------------------------------------------------------------------------------ shapes, gradients

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", (1, 3))
def test_every_generator_and_discriminator_shapes_and_gradients(size, channels):
    g = _gen(size + channels)
    z = torch.randn(3, 8, generator=g)
    gens = [DCGANGenerator(8, size, channels, width=2, generator=g),
            DCGANGenerator(8, size, channels, width=2, upsample="nearest", norm="selfmod", hidden=4, generator=g),
            ResNetGenerator(8, size, channels, width=4, norm="bn", residual_scale=0.1, generator=g),
            StyleGenerator(8, size, channels, width=2, mapping_layers=2, generator=g)]
    discs = [DCGANDiscriminator(size, channels, width=2, generator=g),
             DCGANDiscriminator(size, channels, width=2, spectral_norm=True, generator=g),
             ResNetDiscriminator(size, channels, width=8, spectral_norm=True, generator=g)]
    for G in gens:
        x = G(z)
        assert x.shape == (3, channels, size, size)
        assert x.abs().max() <= 1 and torch.isfinite(x).all()
        for D in discs:
            G.zero_grad()
            D.zero_grad()
            out = D(G(z))
            assert out.shape == (3,)
            out.square().mean().backward()
            _finite_grads(G)
            _finite_grads(D)


@pytest.mark.parametrize("norm", ("bn", "selfmod", "cbn", "none"))
@pytest.mark.parametrize("upsample", ("deconv", "nearest"))
def test_dcgan_norms_upsamples_and_conditioning(norm, upsample):
    g = _gen(1)
    k = 5 if norm == "cbn" else None
    G = DCGANGenerator(6, 16, 3, width=4, upsample=upsample, norm=norm, num_classes=k, generator=g)
    y = torch.tensor([0, 4, 2]) if k else None
    x = G(torch.randn(3, 6, generator=g), y)
    assert x.shape == (3, 3, 16, 16)
    x.sum().backward()
    _finite_grads(G)
    kinds = {type(m).__name__ for m in G.modules()}
    want = {"bn": "BatchNorm2d", "selfmod": "SelfModulatedBatchNorm2d", "cbn": "ConditionalBatchNorm2d"}
    if norm in want:
        assert want[norm] in kinds
    else:
        assert not any("Norm" in n for n in kinds)
    assert (type(G.ups[0]).__name__ == "ConvTranspose2d") == (upsample == "deconv")


def test_conditional_generators_and_projection_discriminators():
    g = _gen(2)
    y = torch.tensor([1, 0, 2, 1])
    for G in (DCGANGenerator(6, 16, 1, width=4, norm="selfmod", num_classes=3, generator=g),
              ResNetGenerator(6, 16, 1, width=4, norm="cbn", num_classes=3, generator=g)):
        x = G(torch.randn(4, 6, generator=g), y)
        for D in (DCGANDiscriminator(16, 1, width=4, num_classes=3, spectral_norm=True, generator=g),
                  ResNetDiscriminator(16, 1, width=4, num_classes=3, generator=g)):
            out = D(x.detach(), y)
            assert out.shape == (4,)
            # projection: changing the label changes the logit by <embed(y') - embed(y), h>
            assert not torch.equal(out, D(x.detach(), (y + 1) % 3))
    # labels matter in a conditional SELF-MOD generator once the embeddings are not zero
    G = DCGANGenerator(6, 16, 1, width=4, norm="selfmod", num_classes=3, generator=g)
    for m in G.modules():
        if isinstance(m, SelfModulatedBatchNorm2d):
            torch.nn.init.normal_(m.embed.weight, generator=g)
            torch.nn.init.normal_(m.gamma[-1].weight, generator=g)
    z = torch.randn(4, 6, generator=g)
    assert not torch.allclose(G(z, y), G(z, (y + 1) % 3))


def test_parameter_counts_match_the_reference_configurations():
    # offline-resources.md §E: DCGAN32 1.19M / 0.66M, ResNet32 ch128 1.20M / 1.05M, + selfmod 1.24M
    assert count_parameters(DCGANGenerator(128, 32, 3, 64)) == 1_183_619
    assert count_parameters(DCGANDiscriminator(32, 3, 64)) == 663_361
    assert count_parameters(DCGANGenerator(128, 32, 3, 64, norm="selfmod")) == 1_237_059
    assert 1.19e6 < count_parameters(ResNetGenerator(128, 32, 3, 128)) < 1.21e6


# ------------------------------------------------------------------------------------- norms vs reference

def _bn_ref(x, eps=1e-5):
    x = x.double()
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _in_ref(x, eps=1e-5):
    x = x.double()
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _randomise(module, g):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _check_against(out, ref, inputs):
    """Outputs and gradients (w.r.t. every input tensor) equal to the float64 reference."""
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=_gen(9), dtype=torch.float64)
    ga = torch.autograd.grad((out.double() * w).sum(), inputs, retain_graph=True)
    gb = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_conditional_batchnorm_matches_reference():
    g = _gen(3)
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    _randomise(cbn, g)
    x = torch.randn(6, 4, 3, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    out = cbn(x, y)
    ref = _bn_ref(x) * cbn.gamma.weight[y].double()[:, :, None, None] + cbn.beta.weight[y].double()[:, :, None, None]
    _check_against(out, ref, (x, cbn.gamma.weight, cbn.beta.weight))
    # running statistics are tracked as in BatchNorm2d
    bn = torch.nn.BatchNorm2d(4, affine=False)
    bn(x.detach())
    torch.testing.assert_close(cbn.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(cbn.bn.running_var, bn.running_var)


@pytest.mark.parametrize("hidden", (0, 5))
@pytest.mark.parametrize("classes", (None, 3))
def test_self_modulated_batchnorm_matches_reference(hidden, classes):
    g = _gen(4)
    sm = SelfModulatedBatchNorm2d(4, z_dim=6, hidden=hidden, num_classes=classes)
    _randomise(sm, g)
    x = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    z = torch.randn(5, 6, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 1]) if classes else None
    out = sm(x, z, y)

    zz = z.double()
    if classes:
        zz = zz + sm.embed.weight[y].double() + sm.embed_scale.weight[y].double() * zz

    def mlp(head, v):
        layers = [m for m in head if isinstance(m, torch.nn.Linear)]
        for i, lin in enumerate(layers):
            v = v @ lin.weight.double().T + lin.bias.double()
            if i + 1 < len(layers):
                v = v.clamp_min(0)
        return v

    gamma = 1 + mlp(sm.gamma, zz)
    beta = mlp(sm.beta, zz)
    ref = _bn_ref(x) * gamma[:, :, None, None] + beta[:, :, None, None]
    _check_against(out, ref, (x, z, sm.gamma[-1].weight, sm.beta[0].weight))


def test_adain_matches_reference():
    g = _gen(5)
    ada = AdaIN2d(3, style_dim=4)
    _randomise(ada, g)
    x = torch.randn(4, 3, 5, 5, generator=g, requires_grad=True)
    s = torch.randn(4, 4, generator=g, requires_grad=True)
    out = ada(x, s)
    gamma = 1 + s.double() @ ada.gamma.weight.double().T + ada.gamma.bias.double()
    beta = s.double() @ ada.beta.weight.double().T + ada.beta.bias.double()
    ref = _in_ref(x) * gamma[:, :, None, None] + beta[:, :, None, None]
    _check_against(out, ref, (x, s, ada.gamma.weight))
    assert not any(b.numel() for b in ada.buffers())  # no running statistics


# ------------------------------------------------------------------------------- the article's checks

def test_selfmod_equals_batchnorm_at_initialisation():
    g = _gen(6)
    x = torch.randn(8, 5, 4, 4, generator=g) * 3 + 1
    z = torch.randn(8, 7, generator=g)
    for hidden in (0, 32):
        sm = SelfModulatedBatchNorm2d(5, z_dim=7, hidden=hidden)
        bn = torch.nn.BatchNorm2d(5)
        assert torch.equal(sm(x, z), bn(x))  # train mode: batch statistics
        assert torch.equal(sm.bn.running_mean, bn.running_mean)
        sm.eval()
        bn.eval()
        assert torch.equal(sm(x, z), bn(x))  # eval mode: running statistics
    # and a whole generator: SELF-MOD and BN versions with the same weights give the same images
    a = DCGANGenerator(7, 16, 3, width=4, norm="bn", generator=_gen(0))
    b = DCGANGenerator(7, 16, 3, width=4, norm="selfmod", generator=_gen(0))
    shared = {k: v for k, v in a.state_dict().items() if k in b.state_dict()}
    b.load_state_dict(shared, strict=False)
    assert torch.equal(a(z), b(z))


def test_adain_is_per_sample_but_batchnorm_is_not():
    g = _gen(7)
    x = torch.randn(6, 4, 5, 5, generator=g)
    s = torch.randn(6, 3, generator=g)
    ada = AdaIN2d(4, 3)
    other = torch.cat([x[:1], torch.randn(5, 4, 5, 5, generator=g) * 4])
    assert torch.allclose(ada(x, s)[:1], ada(other, torch.cat([s[:1], s[1:] * 2]))[:1], atol=1e-6)
    assert torch.allclose(ada(x[:1], s[:1]), ada(x, s)[:1], atol=1e-6)
    cbn = ConditionalBatchNorm2d(4, 2)
    y = torch.zeros(6, dtype=torch.long)
    assert (cbn(x, y)[:1] - cbn(other, y)[:1]).abs().max() > 0.1
    sm = SelfModulatedBatchNorm2d(4, 3)
    assert (sm(x, s)[:1] - sm(other, s)[:1]).abs().max() > 0.1


def test_spectral_norm_keeps_the_top_singular_value_near_one():
    g = _gen(8)
    D = DCGANDiscriminator(32, 3, width=8, spectral_norm=True, generator=g)
    for _ in range(40):  # one power iteration per forward in train mode
        D(torch.randn(4, 3, 32, 32, generator=g))
    D.eval()  # reading the weight in eval mode runs no further iteration
    layers = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 4
    for m in layers:
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        top = float(torch.linalg.matrix_norm(w, ord=2))
        # the power-iteration estimate of sigma is a lower bound, so the normalised weight's norm is >= 1
        assert 1 - 1e-5 < top < 1.01
        raw = m.parametrizations.weight.original.detach().reshape(w.shape[0], -1)
        assert float(torch.linalg.matrix_norm(raw, ord=2)) > 0  # the stored weight is not normalised


# ------------------------------------------------------------------------------------------ initialisation

def test_initialisation_schemes_and_generator_argument():
    a = DCGANGenerator(16, 32, 3, width=16, norm="selfmod", generator=_gen(0))
    b = DCGANGenerator(16, 32, 3, width=16, norm="selfmod", generator=_gen(0))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert abs(float(a.ups[0].weight.detach().std()) - 0.02) < 0.002
    assert abs(float(a.ups[0].weight.detach().mean())) < 0.002
    for m in a.modules():  # the modulation heads stay at zero: SELF-MOD starts as BN
        if isinstance(m, SelfModulatedBatchNorm2d):
            assert not m.gamma[-1].weight.any() and not m.beta[-1].bias.any()
            assert m.gamma[0].weight.std() > 0.01
    r = ResNetGenerator(16, 16, 3, width=8, init="orthogonal", generator=_gen(1))
    w = r.blocks[0].conv1.weight.detach().reshape(8, -1)
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)
    c = ConditionalBatchNorm2d(3, 4)
    init_gan_weights(torch.nn.Sequential(c), "dcgan", generator=_gen(2))
    assert torch.equal(c.gamma.weight, torch.ones(4, 3)) and not c.beta.weight.any()
    with pytest.raises(ValueError, match="scheme"):
        init_gan_weights(a, "xavier")


def test_build_from_config_round_trip():
    for G in (DCGANGenerator(8, 16, 1, width=4, upsample="nearest", norm="cbn", num_classes=3),
              ResNetGenerator(8, 32, 3, width=4, residual_scale=0.5), StyleGenerator(8, 16, 3, width=4)):
        H = build_generator(G.config)
        assert type(H) is type(G) and H.config == G.config
        assert H.state_dict().keys() == G.state_dict().keys()
        H.load_state_dict(G.state_dict())
    D = ResNetDiscriminator(16, 3, width=4, spectral_norm=True, num_classes=2)
    E = build_discriminator(D.config)
    E.load_state_dict(D.state_dict())
    with pytest.raises(ValueError, match="generator name"):
        build_generator({"name": "biggan"})
    with pytest.raises(TypeError, match="name"):
        build_generator({"z_dim": 3})


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("size", (8, 24, 28, 256, 0))
def test_image_size_must_be_a_power_of_two_from_16_to_128(size):
    for make in (lambda: DCGANGenerator(8, size, 1, width=4), lambda: ResNetGenerator(8, size, 1, width=4),
                 lambda: StyleGenerator(8, size, 1, width=4), lambda: DCGANDiscriminator(size, 1, width=4),
                 lambda: ResNetDiscriminator(size, 1, width=4)):
        with pytest.raises(ValueError, match="power of two"):
            make()
    with pytest.raises(TypeError, match="image_size"):
        DCGANGenerator(8, 32.0, 1, width=4)


def test_bad_inputs_raise_clear_errors():
    G = DCGANGenerator(8, 16, 1, width=4)
    with pytest.raises(ValueError, match=r"z must have shape \[N, z_dim=8\]"):
        G(torch.randn(2, 7))
    with pytest.raises(ValueError, match="z must have 2 dimensions"):
        G(torch.randn(2, 8, 1))
    with pytest.raises(TypeError, match="z must be a floating-point"):
        G(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        G(torch.randn(2, 8), torch.tensor([0, 1]))
    C = DCGANGenerator(8, 16, 1, width=4, norm="cbn", num_classes=4)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\)"):
        C(torch.randn(2, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\)"):
        C(torch.randn(2, 8), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="is required"):
        C(torch.randn(2, 8))
    with pytest.raises(ValueError, match="one label per sample"):
        C(torch.randn(2, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        C(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="norm='cbn' needs num_classes"):
        DCGANGenerator(8, 16, 1, norm="cbn")
    with pytest.raises(ValueError, match="needs norm='cbn' or 'selfmod'"):
        DCGANGenerator(8, 16, 1, norm="bn", num_classes=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        DCGANGenerator(8, 16, 1, norm="layer")
    with pytest.raises(ValueError, match="upsample must be one of"):
        DCGANGenerator(8, 16, 1, upsample="bilinear")
    with pytest.raises(ValueError, match="residual_scale"):
        ResNetGenerator(8, 16, 1, residual_scale=0.0)
    with pytest.raises(ValueError, match="width must be >= 1"):
        DCGANGenerator(8, 16, 1, width=0)
    D = DCGANDiscriminator(16, 3, width=4, num_classes=2)
    with pytest.raises(ValueError, match="3 channels"):
        D(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="16 x 16"):
        D(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 2\)"):
        D(torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))
    sm = SelfModulatedBatchNorm2d(3, 4)
    with pytest.raises(ValueError, match="one row per sample"):
        sm(torch.randn(2, 3, 4, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"style must have shape"):
        AdaIN2d(3, 4)(torch.randn(2, 3, 4, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="x must have 3 channels"):
        ConditionalBatchNorm2d(3, 2)(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))


def test_generator_outputs_do_not_depend_on_global_rng_with_generator_argument():
    torch.manual_seed(1)
    a = StyleGenerator(8, 16, 3, width=4, generator=_gen(3))
    torch.manual_seed(2)
    b = StyleGenerator(8, 16, 3, width=4, generator=_gen(3))
    z = torch.randn(2, 8)
    assert torch.equal(a(z), b(z))
    assert F.mse_loss(a(z), a(z)) == 0  # AdaIN: no batch statistics, eval = train
