"""The same library on a CUDA device: attention through the GPU's SDPA kernels (flash, memory-efficient, math)
against the reference, the model and the other pieces against their CPU results, and the training loop on
the GPU (bf16 autocast, resume, NCCL under torchrun).

Every test here needs a CUDA device and is skipped without one (CI has none); run them on a GPU machine with
``python -m pytest -m cuda``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kexue.attention import unilm_mask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
# The GPU kernels accumulate in fp32 but round the inputs and output; fp16 keeps 3 more mantissa bits than bf16.
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float16: dict(rtol=5e-3, atol=5e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def test_transformer_on_cuda_matches_cpu_at_any_length():
    from kexue.nn import Transformer

    torch.manual_seed(0)
    model = Transformer(50, dim=64, depth=2, heads=4, attention_scale="entropy").eval()
    ids = torch.randint(0, 50, (2, 100), generator=torch.Generator().manual_seed(3))
    seg = (torch.arange(100) >= 40).long()[None].expand(2, -1)
    with torch.no_grad():
        want = model(ids, mask=unilm_mask(seg)).logits
        gpu = model.to(DEV)
        got = gpu(ids.to(DEV), mask=unilm_mask(seg.to(DEV))).logits
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(ids.to(DEV), mask=unilm_mask(seg.to(DEV))).logits
    assert torch.isfinite(low).all()
    assert (low.float().argmax(-1).cpu() == want.argmax(-1)).float().mean() > 0.9


def test_augment_on_cuda_is_seeded_and_matches_cpu_draws():
    """A CPU generator draws the same pairs and λ for a CUDA batch as for the same batch on the CPU."""
    from kexue.augment import cutmix, mixup, sample_pairing

    x = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.arange(7) % 3
    for fn, kw in [(mixup, dict(alpha=0.2, per="sample")), (cutmix, {}), (sample_pairing, {})]:
        a = fn(x, y, generator=torch.Generator().manual_seed(5), **kw)
        b = fn(x.to(DEV), y.to(DEV), generator=torch.Generator().manual_seed(5), **kw)
        assert b[0].device.type == "cuda"
        torch.testing.assert_close(b[0].cpu(), a[0])
        for p, r in zip(a[1:], b[1:]):
            if isinstance(p, torch.Tensor):
                torch.testing.assert_close(r.cpu(), p)
            else:
                assert r == p
    # a CUDA generator: reproducible on its own device
    ga, gb = (torch.Generator(device=DEV).manual_seed(6) for _ in range(2))
    xd, yd = x.to(DEV), y.to(DEV)
    torch.testing.assert_close(mixup(xd, yd, generator=ga)[0], mixup(xd, yd, generator=gb)[0])


def test_mlm_masking_of_a_cuda_batch_is_the_cpu_batch_s():
    """mask_tokens draws on its generator's device: a CUDA batch gets the CPU batch's masks, on its device."""
    from kexue.data.tokenizers import CharTokenizer
    from kexue.train.mlm import mask_tokens

    tok = CharTokenizer(list("abcdefgh"))
    ids = torch.randint(len(tok.special_ids), tok.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    want = mask_tokens(ids, tok, generator=torch.Generator().manual_seed(2))
    got = mask_tokens(ids.to(DEV), tok, generator=torch.Generator().manual_seed(2))
    assert all(g.device.type == "cuda" for g in got)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    ga, gb = (torch.Generator(device=DEV).manual_seed(3) for _ in range(2))
    assert torch.equal(mask_tokens(ids.to(DEV), tok, generator=ga)[0], mask_tokens(ids.to(DEV), tok, generator=gb)[0])


def test_losses_linalg_init_on_cuda_match_cpu():
    from kexue.init import he_normal_, orthogonality_error
    from kexue.linalg import orthogonal_map
    from kexue.losses import am_softmax, arcface

    g = torch.Generator().manual_seed(8)
    cos = torch.rand(16, 10, generator=g) * 2 - 1
    t = torch.randint(0, 10, (16,), generator=g)
    for fn in (am_softmax, arcface):
        c1 = cos.clone().requires_grad_(True)
        c2 = cos.to(DEV).requires_grad_(True)
        a, b = fn(c1, t), fn(c2, t.to(DEV))
        a.backward()
        b.backward()
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c2.grad.cpu(), c1.grad, rtol=1e-5, atol=1e-6)

    a = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    for kind in ("householder", "rotation", "symmetric"):
        m = orthogonal_map(a.to(DEV), b.to(DEV), kind=kind)
        torch.testing.assert_close(m(a.to(DEV)), b.to(DEV), rtol=1e-5, atol=1e-5)

    w_cpu, w_gpu = torch.empty(256, 128), torch.empty(256, 128, device=DEV)
    he_normal_(w_cpu, generator=torch.Generator().manual_seed(9))
    he_normal_(w_gpu, generator=torch.Generator(device=DEV).manual_seed(9))
    for w in (w_cpu, w_gpu.cpu()):
        assert abs(float(w.var()) - 2 / 128) < 0.1 * 2 / 128
    assert float(orthogonality_error(w_gpu)) == pytest.approx(float(orthogonality_error(w_cpu)), rel=0.2)


# ------------------------------------------------------------------------------------------- training loop

def _problem(ckdir, device=DEV, plain=False, **cfg_kw):
    """A small image problem on ``device``; ``plain`` swaps the BatchNorm CNN for a BN-free one (per-process
    BatchNorm statistics are the one expected difference under DDP)."""
    from kexue.nn.vision import SmallCNN
    from kexue.train import TrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127.5).long()          # learnable: brightness above the median
    torch.manual_seed(0)
    if plain:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                  torch.nn.Flatten(), torch.nn.Linear(32, 2))
    else:
        net = SmallCNN(1, 2, width=8)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer="adamw", lr=3e-3, warmup_epochs=0.5, progress=False,
                      checkpoint_dir=str(ckdir), seed=3, device=device, **cfg_kw)
    return net, (x, y), cfg


class _Interrupt(Exception):
    pass


def test_fit_on_cuda_resumes_to_the_uninterrupted_weights(tmp_path):
    from kexue.train import fit, load_checkpoint

    torch.backends.cudnn.deterministic, saved = True, torch.backends.cudnn.deterministic
    try:
        net, data, cfg = _problem(tmp_path / "full")
        full = fit(net, data, cfg, eval_data=data)
        ref = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        assert next(net.parameters()).device.type == "cuda"
        assert full[-1]["train_loss"] < full[0]["train_loss"]

        net, data, cfg = _problem(tmp_path / "cut")

        def die(xb, yb, *, generator, epoch):
            if epoch == 2:
                raise _Interrupt
            return xb, yb

        with pytest.raises(_Interrupt):
            fit(net, data, cfg, batch_transform=die, eval_data=data)
        assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 2
        net, data, cfg = _problem(tmp_path / "cut")
        cfg.resume = True
        resumed = fit(net, data, cfg, eval_data=data)
        assert resumed.resumed_from == 2
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v.cpu(), ref[k], rtol=1e-6, atol=1e-7, msg=k)
        assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in full], rel=1e-6)
    finally:
        torch.backends.cudnn.deterministic = saved


def test_fit_with_bf16_autocast_trains_and_runs_in_bf16(tmp_path):
    from kexue.train import fit

    net, data, cfg = _problem(tmp_path / "amp", amp="bf16")
    seen = []
    handle = net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    hist = fit(net, data, cfg, eval_data=data)
    handle.remove()
    assert torch.bfloat16 in seen                              # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay fp32
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in hist)


DDP_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_cuda import _problem
    from kexue.train import fit, distributed as D

    world, device, backend = int(sys.argv[4]), sys.argv[5], sys.argv[6]
    info = D.init_from_env(device, backend=backend)     # fit() then reuses this group
    assert info.world_size == world and torch.distributed.get_backend() == backend
    net, data, cfg = _problem(sys.argv[2], device=device, plain=True)
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
    net, data, cfg = _problem(tmp_path / "single", plain=True)
    single = fit(net, data, cfg, eval_data=data)
    moved = 0.0
    for k, v in net.state_dict().items():
        torch.testing.assert_close(got["model"][k], v.cpu(), rtol=1e-4, atol=1e-5, msg=k)
        moved += float((v.cpu().float() - _problem(tmp_path / "x", plain=True)[0].state_dict()[k].float()).abs().max())
    assert moved > 1e-2                                      # training really moved the weights
    for a, b in zip(got["history"], single.records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
