"""Building blocks of the U-Net: timestep embedding, ResBlock, self-attention, resampling.

Every module computes in `dtype` (e.g. bfloat16) and keeps its parameters in `param_dtype`
(float32). Images are NHWC; every block also takes 1-D signals [B, L, C] (any number of
spatial axes: convolutions, resampling and attention take it from the input's rank).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

Array = jax.Array

# DDPM's `default_init(1.0)`: variance scaling over fan_avg with a uniform distribution.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


TIME_EMBED_ORDERS = ("cos_sin", "sin_cos")


def timestep_embedding(
    t: ArrayLike,
    dim: int,
    max_period: float = 10000.0,
    *,
    order: str = "cos_sin",
    freq_shift: float = 0.0,
) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, transformer-style.

    With h = dim // 2 frequencies f_i = max_period^(-i / (h - freq_shift)), i = 0..h-1:
        emb(t) = [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})]
    (`order="sin_cos"`: the sines first, as the original DDPM code and diffusers'
    `flip_sin_to_cos=False`; `freq_shift` is diffusers' `downscale_freq_shift`) and a
    trailing zero column when `dim` is odd.

    t: [B] int or float. Returns [B, dim] float32.
    """
    if order not in TIME_EMBED_ORDERS:
        raise ValueError(f"order={order!r} is not one of {', '.join(TIME_EMBED_ORDERS)}")
    half = dim // 2
    steps = jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    freqs = jnp.exp(-math.log(max_period) * steps)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    pair = [jnp.cos(args), jnp.sin(args)]
    emb = jnp.concatenate(pair if order == "cos_sin" else pair[::-1], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GuidanceEmbed(nn.Module):
    """The guidance scale s of a guidance-distilled denoiser (Meng et al., 2023) as a vector
    added to its time embedding: Dense(silu(Dense(sin-cos(s)))), the last layer zero-initialised
    so that a network grafted from an undistilled one starts out computing its conditional
    output whatever s is.

    s: [B] float, or None: s = 1 (the conditional prediction) for all `batch` rows.
    Returns [batch, dim] in `dtype`.
    """

    dim: int
    freqs: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, s: ArrayLike | None, batch: int) -> Array:
        s = jnp.ones((batch,), jnp.float32) if s is None else s
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = timestep_embedding(s, 2 * self.freqs).astype(self.dtype)
        emb = nn.Dense(self.dim, kernel_init=default_init, name="dense1", **common)(emb)
        zeros = nn.initializers.zeros
        return nn.Dense(self.dim, kernel_init=zeros, name="dense2", **common)(nn.silu(emb))


def group_norm(
    num_groups: int, dtype: DTypeLike, param_dtype: DTypeLike, epsilon: float = 1e-6, **kw
) -> nn.GroupNorm:
    """flax's GroupNorm computing in `dtype` with parameters in `param_dtype`."""
    return nn.GroupNorm(num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, **kw)


def _conv(features: int, dtype: DTypeLike, param_dtype: DTypeLike, rank: int = 2, **kw) -> nn.Conv:
    """3x3 'SAME' convolution, 3 wide over each of `rank` spatial axes (unless
    `kernel_size`/`strides`/`padding` are overridden in `kw`)."""
    kw.setdefault("kernel_size", (3,) * rank)
    kw.setdefault("kernel_init", default_init)
    kw.setdefault("padding", "SAME")
    return nn.Conv(features, dtype=dtype, param_dtype=param_dtype, **kw)


def _heads(channels: int, num_heads: int, head_dim: int | None) -> int:
    """Attention heads over `channels`: channels // head_dim when head_dim is set, else
    num_heads."""
    return channels // head_dim if head_dim else num_heads


def _rank(x: Array) -> int:
    """Number of spatial axes of x: [B, *spatial, C]."""
    return x.ndim - 2


def _upsample_nearest(x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] (or [B, L, C] -> [B, 2L, C]), nearest neighbour."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x


