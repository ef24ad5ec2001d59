"""Command-line entry point: `python main.py --config=configs/mnist.py --workdir=runs/mnist`.

Thin on purpose: flags and config here, everything else in `ddpm.train` / `ddpm.generate`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding everything of the run.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    # Imported here so `--help` and flag errors are instant.
    from ddpm import generate, train

    if _MODE.value == "train":
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
        generate.sample_from_workdir(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
