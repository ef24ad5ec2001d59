#!/usr/bin/env bash
# Issue 13's GPU figures in one device call: bench/vs_diffusers.py and bench/max_batch.py on
# configs.cifar10_ddpm, most important first, within a time budget (default 540 s, for a
# 600 s device call; a lease has 15 minutes of device time, the machine's start included).
# Run from the repo root with bench/wheels carried (bench/fetch_gpu_wheels.sh; see
# bench/README.md). JSON lines go to $OUT/vs_diffusers_gpu.jsonl (./ if OUT is unset), the
# full log to log.txt and the Markdown tables to table.md beside it.
#
# Usage: bash bench/gpu_h100.sh [BUDGET_S]
# Each step starts only if its estimate fits in what is left, and is stopped at the budget's
# end (its workers are killed; lines it already wrote stay). For a dry run of this script on
# a CPU: BENCH_DEVICE=cpu BENCH_CONFIG=configs.mnist PYTHON=/path/to/venv/bin/python, with a
# budget of about 1500 s; there torch's CUDA-graph variant (compile-ro) becomes plain compile,
# bf16 becomes fp32 (bf16 is emulated on these CPUs) and max_batch predicts for 24 GiB
# without running (a CPU swaps instead of running out of memory).
set -uo pipefail
deadline=$((SECONDS + ${1:-540}))
py=${PYTHON:-python3}
device=${BENCH_DEVICE:-cuda}
config=${BENCH_CONFIG:-configs.cifar10_ddpm}
dir=${OUT:-.}
ro=compile-ro precision=bf16 run=--run
if [ "$device" = cpu ]; then
  ro=compile precision=fp32 run=--memory-gib=24  # a CPU reports no limit: the machine's RAM
fi
out=$dir/vs_diffusers_gpu.jsonl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# The GPU machine lacks diffusers, ml-collections and grain: install the carried wheels.
if ! "$py" -c "import diffusers, ml_collections, grain" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site bench/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
"$py" -c "import jax, torch; print(jax.devices(), torch.__version__)" || exit 1
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv | tee "$dir/nvidia_smi.txt"
fi

# step ESTIMATE_S COMMAND...: runs COMMAND if ESTIMATE_S seconds are left, until the deadline.
step() {
  local estimate=$1 left=$((deadline - SECONDS))
  shift
  if [ "$left" -lt "$estimate" ]; then
    echo "# skipped, ${left} s left of the budget (needs ~${estimate} s): $*" | tee -a "$dir/log.txt"
    return
  fi
  echo "# $(date -u +%T) ${left} s left: $*" | tee -a "$dir/log.txt"
  timeout -k 15 "$left" "$@" 2>&1 | tee -a "$dir/log.txt" | grep --line-buffered '^{' | tee -a "$out"
}
vs() {
  local estimate=$1
  shift
  step "$estimate" "$py" -m bench.vs_diffusers --device="$device" --config="$config" \
    --precision="$precision" --rounds=3 --round-seconds=2 --setup-timeout=240 "$@"
}

# The targets: train step at batch 128 and 32 (bf16 vs bf16 autocast, against eager
# and torch.compile), DDIM-50 at batch 16 and 256 (against eager and CUDA graphs).
vs 150 --cases=train@128 --torch=eager,compile
vs 100 --cases=ddim50@16 --torch=eager,$ro
vs 150 --cases=train@32 --torch=eager,compile
vs 100 --cases=ddim50@256 --torch=eager,$ro
# The largest train batch with and without remat (the allocator may take 95 % of the card):
# predictions from compiled memory analyses, then checked by running.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step 100 "$py" -m bench.max_batch --config="$config" $run
# If time is left: TF32 against TF32, then how the train step scales with the batch.
vs 150 --cases=train@128 --precision=tf32 --torch=eager,compile
vs 60 --cases=train@1,train@8,train@256 --torch=eager --round-seconds=1
# A smoke test of the trainer on the GPU: the MNIST run to step 600, then resumed to its end
# (1200); its metrics and last sample grid come back.
step 120 bash -c "$py main.py --config=configs/mnist.py --workdir=/tmp/smoke \
  --config.training.num_steps=600 && $py main.py --config=configs/mnist.py --workdir=/tmp/smoke \
  && cp /tmp/smoke/metrics.jsonl $dir/smoke_metrics.jsonl \
  && cp \$(ls /tmp/smoke/samples/*.png | tail -1) $dir/smoke_grid.png"

"$py" -m bench.vs_diffusers --table="$out" | tee "$dir/table.md"
