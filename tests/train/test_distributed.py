"""DDP: two gloo processes under torchrun give the single-process result on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kexue.train import TrainConfig, distributed, fit, load_checkpoint

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_distributed import problem
    from kexue.train import fit, distributed as D
    from kexue.train.__main__ import main

    model, loss, data, evald, cfg = problem(sys.argv[2])
    info = D.init_from_env()
    assert info.world_size == 2 and D.get_world_size() == 2
    sizes = []
    def count(x, y, *, generator, epoch):
        sizes.append(x.shape[0])
        return x, y
    h = fit(model, data, cfg, loss_fn=loss, eval_data=evald, batch_transform=count,
            metrics_fn=lambda m, e: {"rank": D.get_rank()})
    if D.is_main():
        torch.save({"model": model.state_dict(), "loss": loss.state_dict(), "history": h.records,
                    "sizes": sizes}, sys.argv[3])
    # the CLI under the same launcher (it reuses the process group, then destroys it)
    main(["--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32", "--train-size", "128",
          "--test-size", "64", "--no-progress", "--checkpoint-dir", sys.argv[4], "--history-json", sys.argv[5]])
''')


class Centres(torch.nn.Module):
    """A loss with its own parameters (like margin-loss class centres): DDP must average their gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(7)))

    def forward(self, emb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.normalize(emb, dim=1) @ F.normalize(self.w, dim=1).T * 5, t)


def problem(ckdir: str):
    """A BatchNorm-free model (per-rank BN statistics are the one expected DDP difference)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(72, 6, generator=g)  # 72 = 4 batches of 16 + one of 8: the last splits 4 / 4
    y = torch.randint(0, 3, (72,), generator=g)
    xe = torch.randn(51, 6, generator=g)  # odd: eval shards of 26 and 25
    ye = torch.randint(0, 3, (51,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, warmup_epochs=0.5, progress=False, checkpoint_dir=ckdir)
    return model, Centres(), (x, y), (xe, ye), cfg


def test_shard_splits_global_batch_in_order():
    items = list(range(11))
    parts = [distributed.shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert sum(parts, []) == items
    with pytest.raises(ValueError, match="rank"):
        distributed.shard(items, 3, 3)
    assert distributed.all_reduce_metrics({"a": 2.0}, weight=3) == {"a": 2.0}
    assert distributed.init_from_env().world_size == 1 and distributed.is_main()


def test_batch_size_must_divide_world(monkeypatch):
    monkeypatch.setattr(distributed, "init_from_env", lambda *a, **k: distributed.DistInfo(0, 3, 0, "gloo"))
    with pytest.raises(ValueError, match="divisible"):
        fit(torch.nn.Linear(2, 2), (torch.randn(8, 2), torch.zeros(8).long()),
            TrainConfig(epochs=1, batch_size=16, progress=False))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp.pt"
    hist_json = tmp_path / "cli.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           os.path.dirname(__file__), str(tmp_path / "ck_ddp"), str(out), str(tmp_path / "ck_cli"), str(hist_json)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["sizes"] == [8, 8, 8, 8, 4] * 2  # each rank trains on its half of every global batch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss, data, evald, cfg = problem(str(tmp_path / "ck_single"))
        single = fit(model, data, cfg, loss_fn=loss, eval_data=evald)
    finally:
        torch.set_num_threads(n)

    moved = 0.0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-5, atol=1e-6)
        moved += float((v - problem("")[0].state_dict()[k]).abs().max())
    assert moved > 1e-2  # training really changed the weights
    torch.testing.assert_close(ddp["loss"]["w"], loss.w.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ddp["history"], single.records):
        for key in ("train_loss", "lr", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["rank"] == 0  # rank 0's metrics are the ones recorded

    ck = load_checkpoint(tmp_path / "ck_ddp" / "checkpoint.pt")
    assert ck["world_size"] == 2 and ck["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "ck_ddp").iterdir()) == ["checkpoint.pt"]  # rank 0 only, no temps

    # the CLI ran under torchrun: one process printed, with the world size
    assert proc.stdout.count("kexue.train: synthetic") == 1
    assert "2 process(es)" in proc.stdout and "final: test_error=" in proc.stdout
    assert hist_json.exists()


# ------------------------------------------------------------------------------------------------ on a CUDA device
from _problems import small_problem  # noqa: E402  (tests/train is on sys.path: tests/train/conftest.py)

# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
DDP_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from _problems import small_problem
    from kexue.train import fit, distributed as D

    world, device, backend = int(sys.argv[4]), sys.argv[5], sys.argv[6]
    info = D.init_from_env(device, backend=backend)     # fit() then reuses this group
    assert info.world_size == world and torch.distributed.get_backend() == backend
    net, data, cfg = small_problem(sys.argv[2], device=device, plain=True)
    hist = fit(net, data, cfg, eval_data=data)
    if D.is_main():
        torch.save({"model": {k: v.cpu() for k, v in net.state_dict().items()}, "history": hist.records},
                   sys.argv[3])
    D.cleanup()
''')

DDP_CASES = [
    pytest.param("cuda", "nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                          reason="NCCL needs one GPU per process: 2 GPUs")),
    pytest.param("cuda:0", "gloo", id="gloo-two-processes-one-gpu"),
]


@pytest.mark.cuda
@pytest.mark.distributed
@pytest.mark.parametrize("device,backend", DDP_CASES)
def test_torchrun_ddp_on_cuda_matches_single_process(tmp_path, device, backend):
    """The loop under torchrun, 2 processes with DDP over CUDA tensors, against a plain single-process run on
    the same global batch. NCCL takes one GPU per process (2 GPUs); gloo lets both processes share one."""
    from kexue.train import fit

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), os.path.dirname(__file__), str(tmp_path / "ck"), str(out), "2", device, backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    net, data, cfg = small_problem(tmp_path / "single", plain=True)
    single = fit(net, data, cfg, eval_data=data)
    moved = 0.0
    for k, v in net.state_dict().items():
        torch.testing.assert_close(got["model"][k], v.cpu(), rtol=1e-4, atol=1e-5, msg=k)
        start = small_problem(tmp_path / "x", plain=True)[0].state_dict()[k]
        moved += float((v.cpu().float() - start.float()).abs().max())
    assert moved > 1e-2                                      # training really moved the weights
    for a, b in zip(got["history"], single.records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
