"""The training tests' tiny config as a recipe, and `main.py` on it in a subprocess:
`python -m tests.run_tiny [--slow] --config=tests/run_tiny.py --workdir=DIR [--config.*=...]`
runs `ddpm.cli.run()` (all that main.py calls); with `--slow` every train step waits 20 ms,
so a test can signal the run between checkpoints.
"""

import sys

import ml_collections

from ddpm import cli
from tests.tiny import slow_down_steps, tiny_config


def get_config() -> ml_collections.ConfigDict:
    """`tests.tiny.tiny_config()` with its defaults."""
    return tiny_config()


if __name__ == "__main__":
    if "--slow" in sys.argv:
        sys.argv.remove("--slow")
        slow_down_steps(0.02)
    sys.argv[0] = "main.py"
    cli.run()
