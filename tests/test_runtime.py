"""The runtime's CPU kernels against autodiff of a second implementation (`group_norm` swapped
into `flax.linen.GroupNorm` against flax's own, `chunked_kernel_grad_conv` against
`lax.conv_general_dilated`), and how `config.runtime` resolves per platform."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddpm import runtime
from ddpm.config import schema
from ddpm.runtime import chunked_kernel_grad_conv, group_norm

FAST_GROUP_NORM = runtime.Runtime(fast_group_norm=True)


def _weighted_sum_grads(apply, variables, x, weights):
    """Gradients of sum(sin(apply(variables, x)) * weights) with respect to variables and x."""
    loss = lambda v, x: jnp.sum(jnp.sin(apply(v, x).astype(jnp.float32)) * weights)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)


@pytest.mark.parametrize(
    "shape,groups,dtype",
    [
        ((4, 7, 7, 32), 8, jnp.float32),  # the MNIST U-Net's 7x7 level
        ((3, 16, 12), 4, jnp.float32),  # a 1-D signal [B, L, C]
        ((2, 8, 8, 16), 16, jnp.float32),  # one channel per group (instance norm)
        ((2, 8, 8, 16), 4, jnp.bfloat16),  # bfloat16 compute, float32 statistics
    ],
)
def test_group_norm_matches_flax_output_and_gradients(shape, groups, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    # Off-centre input (mean 1, std 3) and non-trivial scale/bias exercise every term.
    x = (jax.random.normal(keys[0], shape) * 3 + 1).astype(dtype)
    flax_norm = nn.GroupNorm(groups, dtype=dtype)
    ours = runtime.wrap(flax_norm.apply, FAST_GROUP_NORM)  # the same module, our kernel
    variables = flax_norm.init(keys[1], x)
    variables = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(keys[2], p.shape), variables)
    assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(variables, x))
    weights = jax.random.normal(keys[3], shape)

    y_ours, y_flax = ours(variables, x), flax_norm.apply(variables, x)
    assert y_ours.dtype == y_flax.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    scale = float(jnp.max(jnp.abs(y_flax.astype(jnp.float32))))
    np.testing.assert_allclose(
        y_ours.astype(np.float32), y_flax.astype(np.float32), atol=tol * scale
    )

    (dv_ours, dx_ours), (dv_flax, dx_flax) = (
        _weighted_sum_grads(f, variables, x, weights) for f in (ours, flax_norm.apply)
    )
    for a, b in zip(
        jax.tree.leaves((dv_ours, dx_ours)), jax.tree.leaves((dv_flax, dx_flax)), strict=True
    ):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), np.max(np.abs(a - b))


def test_group_norm_normalises_each_group():
    """Closed form: with scale 1 and bias 0 every (example, group) has mean 0 and variance
    var / (var + eps)."""
    x = jax.random.normal(jax.random.key(1), (3, 5, 5, 12)) * 2 - 4
    y = group_norm(x, jnp.ones(12), jnp.zeros(12), 3, 1e-6)
    groups = np.asarray(y).reshape(3, 25, 3, 4).transpose(0, 2, 1, 3).reshape(3, 3, -1)
    var_x = np.asarray(x).reshape(3, 25, 3, 4).transpose(0, 2, 1, 3).reshape(3, 3, -1).var(-1)
    np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.var(-1), var_x / (var_x + 1e-6), rtol=1e-4)


def _conv_kwargs(strides, kernel):
    rank = len(kernel)
    return dict(
        window_strides=strides,
        padding="SAME",
        dimension_numbers=lax.conv_dimension_numbers(
            (1,) * (rank + 2),
            kernel + (1, 1),
            ("NHWC", "HWIO", "NHWC") if rank == 2 else ("NHC", "HIO", "NHC"),
        ),
    )


@pytest.mark.parametrize(
    "batch,spatial,kernel,strides,examples,chunks",
    [
        (16, (8, 8), (3, 3), (1, 1), 4, 4),
        (12, (8, 8), (3, 3), (2, 2), 4, 3),  # the strided downsampling convolution
        (8, (6, 6), (1, 1), (1, 1), 2, 4),  # the ResBlock's 1x1 skip
        (8, (10,), (3,), (1,), 4, 2),  # 1-D signals
        (10, (8, 8), (3, 3), (1, 1), 4, 1),  # 4 does not divide 10: one convolution
        (4, (8, 8), (3, 3), (1, 1), 4, 1),  # a batch of one chunk: one convolution
    ],
)
def test_chunked_kernel_grad_equals_one_convolution(
    batch, spatial, kernel, strides, examples, chunks
):
    keys = jax.random.split(jax.random.key(2), 3)
    lhs = jax.random.normal(keys[0], (batch, *spatial, 5))
    rhs = jax.random.normal(keys[1], (*kernel, 5, 6)) * 0.3
    kw = _conv_kwargs(strides, kernel)
    plain = lambda x, k: lax.conv_general_dilated(x, k, **kw)
    chunked = functools.partial(chunked_kernel_grad_conv, examples=examples, **kw)
    out_shape = jax.eval_shape(plain, lhs, rhs).shape
    weights = jax.random.normal(keys[2], out_shape)
    grads = {}
    for name, conv in (("plain", plain), ("chunked", chunked)):
        loss = lambda x, k, conv=conv: jnp.sum(jnp.tanh(conv(x, k)) * weights)
        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs, rhs)
        np.testing.assert_allclose(conv(lhs, rhs), plain(lhs, rhs), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads["chunked"], grads["plain"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    # Power: the kernel gradient really is `chunks` convolutions. Each `jax.vjp` in the rule
    # traces its forward convolution too (XLA drops the unused ones): the forward, 2 for the
    # input gradient and 2 per chunk; autodiff of the plain convolution has 2.
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(chunked(x, k)), argnums=1))(lhs, rhs)
    expected = 3 + 2 * chunks if chunks > 1 else 2
    assert str(jaxpr).count("conv_general_dilated[") == expected


XLA = "xla"
NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "platform,devices,avx512,overrides,expected",
    [
        ("cpu", 1, False, {}, runtime.Runtime(16, True, "rbg")),
        ("cpu", 4, False, {}, runtime.Runtime(0, True, "rbg")),  # no per-chunk all-reduces
        ("cpu", 1, True, {}, runtime.Runtime(0, True, "rbg", cpu_kernels=XLA)),
        ("cpu", 1, True, {"cpu_kernels": "ynnpack"}, runtime.Runtime(16, True, "rbg")),
        ("cpu", 1, False, {"cpu_kernels": XLA}, runtime.Runtime(0, True, "rbg", cpu_kernels=XLA)),
        ("gpu", 1, True, {}, runtime.Runtime(0, False, "threefry")),
        ("tpu", 8, False, {}, runtime.Runtime(0, False, "threefry")),
        (
            "cpu",
            1,
            False,
            {"conv_grad_chunk": 0, "group_norm": "flax", "init_key": "threefry"},
            runtime.Runtime(0, False, "threefry"),
        ),
        ("gpu", 1, False, {"conv_grad_chunk": 8, "group_norm": "fast"}, runtime.Runtime(8, True)),
        ("gpu", 1, False, {"async_checkpoint": False}, runtime.Runtime(async_checkpoint=False)),
    ],
)
def test_runtime_resolves_by_platform(platform, devices, avx512, overrides, expected):
    section = schema.get_config().runtime
    section.update(overrides)
    assert runtime.resolve(section, platform, devices, avx512) == expected


def test_xla_kernels_compile_without_ynnpack_and_agree():
    """cpu_kernels="xla": a compiled convolution gradient has no YNNPACK fusion (the default
    has them on an x86 CPU) and the same values as the default's; `runtime.jit` nests."""
    lhs = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
    rhs = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) / 17

    def loss(x, k):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)
        return jnp.sum(jnp.tanh(y) ** 2)

    grads = {}
    for kernels in ("ynnpack", XLA):
        options = runtime.Runtime(cpu_kernels=kernels).compiler_options
        fn = runtime.jit(jax.grad(loss, argnums=(0, 1)), options)
        text = fn.lower(lhs, rhs).compile().as_text()
        assert ("__ynn_fusion" in text) == (kernels == "ynnpack"), kernels
        grads[kernels] = fn(lhs, rhs)
        # Inside a user's jit (where JAX refuses compiler options) it is the plain jit.
        nested = jax.jit(lambda x, k, fn=fn: fn(x, k))
        assert "__ynn_fusion" in nested.lower(lhs, rhs).compile().as_text()
    for a, b in zip(grads[XLA], grads["ynnpack"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_wrap_is_the_identity_without_speedups():
    apply = nn.GroupNorm(2).apply
    assert runtime.wrap(apply, runtime.Runtime()) is apply
