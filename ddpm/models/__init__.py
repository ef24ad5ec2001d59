"""Denoising networks. `create_model(config)` is the one place that maps a config to a module."""

import flax.linen as nn
import ml_collections

from ddpm.models.unet import UNet, unet_from_config

MODELS = {"unet": unet_from_config}

__all__ = ["MODELS", "UNet", "create_model", "null_label"]


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
