"""kexue.train.gan: the GAN loop (losses, EMA, determinism, bit-exact resume, sample grids), its helpers, the
`kexue train --task gan` / `kexue sample` commands, and DDP with two gloo processes under torchrun."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kexue.nn.gan import DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator, ResNetGenerator
from kexue.train import load_checkpoint
from kexue.train.gan import (
    GANConfig,
    GANTrainer,
    d_loss,
    g_loss,
    gan_images,
    generate,
    refresh_batchnorm_stats,
    save_image_grid,
    train_gan,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=96, size=16, channels=1, seed=0, classes=None):
    """Images with a bright square whose corner depends on the class: something a tiny GAN can start to learn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes or 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, channels, size, size), generator=g, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(int(y[i]) % 4, 2)
        x[i, :, r * size // 2:r * size // 2 + size // 4, c * size // 2:c * size // 2 + size // 4] = 230
    return (x, y) if classes else x


def nets(kind="dcgan", seed=0, classes=None):
    g = torch.Generator().manual_seed(seed)
    if kind == "dcgan":
        G = DCGANGenerator(8, 16, 1, width=4, norm="selfmod", hidden=4, generator=g)
        D = DCGANDiscriminator(16, 1, width=4, spectral_norm=True, generator=g)
    else:  # conditional ResNet pair
        G = ResNetGenerator(8, 16, 1, width=4, norm="cbn", num_classes=classes, generator=g)
        D = ResNetDiscriminator(16, 1, width=4, num_classes=classes, generator=g)
    return G, D


def state(h):
    out = {}
    for name, m in (("G", h.G), ("D", h.D), ("E", h.G_ema)):
        out.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    return out


# ------------------------------------------------------------------------------------------------ losses

def test_losses_match_their_formulas():
    r, f = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.5])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ns = bce(r, torch.ones(3)) + bce(f, torch.zeros(3))
    torch.testing.assert_close(d_loss(r, f, "ns"), ns)
    torch.testing.assert_close(g_loss(f, "ns"), bce(f, torch.ones(3)))
    torch.testing.assert_close(d_loss(r, f, "hinge"), torch.tensor((0 + 2 + 0.5) / 3 + (0 + 1.2 + 2.5) / 3))
    torch.testing.assert_close(g_loss(f, "hinge"), -f.mean())
    with pytest.raises(ValueError, match="loss"):
        d_loss(r, f, "wasserstein")


# --------------------------------------------------------------------------------------------- training

def test_train_gan_records_losses_metrics_and_is_reproducible():
    x = data()
    cfg = GANConfig(steps=6, batch_size=32, progress=False, log_every=2, eval_every=3, seed=3)
    seen = []

    def metrics(G, step):
        seen.append((step, G.training))
        return {"mean": generate(G, 4, generator=torch.Generator().manual_seed(0)).mean()}

    G, D = nets()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    h = train_gan(G, D, x, cfg, metrics_fn=metrics)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    assert h.column("step") == [2, 3, 4, 6]
    assert seen == [(3, False), (6, False)]
    assert all(math.isfinite(v) for r in h for k, v in r.items() if k != "step")
    assert "mean" in h[1] and "mean" not in h[0] and isinstance(h.last["mean"], float)
    assert h.G_ema is not None and not h.G_ema.training and not h.G.training
    h2 = train_gan(*nets(), x, cfg, metrics_fn=metrics)
    for k, v in state(h).items():
        assert torch.equal(v, state(h2)[k]), k
    h3 = train_gan(*nets(), x, GANConfig(steps=6, batch_size=32, progress=False, seed=4))
    assert not torch.equal(h3.G.fc.weight, h.G.fc.weight)
    # the generator moved, and the EMA trails it
    g0 = nets()[0]
    assert not torch.equal(h.G.fc.weight, g0.fc.weight)
    assert not torch.equal(h.G_ema.fc.weight, h.G.fc.weight)


def test_ema_is_the_warmed_up_average_of_the_generator_weights():
    x = data()
    G, D = nets()
    tr = GANTrainer(G, D, x, GANConfig(batch_size=32, progress=False, ema_decay=0.9))
    ema = tr.G_ema.fc.weight.detach().clone()
    for s in range(3):
        tr.step()
        d = min(0.9, (1 + s) / (10 + s))
        ema = d * ema + (1 - d) * G.fc.weight.detach()
        torch.testing.assert_close(tr.G_ema.fc.weight, ema, rtol=1e-6, atol=1e-7)
    assert tr.done == 3


