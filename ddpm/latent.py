"""Latent diffusion: the stage-1 autoencoder objective, and stage 2's frozen autoencoder.

Stage 1 (`config.model.name == "autoencoder"`) minimises `autoencoder_loss` with the ordinary
training loop. Stage 2 (`config.latent.autoencoder_workdir` set) restores that run's EMA
parameters (`load_stage1`), fixes the latent scale (`with_scale_factor`), and the training
loop and samplers see latents `encode_latents(...)` instead of images; sample grids are
`decode_latents(...)` of the sampled latents.
"""

import functools
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm import data, models, sharding
from ddpm.models.autoencoder import gaussian_kl

Array = jax.Array

RECON_LOSSES = ("l1", "l2")
# Images encoded to estimate the latent scale factor (from the start of the train split).
SCALE_ESTIMATE_IMAGES = 512


def autoencoder_loss(
    params: Any,
    model: nn.Module,
    x: Array,
    rng: Array,
    *,
    recon_loss: str = "l1",
    kl_weight: float = 1e-6,
) -> tuple[Array, dict[str, Array]]:
    """Stage-1 loss: mean |x - D(z)| (l1) or (x - D(z))^2 (l2) + kl_weight * KL / (H W C).

    z = mean + exp(logvar / 2) * noise ~ q(z | x). Dividing the KL (summed over latent
    dimensions) by the pixel count gives kl_weight LDM's meaning, whose reconstruction term is
    summed over pixels. x: [B, H, W, C] float32 in [-1, 1]; rng splits into noise and dropout
    keys. Returns (scalar loss, {"recon": per-pixel reconstruction error, "kl": mean KL}).
    """
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r} is not one of {', '.join(RECON_LOSSES)}")
    noise_rng, dropout_rng = jax.random.split(rng)
    f = 2 ** (len(model.ch_mult) - 1)
    b, h, w, c = x.shape
    noise = jax.random.normal(noise_rng, (b, h // f, w // f, model.z_channels), jnp.float32)
    recon, mean, logvar = model.apply(
        {"params": params}, x, noise, train=True, rngs={"dropout": dropout_rng}
    )
    error = recon - x.astype(jnp.float32)
    recon_error = jnp.mean(jnp.abs(error) if recon_loss == "l1" else jnp.square(error))
    kl = jnp.mean(gaussian_kl(mean, logvar))
    return recon_error + kl_weight * kl / (h * w * c), {"recon": recon_error, "kl": kl}


def encode_latents(
    model: nn.Module,
    params: Any,
    images: Array,
    rng: Array,
    *,
    scale_factor: float,
    sample_posterior: bool,
) -> Array:
    """Diffusion data of stage 2: scale_factor * z, z ~ q(z | x) (or its mean).

    images: [B, H, W, C] float32 in [-1, 1]. Returns [B, H/f, W/f, z_channels] float32.
    """
    mean, logvar = model.apply({"params": params}, images, method="encode")
    z = mean
    if sample_posterior:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return scale_factor * z


def decode_latents(model: nn.Module, params: Any, latents: Array, *, scale_factor: float) -> Array:
    """Images [B, H, W, C] float32 (about [-1, 1]) of latents [B, H/f, W/f, z] (scaled)."""
    return model.apply({"params": params}, latents / scale_factor, method="decode")


class Stage1(NamedTuple):
    """The frozen autoencoder of a stage-2 run: module, EMA parameters (replicated), config."""

    model: nn.Module
    params: Any
    config: ml_collections.ConfigDict


def _config_from_json(saved: dict) -> ml_collections.ConfigDict:
    """A run's config.json over configs/default.py (fields added since keep their defaults)."""
    from configs import default  # the one list of fields

    config = default.get_config()

    def update(node: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if key not in node:
                continue
            if isinstance(value, dict):
                update(node[key], value)
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    update(config, saved)
    return config


def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of `config.latent.autoencoder_workdir`'s run, checked against `config`.

    Raises FileNotFoundError when the workdir or its config.json is missing, ValueError when it
    is not an autoencoder run or its latent channels, factor or image shape differ.
    """
    workdir = config.latent.autoencoder_workdir
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"config.latent.autoencoder_workdir={workdir!r} holds no autoencoder run ({path} "
            "does not exist); train stage 1 first: python main.py "
            f"--config=configs/mnist_autoencoder.py --workdir={workdir}"
        )
    with open(path) as f:
        saved = _config_from_json(json.load(f))
    if saved.model.name != "autoencoder":
        raise ValueError(
            f"config.latent.autoencoder_workdir={workdir!r} holds a {saved.model.name!r} run, "
            "not an autoencoder (config.model.name='autoencoder')"
        )
    for field in ("latent.z_channels", "latent.factor", "data.image_size", "data.channels"):
        section, key = field.split(".")
        if config[section][key] != saved[section][key]:
            raise ValueError(
                f"config.{field}={config[section][key]!r} does not match the autoencoder in "
                f"config.latent.autoencoder_workdir={workdir!r} ({field}={saved[section][key]!r})"
            )
    return saved


def load_stage1(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Stage1 | None:
    """The frozen autoencoder of a stage-2 `config` (None for pixel-space runs), its EMA
    parameters restored from the latest checkpoint and replicated on `mesh`."""
    if config.latent.autoencoder_workdir is None:
        return None
    from ddpm import generate  # the run layer; generate imports train, which imports this

    saved = stage1_config(config)
    model = models.create_model(saved)
    params, step = generate.restore_ema_params(saved, config.latent.autoencoder_workdir, model)
    print(
        f"Frozen autoencoder: EMA parameters of step {step} of {config.latent.autoencoder_workdir}",
        flush=True,
    )
    return Stage1(model, jax.device_put(params, sharding.replicated(mesh)), saved)


def estimate_scale_factor(config: ml_collections.ConfigDict, stage1: Stage1) -> float:
    """1 / std of the unscaled latents of the first SCALE_ESTIMATE_IMAGES training images.

    Every process reads the same images, so all agree on the value.
    """
    batch = min(SCALE_ESTIMATE_IMAGES, 256)
    images = data.create_dataset(config, "train", batch_size=batch, seed=config.seed, shuffle=False)
    encode = jax.jit(
        functools.partial(
            encode_latents,
            stage1.model,
            scale_factor=1.0,
            sample_posterior=config.latent.sample_posterior,
        )
    )
    rng = jax.random.fold_in(jax.random.key(config.seed), 3)
    latents = [
        np.asarray(encode(stage1.params, next(images)["image"], jax.random.fold_in(rng, i)))
        for i in range(-(-SCALE_ESTIMATE_IMAGES // batch))
    ]
    images.close()
    return float(1.0 / np.std(np.concatenate(latents)))


def with_scale_factor(
    config: ml_collections.ConfigDict, workdir: str, stage1: Stage1 | None, *, estimate: bool
) -> ml_collections.ConfigDict:
    """A copy of stage-2 `config` with `latent.scale_factor` set.

    Its own value if set, else the one saved in `workdir/config.json` (so a resumed run and
    `--mode=sample` use the value training used), else, with `estimate`, `estimate_scale_factor`
    of `stage1` (only used there).
    A set value that differs from the saved one is a ValueError.
    """
    saved = None
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f).get("latent", {}).get("scale_factor")
    value = config.latent.scale_factor
    if value is not None and saved is not None and value != saved:
        raise ValueError(
            f"config.latent.scale_factor={value!r} but the run in {workdir} was trained with "
            f"{saved!r}; leave it unset to use the saved value"
        )
    if value is None:
        value = saved
    if value is None:
        if not estimate:
            raise ValueError(
                f"config.latent.scale_factor is unset and {path} does not give it; train first"
            )
        value = estimate_scale_factor(config, stage1)
        print(f"Estimated config.latent.scale_factor={value:.6g} (latent std -> 1)", flush=True)
    config = config.copy_and_resolve_references()
    config.latent.scale_factor = float(value)
    return config


def make_reconstruction_grid(
    config: ml_collections.ConfigDict, model: nn.Module
) -> tuple[Callable[[Any], Array], int]:
    """Stage-1 grid: `fn(params) -> [2N, H, W, C]`, rows of held-out inputs each followed by the
    row of their reconstructions (posterior means), and the column count.

    The inputs are N images of the eval split (a fixed shuffle): the whole rows of
    ceil(sqrt(config.sample.num_samples)) columns that fit in config.sample.num_samples.
    """
    num = config.sample.num_samples
    cols = int(np.ceil(np.sqrt(num)))
    rows = max(num // cols, 1)
    source = data.create_dataset(
        config, config.data.eval_split, batch_size=rows * cols, seed=config.seed
    )
    inputs = jnp.asarray(next(source)["image"])
    source.close()

    @jax.jit
    def grid(params: Any, x: Array) -> Array:
        recon, _, _ = model.apply({"params": params}, x)
        pairs = jnp.stack([x, recon]).reshape(2, rows, cols, *x.shape[1:])
        return pairs.transpose(1, 0, 2, 3, 4, 5).reshape(2 * rows * cols, *x.shape[1:])

    return lambda params: grid(params, inputs), cols
