"""Start-up validation of a run's config: every field named in the error, before any compile."""

import json
import os
from collections.abc import Iterator

import ml_collections

from ddpm import data, diffusion, latent, schedules

# Fields that fix the network and the data's shape: a workdir trained with other values cannot
# be resumed with these. (Model fields that change neither, like dropout, may change.)
SHAPE_FIELDS = ("data.image_size", "data.channels", "model", "text")
_FREE_MODEL_FIELDS = ("dropout", "dtype", "param_dtype", "remat", "conv_grad_chunk")


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
        "fsdp",
    ):
        _range(config, f"training.{path}", 1)
    _range(config, "training.learning_rate", 0, low_inclusive=False)
    _range(config, "training.fsdp_min_size", 0)
    _range(config, "training.warmup_steps", 0)
    _range(config, "training.weight_decay", 0)
    _range(config, "training.grad_clip", 0, low_inclusive=False)
    _range(config, "training.ema_decay", 0, 1)
    _range(config, "training.label_dropout", 0, 1)
    _range(config, "training.adam_b2", 0, 1)
    _range(config, "sample.num_samples", 1)
    _validate_latent(config)
    return info


def _validate_latent(config: ml_collections.ConfigDict) -> None:
    """config.latent: both stages' shapes, stage 1's loss, stage 2's pixel-only sample options."""
    lat = config.latent
    _range(config, "latent.z_channels", 1)
    if lat.factor < 1 or lat.factor & (lat.factor - 1):
        raise ValueError(f"config.latent.factor={lat.factor!r} must be a power of 2, e.g. 4 or 8")
    _choice(config, "latent.recon_loss", latent.RECON_LOSSES)
    _range(config, "latent.kl_weight", 0)
    if lat.autoencoder_workdir is None:
        return
    if config.model.name == "autoencoder":
        raise ValueError(
            "config.latent.autoencoder_workdir is set (stage 2) but config.model.name="
            "'autoencoder': stage 2 trains a denoiser, e.g. 'unet'"
        )
    if config.data.image_size % lat.factor:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} is not divisible by "
            f"config.latent.factor={lat.factor}"
        )
    if lat.scale_factor is not None:
        _range(config, "latent.scale_factor", 0, low_inclusive=False)
    if config.sample.clip_x0 or config.sample.dynamic_threshold is not None:
        raise ValueError(
            f"config.sample.clip_x0={config.sample.clip_x0!r} / config.sample.dynamic_threshold="
            f"{config.sample.dynamic_threshold!r}: clipping to [-1, 1] is for pixels, not "
            "latents; set clip_x0=False and dynamic_threshold=None for latent diffusion"
        )


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
            # A field the saved config lacks was added to configs/default.py after that run
            # was made: it had the field's default.
            from configs import default

            defaults = _get_json(json.loads(default.get_config().to_json_best_effort()), field)
            for key in sorted(set(old_value) | set(new_value)):
                if key in _FREE_MODEL_FIELDS:
                    continue
                if old_value.get(key, defaults.get(key)) != new_value.get(key):
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