def test_n_dis_and_reuse_fake_paths_train():
    x = data()
    for n_dis, reuse, loss in ((2, True, "hinge"), (1, False, "ns"), (1, True, "hinge")):
        G, D = nets()
        d0 = {k: v.clone() for k, v in D.state_dict().items()}
        tr = GANTrainer(G, D, x, GANConfig(batch_size=32, progress=False, n_dis=n_dis, reuse_fake=reuse, loss=loss))
        dl, gl = tr.step()
        assert math.isfinite(dl) and math.isfinite(gl)
        assert any(not torch.equal(v, D.state_dict()[k]) for k, v in d0.items())
        assert all(p.requires_grad for p in D.parameters())  # D unfrozen after the G update


def test_conditional_training_with_labels_and_projection():
    x, y = data(classes=3)
    G, D = nets("resnet", classes=3)
    h = train_gan(G, D, (x, y), GANConfig(steps=2, batch_size=32, progress=False, n_dis=2, loss="hinge"))
    assert h.last["step"] == 2
    imgs = generate(h.G_ema, 6, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert imgs.shape == (6, 1, 16, 16)
    with pytest.raises(ValueError, match="needs data=\\(images, labels\\)"):
        train_gan(*nets("resnet", classes=3), x, GANConfig(steps=1, batch_size=32, progress=False))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        train_gan(*nets("resnet", classes=3), (x, y + 1), GANConfig(steps=1, batch_size=32, progress=False))


# ----------------------------------------------------------------------------------------- resume

class _Kill(Exception):
    pass


@pytest.mark.parametrize("kind", ("dcgan", "resnet"))
def test_interrupted_run_resumes_to_bitwise_identical_weights(tmp_path, kind):
    classes = 3 if kind == "resnet" else None
    d = data(classes=classes)
    n_dis = 1 if kind == "dcgan" else 2

    def cfg(name, **kw):
        return GANConfig(steps=7, batch_size=32, n_dis=n_dis, progress=False, checkpoint_dir=str(tmp_path / name),
                         checkpoint_every=3, log_every=2, eval_every=2, seed=11, ema_decay=0.99, **kw)

    def probe(G, step):  # evaluation samples from G_ema: it must not disturb the trajectory
        return {"m": generate(G, 8, generator=torch.Generator().manual_seed(step)).mean()}

    full = train_gan(*nets(kind, classes=classes), d, cfg("full"), metrics_fn=probe)
    ref = state(full)

    def die_at_4(G, step):
        if step == 4:
            raise _Kill
        return probe(G, step)

    with pytest.raises(_Kill):
        train_gan(*nets(kind, classes=classes), d, cfg("cut"), metrics_fn=die_at_4)
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ck["trainer"]["step"] == 3 and ck["kind"] == "gan"
    assert ck["generator_config"]["name"] == kind
    assert not list((tmp_path / "cut").glob("*.tmp"))
    resumed = train_gan(*nets(kind, seed=99, classes=classes), d, cfg("cut", resume=True), metrics_fn=probe)
    assert resumed.resumed_from == 3
    got = state(resumed)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [2, 4, 6, 7]
    for key in ("d_loss", "g_loss", "m"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in full], key
    a, b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt"), load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    for k in ("opt_g", "opt_d"):
        sa, sb = a["trainer"][k]["state"], b["trainer"][k]["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sb)


def test_resume_checks_the_run_and_can_extend_it(tmp_path):
    x = data()
    base = dict(batch_size=32, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    train_gan(*nets(), x, GANConfig(steps=2, **base))
    with pytest.raises(ValueError, match="lr_d"):
        train_gan(*nets(), x, GANConfig(steps=2, lr_d=1e-3, resume=True, **base))
    with pytest.raises(ValueError, match="training-set size"):
        train_gan(*nets(), x[:64], GANConfig(steps=2, resume=True, **base))
    with pytest.raises(ValueError, match="do not match"):
        G = DCGANGenerator(8, 16, 1, width=8)
        train_gan(G, nets()[1], x, GANConfig(steps=3, resume=True, **base))
    longer = train_gan(*nets(), x, GANConfig(steps=4, resume=True, **base))  # no schedule: a run can be extended
    assert longer.resumed_from == 2 and longer.last["step"] == 4
    straight = train_gan(*nets(), x, GANConfig(steps=4, **{**base, "checkpoint_dir": str(tmp_path / "s")}))
    for k, v in state(straight).items():
        assert torch.equal(v, state(longer)[k]), k


def test_sample_grids_are_written_every_n_steps(tmp_path):
    x = data()
    train_gan(*nets(), x, GANConfig(steps=4, batch_size=32, progress=False, sample_every=2, sample_count=10,
                                    sample_dir=str(tmp_path / "grids")))
    from PIL import Image

    files = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert files == ["samples_000002.png", "samples_000004.png"]
    im = Image.open(tmp_path / "grids" / "samples_000004.png")
    assert im.size == (4 * 18 + 2, 3 * 18 + 2) and im.mode == "L"


# --------------------------------------------------------------------------------------------- helpers

def test_gan_images_pads_and_adds_channels():
    x = torch.full((3, 28, 28), 200, dtype=torch.uint8)
    p = gan_images(x, 32)
    assert p.shape == (3, 1, 32, 32) and p.dtype == torch.uint8
    assert int(p[:, :, 2:30, 2:30].min()) == 200 and int(p.sum()) == 200 * 3 * 28 * 28
    c = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert gan_images(c, 32) is c
    with pytest.raises(ValueError, match="do not fit"):
        gan_images(c, 16)
    with pytest.raises(TypeError, match="uint8"):
        gan_images(c.float(), 32)


def test_generate_and_standing_statistics():
    G = DCGANGenerator(8, 16, 3, width=4, generator=torch.Generator().manual_seed(0))
    a = generate(G, 7, batch_size=3, generator=torch.Generator().manual_seed(1))
    b = generate(G, 7, batch_size=7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (7, 3, 16, 16) and G.training  # mode restored
    torch.testing.assert_close(a, b)  # eval mode: no batch dependence
    refresh_batchnorm_stats(G, batches=4, batch_size=16, generator=torch.Generator().manual_seed(2))
    bn = G.norms[0]
    # the running mean is the average of the batch means of the 4 batches, drawn from the same generator
    gen = torch.Generator().manual_seed(2)
    means = [G.fc(torch.randn(16, 8, generator=gen)).view(16, -1, 4, 4).mean(dim=(0, 2, 3)) for _ in range(4)]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    assert not G.training and bn.momentum == 0.1
    with pytest.raises(ValueError, match="labels"):
        generate(DCGANGenerator(8, 16, 1, width=4, norm="cbn", num_classes=3), 4, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n must be"):
        generate(G, 0)


def test_save_image_grid_layout(tmp_path):
    from PIL import Image

    imgs = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 1.0, 0.0)])
    p = save_image_grid(imgs, tmp_path / "g.png", nrow=2, padding=1)
    arr = torch.from_numpy(__import__("numpy").array(Image.open(p)))
    assert arr.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert int(arr[1, 1, 0]) == 0 and int(arr[1, 7, 0]) == 255 and int(arr[6, 1, 0]) == 128
    with pytest.raises(ValueError, match="1 or 3"):
        save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png")


def test_bad_configs_and_data():
    x = data()
    for kw, err, msg in ((dict(steps=0), ValueError, "steps"), (dict(loss="wgan"), ValueError, "loss"),
                         (dict(betas=(0.5, 1.0)), ValueError, "betas"), (dict(ema_decay=1.0), ValueError, "ema"),
                         (dict(n_dis=1.5), TypeError, "n_dis"), (dict(resume=True), ValueError, "checkpoint_dir"),
                         (dict(sample_every=5), ValueError, "sample_dir"), (dict(lr_g=0.0), ValueError, "lr_g")):
        with pytest.raises(err, match=msg):
            GANConfig(**kw)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_gan(*nets(), x[:20], GANConfig(steps=1, batch_size=32, progress=False))
    with pytest.raises(TypeError, match="uint8 images or float"):
        train_gan(*nets(), x.long(), GANConfig(steps=1, batch_size=32, progress=False))
    with pytest.raises(TypeError, match="z_dim"):
        train_gan(torch.nn.Linear(2, 2), nets()[1], x, GANConfig(steps=1, batch_size=32, progress=False))


def test_batch_must_divide_world(monkeypatch):
    from kexue.train import distributed

    monkeypatch.setattr(distributed, "init_from_env", lambda *a, **k: distributed.DistInfo(0, 3, 0, "gloo"))
    with pytest.raises(ValueError, match="divisible"):
        train_gan(*nets(), data(), GANConfig(steps=1, batch_size=32, progress=False))


# --------------------------------------------------------------------------------------------------- CLI

def _cli(ckdir, steps=12, extra=()):
    return ["--task", "gan", "--dataset", "synthetic", "--image-size", "16", "--width", "4", "--z-dim", "8",
            "--steps", str(steps), "--batch-size", "32", "--norm", "selfmod", "--seed", "2", "--log-every", "3",
            "--checkpoint-dir", str(ckdir), "--checkpoint-every", "3", "--no-progress", "--threads", "1", *extra]


@pytest.mark.slow
def test_cli_kill_and_resume_then_sample(tmp_path, capsys):
    """SIGKILL `kexue train --task gan` after its first checkpoint, resume, compare with a clean run, sample."""
    import signal
    import time

    from kexue.cli import main

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kexue.cli", "train", *_cli(killed, steps=4000)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = killed / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while not ck.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(ck)["trainer"]["step"]
    assert at_kill >= 3 and at_kill % 3 == 0
    steps = at_kill + 6
    assert main(["train", *_cli(killed, steps)] + ["--resume"]) == 0
    assert f"resumed from {ck} after step {at_kill}/{steps}" in capsys.readouterr().out
    assert main(["train", *_cli(tmp_path / "clean", steps)]) == 0
    a, b = load_checkpoint(ck), load_checkpoint(tmp_path / "clean" / "checkpoint.pt")
    for part in ("G", "D", "G_ema"):
        for k in b["trainer"][part]:
            assert torch.equal(a["trainer"][part][k], b["trainer"][part][k]), (part, k)
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(killed), "--out", str(out), "--n", "9"]) == 0
    from PIL import Image

    assert Image.open(out).size == (3 * 18 + 2, 3 * 18 + 2)


