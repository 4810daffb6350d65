"""The fused kernels compile for NVIDIA GPUs (sm_80 and sm_90), here, without a GPU.

Triton's interpreter (tests/attention/kernels/test_fused.py) runs the kernels' Python but does not check what
only the compiler does: that globals are constexpr, that every branch types, that the tiles fit in shared
memory, that ptxas takes the code (a non-constexpr global passed the interpreter and failed here). This compiles
every launch setting in ``kexue.attention.kernels.fused._GPU_CONFIGS`` -- with every optional feature on, and off
-- to a cubin for an A100 (sm_80) and an H100/H200 (sm_90) with the installed Triton, in a process of its own
(scripts/fused-compile-check.py), so that a GPU session does not find such an error; it also holds the settings
to what they were chosen for: no register spills on sm_90 (read with ``ptxas -v``), and main loops whose loads
Triton software-pipelines. The kernels are specialised as Triton's launcher specialises a call with contiguous
tensors (unit strides as the constant 1, the rest divisible by 16) -- without that, nothing is pipelined, and
the report would not describe what runs -- and also for arbitrary strides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError("triton is missing: the test extra installs it (pip install -e '.[test]')")
    pytest.skip("triton is not installed", allow_module_level=True)

from kexue.attention.kernels.fused import _GPU_CONFIGS  # noqa: E402

# max dynamic shared memory per block: A100 163 KB, H100/H200 227 KB
SHARED_LIMIT = {80: 166912, 90: 232448}


@pytest.mark.slow
@pytest.mark.parametrize("cap", [90, 80])        # (one test per GPU generation: pytest-xdist runs them side by side)
def test_every_launch_setting_compiles_for_the_gpu_generation(tmp_path, cap):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = Path(__file__).resolve().parents[3] / "scripts" / "fused-compile-check.py"
    proc = subprocess.run([sys.executable, str(script), str(cap)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows and all(r["cap"] == cap for r in rows), proc.stderr[-3000:]
    # each setting with features on and off (bf16 / fp16 for half) for contiguous tensors, and on sm_90 also with
    # the features on for any strides; the backward as 2 kernels
    kernels = sum(1 if k[0] == "fwd" else 2 for k in _GPU_CONFIGS)
    assert len(rows) == (3 if cap == 90 else 2) * kernels, proc.stderr[-3000:]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']} {r['key']} {r['dtype']} sm_{r['cap']}:\n{r.get('error')}"
                                   for r in failed)
    too_big = [r for r in rows if r["shared"] > SHARED_LIMIT[r["cap"]]]
    assert not too_big, [(r["kernel"], r["key"], r["dtype"], r["cap"], r["shared"]) for r in too_big]
    # the settings were chosen so that nothing spills registers on sm_90 (Triton 3.9, features on and off,
    # contiguous and strided)
    measured = [r for r in rows if r["cap"] == 90 and r["spill_bytes"] is not None]
    assert measured or cap != 90, "ptxas -v could not read the PTX: no register report"
    spilled = [(r["kernel"], r["key"], r["dtype"], r["contiguous"], r["spill_bytes"]) for r in measured
               if r["spill_bytes"]]
    assert not spilled, f"register spills on sm_90: {spilled}"
    # with 2+ stages, the loads of the main loop are software-pipelined (asynchronous copies) for contiguous
    # tensors -- also with a rank or group mask, whose block skipping once sat in a branch that Triton's
    # pipeliner does not enter (0 copies: every load of the loop waited for its data)
    serial = [(r["kernel"], r["key"], r["dtype"], r["features"], r["cap"]) for r in rows
              if r["contiguous"] and r["stages"] > 1 and not r["async_copies"]]
    assert not serial, f"main loop not pipelined: {serial}"


def test_the_configured_blocks_are_valid():
    for kind in ("fwd", "bwd"):
        for bucket in (64, 128, 256):
            for fp32 in (False, True):
                BM, BN, warps, stages = _GPU_CONFIGS[(kind, bucket, fp32)]
                assert BM >= 16 and BN >= 16 and BM & (BM - 1) == 0 and BN & (BN - 1) == 0
                assert warps in (1, 2, 4, 8) and stages >= 1
