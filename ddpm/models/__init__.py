"""Denoising networks. `create_model(config)` is the one place that maps a config to a module."""

import flax.linen as nn
import ml_collections

from ddpm.models.unet import UNet, unet_from_config

MODELS = {"unet": unet_from_config}

__all__ = ["MODELS", "UNet", "create_model", "input_shape", "null_label"]


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Validate the full `config` (model section plus `config.data.channels/image_size`) and
    build `config.model.name`'s module, called as
    `model.apply(variables, x, t, labels=None, train=False, rngs={"dropout": key})`.
    """
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not one of {', '.join(MODELS)}")
    return MODELS[name](config)


def null_label(config: ml_collections.ConfigDict) -> int | None:
    """The label index meaning "no class" (classifier-free guidance), or None if unconditional."""
    return config.model.num_classes


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one example as the denoising network sees it (no batch axis): (H, W, C).

    Every shape the run layer builds (init, sample grids, samplers) comes from here, so a model
    family whose input is not `config.data`'s image (latents, 1-D signals) changes only this.
    """
    size = config.data.image_size
    return (size, size, config.data.channels)
