"""Subprocess entry of the training tests: `python -m tests.run_tiny WORKDIR '{"num_steps": 40}'`.

With `--slow`, every step waits 20 ms so a test can signal the run between checkpoints.
"""

import json
import sys

from ddpm import train
from tests.tiny import slow_down_steps, tiny_config

if __name__ == "__main__":
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    if "--slow" in sys.argv:
        slow_down_steps(0.02)
    train.train_and_evaluate(tiny_config(**overrides), workdir)
