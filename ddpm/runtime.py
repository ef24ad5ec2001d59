"""Speed-only choices of a run (`config.runtime`), chosen by platform and applied from outside
the models: the same program, the same results, a faster compile or step.

The networks use flax's plain `nn.Conv` and `nn.GroupNorm`. On CPU, `wrap` swaps in two
kernels at trace time through `flax.linen.intercept_methods`, with the same parameters and
outputs (up to float summation order):
- `chunked_kernel_grad_conv`: a convolution whose kernel gradient is summed over batch chunks
  (XLA:CPU's kernel gradient slows down sharply with batch size);
- `group_norm`: group normalisation with a hand-written two-pass gradient (reverse mode only).
On GPU/TPU neither is used. `Runtime.init_key` picks the PRNG of parameter initialisation
("rbg" compiles initialisers 3-4x faster on CPU). `Runtime.compiler_options` are the XLA
options the train step and the samplers are compiled with: on an AVX-512 CPU they turn
XLA:CPU's YNNPACK fusions off, so convolutions run on XLA's own (Eigen) kernels, whose
gradients are 1.5x faster there (bench/README.md).
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

Array = jax.Array
# Examples per kernel-gradient chunk on a single CPU device: the MNIST batch-64 step is 1.28x
# faster with 16 with YNNPACK's convolutions (bench/README.md); batches of at most 16 are
# unaffected. XLA's own convolutions are faster unchunked.
CPU_CONV_GRAD_CHUNK = 16
# The XLA option that keeps XLA:CPU from handing convolutions (and matmuls, elementwise
# fusions) to YNNPACK: an empty list of fusion kinds.
NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """`config.runtime` resolved for a platform: conv_grad_chunk (0 = plain convolutions),
    fast_group_norm, init_key ("rbg" | "threefry"), async_checkpoint, cpu_kernels ("ynnpack":
    XLA:CPU's default, "xla": without its YNNPACK fusions)."""

    conv_grad_chunk: int = 0
    fast_group_norm: bool = False
    init_key: str = "threefry"
    async_checkpoint: bool = True
    cpu_kernels: str = "ynnpack"

    @property
    def compiler_options(self) -> dict[str, str] | None:
        """`jax.jit(..., compiler_options=)` of the train step and the samplers."""
        return dict(NO_YNNPACK) if self.cpu_kernels == "xla" else None

    def config_values(self) -> dict[str, Any]:
        """The `config.runtime` fields that resolve to this Runtime on any platform."""
        return {
            "conv_grad_chunk": self.conv_grad_chunk,
            "group_norm": "fast" if self.fast_group_norm else "flax",
            "init_key": self.init_key,
            "async_checkpoint": self.async_checkpoint,
            "cpu_kernels": self.cpu_kernels,
        }


@functools.cache
def host_has_avx512() -> bool:
    """Whether this machine's CPU has AVX-512 (Linux's /proc/cpuinfo, read once per process;
    False elsewhere). `resolve` asks it for every objective and sampler built."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def resolve(
    runtime: ml_collections.ConfigDict,
    platform: str | None = None,
    num_devices: int | None = None,
    avx512: bool | None = None,
) -> Runtime:
    """`config.runtime` with its "auto" / None values decided for `platform` (default: that of
    jax.devices()), the device count and the CPU (`avx512`, default: this host's): the CPU
    speed-ups only on CPU; XLA's own kernels (no YNNPACK) on an AVX-512 CPU, measured faster
    there (an AVX2 CPU keeps YNNPACK until measured); kernel-gradient chunking only on a
    single CPU device with YNNPACK (on a mesh each chunk's gradient would be all-reduced on
    its own)."""
    platform = platform or jax.devices()[0].platform
    num_devices = jax.device_count() if num_devices is None else num_devices
    cpu = platform == "cpu"
    kernels = runtime.cpu_kernels
    if kernels == "auto":
        avx512 = host_has_avx512() if avx512 is None else avx512
        kernels = "xla" if cpu and avx512 else "ynnpack"
    chunk = runtime.conv_grad_chunk
    if chunk is None:
        chunk = CPU_CONV_GRAD_CHUNK if cpu and num_devices == 1 and kernels == "ynnpack" else 0
    group_norm = runtime.group_norm
    init_key = runtime.init_key
    return Runtime(
        conv_grad_chunk=chunk,
        fast_group_norm=group_norm == "fast" or (group_norm == "auto" and cpu),
        init_key=("rbg" if cpu else "threefry") if init_key == "auto" else init_key,
        async_checkpoint=bool(runtime.async_checkpoint),
        cpu_kernels=kernels,
    )


def jit(fn: Callable[..., Any], compiler_options: dict[str, str] | None, **jit_kwargs) -> Any:
    """`jax.jit(fn, **jit_kwargs)` compiled with `compiler_options` (a Runtime's) when called
    at the top level. JAX refuses compiler options on a jit nested in another: called with
    traced arguments (inside a user's `jax.jit`), the result is the plain jit, compiled with
    the outer one's options. `.lower` lowers the top-level version; `._cache_size()` counts
    both versions' compiles."""
    plain = jax.jit(fn, **jit_kwargs)
    if not compiler_options:
        return plain
    tuned = jax.jit(fn, compiler_options=compiler_options, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        return (plain if nested else tuned)(*args, **kwargs)

    call.lower = tuned.lower
    call._cache_size = lambda: tuned._cache_size() + plain._cache_size()  # compile-once tests
    return call


def init_key(rng: Array, runtime: Runtime) -> Array:
    """A parameter-initialisation key of `runtime.init_key`'s kind derived from `rng`.

    rbg's draws depend on how an array is sharded, which is harmless for initialisation
    (replicated); training keys stay threefry."""
    if runtime.init_key == "threefry":
        return rng
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def wrap(fn: Callable[..., Any], runtime: Runtime) -> Callable[..., Any]:
    """`fn` (anything that applies flax modules, e.g. `model.apply`) with the runtime's
    kernels swapped in while it runs (and so while it is traced); `fn` itself when none are
    on."""
    if not (runtime.conv_grad_chunk or runtime.fast_group_norm):
        return fn
    interceptor = functools.partial(_intercept, runtime)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs)

    return wrapped


def _plain_group_norm(module: nn.GroupNorm) -> bool:
    """A GroupNorm `group_norm` computes exactly: groups by count, scale and bias, statistics
    over every axis but batch and features, no cross-device axis."""
    return (
        module.num_groups is not None
        and module.group_size is None
        and module.use_bias
        and module.use_scale
        and module.reduction_axes is None
        and module.axis_name is None
    )


def _intercept(runtime: Runtime, next_fun, args, kwargs, context) -> Any:
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
        return next_fun(*args, **kwargs)
    norm = type(module) is nn.GroupNorm and not kwargs and _plain_group_norm(module)
    if runtime.fast_group_norm and norm:
        (x,) = args
        params = module.variables["params"]
        y = group_norm(
            x,
            params["scale"].astype(jnp.float32),
            params["bias"].astype(jnp.float32),
            module.num_groups,
            module.epsilon,
        )
        return y.astype(module.dtype or jnp.promote_types(x.dtype, module.param_dtype))
    conv = type(module) is nn.Conv and module.conv_general_dilated is None
    if runtime.conv_grad_chunk and conv and module.conv_general_dilated_cls is None:
        chunked = functools.partial(chunked_kernel_grad_conv, examples=runtime.conv_grad_chunk)
        fast = module.clone(parent=None, conv_general_dilated=chunked)
        return fast.apply({"params": module.variables["params"]}, *args, **kwargs)
    return next_fun(*args, **kwargs)


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
