#!/usr/bin/env bash
# bench/vs_diffusers.py on the GPU machine (run from the repo root, bench/wheels carried; see
# bench/README.md). Writes JSON lines to $OUT/vs_diffusers_gpu.jsonl (or ./ if OUT is unset).
# Usage: bash bench/gpu_h100.sh train|sample|memory   (each part fits one 10-minute device call)
set -uo pipefail
part=${1:?usage: bash bench/gpu_h100.sh train|sample|memory}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site bench/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-.}/vs_diffusers_gpu.jsonl
python3 -c "import jax, torch; print(jax.devices(), torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv | tee "${OUT:-.}/nvidia_smi.txt"
run() { timeout "${STEP_TIMEOUT:-240}" python3 -m bench.vs_diffusers --device=cuda "$@" 2>&1 \
          | tee -a "${OUT:-.}/log.txt" | grep '^{' | tee -a "$out"; }
if [ "$part" = train ]; then
# CIFAR-10 DDPM (35.7M) train step, bf16 vs bf16 autocast; then TF32 vs TF32.
run --config=configs.cifar10_ddpm --cases=train@128,train@32 --precision=bf16 \
    --torch=eager,compile --rounds=3 --round-seconds=2
run --config=configs.cifar10_ddpm --cases=train@128 --precision=tf32 \
    --torch=eager,compile --rounds=3 --round-seconds=2
elif [ "$part" = sample ]; then
# DDIM-50 at batch 16 and 256 on the same U-Net, with CUDA graphs on the torch side.
run --config=configs.cifar10_ddpm --cases=ddim50@16,ddim50@256 --precision=bf16 \
    --torch=eager,compile-ro --rounds=3 --round-seconds=2
else
# Largest CIFAR-10 DDPM train batch with and without remat (the allocator may take 95 % of
# the card), then train-step scaling over batch sizes against torch eager (bf16).
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 300 python3 -m bench.max_batch \
    --config=configs.cifar10_ddpm --run 2>&1 | tee -a "${OUT:-.}/log.txt" | grep '^{' | tee -a "$out"
run --config=configs.cifar10_ddpm --cases=train@1,train@8,train@64,train@256 --precision=bf16 \
    --torch=eager --rounds=3 --round-seconds=1
fi
