"""What a run derives from its config, and the config of a workdir: reading a run's
config.json back, the resume check, the stage-1 run of latent diffusion, the shape of the
network's input (which, for latent diffusion, that stage-1 run decides) and the lengths of a
distillation run.

`derive` gathers the derived values in one `Derived`, which validation
(`ddpm.config.validation`) reads once its field checks have passed. The dependency runs one
way: validation imports this module, never the reverse, and the only errors raised here are
about the workdirs read (a missing or corrupt config.json, a stage-1 run that does not fit).
"""

import dataclasses
import functools
import json
import os

import ml_collections

from ddpm.config import schema
from ddpm.errors import UserError

CONFIG_FILE = "config.json"
# Sections compared whole by the resume check (besides the model's shape fields).
_COMPARED = (
    "objective",
    "lora.rank",
    "lora.alpha",
    "lora.targets",
    "diffusion.process",
    "data.image_size",
    "data.channels",
    "data.length",
    "text",
)


def _update(node: ml_collections.ConfigDict, values: dict) -> None:
    """Overlay JSON `values` on `node`, skipping keys the schema no longer has."""
    for key, value in values.items():
        if key not in node:
            continue
        if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _update(node[key], value)
        else:
            node[key] = tuple(value) if isinstance(value, list) else value


def from_json(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config over today's schema: fields added since keep their defaults,
    fields since removed are dropped. Workdirs written before the run-layer redesign (one
    flat `model` section, `latent.z_channels`, no `objective`) read as they were meant."""
    config = schema.get_config()
    model = saved.get("model", {})
    name = model.get("name", "unet")
    if name not in schema.MODEL_SECTIONS:
        raise UserError(f"a saved config has model.name={name!r}, not one of the known families")
    config.model = schema.model_section(name)
    _update(config, saved)
    latent = saved.get("latent", {})
    if name == "autoencoder" and "z_channels" not in model and "z_channels" in latent:
        config.model.z_channels = latent["z_channels"]
    if "objective" not in saved:
        if name == "autoencoder":
            config.objective = "autoencoder"
        elif latent.get("autoencoder_workdir") is not None:
            config.objective = "latent"
    return config


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def read_saved(workdir: str) -> dict | None:
    """The raw config.json of `workdir` (None when there is none); a corrupt file is a
    UserError naming it."""
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable run config ({e}); is this a workdir?") from e


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `config` as `workdir`'s config.json (creating the folder)."""
    os.makedirs(workdir, exist_ok=True)
    with open(config_path(workdir), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (`from_json` of its config.json)."""
    saved = read_saved(workdir)
    if saved is None:
        raise UserError(f"{config_path(workdir)} does not exist: {workdir!r} holds no run")
    return from_json(saved)


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return tuple(value) if isinstance(value, list | tuple) else value


def incompatibilities(
    old: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> list[tuple[str, object, object]]:
    """(field, old value, new value) of every field that differs between two configs and
    changes the parameters' shapes or the function the network computes; runtime fields and
    model fields in `schema.FREE_MODEL_FIELDS` do not count."""
    differences = []
    compared = _COMPARED
    if old.objective == new.objective == "distill":  # the stages a checkpoint belongs to
        compared += ("distill",)
    for path in compared:
        a, b = old[path], new[path]  # a ConfigDict reads a dotted path
        if path == "text" and a.source is None and b.source is None:
            continue  # a text section matters only when text conditioning is on
        if path in ("text", "distill"):
            pairs = [(f"{path}.{key}", a[key], b[key]) for key in b]
        else:
            pairs = [(path, a, b)]
        differences += [(p, _plain(x), _plain(y)) for p, x, y in pairs if _plain(x) != _plain(y)]
    if old.model.name != new.model.name:
        return [*differences, ("model.name", old.model.name, new.model.name)]
    for key in new.model:
        if key not in schema.FREE_MODEL_FIELDS:
            a, b = _plain(old.model[key]), _plain(new.model[key])
            if a != b:
                differences.append((f"model.{key}", a, b))
    return differences


def check_resumable(
    config: ml_collections.ConfigDict, workdir: str, *, training: bool = False
) -> None:
    """A workdir holding a run with other parameter/data shapes is a UserError, not an
    overwrite. A workdir path that is a file is one too. `training`: the train state must
    match as well (its power EMAs, config.phema.track); reading the EMA does not need it."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir!r} is a file, not a directory")
    saved = read_saved(workdir)
    if saved is None:
        return
    old = from_json(saved)
    differences = incompatibilities(old, config)
    if training and tuple(old.phema.track) != tuple(config.phema.track):
        differences.append(("phema.track", tuple(old.phema.track), tuple(config.phema.track)))
    if differences:
        text = "; ".join(
            f"config.{f}: workdir has {o!r}, new config {n!r}" for f, o, n in differences
        )
        raise UserError(
            f"workdir {workdir} holds a run whose config is incompatible with this one ({text}). "
            "Use a new --workdir, or the same config to resume."
        )


def data_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """One example of config.data without the batch axis: (H, W, C), or (L, C) for 1-D
    signals (`config.data.length` set)."""
    d = config.data
    if d.length is not None:
        return (d.length, d.channels)
    return (d.image_size, d.image_size, d.channels)


def is_diffusers_model(folder: str) -> bool:
    """Whether `folder` is a diffusers model folder (config.json with a `_class_name`), such
    as a Stable Diffusion pipeline's vae/, rather than a run's workdir."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return "_class_name" in json.load(f)
    except (OSError, ValueError):
        return False


@functools.cache
def _stage1_config(path: str, mtime_ns: int) -> ml_collections.ConfigDict:
    del mtime_ns  # part of the cache key: a retrained stage 1 is read again
    folder = os.path.dirname(path)
    if is_diffusers_model(folder):  # a diffusers AutoencoderKL folder, used as it is
        from ddpm.pretrained import autoencoder_kl, files

        cfg = files.read_json(path)
        if cfg["_class_name"] != autoencoder_kl.CLASS_NAME:
            raise UserError(f"{path}: a {cfg['_class_name']}, not an {autoencoder_kl.CLASS_NAME}")
        return autoencoder_kl.run_config(cfg, path)
    return load_config(folder)


def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of `config.latent.autoencoder_workdir`'s run (or of the diffusers
    AutoencoderKL folder it names), checked against `config`: a UserError when it holds no
    autoencoder or its image shape differs."""
    workdir = config.latent.autoencoder_workdir
    if workdir is None:
        raise UserError("config.objective='latent' needs config.latent.autoencoder_workdir")
    path = os.path.abspath(config_path(workdir))
    if not os.path.exists(path):
        raise UserError(
            f"config.latent.autoencoder_workdir={workdir!r} holds no autoencoder run ({path} "
            "does not exist); train stage 1 first: python main.py "
            f"--config=configs/mnist_autoencoder.py --workdir={workdir}"
        )
    saved = _stage1_config(path, os.stat(path).st_mtime_ns)
    if saved.objective != "autoencoder":
        raise UserError(
            f"config.latent.autoencoder_workdir={workdir!r} holds a {saved.model.name!r} run, "
            "not an autoencoder (config.objective='autoencoder')"
        )
    for field in ("image_size", "channels"):
        if config.data[field] != saved.data[field]:
            raise UserError(
                f"config.data.{field}={config.data[field]!r} does not match the autoencoder in "
                f"config.latent.autoencoder_workdir={workdir!r} (data.{field}="
                f"{saved.data[field]!r})"
            )
    return saved


def latent_factor(autoencoder: ml_collections.ConfigDict) -> int:
    """Spatial downsampling f = 2^(len(ch_mult) - 1) of an autoencoder's `config.model`."""
    return 2 ** (len(autoencoder.ch_mult) - 1)


def distill_rounds(config: ml_collections.ConfigDict) -> int:
    """Halvings of a distillation run, log2(teacher_steps / final_steps) (validated)."""
    d = config.distill
    return (d.teacher_steps // d.final_steps).bit_length() - 1


def distill_stage1_steps(config: ml_collections.ConfigDict) -> int:
    """Train steps of a distillation run's guided stage 1 (0 when it is not guided)."""
    d = config.distill
    return d.guided_steps if d.guided else 0


def distill_length(config: ml_collections.ConfigDict) -> int:
    """Train steps of a whole distillation run: guided stage 1 (if any), then the rounds."""
    d = config.distill
    return distill_stage1_steps(config) + distill_rounds(config) * d.steps_per_round


@dataclasses.dataclass(frozen=True)
class Derived:
    """What a run derives from its config.

    input_shape: one example as the trained network sees it (no batch axis): the data's
        (`data_shape`), or for latent diffusion the stage-1 autoencoder's latents
        (H/f, W/f, z_channels).
    latent_factor: latent diffusion's f (`latent_factor` of the stage-1 autoencoder); None
        for other objectives.
    distill_length: train steps of a whole distillation run (`distill_length`); None for other
        objectives.
    """

    input_shape: tuple[int, ...]
    latent_factor: int | None = None
    distill_length: int | None = None


def derive(config: ml_collections.ConfigDict) -> Derived:
    """The `Derived` values of `config`, whose fields are valid (validation's field checks).
    Latent diffusion reads its stage-1 run here (`stage1_config`: a UserError when that run
    does not fit)."""
    length = distill_length(config) if config.objective == "distill" else None
    if config.objective != "latent":
        return Derived(data_shape(config), distill_length=length)
    stage1 = stage1_config(config)
    f = latent_factor(stage1.model)
    size = config.data.image_size
    return Derived((size // f, size // f, stage1.model.z_channels), f, length)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one example as the trained network sees it (`Derived.input_shape`)."""
    return derive(config).input_shape
