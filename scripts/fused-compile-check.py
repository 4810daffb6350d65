"""Compile every launch setting of the fused kernels for sm_80 and sm_90 with the installed Triton; print one
JSON line per compiled kernel. Run by tests/attention/kernels/test_fused_compile.py in a process of its own:
Triton decides at import time whether its functions are interpreted, and the other tests switch the interpreter
on.

    python scripts/fused-compile-check.py [CAPABILITY ...]
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kexue.attention.kernels import _triton as kernels  # noqa: E402
from kexue.attention.kernels.fused import _GPU_CONFIGS  # noqa: E402

POINTERS = {"Q": None, "K": None, "V": None, "O": None, "DO": None, "DK": None, "DV_": None, "DQ": None,
            "LSE": "fp32", "CB": "fp32", "DELTA": "fp32", "DC": "fp32", "MULT": "fp32",
            "QR": "i32", "KR": "i32", "QG": "i32", "KG": "i32", "COUNTS": "i64"}
FLOATS = ("sm_scale", "inv_log2_base", "min_n")


# the strides a launch with contiguous tensors passes as 1 (Triton then compiles them as the constant 1, which is
# what tells it that rows are contiguous: vector loads and asynchronous copies); the other integers and the
# pointers it sees divisible by 16 when they are (as with L = 512, D = 64 and offset 0)
UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdod", "sdkd", "sdvd", "sdqd", "sqrm", "sqgm"}
UNALIGNED = {"H"}     # (lengths, head dims and the offset are multiples of 16 in the usual call: L = 512, D = 64)


def compile_kernel(fn, dtype: str, constexprs: dict, cap: int, warps: int, stages: int, contiguous: bool = True):
    """A cubin of ``fn`` for ``sm_{cap}``: tensors of ``dtype``, scalars as a launch passes them. ``contiguous``:
    specialised as Triton's launcher specialises a call with contiguous q, k, v (unit strides are the constant 1,
    pointers and other strides divisible by 16); otherwise as for arbitrary strides."""
    params = inspect.signature(fn.fn).parameters
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if "constexpr" in str(params[name].annotation):
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + (POINTERS[name] or dtype)
            if contiguous:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        elif contiguous and name in UNIT_STRIDES:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if contiguous and name not in UNALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = {n for n, t in sig.items() if t == "constexpr"} ^ set(consts)
    if missing:
        raise ValueError(f"constexprs do not match {fn.__name__}: {sorted(missing)}")
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})


def async_copies(ck) -> int:
    """How many asynchronous global-to-shared copies the compiled kernel issues: what Triton's software pipeliner
    turns a loop's loads into (0: every load of the loop waits for its data)."""
    return ck.asm["ttgir"].count("async_copy_global_to_local")


def ptxas_report(ptx: str, cap: int) -> tuple[int | None, int | None]:
    """(registers per thread, bytes of spill stores) from ``ptxas -v`` -- with the ptxas in Triton's wheel that
    reads its PTX version (None, None when none does)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):
            if not (bin_dir / exe).exists():
                continue
            out = subprocess.run([str(bin_dir / exe), "-v", f"-arch=sm_{cap}a" if cap >= 90 else f"-arch=sm_{cap}",
                                  str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
            regs = re.findall(r"Used (\d+) registers", out.stderr)
            spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
            if out.returncode == 0 and regs and spills:
                return int(regs[0]), int(spills[0])
    return None, None


def variants(key: tuple, on: bool) -> list[tuple[str, dict]]:
    """The kernels of one launch setting, with every optional feature on (``on``) or off."""
    kind, bucket, fp32 = key
    BM, BN, _, _ = _GPU_CONFIGS[key]
    common = dict(IS_CAUSAL=on, HAS_RANK=on, HAS_GROUP=on, HAS_MULT=on, UPCAST=False,
                  PRECISION="ieee" if fp32 else "tf32", BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=bucket, BLOCK_DV=bucket)
    if kind == "fwd":
        return [("_fwd_kernel", dict(common, ENTROPY=on, HAS_COUNTS=not on))]
    return [("_bwd_dkdv_kernel", common), ("_bwd_dq_kernel", dict(common, GRAD_C=on))]


def main(caps: list[int]) -> int:
    for cap in caps:
        for key in sorted(_GPU_CONFIGS, key=str):
            _, _, warps, stages = _GPU_CONFIGS[key]
            dtypes = ["fp32", "fp32"] if key[2] else ["bf16", "fp16"]   # (features on, then off)
            # contiguous tensors (the usual launch), features on and off; any strides, features on (sm_90 only)
            runs = [(dtypes[0], True, True), (dtypes[1], False, True)] + [(dtypes[0], True, False)] * (cap == 90)
            for dtype, on, contiguous in runs:
                for name, constexprs in variants(key, on=on):
                    row = {"cap": cap, "key": list(key), "kernel": name, "dtype": dtype, "features": on,
                           "contiguous": contiguous, "stages": stages}
                    try:
                        ck = compile_kernel(getattr(kernels, name), dtype, constexprs, cap, warps, stages, contiguous)
                        regs, spills = ptxas_report(ck.asm["ptx"], cap)
                        row.update(ok=bool(ck.asm.get("cubin")), shared=ck.metadata.shared, registers=regs,
                                   spill_bytes=spills, async_copies=async_copies(ck))
                    except Exception:              # report every failure, not only the first
                        row.update(ok=False, error=traceback.format_exc(limit=3)[-1500:])
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or [90, 80]))
