"""Denoising networks. `create_model(config, input_shape)` is the one place that maps a config
to a module."""

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
    "null_label",
]


def create_model(config: ml_collections.ConfigDict, input_shape: tuple[int, ...]) -> nn.Module:
    """`config.model.name`'s module for inputs of `input_shape` (one example, no batch axis),
    called as `model.apply(variables, x, t, labels=None, train=False, rngs={"dropout": key})`.

    The config is validated first by `ddpm.config.validation.validate` (the run layer, and
    `ddpm.build.model`, do that); the run layer also decides `input_shape` (the data's, or a
    latent shape: `ddpm.config.runs.input_shape`).
    """
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"model name {name!r} is not one of {', '.join(MODELS)}")
    return MODELS[name](config, tuple(input_shape))


def null_label(config: ml_collections.ConfigDict) -> int | dict | None:
    """The null condition of classifier-free guidance: fill values with the structure of the
    model's conditioning pytree (`ddpm.conditioning`). Class labels: the label index meaning
    "no class"; text: padding tokens (or an all-False mask), i.e. the learned null context;
    None if unconditional."""
    spec = context_spec(config)
    if spec is not None:
        return null_context(spec)
    return config.model.get("num_classes")


def init_inputs(
    config: ml_collections.ConfigDict, input_shape: tuple[int, ...]
) -> tuple[jax.Array | None, ...]:
    """Positional inputs (batch 1, zeros) of `model.init` for `create_model(config, shape)`.

    The autoencoder takes an image [1, H, W, C]; a denoiser takes (x [1, ...], t [1] int32,
    labels [1] int32, a text model's conditioning dict (`ddpm.models.context`), or None).
    """
    x = jnp.zeros((1, *input_shape), jnp.float32)
    if config.model.name == "autoencoder":
        return (x,)
    t = jnp.zeros((1,), jnp.int32)
    labels = None if config.model.num_classes is None else jnp.zeros((1,), jnp.int32)
    spec = context_spec(config)
    if spec is not None:
        labels = init_context(spec)
    return (x, t, labels)
