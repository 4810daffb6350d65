"""What the log n multiplier costs inside a compiled graph: three ways of writing ``q * multiplier`` (causal,
D = 64), each compiled with inductor and timed against the plain float64 formula with kexue.bench.base.compare.

* ``lookup``: the opaque table lookup ``kexue::logn_multiplier``, what attention() traces to on a CPU; the
  compiler cannot inline it, so the log is taken once per row (K + 1 values, cached);
* ``log2-fp32``: the formula as plain ops in float32, ``log2(max(n, 16)) / log2(512)`` (exact at n = 512);
* ``fp64`` (the reference side of each row): the formula as plain ops in float64, what attention() traces to
  on other devices. Inductor inlines it into the multiply of q, so the float64 log runs once per element
  (on a CPU once per 8, vectorised), which costs little where float64 is fast and may cost much on GPUs
  with slow float64.

For each side it also says whether the generated code takes a float64 log. Usage:
``python scripts/traced-logn-multiplier.py [--device cuda]`` (one line per shape; the CPU numbers quoted in
the README came from it; scripts/gpu-check.sh runs it on a GPU).
"""

from __future__ import annotations

import argparse
import math
import re

import torch
from torch._inductor.utils import run_and_get_code

from kexue.attention import core
from kexue.attention.scaling import _logn_of_counts
from kexue.bench.base import compare
from kexue.cli import _machine


def _sides(L: int) -> dict:
    def lookup(q: torch.Tensor) -> torch.Tensor:
        counts = core._causal_counts(L, L, True, q.device)
        return q * torch.ops.kexue.logn_multiplier(counts, L, 16.0, 512.0, q.dtype).unsqueeze(-1)

    def log2_fp32(q: torch.Tensor) -> torch.Tensor:
        counts = core._causal_counts(L, L, True, q.device)
        return q * (torch.log2(counts.float().clamp_min(16.0)) / math.log2(512.0)).to(q.dtype).unsqueeze(-1)

    def fp64(q: torch.Tensor) -> torch.Tensor:
        counts = core._causal_counts(L, L, True, q.device)
        return q * _logn_of_counts(counts, 512.0, 16.0).to(q.dtype).unsqueeze(-1)

    return {"lookup": lookup, "log2-fp32": log2_fp32, "fp64": fp64}


def _float64_log(code: str) -> bool:
    """Whether inductor's generated code (C++ or Triton) takes a log of a float64 value."""
    has_log = re.search(r"\blog\w*\(", code) is not None
    return has_log and re.search(r"\bdouble\b|float64|fp64", code) is not None


def measure(B: int, H: int, L: int, device: str, dtype: torch.dtype) -> list[str]:
    q = torch.randn(B, H, L, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    torch._dynamo.reset()
    compiled, f64 = {}, {}
    for name, fn in _sides(L).items():
        compiled[name] = torch.compile(fn, dynamic=False)
        _, codes = run_and_get_code(compiled[name], q)
        f64[name] = _float64_log("\n".join(codes))
    ref = compiled["fp64"](q)
    lines = [f"B={B} H={H} L={L} D=64 {dtype}: float64 log in the compiled code: "
             + ", ".join(f"{n} {'yes' if v else 'no'}" for n, v in f64.items())]
    for name in ("lookup", "log2-fp32"):
        fn, peer = compiled[name], compiled["fp64"]
        torch.testing.assert_close(fn(q), ref)
        r = compare(lambda: fn(q), lambda: peer(q), device=device, repeats=10)  # noqa: B023 (used in the loop)
        lines.append(f"  {name} {r[0] * 1e3:.4f} ms vs fp64 formula {r[1] * 1e3:.4f} ms: "
                     f"speedup {r.ratio:.2f}x (paired median)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(_machine(), flush=True)
    if torch.device(args.device).type == "cuda":   # the library registers the lookup op for CPUs only
        core._LIB.impl("logn_multiplier", lambda counts, k_len, min_n, base, dtype: torch.take(
            core._logn_lookup(k_len, min_n, base, dtype, counts.device), counts), "CUDA")
    if args.device == "cpu":
        shapes, dtype = ((1, 2, 512), (1, 2, 2048), (8, 12, 512)), torch.float32
    else:
        shapes, dtype = ((8, 12, 512), (8, 12, 2048), (1, 12, 8192)), torch.bfloat16
    for B, H, L in shapes:
        print("\n".join(measure(B, H, L, args.device, dtype)), flush=True)


if __name__ == "__main__":
    main()
