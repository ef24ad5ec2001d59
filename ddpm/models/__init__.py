"""Denoising networks. `create_model(config)` is the one place that maps a config to a module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddpm.models.autoencoder import Autoencoder, autoencoder_from_config
from ddpm.models.context import context_spec, init_context, null_context
from ddpm.models.dit import DiT, dit_from_config
from ddpm.models.unet import UNet, unet_from_config

MODELS = {"unet": unet_from_config, "dit": dit_from_config, "autoencoder": autoencoder_from_config}

__all__ = [
    "MODELS",
    "Autoencoder",
    "DiT",
    "UNet",
    "create_model",
    "init_inputs",
    "input_shape",
    "null_label",
]


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Validate the full `config` (model section plus `config.data.channels/image_size`) and
    build `config.model.name`'s module, called as
    `model.apply(variables, x, t, labels=None, train=False, rngs={"dropout": key})`.
    """
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not one of {', '.join(MODELS)}")
    return MODELS[name](config)


def null_label(config: ml_collections.ConfigDict) -> int | dict | None:
    """The null condition of classifier-free guidance: fill values with the structure of the
    model's conditioning pytree (`ddpm.conditioning`). Class labels: the label index meaning
    "no class"; text: padding tokens (or an all-False mask), i.e. the learned null context;
    None if unconditional."""
    spec = context_spec(config)
    if spec is not None:
        return null_context(spec)
    return config.model.num_classes


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one example as the denoising network sees it (no batch axis): (H, W, C).

    Every shape the run layer builds (init, sample grids, samplers) comes from here, so a model
    family whose input is not `config.data`'s image (latents, 1-D signals) changes only this.
    Latent diffusion (`config.latent.autoencoder_workdir` set): the stage-1 autoencoder's
    latents, (H/f, W/f, z) with f = `config.latent.factor`, z = `config.latent.z_channels`.
    1-D signals (`config.data.length` set): (L, C).
    """
    if config.data.length is not None:
        return (config.data.length, config.data.channels)
    size = config.data.image_size
    if config.latent.autoencoder_workdir is not None:
        f = config.latent.factor
        return (size // f, size // f, config.latent.z_channels)
    return (size, size, config.data.channels)


def init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array | None, ...]:
    """Positional inputs (batch 1, zeros) of `model.init` for `create_model(config)`'s module.

    The autoencoder takes an image [1, H, W, C]; a denoiser takes (x [1, ...], t [1] int32,
    labels [1] int32, a text model's conditioning dict (`ddpm.models.context`), or None).
    """
    x = jnp.zeros((1, *input_shape(config)), jnp.float32)
    if config.model.name == "autoencoder":
        return (x,)
    t = jnp.zeros((1,), jnp.int32)
    labels = None if config.model.num_classes is None else jnp.zeros((1,), jnp.int32)
    spec = context_spec(config)
    if spec is not None:
        labels = init_context(spec)
    return (x, t, labels)
