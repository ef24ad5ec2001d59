"""Subprocess entry of the training tests: `python -m tests.run_tiny WORKDIR '{"num_steps": 40}'`.

With `--slow`, every step waits 20 ms so a test can signal the run between checkpoints.
"""

import json
import sys
import time

from ddpm import sharding, train
from tests.tiny import tiny_config

if __name__ == "__main__":
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    if "--slow" in sys.argv:
        assemble = sharding.global_batch

        def slow_global_batch(*args, **kwargs):
            time.sleep(0.02)
            return assemble(*args, **kwargs)

        sharding.global_batch = slow_global_batch
    train.train_and_evaluate(tiny_config(**overrides), workdir)
