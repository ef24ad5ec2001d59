"""Test-session setup: one persistent XLA compilation cache shared by tests and subprocesses,
XLA:CPU's backend optimisation at level 0 and its older (non-MLIR) fusion emitters.

Many tests train the same tiny config; on a 2-core CPU compiling it again costs more than
running it. The cache is new for each session, so no result of an earlier run is reused.
The tests' networks are tiny, so LLVM's optimisation passes cost far more than they save
(a 60-step tiny run: 7 s of compilation instead of 14, the same run time). The older fusion
emitters compile the tiny train step in 6-8 s instead of 10-13 s and run it up to 2x slower,
a good trade where most of the time is compilation (AMD EPYC, AVX2: the eval-mode test 115 ->
103 s, the two tiny process runs 110 -> 91 s). One LLVM module per program instead of
several compiled on threads: the same compile time with two test workers on two cores, about
1 s less CPU per tiny train-step compile (11.5 s of process CPU instead of 12.5, medians of
5). Subprocesses inherit XLA_FLAGS; those that simulate devices append to it.
"""

import atexit
import os
import shutil
import tempfile

# The tests run on the host's CPU. Where libtpu is installed (requirements-dev.txt, for
# tests/test_aot.py, which compiles for TPU topologies without a TPU backend), JAX would
# otherwise look for a TPU in every process first: 0.2-0.6 s each, and the suite starts
# dozens of subprocesses, which inherit the variable.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Processes that inherit the variable share the cache; the one that made it removes it.
if "DDPM_TEST_JAX_CACHE" not in os.environ:
    os.environ["DDPM_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="ddpm-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPM_TEST_JAX_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["DDPM_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
flags = os.environ.get("XLA_FLAGS", "")
for flag in (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
):
    if flag.split("=")[0] not in flags:
        flags = f"{flags} {flag}".strip()
os.environ["XLA_FLAGS"] = flags


# Test files by the time they took (--durations summed per file, longest first; every file
# over 15 s). pytest-xdist's `--dist loadfile --no-loadscope-reorder` (README's test command)
# hands files to the workers in collection order; starting with the longest keeps one worker
# from finishing a long file alone while the other idles. Without the flag xdist orders files
# by their number of tests, and two-test files such as test_multihost.py run last.
LONGEST_FIRST = (
    "test_train.py",
    "test_stable_diffusion.py",
    "test_evaluate.py",
    "test_distill.py",
    "test_multihost.py",
    "test_autoencoder.py",
    "test_consistency.py",
    "test_processes.py",
    "test_phema.py",
    "test_package.py",
    "test_pretrained.py",
    "test_sweep.py",
    "test_samplers.py",
    "test_vlb.py",
    "test_unet.py",
    "test_signals.py",
    "test_entrypoints.py",
    "test_diffusion.py",
    "test_text.py",
    "test_autoguide.py",
    "test_editing.py",
    "test_dit.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
