#!/usr/bin/env bash
# What a session lent a CUDA GPU runs first, as one command (at most 9.5 minutes: the device tool's command limit
# is 10), in order of value:
#   1. the attention bench on the GPU, fused and eager rows (quick sizes, L = 512 and 2048); every fused row also
#      checks its output against SDPA on a pre-scaled q (max_abs_diff_vs_prescaled_sdpa);
#   2. the fused Triton kernel's tests on the compiled kernels (pytest -m kernels tests/attention/kernels: outputs
#      and gradients against the reference, every mask, fp32/fp16/bf16, GPU-sized shapes);
#   3. the CUDA tests (-m cuda, wherever they live in tests/);
#   4. the bench's compiled (the fused kernel inside a compiled graph too), model and backward rows.
# Each step has its own time limit, cut to what is left of 570 s in all, so one hang cannot eat the session; the logs go to $OUT (the device tool's
# folder that comes back) or ./gpu-check. Uses the machine's own torch and triton (no install: src/ on the path).
# Run from the repository root:  bash scripts/gpu-check.sh
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/machine.txt"

deadline=570   # seconds since the script started (bash SECONDS)
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((deadline - SECONDS))
  if [ "$left" -le 5 ]; then echo "== $name: skipped, no time left"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

step bench-fused 170 $py -m kexue.cli bench attention --quick --device cuda --only fused,eager,control \
  --json "$out/bench-fused.json"
step fused-tests 170 $py -m pytest -q -x -m kernels tests/attention/kernels/test_fused.py -p no:cacheprovider
step cuda-tests 120 $py -m pytest -q -m cuda tests -p no:cacheprovider
step bench-rest 130 $py -m kexue.cli bench attention --quick --device cuda --only compiled,model,backward \
  --json "$out/bench-rest.json"
