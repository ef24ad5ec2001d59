"""Pretrained diffusers checkpoints as ordinary workdirs, offline and without torch.

    python main.py --mode=import --config=configs/pretrained.py:DIR --workdir=W
    python main.py --mode=sample --config=configs/pretrained.py:DIR --workdir=W

`config_for(DIR)` is the run config a diffusers directory describes (its model config.json
and scheduler config; the weights are not read), so every mode takes the same recipe.
`import_weights(config, workdir)` converts the safetensors weights (`ddpm.pretrained.layout`)
and writes `W/config.json` and a step-0 checkpoint whose EMA parameters are the imported
weights: sampling, editing and evaluation read them as any run's, and `--mode=train` starts
from them (fine-tuning with a fresh optimizer and data stream).
"""

import dataclasses
import json
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ddpm import build, checkpoint, sharding
from ddpm.config import runs, schema, validation
from ddpm.errors import UserError
from ddpm.pretrained import (
    autoencoder_kl,
    dit,
    files,
    layout,
    scheduler,
    stable_diffusion,
    unet2d,
    unet2d_condition,
)

# diffusers class name -> our family's converter module (model_section, prepare, rules).
FAMILIES = {m.CLASS_NAME: m for m in (unet2d, autoencoder_kl, dit, unet2d_condition)}


def describe(path: str) -> tuple[ml_collections.ConfigDict, list[str], files.ModelFiles]:
    """(run config, notes on fields that do not apply, the directory's files) of the
    diffusers directory `path` (a model, or a Stable Diffusion pipeline:
    `ddpm.pretrained.stable_diffusion`); UserError for what our networks cannot express."""
    if stable_diffusion.is_pipeline(path):
        return stable_diffusion.describe(path)
    found = files.read_model_dir(path)
    family = FAMILIES.get(found.class_name)
    source = f"{found.folder}/config.json"
    if family is None:
        raise UserError(
            f"{source}: _class_name={found.class_name!r} is not supported (accepted: "
            f"{', '.join(FAMILIES)})"
        )
    if family is autoencoder_kl:
        config = autoencoder_kl.run_config(found.config, source)
        config.pretrained.path = path
        return config, autoencoder_kl.notes(found.config, source), found
    config = schema.get_config()
    config.pretrained.path = path
    config.model, data_fields = family.model_section(found.config, source)
    config.data.update(data_fields)
    config.training.label_dropout = 0.0 if config.model.num_classes is None else 0.1
    notes = []
    if found.scheduler is None:
        notes.append(f"{path}: no scheduler config; config.diffusion keeps its defaults")
    else:
        notes += scheduler.apply(config, found.scheduler, f"{path}: scheduler config")
    return config, notes, found


@dataclasses.dataclass(frozen=True)
class Converted:
    """A diffusers model as ours: config (what its directory describes, `describe`), notes,
    model_files, net (our flax module) and params (its parameter pytree of float32 NumPy
    arrays)."""

    config: ml_collections.ConfigDict
    notes: list[str]
    model_files: files.ModelFiles
    net: nn.Module
    params: dict


def load(path: str) -> Converted:
    """Reads and converts the diffusers model in `path` (UserError for what does not fit)."""
    return _convert(*describe(path))


def _convert(
    config: ml_collections.ConfigDict, notes: list[str], found: files.ModelFiles
) -> Converted:
    """The weights of `found` converted for the network `config` (from `describe`)."""
    family = FAMILIES[found.class_name]
    tensors = family.prepare(found.tensors(), found.weights_path)
    net = build.model(config)
    target = build.abstract_params(config, net, runs.input_shape(config))
    table = family.rules(config.model, runs.input_shape(config)[0], tensors)
    params = layout.convert(tensors, table, target, found.weights_path)
    return Converted(config, notes, found, net, params)


def config_for(path: str) -> ml_collections.ConfigDict:
    """The run config of the diffusers directory `path` (see `describe`)."""
    return describe(path)[0]


def import_weights(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`--mode=import`: converts the weights of `config.pretrained.path` into `workdir`
    (config.json + checkpoints/0 holding them as EMA parameters). -> the checkpoint folder."""
    path = config.pretrained.path
    if path is None:
        raise UserError(
            "config.pretrained.path is not set: use --config=configs/pretrained.py:DIR with a "
            "diffusers model directory DIR"
        )
    validation.validate(config)
    described, notes, found = describe(path)  # checked before the weights are read
    # The network must be the checkpoint's; the objective may differ (a DiT of latents
    # imported into a latent-diffusion run on an imported VAE).
    mismatch = [d for d in runs.incompatibilities(described, config) if d[0].startswith("model.")]
    if mismatch:
        field, needed, given = mismatch[0]
        raise UserError(
            f"config.{field}={given!r} does not match the checkpoint in {path} ({needed!r}); "
            "import with --config=configs/pretrained.py:DIR"
        )
    shape, needed = runs.input_shape(config), runs.input_shape(described)
    if shape != needed:
        raise UserError(
            f"this config's network input is {shape}; the checkpoint in {path} takes {needed}"
        )
    if runs.read_saved(workdir) is not None:
        raise UserError(f"{workdir} already holds a run; import into a new workdir")
    start = time.perf_counter()
    params = _convert(described, notes, found).params
    count = sum(p.size for p in jax.tree.leaves(params))
    mesh = build.mesh(config)
    where = sharding.state_shardings(params, mesh, config.training.fsdp_min_size)
    state = {"step": np.zeros((), np.int32), "ema_params": jax.device_put(params, where)}
    runs.write_config(config, workdir)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    try:
        ckpt.save(0, state, {}, json.loads(config.to_json_best_effort()))
    finally:
        ckpt.close()
    for note in notes:
        print(f"note: {note}", flush=True)
    print(
        f"Imported {found.class_name} ({count:,} parameters) from {found.weights_path} into "
        f"{ckpt.directory}/0 in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return f"{ckpt.directory}/0"
