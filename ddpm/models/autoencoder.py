"""KL-autoencoder of latent diffusion (Rombach et al. 2022), stage 1: images <-> latents.

Encoder: a 3x3 input conv, per level `num_res_blocks` ResBlocks (self-attention after each at
the resolutions in `attention_resolutions`) and a stride-2 downsample (except the last level),
a middle ResBlock / attention / ResBlock, then GroupNorm, SiLU and a 3x3 conv to the mean and
log-variance of q(z | x), each [B, H/f, W/f, z_channels] with f = 2^(len(ch_mult)-1).
Decoder: the mirror image (`num_res_blocks + 1` ResBlocks per level, nearest-neighbour
upsampling). The blocks are the U-Net's (`ddpm.models.layers`) without a time embedding.
With `quant_conv` (Stable Diffusion's VAE), 1x1 convolutions map the moments after the
encoder and the latents before the decoder.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.typing import ArrayLike, DTypeLike

from ddpm.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    _conv,
    group_norm,
)

Array = jax.Array

# Log-variance clip of the LDM reference code: keeps exp(logvar) finite early in training.
LOGVAR_RANGE = (-30.0, 20.0)


def gaussian_kl(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent dimensions.

    KL = 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar).  mean, logvar: [B, ...]. Returns [B]
    float32.
    """
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


class _Coder(nn.Module):
    """Shared fields of the encoder and decoder (see `Autoencoder`)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    mid_attention: bool
    num_heads: int
    head_dim: int | None
    num_groups: int
    dropout: float
    dtype: DTypeLike
    param_dtype: DTypeLike

    def conv(self, features: int, name: str) -> nn.Conv:
        return _conv(features, self.dtype, self.param_dtype, name=name)

    def block(self, out_ch: int, name: str, train: bool) -> ResBlock:
        return ResBlock(
            out_ch,
            num_groups=self.num_groups,
            dropout=self.dropout,
            deterministic=not train,
            name=name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def attention(self, name: str) -> AttentionBlock:
        return AttentionBlock(
            self.num_heads,
            self.head_dim,
            self.num_groups,
            name=name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def middle(self, h: Array, train: bool) -> Array:
        h = self.block(h.shape[-1], "mid_res0", train)(h, None)
        if self.mid_attention:
            h = self.attention("mid_attn")(h)
        return self.block(h.shape[-1], "mid_res1", train)(h, None)

    def output(self, h: Array, features: int) -> Array:
        h = group_norm(self.num_groups, self.dtype, self.param_dtype)(h)
        return self.conv(features, "conv_out")(nn.silu(h))


class Encoder(_Coder):
    """x: [B, H, W, C] -> the moments (mean, log-variance) of q(z | x) stacked on the channel
    axis: [B, H/f, W/f, 2 * z_channels] float32."""

    z_channels: int = 4

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        levels = len(self.ch_mult)
        h = self.conv(self.ch, "conv_in")(x.astype(self.dtype))
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = self.block(self.ch * mult, f"down{level}_res{i}", train)(h, None)
                if h.shape[1] in self.attention_resolutions:
                    h = self.attention(f"down{level}_attn{i}")(h)
            if level != levels - 1:
                h = Downsample(
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"down{level}_resample"
                )(h)
        return self.output(self.middle(h, train), 2 * self.z_channels).astype(jnp.float32)


class Decoder(_Coder):
    """z: [B, H/f, W/f, z_channels] -> x: [B, H, W, out_channels] float32."""

    out_channels: int = 1

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        top = self.ch * self.ch_mult[-1]
        h = self.conv(top, "conv_in")(z.astype(self.dtype))
        h = self.middle(h, train)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = self.block(self.ch * self.ch_mult[level], f"up{level}_res{i}", train)(h, None)
                if h.shape[1] in self.attention_resolutions:
                    h = self.attention(f"up{level}_attn{i}")(h)
            if level != 0:
                h = Upsample(self.dtype, self.param_dtype, name=f"up{level}_resample")(h)
        return self.output(h, self.out_channels).astype(jnp.float32)


class Autoencoder(nn.Module):
    """KL-regularised autoencoder. Fields mirror `config.model` (the autoencoder family).

    `model.apply(v, x, noise)` reconstructs; `method="encode"` / `method="decode"` give the
    two halves (`model.apply(v, x, method="encode")`).
    """

    out_channels: int
    z_channels: int = 4
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = ()
    mid_attention: bool = True
    num_heads: int = 4
    head_dim: int | None = None
    num_groups: int = 32
    dropout: float = 0.0
    quant_conv: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        common = dict(
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=tuple(self.attention_resolutions),
            mid_attention=self.mid_attention,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_groups=self.num_groups,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(z_channels=self.z_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.quant_conv:  # LDM / Stable Diffusion: 1x1 maps of the moments and the latents
            conv = lambda features: nn.Conv(
                features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype
            )
            self.quant = conv(2 * self.z_channels)
            self.post_quant = conv(self.z_channels)

    def encode(self, x: ArrayLike, train: bool = False) -> tuple[Array, Array]:
        """x: [B, H, W, C] in [-1, 1] -> (mean, logvar): [B, H/f, W/f, z_channels] float32."""
        x = jnp.asarray(x)
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"autoencoder input of shape {x.shape}: expected [B, H, W, C] with H and W "
                f"divisible by 2^(len(ch_mult)-1)={factor}"
            )
        moments = self.encoder(x, train)
        if self.quant_conv:
            moments = self.quant(moments).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: ArrayLike, train: bool = False) -> Array:
        """z: [B, H/f, W/f, z_channels] -> reconstruction [B, H, W, C] float32."""
        z = jnp.asarray(z)
        if self.quant_conv:
            z = self.post_quant(z.astype(self.dtype))
        return self.decoder(z, train)

    def __call__(
        self, x: ArrayLike, noise: ArrayLike | None = None, train: bool = False
    ) -> tuple[Array, Array, Array]:
        """(reconstruction [B, H, W, C], mean, logvar) with z = mean + exp(logvar / 2) * noise.

        noise: [B, H/f, W/f, z_channels] standard normal draws, or None to decode the mean.
        `train=True` enables dropout and then needs `rngs={"dropout": key}`.
        """
        mean, logvar = self.encode(x, train)
        z = mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise
        return self.decode(z, train), mean, logvar


def autoencoder_from_config(
    config: ml_collections.ConfigDict, input_shape: tuple[int, ...]
) -> Autoencoder:
    """The autoencoder of `config.model` (validated by `ddpm.config.validation`) for images of
    `input_shape` = (H, W, C)."""
    m = config.model
    return Autoencoder(
        out_channels=input_shape[-1],
        z_channels=m.z_channels,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        mid_attention=m.mid_attention,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        num_groups=m.num_groups,
        dropout=m.dropout,
        quant_conv=m.quant_conv,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
    )
