"""Model sub-configs (`config.model`): use as `config.model = models.ddpm_cifar10()`.

Each returns a complete `config.model` ConfigDict: the defaults of `configs/default.py`
with the overrides of that model.
"""

import ml_collections

from configs import default


def _model(**overrides) -> ml_collections.ConfigDict:
    model = default.get_config().model
    model.update(overrides)
    return model


def ddpm_cifar10() -> ml_collections.ConfigDict:
    """The DDPM paper's CIFAR-10 model (35.7M parameters at 32x32x3, unconditional)."""
    return _model(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        num_groups=32,
    )


def unet64() -> ml_collections.ConfigDict:
    """64x64 images: levels 64->32->16->8 with 64/128/256/512 channels, attention at 16 and 8."""
    return _model(
        ch=64,
        ch_mult=(1, 2, 4, 8),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        num_heads=4,
        dropout=0.1,
        num_groups=32,
    )


def mnist_small() -> ml_collections.ConfigDict:
    """Class-conditional MNIST at 28x28x1 on a 2-core CPU: 16/32/64 channels (28 -> 14 -> 7),
    one ResBlock per level, attention only in the 7x7 middle block; 0.64M parameters."""
    return _model(
        ch=16,
        ch_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(),
        num_heads=4,
        dropout=0.0,
        num_classes=10,
        num_groups=8,
    )
