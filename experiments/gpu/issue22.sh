#!/usr/bin/env bash
# Issue 22's GPU measurements in one call of at most 10 minutes on one H100 (or H200), results under $OUT:
#
#   1. check     tests/test_grouped_gemm.py on the GPU: impl="pallas" compiled to Triton (not interpreted)
#                against the loop oracles, "blocked" and the CUDA-lowered program (float32, 1e-5).
#   2. dispatch  python -m experiments.bench: dense / ragged / blocked / pallas, bfloat16, forward and
#                forward+backward, 2,048 and 8,192 tokens, the 8-expert and the Qwen1.5-MoE-shaped layer.
#   3. e2e       python -m experiments.bench --mode=e2e --impl=pallas: the full-size Qwen1.5-MoE-A2.7B-shaped
#                bf16 model, Fisher scoring of 128 x 2,048 tokens first, then prefill / decode of unpruned,
#                Fisher-MoE 50% (expert, global), Pathfinder 50% and trimmed, one variant at a time.
#
# Each step has a time limit inside one overall deadline (DEADLINE_S, default 570 s) and writes its log
# as it goes, so a step cut short still leaves what it measured; summary.txt says how each step ended.
# From a session that holds a GPU (device tool), in the repo root:
#
#   run(command="bash experiments/gpu/issue22.sh", timeout_s=600)
#
# or one step: bash experiments/gpu/issue22.sh dispatch. No package beyond the device image's is needed
# (moe_jax imports no datasets / ml_collections / tensorboardX on these paths).
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/issue22}
DEADLINE_S=${DEADLINE_S:-570}
PY=${PYTHON:-python3}
STEPS=${1:-check dispatch e2e}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
mkdir -p "$OUT"

step() {  # step NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, time left), log to $OUT/NAME.log
  local name=$1 limit=$2 left=$((DEADLINE_S - SECONDS))
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "$name: not run, ${left} s left" | tee -a "$OUT/summary.txt"; return 0; fi
  echo "== $name: up to ${limit} s: $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "$name: rc=$rc$( ((rc == 124)) && echo ' (time limit)') after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  git log -1 --format='%h %s' 2>/dev/null | cut -c1-100; } 2>&1 | tee "$OUT/device.txt"

step check 100 $PY -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py
step dispatch 200 $PY -m experiments.bench --dtype=bfloat16 --impls=dense,ragged,blocked,pallas \
  --tokens=2048,8192 --passes=forward,backward --repeats=5 --budget_s=30
step e2e 600 $PY -m experiments.bench --mode=e2e --impl=pallas --workdir="$OUT/e2e" --repeats=2 --new_tokens=32 \
  --traj_sequences=8 --trim_bisect_steps=4 --noprogram_bytes
echo "== done in $SECONDS s"; cat "$OUT/summary.txt"
