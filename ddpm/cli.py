"""The command line: `ddpm --config=RECIPE.py --workdir=DIR [--mode=...]` (the console script
of `pip install .`) and `python main.py ...` in a checkout.

Thin on purpose: flags and config here, one call per mode. A `UserError` (a bad config value,
path or file) prints as one line, `error: ...`, with exit status 2; anything else is a bug and
keeps its traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm.errors import UserError

MODES = (
    "train",
    "sample",
    "sweep",
    "inpaint",
    "img2img",
    "eval",
    "train_classifier",
    "import",
    "compile",
    "phema",
)
USER_ERROR_STATUS = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (a recipe: configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding everything of the run.")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process JAX job (jax.distributed.initialize). Flags left unset are taken from "
    "JAX_COORDINATOR_ADDRESS etc. or detected on TPU pods, SLURM and Open MPI.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (implies --distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (implies --distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0-based (implies --distributed)."
)
_SWEEP_BACKEND = flags.DEFINE_enum(
    "sweep_backend", "local", ["local", "ray"], "--mode=sweep: run trials here or on Ray."
)
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", None, "--mode=sweep --sweep_backend=ray: cluster address (None: local Ray)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "--mode=compile: the TPU slice to compile for, as libtpu names it (v5e:2x4, v5p:2x2x2, ...).",
)
_FIT = flags.DEFINE_bool(
    "fit",
    False,
    "--mode=compile: try fsdp 1, 2, 4, ... without and then with remat; report the first "
    "layout that fits the chip's memory.",
)
_COMPILE_SAMPLER = flags.DEFINE_bool(
    "compile_sampler", False, "--mode=compile: also compile the sampler of config.sample."
)
flags.mark_flags_as_required(["config", "workdir"])


def _run_mode(mode: str, config, workdir: str) -> None:
    # Imported here so `--help` and flag errors are instant; the distributed runtime starts
    # before anything else touches JAX's devices.
    from ddpm import sharding

    job_flags = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(value is not None for value in job_flags):
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if mode == "train":
        from ddpm import train

        train.train_and_evaluate(config, workdir)
    elif mode in ("inpaint", "img2img"):
        from ddpm import editing

        editing.edit_from_workdir(config, workdir, mode)
    elif mode == "sweep":
        from ddpm import evaluate, sweep, train

        sweep.run_sweep(
            config_flags.get_config_filename(flags.FLAGS["config"]),
            config,
            workdir,
            backend=_SWEEP_BACKEND.value,
            ray_address=_RAY_ADDRESS.value,
            train_fn=train.train_and_evaluate,
            evaluate_fn=evaluate.evaluate,
        )
    elif mode == "eval":
        from ddpm import evaluate

        evaluate.evaluate(config, workdir)
    elif mode == "import":
        from ddpm import pretrained

        pretrained.import_weights(config, workdir)
    elif mode == "compile":
        from ddpm import aot

        aot.compile_for_topology(
            config, workdir, _TOPOLOGY.value, fit=_FIT.value, sampler=_COMPILE_SAMPLER.value
        )
    elif mode == "phema":
        from ddpm import generate

        generate.write_posthoc_ema(config, workdir)
    elif mode == "train_classifier":
        from ddpm import classifier

        classifier.train_classifier(config, workdir)
    else:
        from ddpm import generate

        generate.sample_from_workdir(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.keys()  # ml_collections reports a config file that failed to load only on use
    except OSError as e:
        _fail(f"{flags.FLAGS['config'].serialize()}: {e}")
    try:
        _run_mode(_MODE.value, config, _WORKDIR.value)
    except UserError as e:
        _fail(str(e))


def _fail(message: str) -> None:
    """Prints `message` as one line, `error: ...`, and exits with USER_ERROR_STATUS."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure (an unknown flag or config field, a missing or
    broken config file, a bad override value) printed as one line, exit status 2."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no such field
        _fail(
            f"no config field {e}: a --config.<path> override must name a field of the config "
            "(config.model holds only the fields of its family)"
        )
    except flags.Error as e:
        # A recipe that derives its config (configs/pretrained.py:DIR) may raise a UserError,
        # which ml_collections wraps in a flag error with the traceback as its text.
        _fail(str(_user_error_in(e) or e))
    except Exception as e:  # noqa: BLE001 - the config file is the user's code, run here
        _fail(f"{type(e).__name__} while reading the config: {e}")


def _user_error_in(error: BaseException | None) -> UserError | None:
    """The first UserError that `error` was raised from, if any (ml_collections re-raises a
    config file's ValueError as a new one of the same type, traceback in its text)."""
    found = None
    while error is not None:
        if isinstance(error, UserError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def run() -> None:
    """Entry point of the `ddpm` console script."""
    app.run(main, flags_parser=_parse_flags)