def test_cli_options_errors_and_sample(tmp_path, capsys):
    from kexue.cli import main

    assert main(["train", *_cli(tmp_path / "c", steps=2, extra=("--norm", "cbn", "--spectral-norm"))]) == 0
    out = capsys.readouterr().out
    assert "G dcgan" in out and "final: step=2" in out
    ck = load_checkpoint(tmp_path / "c" / "checkpoint.pt")
    assert ck["generator_config"]["num_classes"] == 4 and ck["discriminator_config"]["spectral_norm"]
    grid = tmp_path / "l.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "c" / "checkpoint.pt"), "--out", str(grid), "--n", "4",
                 "--labels", "1,3", "--no-ema"]) == 0
    assert grid.exists()
    assert main(["sample", "--checkpoint", str(tmp_path / "c"), "--out", str(grid), "--labels", "4"]) == 2
    assert "--labels must lie in [0, 4)" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(grid)]) == 2
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["train", *_cli(tmp_path / "d", steps=0)])
    with pytest.raises(SystemExit, match="--task must be classify or gan"):
        main(["train", "--task", "vae"])
    with pytest.raises(SystemExit, match="unconditional"):
        main(["train", *_cli(tmp_path / "e", steps=1, extra=("--generator", "style", "--conditional"))])


# ------------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_gan import ddp_problem
    from kexue.train import distributed as D
    from kexue.train.gan import train_gan

    G, Dn, x, cfg = ddp_problem(sys.argv[2])
    info = D.init_from_env()
    assert info.world_size == 2
    h = train_gan(G, Dn, x, cfg)
    if D.is_main():
        torch.save({"G": G.state_dict(), "D": Dn.state_dict(), "E": h.G_ema.state_dict(), "history": h.records},
                   sys.argv[3])
    D.cleanup()
