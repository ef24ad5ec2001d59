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
from jax import lax
from jax.typing import ArrayLike, DTypeLike

Array = jax.Array

# DDPM's `default_init(1.0)`: variance scaling over fan_avg with a uniform distribution.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def timestep_embedding(t: ArrayLike, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, transformer-style.

    With h = dim // 2 frequencies f_i = max_period^(-i / h), i = 0..h-1:
        emb(t) = [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})]
    and a trailing zero column when `dim` is odd.

    t: [B] int or float. Returns [B, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def chunked_kernel_grad_conv(lhs: Array, rhs: Array, *args, examples: int, **kwargs) -> Array:
    """`lax.conv_general_dilated` whose kernel gradient is a sum over batch chunks of
    `examples` examples (the input gradient and the forward pass are unchanged).

    XLA:CPU computes the kernel gradient of a convolution as one convolution over the whole
    batch, after relaying out both operands, and that slows down sharply with batch size: the
    gradient of a 3x3, 16-channel kernel on [64, 32, 32, 16] takes 11-13 ms as one convolution
    and 3.3-3.6 ms as eight 8-example ones (bench/README.md). The result is the same up to
    float summation order. Chunk i holds examples i, i + n, i + 2n, ... (n = B / examples),
    so a batch sharded over the mesh's data axis splits into local chunks when the device
    count divides `examples` (but each chunk's gradient is then all-reduced on its own: 264
    all-reduces instead of 154 in the 4-device MNIST step; the option is meant for one CPU
    device). Batches of at most `examples`, or not divisible by it, use the plain
    convolution.

    lhs: [B, ...] with the batch on axis 0 (flax's NHWC / NLC), rhs: the kernel; `args` and
    `kwargs` as for `lax.conv_general_dilated`. Returns the convolution's output.
    """

    def conv(lhs: Array, rhs: Array) -> Array:
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

    batch = lhs.shape[0]
    if batch <= examples or batch % examples:
        return conv(lhs, rhs)
    chunks = batch // examples

    def kernel_grad(lhs_chunk: Array, grad_chunk: Array, rhs: Array) -> Array:
        return jax.vjp(lambda kernel: conv(lhs_chunk, kernel), rhs)[1](grad_chunk)[0]

    @jax.custom_vjp
    def convolve(lhs: Array, rhs: Array) -> Array:
        return conv(lhs, rhs)

    def forward(lhs: Array, rhs: Array) -> tuple[Array, tuple[Array, Array]]:
        return conv(lhs, rhs), (lhs, rhs)

    def backward(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
        lhs, rhs = residuals
        d_lhs = jax.vjp(lambda x: conv(x, rhs), lhs)[1](grad)[0]
        lhs_chunks = lhs.reshape(examples, chunks, *lhs.shape[1:])
        grad_chunks = grad.reshape(examples, chunks, *grad.shape[1:])
        d_rhs = sum(kernel_grad(lhs_chunks[:, i], grad_chunks[:, i], rhs) for i in range(chunks))
        return d_lhs, d_rhs

    convolve.defvjp(forward, backward)
    return convolve(lhs, rhs)


def _group_sums(s: Array, groups: int) -> Array:
    """[B, C] -> [B, C]: each entry replaced by the sum over its group of C / groups channels."""
    b, c = s.shape
    sums = s.reshape(b, groups, c // groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(sums, (b, groups, c // groups)).reshape(b, c)


def _group_reduction(x: Array, groups: int) -> tuple[tuple[int, ...], int]:
    """(spatial axes of x: [B, *spatial, C], number of elements in each group)."""
    return tuple(range(1, x.ndim - 1)), math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)


def _group_norm_forward(
    x: Array, scale: Array, bias: Array, groups: int, epsilon: float
) -> tuple[Array, tuple[Array, ...]]:
    """Statistics from one pass (sum and sum of squares per example and channel, float32)."""
    axes, count = _group_reduction(x, groups)
    x32 = x.astype(jnp.float32)
    mean = _group_sums(jnp.sum(x32, axes), groups) / count
    var = jnp.maximum(_group_sums(jnp.sum(x32 * x32, axes), groups) / count - mean * mean, 0.0)
    shape = (x.shape[0],) + (1,) * len(axes) + (x.shape[-1],)
    mean, inv = mean.reshape(shape), lax.rsqrt(var + epsilon).reshape(shape)
    y = (x32 - mean) * (inv * scale) + bias
    return y.astype(x.dtype), (x, scale, mean, inv)


def _group_norm_backward(
    groups: int, epsilon: float, residuals: tuple[Array, ...], dy: Array
) -> tuple[Array, Array, Array]:
    """With x_hat = (x - mean) * inv and g = dy * scale, per example and group:
    dx = inv * (g - mean(g) - x_hat * mean(g * x_hat)); d_scale = sum(dy * x_hat),
    d_bias = sum(dy). All from two per-(example, channel) sums over the spatial axes."""
    del epsilon
    x, scale, mean, inv = residuals
    axes, count = _group_reduction(x, groups)
    x_hat = (x.astype(jnp.float32) - mean) * inv
    dy = dy.astype(jnp.float32)
    sum_dy, sum_dy_xhat = jnp.sum(dy, axes), jnp.sum(dy * x_hat, axes)  # [B, C] each
    mean_g = (_group_sums(sum_dy * scale, groups) / count).reshape(mean.shape)
    mean_gx = (_group_sums(sum_dy_xhat * scale, groups) / count).reshape(mean.shape)
    dx = inv * (dy * scale - mean_g - x_hat * mean_gx)
    return dx.astype(x.dtype), jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, groups: int, epsilon: float) -> Array:
    """Group normalisation over the spatial axes and C / `groups` channels of each group.

    Equal to `flax.linen.GroupNorm` (same statistics: float32 mean and E[x^2] - mean^2), with
    a hand-written gradient: two fused passes forward and two backward, where autodiff of the
    flax module takes several more reductions and elementwise passes. On the 2-core CPU the
    MNIST U-Net's loss gradient is 9-16 % faster with it (bench/README.md). A custom_vjp
    has no forward mode: `jax.jvp` through it raises. The same derivative as a custom_jvp
    rule (whose transpose JAX derives) supports both modes but measured no faster than
    flax's GroupNorm, so reverse mode won.

    x: [B, *spatial, C] any float dtype, scale/bias: [C] float32. Returns x's shape and dtype.
    """
    return _group_norm_forward(x, scale, bias, groups, epsilon)[0]


group_norm.defvjp(_group_norm_forward, _group_norm_backward)  # fwd takes the primal's arguments


class GroupNorm(nn.Module):
    """`group_norm` with learned scale (ones) and bias (zeros): the parameters, their names
    and the output of `flax.linen.GroupNorm(num_groups, epsilon)`, so checkpoints carry over.

    x: [B, *spatial, C]. Returns [B, *spatial, C] in `dtype` (default: x's dtype).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {self.num_groups} groups do not divide {channels} channels"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        y = group_norm(
            x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.num_groups, self.epsilon
        )
        return y.astype(self.dtype or x.dtype)


def _conv(
    features: int,
    dtype: DTypeLike,
    param_dtype: DTypeLike,
    rank: int = 2,
    conv_grad_chunk: int = 0,
    **kw,
) -> nn.Conv:
    """3x3 'SAME' convolution, 3 wide over each of `rank` spatial axes (unless
    `kernel_size`/`strides` are overridden in `kw`). `conv_grad_chunk` > 0 computes the
    kernel gradient in chunks of that many examples (`chunked_kernel_grad_conv`)."""
    kw.setdefault("kernel_size", (3,) * rank)
    kw.setdefault("kernel_init", default_init)
    if conv_grad_chunk:
        kw["conv_general_dilated"] = functools.partial(
            chunked_kernel_grad_conv, examples=conv_grad_chunk
        )
    return nn.Conv(features, padding="SAME", dtype=dtype, param_dtype=param_dtype, **kw)


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
    `conv_grad_chunk`: see `chunked_kernel_grad_conv` (0 = off)."""

    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    conv_grad_chunk: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        rank = _rank(x)
        conv = _conv(
            x.shape[-1], self.dtype, self.param_dtype, rank, self.conv_grad_chunk,
            strides=(2,) * rank,
        )  # fmt: skip
        return conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour) then a 3x3 convolution. [B, H, W, C] -> [B, 2H, 2W, C].
    `conv_grad_chunk`: see `chunked_kernel_grad_conv` (0 = off)."""

    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    conv_grad_chunk: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = _conv(x.shape[-1], self.dtype, self.param_dtype, _rank(x), self.conv_grad_chunk)
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
    in `dtype`. `conv_grad_chunk`: see `chunked_kernel_grad_conv` (0 = off).
    """

    out_ch: int
    num_groups: int = 32
    dropout: float = 0.0
    scale_shift_norm: bool = False
    resample: str | None = None  # None | "down" | "up"
    deterministic: bool = True  # no dropout (evaluation)
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    conv_grad_chunk: int = 0

    def _norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: Array, emb: Array | None) -> Array:
        h = nn.silu(self._norm("norm1")(x))
        if self.resample == "down":
            h, x = _downsample_avg(h), _downsample_avg(x)
        elif self.resample == "up":
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        rank = _rank(x)
        conv = functools.partial(
            _conv, self.out_ch, self.dtype, self.param_dtype, rank, self.conv_grad_chunk
        )
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
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        heads = c // self.head_dim if self.head_dim else self.num_heads
        dense = lambda feats, name: nn.Dense(
            feats,
            kernel_init=default_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        y = GroupNorm(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)(x)
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

    x: [B, T, C], context: [B, L, D], mask: [B, L] bool (at least one True per row).
    Returns [B, T, C] in `dtype`.
    """

    num_heads: int = 1
    kernel_init: nn.initializers.Initializer = default_init
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array) -> Array:
        b, t, c = x.shape
        heads = self.num_heads
        dense = lambda feats, name: nn.Dense(
            feats,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        q = dense(c, "q")(x).reshape(b, t, heads, c // heads)
        kv = dense(2 * c, "kv")(context.astype(self.dtype))
        k, v = jnp.split(kv.reshape(b, context.shape[1], 2, heads, c // heads), 2, axis=2)
        y = jax.nn.dot_product_attention(q, k[:, :, 0], v[:, :, 0], mask=mask[:, None, None, :])
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
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        heads = c // self.head_dim if self.head_dim else self.num_heads
        y = GroupNorm(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        y = CrossAttention(heads, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
            y.reshape(b, -1, c), context, mask
        )
        return x + y.reshape(x.shape)
