"""Test-session setup: one persistent XLA compilation cache shared by tests and subprocesses.

Many tests train the same tiny config; on a 2-core CPU compiling it again costs more than
running it. The cache is new for each session, so no result of an earlier run is reused.
"""

import os
import tempfile

import jax

os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-jax-cache-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
