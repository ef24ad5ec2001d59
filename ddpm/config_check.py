"""Start-up validation of a run's config: every field named in the error, before any compile."""

import json
import os
from collections.abc import Iterator

import ml_collections

from ddpm import data, diffusion, schedules

# Fields that fix the network and the data's shape: a workdir trained with other values cannot
# be resumed with these. (Model fields that change neither, like dropout, may change.)
SHAPE_FIELDS = ("data.image_size", "data.channels", "model")
_FREE_MODEL_FIELDS = ("dropout", "dtype", "param_dtype", "remat")


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _field_paths(value, path + ".")
        else:
            yield path


def check_known_fields(config: ml_collections.ConfigDict) -> None:
    """Every field of `config` must exist in configs/default.py (catches typos in configs)."""
    from configs import default  # the one list of fields

    known = set(_field_paths(default.get_config()))
    unknown = sorted(set(_field_paths(config)) - known)
    if unknown:
        raise ValueError(
            f"unknown config field(s): {', '.join('config.' + u for u in unknown)}; every field "
            "must exist in configs/default.py"
        )


def _choice(config: ml_collections.ConfigDict, path: str, choices) -> None:
    value = _get(config, path)
    if value not in choices:
        raise ValueError(f"config.{path}={value!r} is not one of {', '.join(map(str, choices))}")


def _range(
    config: ml_collections.ConfigDict,
    path: str,
    low: float,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
) -> None:
    value = _get(config, path)
    ok_low = value >= low if low_inclusive else value > low
    ok_high = high is None or value < high
    if not (ok_low and ok_high):
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (
            "" if high is None else f" and < {high}"
        )
        raise ValueError(f"config.{path}={value!r} must be {bound}")


def _get(config: ml_collections.ConfigDict, path: str):
    value = config
    for key in path.split("."):
        value = value[key]
    return value


def validate(config: ml_collections.ConfigDict) -> data.DatasetInfo:
    """Raises ValueError naming the first invalid field (data, diffusion, training).

    Returns the data source's metadata, read while validating it (for a folder source that
    means indexing the folder, so callers should not read it again).
    """
    check_known_fields(config)
    info = data.dataset_info(config)
    _choice(config, "diffusion.schedule", schedules.SCHEDULE_NAMES)
    _choice(config, "diffusion.prediction", diffusion.PREDICTIONS)
    _choice(config, "diffusion.loss_weighting", diffusion.LOSS_WEIGHTINGS)
    _range(config, "diffusion.num_timesteps", 1)
    _range(config, "diffusion.min_snr_gamma", 0, low_inclusive=False)
    if config.diffusion.zero_terminal_snr and config.diffusion.prediction != "v":
        raise ValueError(
            "config.diffusion.zero_terminal_snr=True needs config.diffusion.prediction='v' "
            f"(got {config.diffusion.prediction!r}): eps is undefined at SNR 0"
        )
    _choice(config, "training.optimizer", ("adam", "adamw"))
    _choice(config, "training.lr_schedule", ("constant", "cosine"))
    for path in (
        "num_steps",
        "batch_size",
        "grad_accum_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
    ):
        _range(config, f"training.{path}", 1)
    _range(config, "training.learning_rate", 0, low_inclusive=False)
    _range(config, "training.warmup_steps", 0)
    _range(config, "training.weight_decay", 0)
    _range(config, "training.grad_clip", 0, low_inclusive=False)
    _range(config, "training.ema_decay", 0, 1)
    _range(config, "training.label_dropout", 0, 1)
    _range(config, "training.adam_b2", 0, 1)
    _range(config, "sample.num_samples", 1)
    return info


def check_workdir_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir holding a run with other parameter/data shapes is an error, not an overwrite."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    new = json.loads(config.to_json_best_effort())
    differences = []
    for field in SHAPE_FIELDS:
        old_value, new_value = _get_json(saved, field), _get_json(new, field)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            for key in sorted(set(old_value) | set(new_value)):
                if key in _FREE_MODEL_FIELDS:
                    continue
                if old_value.get(key) != new_value.get(key):
                    differences.append((f"{field}.{key}", old_value.get(key), new_value.get(key)))
        elif old_value != new_value:
            differences.append((field, old_value, new_value))
    if differences:
        text = "; ".join(
            f"config.{f}: workdir has {o!r}, new config {n!r}" for f, o, n in differences
        )
        raise ValueError(
            f"workdir {workdir} holds a run whose config is incompatible with this one ({text}). "
            "Use a new --workdir, or the same config to resume."
        )


def _get_json(tree: dict, path: str):
    for key in path.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else None
    return tree
