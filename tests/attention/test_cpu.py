"""The two CPU kernels of kexue.attention._cpu (row counts read 8 bools at a time, the additive mask made on the
float's bit pattern) against their plain torch references, over dtypes, layouts, lengths and edges; and the
switch that turns them off."""

from __future__ import annotations

import pytest
import torch

from kexue.attention import _cpu, attention, attention_reference, causal_mask


def _layouts():
    g = torch.Generator().manual_seed(31)
    m = torch.rand(2, 3, 5, 2048 + 24, generator=g) > 0.5          # > 255 words per row: several lane groups
    m[0, 0, 1] = False                                              # a fully hidden row
    small = torch.rand(2, 3, 5, 8, generator=g) > 0.5
    return {
        "contiguous": m, "one group": small, "transposed": small.transpose(-1, -2),
        "broadcast heads": small[:, :1].expand(2, 4, 5, 8), "sliced keys": m[..., 3:1027],
        "offset view": m[..., 8:], "odd length": torch.rand(3, 7, 13, generator=g) > 0.3, "causal": causal_mask(9),
        "empty keys": m[..., :0], "empty rows": m[:, :, :0], "all true": torch.ones(1, 1, 4, 16, dtype=torch.bool),
        "exactly 255 words": torch.rand(1, 1, 3, 255 * 8, generator=g) > 0.5,
        "exactly 510 words": torch.rand(1, 1, 2, 510 * 8, generator=g) > 0.5,
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_row_counts_equal_the_plain_sum(name):
    m = _layouts()[name]
    got = _cpu.row_counts(m)
    assert got.dtype == torch.int64
    assert torch.equal(got, m.sum(-1)), name


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_additive_forms_equal_torch_where(name, dtype):
    m = _layouts()[name]
    want = torch.where(m, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))
    got = _cpu.to_additive(m, dtype)
    assert got.dtype == dtype and got.shape == m.shape and got.is_contiguous()
    assert torch.equal(got, want)
    if m.shape[-1]:
        add, counts = _cpu.to_additive_counted(m, dtype)
        assert torch.equal(add, want) and torch.equal(counts, m.sum(-1))


def test_the_switch_gives_the_plain_forms_and_the_same_attention(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    m = torch.rand(2, 1, 16, 16, generator=g) > 0.3
    fast = attention(q, k, v, m, scale="entropy")
    monkeypatch.setattr(_cpu, "ENABLED", False)
    calls = []
    real = _cpu.row_counts_plain
    monkeypatch.setattr(_cpu, "row_counts_plain", lambda a: calls.append(1) or real(a))
    plain = attention(q, k, v, m, scale="entropy")
    assert calls                                             # the plain reduction ran
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    torch.testing.assert_close(plain, attention_reference(q, k, v, m, scale="entropy"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,args", [("row_counts", ()), ("to_additive", (torch.float32,)),
                                     ("to_additive_counted", (torch.float64,))])
def test_the_ops_pass_opcheck(op, args):
    m = _layouts()["odd length"]
    torch.library.opcheck(getattr(torch.ops.kexue, op), (m, *args))


def test_a_cpu_trace_calls_the_ops_and_matches_eager():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    m = torch.rand(1, 1, 24, 24, generator=g) > 0.4
    seen: list[str] = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = torch.compile(lambda q, k, v, m: attention(q, k, v, m, scale="entropy"), backend=backend,
                       fullgraph=True)
    got = fn(q, k, v, m)
    assert any("kexue.to_additive_counted" in s for s in seen), seen
    torch.testing.assert_close(got, attention(q, k, v, m, scale="entropy"), rtol=0, atol=0)
