"""The training loop: fit on tiny problems, config validation, transforms, checkpoints and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kexue.train import FlipCrop, TrainConfig, TrainHistory, fit, lr_factor, random_crop, random_horizontal_flip

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n=128, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


def mlp(d=6, classes=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))


# ------------------------------------------------------------------------------------------------ fit

def test_fit_reduces_loss_and_reports_metrics():
    x, y = blobs()
    h = fit(mlp(), (x, y), TrainConfig(epochs=4, batch_size=16, lr=0.1, progress=False), eval_data=(x, y))
    assert isinstance(h, TrainHistory) and len(h) == 4
    losses = h.column("train_loss")
    assert losses[-1] < 0.5 * losses[0]
    assert h.last["test_acc"] > 0.9
    assert math.isclose(h.last["test_error"], 1 - h.last["test_acc"])
    assert set(h.last) >= {"epoch", "train_loss", "lr", "test_loss", "test_acc", "test_error", "time"}
    assert h.column("epoch") == [0, 1, 2, 3]


def test_fit_is_reproducible_from_seed_and_leaves_global_rng_alone():
    x, y = blobs()
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, seed=3)
    net = mlp(seed=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = fit(net, (x, y), cfg).model
    assert torch.equal(torch.get_rng_state(), before)
    b = fit(mlp(seed=1), (x, y), cfg).model
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = fit(mlp(seed=1), (x, y), TrainConfig(epochs=2, batch_size=16, progress=False, seed=4)).model
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_dropout_inside_fit_is_seeded():
    x, y = blobs()

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3))

    cfg = TrainConfig(epochs=1, batch_size=16, progress=False)
    torch.manual_seed(1)
    a = fit(net(), (x, y), cfg).model
    torch.manual_seed(2)  # a different global state must not matter
    b = fit(net(), (x, y), cfg).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_uint8_images_small_cnn_with_augment_and_dataset_input():
    from kexue.nn.vision import SmallCNN

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (48,), generator=g)
    x = torch.randint(0, 100, (48, 1, 12, 12), generator=g, dtype=torch.uint8)
    x[y == 1, :, 3:9, 3:9] = 255  # a bright square means class 1
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)
    torch.manual_seed(0)
    h = fit(SmallCNN(1, 2, width=4), (x, y), cfg, augment=FlipCrop(padding=1), eval_data=(x, y))
    assert h.column("train_loss")[-1] < h.column("train_loss")[0]
    ds = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    h2 = fit(SmallCNN(1, 2, width=4), ds, cfg, augment=FlipCrop(padding=1), eval_data=(x, y))
    # a Dataset and the equivalent tensors give the same run
    assert h2.column("train_loss") == pytest.approx(h.column("train_loss"), rel=1e-6)


def test_batch_transform_and_custom_loss_receive_what_they_should():
    x, y = blobs(n=40)
    seen = []

    def bt(xb, yb, *, generator, epoch):  # fit passes both by keyword
        gen = generator
        assert isinstance(gen, torch.Generator)
        seen.append((epoch, xb.shape[0]))
        lam = 0.7
        perm = torch.randperm(xb.shape[0], generator=gen)
        return lam * xb + (1 - lam) * xb[perm], (yb, yb[perm], lam)

    def mixed_ce(logits, t):
        ya, yb, lam = t
        return lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)

    h = fit(mlp(), (x, y), TrainConfig(epochs=2, batch_size=16, progress=False), loss_fn=mixed_ce,
            batch_transform=bt)
    assert seen == [(0, 16), (0, 16), (0, 8), (1, 16), (1, 16), (1, 8)]
    assert all(math.isfinite(v) for v in h.column("train_loss"))


def test_loss_module_parameters_are_trained():
    x, y = blobs()

    class Centres(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 4))

        def forward(self, emb, t):
            return F.cross_entropy(F.normalize(emb, dim=1) @ F.normalize(self.w, dim=1).T * 10, t)

    loss = Centres()
    w0 = loss.w.detach().clone()
    h = fit(mlp(classes=4), (x, y), TrainConfig(epochs=2, batch_size=32, progress=False), loss_fn=loss)
    assert not torch.equal(loss.w.detach(), w0)
    assert h.loss_fn is loss


def test_metrics_fn_values_are_recorded():
    x, y = blobs(n=32)
    calls = []

    def metrics(model, epoch):
        calls.append(epoch)
        assert not model.training
        return {"wnorm": torch.linalg.vector_norm(model[0].weight), "tag": "ok"}

    h = fit(mlp(), (x, y), TrainConfig(epochs=2, batch_size=16, progress=False), metrics_fn=metrics)
    assert calls == [0, 1]
    assert isinstance(h.last["wnorm"], float) and h.last["tag"] == "ok"


def test_schedule_warmup_and_cosine():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(9, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(7, 10, 2, "constant") == 1.0
    x, y = blobs(n=64)
    h = fit(mlp(), (x, y), TrainConfig(epochs=4, batch_size=16, lr=0.2, warmup_epochs=1, progress=False))
    lrs = h.column("lr")  # lr at each epoch's first step
    assert lrs[0] == pytest.approx(0.2 / 4)
    assert lrs[1] == pytest.approx(0.2)
    assert lrs[1] > lrs[2] > lrs[3] > 0
    hc = fit(mlp(), (x, y), TrainConfig(epochs=2, batch_size=16, lr=0.2, schedule="constant", progress=False))
    assert hc.column("lr") == [0.2, 0.2]


def test_adamw_and_drop_last():
    x, y = blobs(n=40)
    steps = []
    h = fit(mlp(), (x, y), TrainConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-2, drop_last=True,
                                       progress=False),
            batch_transform=lambda a, b, **_: (steps.append(a.shape[0]) or a, b))
    assert steps == [16, 16] and len(h) == 1


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=2.0), TypeError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(lr=0), ValueError, "lr"),
    (dict(lr=float("nan")), TypeError, "lr"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(optimizer="adam"), ValueError, "optimizer"),
    (dict(schedule="step"), ValueError, "schedule"),
    (dict(warmup_epochs=11), ValueError, "warmup_epochs"),
    (dict(resume=True), ValueError, "checkpoint_dir"),
    (dict(amp="fp16"), ValueError, "amp"),
    (dict(device="gpu0"), ValueError, "device"),
    (dict(grad_clip=0), ValueError, "grad_clip"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_config_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        TrainConfig(**kwargs)


def test_fit_input_validation():
    x, y = blobs(n=16)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False)
    with pytest.raises(TypeError, match="config"):
        fit(mlp(), (x, y), {"epochs": 1})
    with pytest.raises(TypeError, match="model"):
        fit(lambda t: t, (x, y), cfg)
    with pytest.raises(ValueError, match="first dimension"):
        fit(mlp(), (x, y[:-1]), cfg)
    with pytest.raises(TypeError, match="train"):
        fit(mlp(), 3, cfg)
    with pytest.raises(TypeError, match="loss_fn"):
        fit(mlp(), (x, y), cfg, loss_fn=3)
    with pytest.raises(ValueError, match="scalar"):
        fit(mlp(), (x, y), cfg, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    with pytest.raises(FloatingPointError, match="loss"):
        fit(mlp(), (x, y), cfg, loss_fn=lambda o, t: o.sum() * float("nan"))
    with pytest.raises(ValueError, match="drop_last"):
        fit(mlp(), (x, y), TrainConfig(epochs=1, batch_size=32, drop_last=True, progress=False))
    cfg.lr = -1.0  # mutated after creation: fit validates again
    with pytest.raises(ValueError, match="lr"):
        fit(mlp(), (x, y), cfg)


# ------------------------------------------------------------------------------------------ transforms

def reference_crop(x, padding, mode, oy, ox):
    """Per-sample loop with F.pad: the plain reference for random_crop."""
    pad_mode = {"zero": "constant", "reflect": "reflect", "replicate": "replicate"}[mode]
    out = []
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        p = F.pad(x[i:i + 1].double(), (padding,) * 4, mode=pad_mode)
        out.append(p[:, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w])
    return torch.cat(out).to(x.dtype)


@pytest.mark.parametrize("mode", ["reflect", "zero", "replicate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_random_crop_matches_padded_reference(mode, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 2, 7, 9, generator=g) * 255).to(dtype)
    pad = 3
    out = random_crop(x, padding=pad, mode=mode, generator=torch.Generator().manual_seed(11))
    g2 = torch.Generator().manual_seed(11)  # the same draws the function makes
    oy = torch.randint(0, 2 * pad + 1, (5,), generator=g2)
    ox = torch.randint(0, 2 * pad + 1, (5,), generator=g2)
    ref = reference_crop(x, pad, mode, oy.tolist(), ox.tolist())
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)


def test_random_crop_size_and_zero_padding_is_identity():
    x = torch.rand(4, 3, 10, 10)
    assert torch.equal(random_crop(x, padding=0, generator=torch.Generator().manual_seed(0)), x)
    out = random_crop(x, size=6, padding=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 6, 6)
    # every crop is a window of its own image
    for i in range(4):
        windows = x[i].unfold(1, 6, 1).unfold(2, 6, 1)  # [C, 5, 5, 6, 6]
        assert any(torch.equal(windows[:, a, b], out[i]) for a in range(5) for b in range(5))


def test_flip_per_sample_and_generator_reproducible():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4).repeat(50, 1, 1, 1)
    out = random_horizontal_flip(x, generator=torch.Generator().manual_seed(5))
    flipped = (out != x).flatten(1).any(1)
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert 20 < flipped.sum() < 80  # about half, per sample
    again = random_horizontal_flip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    assert torch.equal(random_horizontal_flip(x, p=0.0), x)
    assert torch.equal(random_horizontal_flip(x, p=1.0), x.flip(-1))
    u = x.to(torch.uint8)
    assert random_horizontal_flip(u, generator=torch.Generator().manual_seed(5)).dtype == torch.uint8


def test_flipcrop_reproducible_and_input_untouched():
    x = torch.rand(16, 3, 8, 8)
    keep = x.clone()
    aug = FlipCrop(padding=2, mode="zero")
    a = aug(x, generator=torch.Generator().manual_seed(1))
    b = aug(x, generator=torch.Generator().manual_seed(1))
    c = aug(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, keep)


def test_transform_bad_input():
    with pytest.raises(ValueError, match="x"):
        random_crop(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        random_crop(torch.rand(1, 1, 8, 8), mode="wrap")
    with pytest.raises(ValueError, match="padding"):
        random_crop(torch.rand(1, 1, 4, 4), padding=4)  # reflect needs padding < side
    with pytest.raises(ValueError, match="padding"):
        random_crop(torch.rand(1, 1, 4, 4), padding=-1)
    with pytest.raises(ValueError, match="p must"):
        random_horizontal_flip(torch.rand(1, 1, 4, 4), p=1.5)
    with pytest.raises(TypeError, match="generator"):
        random_horizontal_flip(torch.rand(1, 1, 4, 4), generator=0)
    x, g = torch.rand(2, 1, 8, 8), torch.Generator().manual_seed(0)
    for call in (lambda: random_crop(x, 6), lambda: random_horizontal_flip(x, 0.5), lambda: FlipCrop(2),
                 lambda: FlipCrop()(x, g)):  # options and the generator are keyword-only
        with pytest.raises(TypeError, match="positional"):
            call()


# ------------------------------------------------------------------------------------ checkpoint / resume

class _Interrupt(Exception):
    pass


def _resume_setup(tmp_path, name):
    from kexue.nn.vision import SmallCNN

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 10, 10), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (40,), generator=g)

    class Centres(torch.nn.Module):  # a loss with parameters, as margin losses have
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))

        def forward(self, emb, t):
            ya, yb, lam = t
            logits = F.normalize(emb, dim=1) @ F.normalize(self.w, dim=1).T * 8
            return lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)

    def mix(xb, yb, *, generator, epoch):
        lam = float(torch.rand((), generator=generator))
        perm = torch.randperm(xb.shape[0], generator=generator)
        return lam * xb + (1 - lam) * xb[perm], (yb, yb[perm], lam)

    torch.manual_seed(0)
    net = torch.nn.Sequential(SmallCNN(1, None, width=4, embedding_dim=8), torch.nn.Dropout(0.2))
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer="adamw", lr=3e-3, warmup_epochs=0.5, progress=False,
                      checkpoint_dir=str(tmp_path / name), seed=5)
    return net, Centres(), (x, y), cfg, mix


def _state(net, loss):
    return {**{f"m.{k}": v for k, v in net.state_dict().items()}, **{f"l.{k}": v for k, v in loss.state_dict().items()}}


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    from kexue.train import load_checkpoint

    net, loss, data, cfg, mix = _resume_setup(tmp_path, "full")
    full = fit(net, data, cfg, loss_fn=loss, batch_transform=mix, augment=FlipCrop(padding=1))
    ref = _state(net, loss)

    net, loss, data, cfg, mix = _resume_setup(tmp_path, "cut")

    def mix_then_die(xb, yb, *, generator, epoch):
        if epoch == 2:
            raise _Interrupt
        return mix(xb, yb, generator=generator, epoch=epoch)

    with pytest.raises(_Interrupt):
        fit(net, data, cfg, loss_fn=loss, batch_transform=mix_then_die, augment=FlipCrop(padding=1))
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ck["epoch"] == 2 and len(ck["history"]) == 2
    assert not list((tmp_path / "cut").glob("*.tmp"))  # atomic writes leave no temp files

    net, loss, data, _, mix = _resume_setup(tmp_path, "cut")  # fresh objects, as after a restart
    cfg.resume = True
    resumed = fit(net, data, cfg, loss_fn=loss, batch_transform=mix, augment=FlipCrop(padding=1))
    assert resumed.resumed_from == 2
    got = _state(net, loss)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]

    # resuming a finished run trains nothing and returns the stored history
    net, loss, data, _, mix = _resume_setup(tmp_path, "cut")
    again = fit(net, data, cfg, loss_fn=loss, batch_transform=mix)
    assert len(again) == 3 and again.resumed_from == 3
    assert all(torch.equal(a, b) for a, b in zip(_state(net, loss).values(), ref.values()))


def test_resume_refuses_a_different_run(tmp_path):
    x, y = blobs(n=32)
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, checkpoint_dir=str(tmp_path))
    fit(mlp(), (x, y), cfg)
    with pytest.raises(ValueError, match="lr"):
        fit(mlp(), (x, y), TrainConfig(epochs=2, batch_size=16, lr=0.01, progress=False,
                                       checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fit(mlp(), (x[:16], y[:16]), TrainConfig(epochs=2, batch_size=16, progress=False,
                                                 checkpoint_dir=str(tmp_path), resume=True))
    # resume=True with no checkpoint yet starts from scratch
    h = fit(mlp(), (x, y), TrainConfig(epochs=1, batch_size=16, progress=False,
                                       checkpoint_dir=str(tmp_path / "new"), resume=True))
    assert h.resumed_from is None and len(h) == 1


def test_atomic_checkpoint_write_keeps_old_file_on_failure(tmp_path):
    from kexue.train import load_checkpoint, save_checkpoint

    p = tmp_path / "c.pt"
    save_checkpoint(p, {"epoch": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint(p, {"epoch": 2, "bad": Boom()})
    assert load_checkpoint(p) == {"epoch": 1}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.pt"]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def _cli_args(ckdir, epochs=4):
    return ["--dataset", "synthetic", "--model", "smallcnn", "--width", "4", "--epochs", str(epochs),
            "--batch-size", "32", "--train-size", "384", "--test-size", "128", "--lr", "0.05", "--seed", "2",
            "--checkpoint-dir", str(ckdir), "--no-progress", "--threads", "1"]


@pytest.mark.slow
def test_cli_kill_and_resume_reaches_the_uninterrupted_weights(tmp_path, capsys):
    """SIGKILL `python -m kexue.train` right after its first checkpoint, resume, compare to a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from kexue.train import load_checkpoint
    from kexue.train.__main__ import main

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kexue.train", *_cli_args(killed)], env=env,
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
    at_kill = load_checkpoint(ck)["epoch"]
    assert 1 <= at_kill < 4, "the run must be cut mid-way"

    assert main(_cli_args(killed) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ck} after epoch {at_kill}/4" in out
    clean = tmp_path / "clean"
    assert main(_cli_args(clean)) == 0
    a, b = load_checkpoint(ck), load_checkpoint(clean / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 4
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert b["history"][-1]["test_acc"] > 0.5  # and it learned something


def test_evaluate_with_embedder_and_logits_fn():
    from kexue.nn.vision import SmallCNN
    from kexue.train import evaluate

    torch.manual_seed(0)
    net = SmallCNN(1, None, width=4, embedding_dim=6)
    centres = F.normalize(torch.randn(3, 6), dim=1)
    x = torch.rand(9, 1, 12, 12)
    y = torch.tensor([0, 1, 2] * 3)
    logits_fn = lambda e: F.normalize(e, dim=1) @ centres.T * 10  # noqa: E731
    got = evaluate(net, (x, y), batch_size=4, logits_fn=logits_fn)
    net.eval()
    with torch.no_grad():
        logits = logits_fn(net(x))
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert got["test_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    with pytest.raises(ValueError, match="eval_logits"):
        evaluate(torch.nn.Conv2d(1, 2, 3), (x, y))
    # fit passes eval_logits through
    h = fit(net, (x, y), TrainConfig(epochs=1, batch_size=9, progress=False), loss_fn=lambda e, t: F.cross_entropy(
        logits_fn(e), t), eval_data=(x, y), eval_logits=logits_fn)
    assert 0 <= h.last["test_acc"] <= 1


def test_cli_on_real_fashion_mnist(data_dir, tmp_path, capsys):
    import json

    from kexue.train.__main__ import main

    out = tmp_path / "h.json"
    rc = main(["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--width", "4", "--epochs", "2",
               "--batch-size", "64", "--train-size", "512", "--test-size", "256", "--lr", "0.05",
               "--no-progress", "--threads", "1", "--history-json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fashion-mnist train (512, 1, 28, 28) test (256, 1, 28, 28)" in text
    assert "epoch 2/2" in text and "final: test_error=" in text
    hist = json.loads(out.read_text())["history"]
    assert len(hist) == 2 and hist[1]["train_loss"] < hist[0]["train_loss"] < math.log(10) + 0.5
    assert 0 <= hist[1]["test_acc"] <= 1 and math.isfinite(hist[1]["test_loss"])


# ----------------------------------------------------------------- resume: the whole run must match (issue 18)

def _ck_config(ck, **kw):
    return TrainConfig(epochs=2, batch_size=16, progress=False, checkpoint_dir=str(ck), **kw)


def test_fit_resume_refuses_other_data_model_or_run_info(tmp_path):
    from kexue.train.checkpoint import CheckpointError

    x, y = blobs(n=32)
    info = {"dataset": "a", "sizes": (32, 32)}
    fit(mlp(), (x, y), _ck_config(tmp_path, run_info=info), eval_data=(x, y))
    refusals = [  # (train, eval, model, run_info) -> what the message names
        ((x + 1, y), (x, y), mlp(), info, "training data: different tensors"),
        ((x, y), (x[:8], y[:8]), mlp(), info, "evaluation data: different tensors"),
        ((x, y), None, mlp(), info, "evaluation data: given then but not now"),
        ((x, y), (x, y), mlp(), {**info, "dataset": "b"}, "dataset: checkpoint 'a', now 'b'"),
        ((x, y), (x, y), mlp(), {"dataset": "a"}, "sizes: checkpoint [32, 32], now (not set)"),
        ((x, y), (x, y), torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), info,
         "model: tensor '0.weight' is torch.float32 [16, 6] in the checkpoint, torch.float32 [8, 6] now"),
    ]
    for train, evald, net, run_info, named in refusals:
        with pytest.raises(CheckpointError) as err:
            fit(net, train, _ck_config(tmp_path, resume=True, run_info=run_info), eval_data=evald)
        assert named in str(err.value) and str(tmp_path / "checkpoint.pt") in str(err.value), named
    h = fit(mlp(), (x, y), _ck_config(tmp_path, resume=True, run_info={"sizes": [32, 32], "dataset": "a"}),
            eval_data=(x, y))
    assert h.resumed_from == 2


def test_fit_resume_refuses_a_checkpoint_that_does_not_record_the_run(tmp_path):
    from kexue.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    x, y = blobs(n=32)
    fit(mlp(), (x, y), _ck_config(tmp_path))
    p = tmp_path / "checkpoint.pt"
    state = load_checkpoint(p)
    for k in ("run_info", "data", "model_signature"):
        del state[k]
    state["format"] = 1  # what kexue wrote before the run's data and settings were recorded
    save_checkpoint(p, state)
    with pytest.raises(CheckpointError, match="format 1"):
        fit(mlp(), (x, y), _ck_config(tmp_path, resume=True))


def test_run_info_must_be_plain_data():
    assert TrainConfig(run_info={"a": (1, 2), "b": {"c": None}}).run_info == {"a": [1, 2], "b": {"c": None}}
    for bad in ({"a": object()}, {"a": float("nan")}, {1: "x"}, ["a"]):
        with pytest.raises(TypeError, match="run_info"):
            TrainConfig(run_info=bad)


def test_fit_checks_the_checkpoint_path_before_training(tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()
    epochs_run = []
    with pytest.raises(ValueError, match="is a folder") as err:
        fit(mlp(), blobs(n=32), _ck_config(tmp_path), metrics_fn=lambda m, e: epochs_run.append(e) or {})
    assert epochs_run == [] and str(tmp_path / "checkpoint.pt") in str(err.value)


# ---------------------------------------------------------------------------- the CLI (issue 18)

def _tiny(*extra):
    return ["--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "64", "--train-size", "128",
            "--test-size", "64", "--lr", "0.05", "--no-progress", *extra]


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flag,value", [("--train-size", "-5"), ("--test-size", "-1"), ("--train-size", "0"),
                                        ("--epochs", "0"), ("--batch-size", "-2"), ("--width", "0"),
                                        ("--threads", "0"), ("--seed", "-1"), ("--data-seed", str(2**64)),
                                        ("--lr", "nan"), ("--momentum", "1"), ("--weight-decay", "-1e-4")])
def test_cli_refuses_bad_numbers_at_parse_time(flag, value, capsys):
    from kexue.train.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(_tiny(f"{flag}={value}"))
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and f"argument {flag}: must be" in _one_line(err) and repr(value) in err


def test_kexue_train_names_itself_and_fails_in_one_line(tmp_path, capsys):
    from kexue.cli import main as kexue

    with pytest.raises(SystemExit) as exit_:
        kexue(["train", *_tiny("--train-size", "-5")])
    assert exit_.value.code == 2
    assert _one_line(capsys.readouterr().err).startswith("kexue train: error: argument --train-size")
    for args, named in ((["--device", "tpu"], "--device"), (["--resume"], "--resume"),
                        (["--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere")], "--data-dir"),
                        (["--warmup-epochs", "3"], "--warmup-epochs")):
        assert kexue(["train", *_tiny(*args)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and _one_line(err).startswith(f"kexue train: error: argument {named}"), args


def test_cli_resume_refuses_a_run_with_other_settings(tmp_path, capsys):
    from kexue.train.__main__ import main

    ck = tmp_path / "ck"
    assert main(_tiny("--checkpoint-dir", str(ck))) == 0
    capsys.readouterr()
    for args, named in ((["--data-seed", "1"], "data_seed: checkpoint 0, now 1"),
                        (["--augment", "crop"], "augment: checkpoint 'none', now 'crop'"),
                        (["--train-size", "192"], "train_size: checkpoint 128, now 192"),
                        (["--test-size", "32"], "test_size: checkpoint 64, now 32"),
                        (["--width", "8"], "width: checkpoint 4, now 8"),
                        (["--lr", "0.1"], "lr: checkpoint 0.05, now 0.1")):
        assert main(_tiny("--checkpoint-dir", str(ck), "--resume", *args)) == 2, args
        out, err = capsys.readouterr()
        line = _one_line(err)
        assert "final:" not in out and named in line and str(ck / "checkpoint.pt") in line, (args, line)
        assert line.startswith("python -m kexue.train: error: argument --resume: cannot resume from")
    assert main(_tiny("--checkpoint-dir", str(ck), "--resume")) == 0  # the same run resumes
    assert "resumed from" in capsys.readouterr().out


def test_cli_resume_refuses_another_dataset(data_dir, tmp_path, capsys):
    """The audit's case: a Fashion-MNIST checkpoint resumed with --dataset mnist (same shapes and classes)."""
    from kexue.train.__main__ import main

    ck = tmp_path / "ck"
    args = ["--data-dir", str(data_dir), "--checkpoint-dir", str(ck)]
    assert main(_tiny("--dataset", "fashion-mnist", *args)) == 0
    capsys.readouterr()
    assert main(_tiny("--dataset", "mnist", "--resume", *args)) == 2
    out, err = capsys.readouterr()
    assert "final:" not in out
    assert "dataset: checkpoint 'fashion-mnist', now 'mnist'" in _one_line(err)


def test_cli_resume_refuses_a_corrupt_checkpoint(tmp_path, capsys):
    from kexue.train.__main__ import main
    from kexue.train.checkpoint import load_checkpoint

    ck = tmp_path / "ck"
    p = ck / "checkpoint.pt"
    assert main(_tiny("--checkpoint-dir", str(ck))) == 0
    w = load_checkpoint(p)["model"]["fc.weight"]
    good = p.read_bytes()
    at = good.find(w.numpy().tobytes())
    assert at > 0
    flipped = bytearray(good)
    flipped[at + 3] ^= 0x01
    for data, why in ((bytes(flipped), "CRC"), (good[:len(good) // 3], "truncated"), (b"", "empty")):
        p.write_bytes(data)
        capsys.readouterr()
        assert main(_tiny("--checkpoint-dir", str(ck), "--resume")) == 2
        out, err = capsys.readouterr()
        line = _one_line(err)
        assert "final:" not in out and why in line and str(p) in line, line


def test_cli_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    from kexue.train.__main__ import main

    typo = tmp_path / "runz"
    assert main(_tiny("--checkpoint-dir", str(typo), "--resume")) == 0
    out, err = capsys.readouterr()
    assert f"no checkpoint at {typo / 'checkpoint.pt'}" in _one_line(err) and "starting from scratch" in err
    assert "final:" in out and (typo / "checkpoint.pt").is_file()


def test_cli_checks_output_paths_before_training(tmp_path, capsys):
    import os

    from kexue.train.__main__ import main

    (tmp_path / "ck" / "checkpoint.pt").mkdir(parents=True)
    (tmp_path / "h.json").mkdir()
    (tmp_path / "afile").write_text("x")
    too_long = "h" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".json"
    for args, named in ((["--checkpoint-dir", str(tmp_path / "ck")], "--checkpoint-dir"),
                        (["--history-json", str(tmp_path / "h.json")], "--history-json"),
                        (["--history-json", str(tmp_path / "afile" / "h.json")], "--history-json"),
                        (["--history-json", str(tmp_path / too_long)], "--history-json")):
        assert main(_tiny(*args)) == 2, args
        out, err = capsys.readouterr()
        assert out == "", args  # refused before the data is loaded or a step is taken
        assert _one_line(err).startswith(f"python -m kexue.train: error: argument {named}: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ck", "h.json"]
    ok = tmp_path / "out" / ("h" * 200 + ".json")
    assert main(_tiny("--history-json", str(ok))) == 0 and ok.is_file()


def test_cli_diverging_loss_is_one_line(capsys):
    from kexue.train.__main__ import main

    assert main(_tiny("--lr", "1e30")) == 1
    assert "training diverged: training loss became nan" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
from _problems import small_problem  # noqa: E402  (tests/train is on sys.path: tests/train/conftest.py)


class _Interrupt(Exception):
    pass


@pytest.mark.cuda
def test_fit_on_cuda_resumes_to_the_uninterrupted_weights(tmp_path):
    from kexue.train import fit, load_checkpoint

    torch.backends.cudnn.deterministic, saved = True, torch.backends.cudnn.deterministic
    try:
        net, data, cfg = small_problem(tmp_path / "full")
        full = fit(net, data, cfg, eval_data=data)
        ref = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        assert next(net.parameters()).device.type == "cuda"
        assert full[-1]["train_loss"] < full[0]["train_loss"]

        net, data, cfg = small_problem(tmp_path / "cut")

        def die(xb, yb, *, generator, epoch):
            if epoch == 2:
                raise _Interrupt
            return xb, yb

        with pytest.raises(_Interrupt):
            fit(net, data, cfg, batch_transform=die, eval_data=data)
        assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 2
        net, data, cfg = small_problem(tmp_path / "cut")
        cfg.resume = True
        resumed = fit(net, data, cfg, eval_data=data)
        assert resumed.resumed_from == 2
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v.cpu(), ref[k], rtol=1e-6, atol=1e-7, msg=k)
        assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in full], rel=1e-6)
    finally:
        torch.backends.cudnn.deterministic = saved


@pytest.mark.cuda
def test_fit_with_bf16_autocast_trains_and_runs_in_bf16(tmp_path):
    from kexue.train import fit

    net, data, cfg = small_problem(tmp_path / "amp", amp="bf16")
    seen = []
    handle = net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    hist = fit(net, data, cfg, eval_data=data)
    handle.remove()
    assert torch.bfloat16 in seen                              # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay fp32
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in hist)