def _downsample_avg(x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C] (or [B, L/2, C]), 2x2 (2) average pooling."""
    window = (2,) * _rank(x)
    return nn.avg_pool(x, window, strides=window)


class Downsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 convolution. x: [B, H, W, C] -> [B, H/2, W/2, C].

    `padding` 0 pads one row and column after the input ('SAME' on even sizes, as DDPM and
    diffusers' `downsample_padding=0`), 1 pads one on every side (diffusers' default).
    """

    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    padding: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        rank = _rank(x)
        pad = "SAME" if self.padding == 0 else ((self.padding, self.padding),) * rank
        return _conv(
            x.shape[-1], self.dtype, self.param_dtype, rank, strides=(2,) * rank, padding=pad
        )(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour) then a 3x3 convolution. [B, H, W, C] -> [B, 2H, 2W, C]."""

    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = _conv(x.shape[-1], self.dtype, self.param_dtype, _rank(x))
        return conv(_upsample_nearest(x))


class ResBlock(nn.Module):
    """Residual block conditioned on the time(+label) embedding.

    h = conv(act(norm(x)));  h = h + dense(act(emb))  (or, with `scale_shift_norm`,
    h = norm(h) * (1 + scale) + shift);  h = conv(dropout(act(norm(h))));  out = skip(x) + h,
    where skip is a 1x1 convolution when the channel count changes. With `resample` = "down"
    or "up" the block also halves or doubles H and W (BigGAN style: both branches are
    resampled after the first norm/activation).

    x: [B, H, W, C_in], emb: [B, E], or None for an unconditioned block (the autoencoder's):
    then h = conv(dropout(act(norm(h)))) with no embedding term. Returns [B, H', W', out_ch]
    in `dtype`.
    """

    out_ch: int
    num_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    scale_shift_norm: bool = False
    resample: str | None = None  # None | "down" | "up"
    deterministic: bool = True  # no dropout (evaluation)
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def _norm(self, name: str) -> nn.GroupNorm:
        return group_norm(self.num_groups, self.dtype, self.param_dtype, self.norm_eps, name=name)

    @nn.compact
    def __call__(self, x: Array, emb: Array | None) -> Array:
        h = nn.silu(self._norm("norm1")(x))
        if self.resample == "down":
            h, x = _downsample_avg(h), _downsample_avg(x)
        elif self.resample == "up":
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        rank = _rank(x)
        conv = functools.partial(_conv, self.out_ch, self.dtype, self.param_dtype, rank)
        h = conv(name="conv1")(h)

        if emb is None:
            h = self._norm("norm2")(h)
        else:
            emb_dim = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
            emb_out = nn.Dense(
                emb_dim,
                kernel_init=default_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="emb_proj",
            )(nn.silu(emb)).reshape((-1,) + (1,) * rank + (emb_dim,))
            if self.scale_shift_norm:
                scale, shift = jnp.split(emb_out, 2, axis=-1)
                h = self._norm("norm2")(h) * (1 + scale) + shift
            else:
                h = self._norm("norm2")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv(name="conv2")(h)

        if x.shape[-1] != self.out_ch:
            x = conv(kernel_size=(1,) * rank, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W (or L) positions, with a residual connection.

    out = x + proj(attention(q, k, v)),  q, k, v = dense(norm(x)), via
    `jax.nn.dot_product_attention` (a fused kernel where the backend has one).
    Heads: `num_heads`, or C // `head_dim` when `head_dim` is set.

    x: [B, H, W, C] or [B, L, C]. Returns x's shape in `dtype`.
    """

    num_heads: int = 1
    head_dim: int | None = None
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        heads = _heads(c, self.num_heads, self.head_dim)
        dense = lambda feats, name: nn.Dense(
            feats,
            kernel_init=default_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        y = group_norm(self.num_groups, self.dtype, self.param_dtype, self.norm_eps)(x)
        qkv = dense(3 * c, "qkv")(y.reshape(b, -1, c))
        q, k, v = jnp.split(qkv.reshape(b, -1, 3, heads, c // heads), 3, axis=2)
        y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # [B, T, N, D]
        y = dense(c, "proj")(y.reshape(b, -1, c))
        return x + y.reshape(x.shape)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x onto a context sequence (no norm, no residual).

    out = proj(attention(q = dense(x), k = dense(context), v = dense(context))) with masked
    context positions excluded from the softmax (their values have no effect), via
    `jax.nn.dot_product_attention`.

    x: [B, T, C], context: [B, L, D], mask: [B, L] bool (at least one True per row; None:
    all). Returns [B, T, C] in `dtype`.
    """

    num_heads: int = 1
    kernel_init: nn.initializers.Initializer = default_init
    causal: bool = False  # position i of x also attends only to context positions <= i
    qkv_bias: bool = True  # False: bias-free q, k, v projections (Stable Diffusion's)
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
        b, t, c = x.shape
        heads = self.num_heads
        dense = lambda feats, name, bias=True: nn.Dense(
            feats,
            use_bias=bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if mask is None:
            mask = jnp.ones(context.shape[:2], bool)
        q = dense(c, "q", self.qkv_bias)(x).reshape(b, t, heads, c // heads)
        kv = dense(2 * c, "kv", self.qkv_bias)(context.astype(self.dtype))
        k, v = jnp.split(kv.reshape(b, context.shape[1], 2, heads, c // heads), 2, axis=2)
        y = jax.nn.dot_product_attention(
            q, k[:, :, 0], v[:, :, 0], mask=mask[:, None, None, :], is_causal=self.causal
        )
        return dense(c, "proj")(y.reshape(b, t, c))


class CrossAttentionBlock(nn.Module):
    """Cross-attention of the H*W positions onto a context, with a residual connection:
    out = x + CrossAttention(norm(x), context, mask).  Heads as in `AttentionBlock`.

    x: [B, H, W, C] (or [B, L, C]), context: [B, L', D], mask: [B, L'] bool. Returns x's
    shape in `dtype`.
    """

    num_heads: int = 1
    head_dim: int | None = None
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        heads = _heads(c, self.num_heads, self.head_dim)
        y = group_norm(self.num_groups, self.dtype, self.param_dtype, self.norm_eps)(x)
        y = CrossAttention(heads, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
            y.reshape(b, -1, c), context, mask
        )
        return x + y.reshape(x.shape)


class SpatialTransformer(nn.Module):
    """Stable Diffusion's attention block (diffusers' `Transformer2DModel`): GroupNorm (eps
    1e-6), a dense projection in (SD 1.x's 1x1 convolution is the same map), `depth`
    transformer blocks over the H*W positions, a projection out, plus the input:

        h = h + attn1(LN(h), LN(h))           self-attention, bias-free q/k/v
        h = h + attn2(LN(h), context, mask)   cross-attention onto the text
        h = h + ff_out(a * gelu(g)),  (a, g) = split(ff_in(LN(h)))   GEGLU, 4x wide

    Heads: `num_heads`, or C // `head_dim` when `head_dim` is set. x: [B, H, W, C] (or
    [B, L, C]), context: [B, L', D], mask: [B, L'] bool. Returns x's shape in `dtype`.
    """

    num_heads: int = 8
    head_dim: int | None = None
    num_groups: int = 32
    depth: int = 1
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        heads = _heads(c, self.num_heads, self.head_dim)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda feats, name: nn.Dense(feats, kernel_init=default_init, name=name, **common)
        attention = lambda name: CrossAttention(heads, qkv_bias=False, name=name, **common)
        layer_norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **common)

        h = group_norm(self.num_groups, self.dtype, self.param_dtype, 1e-6, name="norm")(x)
        h = dense(c, "proj_in")(h.reshape(b, -1, c))
        for j in range(self.depth):
            y = layer_norm(f"block{j}_norm1")(h)
            h = h + attention(f"block{j}_attn1")(y, y)
            h = h + attention(f"block{j}_attn2")(layer_norm(f"block{j}_norm2")(h), context, mask)
            y = dense(8 * c, f"block{j}_ff_in")(layer_norm(f"block{j}_norm3")(h))
            a, g = jnp.split(y, 2, axis=-1)
            h = h + dense(c, f"block{j}_ff_out")(a * nn.gelu(g, approximate=False))
        return x + dense(c, "proj_out")(h).reshape(x.shape)
