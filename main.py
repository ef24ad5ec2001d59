"""Command-line entry point: `python main.py --config=configs/mnist.py --workdir=runs/mnist`.

Thin on purpose: flags and config here, everything else in `ddpm.train` / `ddpm.generate`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding everything of the run.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "sample", "sweep", "inpaint", "img2img", "eval", "train_classifier"],
    "What to run.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process JAX job (jax.distributed.initialize). Flags left unset are taken from "
    "JAX_COORDINATOR_ADDRESS etc. or detected on TPU pods, SLURM and Open MPI.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (implies --distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_SWEEP_BACKEND = flags.DEFINE_enum(
    "sweep_backend", "local", ["local", "ray"], "--mode=sweep: run trials here or on Ray."
)
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", None, "--mode=sweep --sweep_backend=ray: cluster address (None: local Ray)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    # Imported here so `--help` and flag errors are instant; the distributed runtime starts
    # before anything else touches JAX's devices.
    from ddpm import sharding

    if _DISTRIBUTED.value or _COORDINATOR.value:
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from ddpm import generate, sweep, train

    if _MODE.value == "train":
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value in ("inpaint", "img2img"):
        from ddpm import editing

        editing.edit_from_workdir(_CONFIG.value, _WORKDIR.value, _MODE.value)
    elif _MODE.value == "sweep":
        config_path = config_flags.get_config_filename(flags.FLAGS["config"])
        sweep.run_sweep(
            config_path,
            _CONFIG.value,
            _WORKDIR.value,
            backend=_SWEEP_BACKEND.value,
            ray_address=_RAY_ADDRESS.value,
        )
    elif _MODE.value == "eval":
        from ddpm import evaluate

        evaluate.evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "train_classifier":
        from ddpm import classifier

        classifier.train_classifier(_CONFIG.value, _WORKDIR.value)
    else:
        generate.sample_from_workdir(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
