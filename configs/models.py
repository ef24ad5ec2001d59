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


# DiT (Peebles & Xie 2023, table 1): size -> (hidden_size, depth, num_heads).
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_PATCHES = (2, 4, 8)


def dit(size: str = "XL", patch: int = 2, **overrides) -> ml_collections.ConfigDict:
    """The DiT paper's DiT-{S,B,L,XL}/{2,4,8} (MLP ratio 4, no dropout); `overrides` set other
    `config.model` fields, e.g. num_classes=1000, learn_sigma=True as in the paper."""
    if size not in DIT_SIZES:
        raise ValueError(f"DiT size {size!r} is not one of {', '.join(DIT_SIZES)}")
    if patch not in DIT_PATCHES:
        raise ValueError(f"DiT patch size {patch!r} is not one of {DIT_PATCHES}")
    hidden, depth, heads = DIT_SIZES[size]
    return _model(
        name="dit",
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        dropout=0.0,
        **overrides,
    )


def mnist_dit() -> ml_collections.ConfigDict:
    """Class-conditional DiT for MNIST at 28x28x1 on a 2-core CPU: 4x4 patches (7x7 = 49
    tokens), width 128, 6 blocks of 4 heads; 1.8M parameters."""
    return _model(
        name="dit",
        patch_size=4,
        hidden_size=128,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        dropout=0.0,
        num_classes=10,
    )
