"""What the log n multiplier costs inside a compiled graph on a CPU: the opaque table lookup
(``kexue::logn_multiplier``, what attention() traces to) against the same formula as plain ops (which inductor
inlines into the multiply of q, one float64 log per 8 elements). Each side is ``q * multiplier`` compiled with
inductor; timed side by side with kexue.bench.base.compare. Usage: ``python scripts/traced-logn-multiplier.py``
(prints one line per shape; numbers quoted in the README came from it)."""

from __future__ import annotations

import torch

from kexue.attention import core
from kexue.attention.scaling import _logn_of_counts
from kexue.bench.base import compare
from kexue.cli import _machine


def measure(B: int, H: int, L: int) -> str:
    q = torch.randn(B, H, L, 64, generator=torch.Generator().manual_seed(0))

    def lookup(q: torch.Tensor) -> torch.Tensor:
        counts = core._causal_counts(L, L, True, q.device)
        return q * core._traced_logn_multiplier(counts, L, 16.0, 512.0, q).unsqueeze(-1)

    def inline(q: torch.Tensor) -> torch.Tensor:
        counts = core._causal_counts(L, L, True, q.device)
        return q * _logn_of_counts(counts, 512.0, 16.0).to(q.dtype).unsqueeze(-1)

    torch._dynamo.reset()
    ours, peer = torch.compile(lookup, dynamic=False), torch.compile(inline, dynamic=False)
    torch.testing.assert_close(ours(q), peer(q))
    r = compare(lambda: ours(q), lambda: peer(q), device="cpu", repeats=10)
    return (f"B={B} H={H} L={L} D=64: lookup op {r[0] * 1e3:.3f} ms, inlined formula {r[1] * 1e3:.3f} ms, "
            f"speedup {r.ratio:.2f}x (paired median)")


def main() -> None:
    print(_machine())
    for B, H, L in ((1, 2, 512), (1, 2, 2048), (8, 12, 512)):
        print(measure(B, H, L), flush=True)


if __name__ == "__main__":
    main()