''')


def ddp_problem(ckdir):
    """BatchNorm-free nets (per-rank BN statistics are the one expected DDP difference)."""
    g = torch.Generator().manual_seed(0)
    G = DCGANGenerator(8, 16, 1, width=4, norm="none", generator=g)
    D = DCGANDiscriminator(16, 1, width=4, norm="none", generator=g)
    cfg = GANConfig(steps=4, batch_size=16, progress=False, n_dis=2, loss="hinge", checkpoint_dir=ckdir,
                    checkpoint_every=2, log_every=2, seed=5)
    return G, D, data(n=64), cfg


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_gan.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           os.path.dirname(__file__), str(tmp_path / "ck_ddp"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    G, D, x, cfg = ddp_problem(str(tmp_path / "ck_single"))
    g0 = {k: v.clone() for k, v in G.state_dict().items()}
    single = train_gan(G, D, x, cfg)
    moved = 0.0
    for name, m in (("G", G), ("D", D), ("E", single.G_ema)):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(ddp[name][k], v, rtol=1e-4, atol=1e-5)
    moved = sum(float((G.state_dict()[k] - g0[k]).abs().max()) for k in g0)
    assert moved > 1e-3
    for a, b in zip(ddp["history"], single.records):
        assert a["step"] == b["step"] and a["d_loss"] == pytest.approx(b["d_loss"], rel=1e-4, abs=1e-6)
    ck = load_checkpoint(tmp_path / "ck_ddp" / "checkpoint.pt")
    assert ck["world_size"] == 2 and ck["trainer"]["step"] == 4
    assert sorted(p.name for p in (tmp_path / "ck_ddp").iterdir()) == ["checkpoint.pt"]


def test_bench_rows_compare_the_same_architecture():
    """`kexue bench gan` times our step against a plain PyTorch-examples loop: same nets, same parameter count."""
    from kexue.bench.gan import _plain_dcgan, _trainer
    from kexue.nn.gan import count_parameters

    x = torch.randint(0, 256, (128, 1, 32, 32), dtype=torch.uint8)
    ours = _trainer("bn", 1, 8, "cpu", x)
    step, gp, dp = _plain_dcgan(1, 8, "cpu", x)
    assert (count_parameters(ours.G), count_parameters(ours.D)) == (gp, dp)
    step()
    d, g = ours.step()
    assert math.isfinite(d) and math.isfinite(g)
