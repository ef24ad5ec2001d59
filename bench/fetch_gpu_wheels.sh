#!/usr/bin/env bash
# Download, on a CPU machine with PyPI access, the Python 3.12 wheels that the GPU machine
# lacks for bench/vs_diffusers.py (it has jax 0.11.2 CUDA, flax, optax, orbax, torch 2.11,
# huggingface_hub, safetensors, regex, requests, ... but not these). Into bench/wheels/
# (git-ignored); carry that folder to the GPU machine and run bench/gpu_h100.sh there.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d wheels \
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 \
  tensorboardX==2.6.5
du -sh wheels
