"""The U-Net: shapes, parameter count, embedding formula, conditioning, precision, validation."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import runtime
from ddpm.config import presets, schema, validation
from ddpm.errors import UserError
from ddpm.models import init_inputs, null_label
from ddpm.models.layers import timestep_embedding
from tests.tiny import create_model


def tiny_config(image_size=16, channels=1, **model):
    """A U-Net that compiles in seconds: 8/16 channels, attention at size/2 and in the middle."""
    config = schema.get_config()
    config.data.image_size = image_size
    config.data.channels = channels
    config.model.update(
        dict(
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(image_size // 2,),
            num_heads=2,
            num_groups=4,
            dropout=0.0,
        )
    )
    config.model.update(model)
    return config


def inputs(config, batch=4, seed=0):
    """x: [B, H, W, C] float32 noise, t: [B] int32 spread over [0, 1000)."""
    size, c = config.data.image_size, config.data.channels
    x = jax.random.normal(jax.random.key(seed), (batch, size, size, c))
    t = jnp.arange(batch, dtype=jnp.int32) * 300
    return x, t


@functools.cache
def jit_apply(model):
    """model.apply under jit, one per model so that tests share compilations."""
    return jax.jit(model.apply, static_argnames="train")


def loss_grad(apply, variables, x, t, labels):
    """Gradient of a regression of `apply`'s output onto a fixed random target."""
    target = jax.random.normal(jax.random.key(7), x.shape)
    loss = lambda v: jnp.mean((apply(v, x, t, labels) - target) ** 2)
    return jax.grad(loss)(variables)


jit_loss_grad = jax.jit(loss_grad, static_argnums=0)


@pytest.fixture(scope="module")
def trained():
    """A conditional tiny U-Net, its fresh variables, and its variables after one SGD step.

    Initialised with an "rbg" key: threefry init compiles ~6x slower on CPU.
    """
    config = tiny_config(num_classes=10, dropout=0.5)
    model = create_model(config)
    x, t = inputs(config)
    labels = jnp.array([0, 1, 2, 10])
    fresh = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, t, labels)
    grads = jit_loss_grad(model.apply, fresh, x, t, labels)
    variables = jax.tree.map(lambda p, g: p - 0.1 * g, fresh, grads)
    return dict(config=config, model=model, fresh=fresh, variables=variables, x=x, t=t)


@pytest.mark.parametrize(
    "channels,size,overrides",
    [
        (1, 28, {"ch_mult": (1, 2, 2), "attention_resolutions": (7,)}),
        (3, 32, {"learn_sigma": True}),
        (4, 64, {"resblock_updown": True, "scale_shift_norm": True, "head_dim": 4}),
        (3, 32, {"num_classes": 10, "ch_mult": (1, 2, 2, 2), "attention_resolutions": (16,)}),
    ],
)
def test_output_shape_and_dtype(channels, size, overrides):
    config = tiny_config(size, channels, **overrides)
    model = create_model(config)
    x, t = inputs(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    out = jax.eval_shape(model.apply, variables, x, t.astype(jnp.float32) + 0.5)
    out_channels = channels * (2 if config.model.learn_sigma else 1)
    assert out.shape == (4, size, size, out_channels)
    assert out.dtype == jnp.float32


def test_fresh_model_outputs_zeros(trained):
    """The final conv is zero-initialised."""
    out = jit_apply(trained["model"])(trained["fresh"], trained["x"], trained["t"])
    np.testing.assert_array_equal(out, 0.0)


def test_image_size_not_divisible_fails_naming_sizes_that_work():
    # Four levels need sizes divisible by 8: 28 fails and the message names 24 and 32.
    config = tiny_config(28, ch_mult=(1, 2, 2, 2), attention_resolutions=())
    with pytest.raises(UserError, match=r"config\.data\.image_size=28.*=8.*24 or 32"):
        create_model(config)


def parameter_count(config) -> int:
    """Parameters of `config`'s network, from `model.init`'s shapes (nothing is computed)."""
    size, channels = config.data.image_size, config.data.channels
    inputs = init_inputs(config, (size, size, channels))
    shapes = jax.eval_shape(create_model(config).init, jax.random.key(0), *inputs)
    return sum(p.size for p in jax.tree.leaves(shapes["params"]))


def unet_parameter_count(config, context_dim=None) -> int:
    """The parameter count of `config`'s U-Net, layer by layer from Ho et al.'s architecture:
    time MLP ch -> 4ch -> 4ch, 3x3 convolutions, ResBlocks with a time projection and a 1x1
    skip where the width changes, attention = GroupNorm + qkv + output projection, a label
    table with the null row. `context_dim`: each attention block is followed by
    cross-attention (GroupNorm, q, kv from the context, output projection)."""
    m, size, channels = config.model, config.data.image_size, config.data.channels
    conv = lambda k, cin, cout: k * k * cin * cout + cout
    dense = lambda cin, cout: cin * cout + cout
    norm = lambda c: 2 * c  # GroupNorm scale and bias
    emb = 4 * m.ch

    def res(cin, cout):
        skip = conv(1, cin, cout) if cin != cout else 0
        return (
            norm(cin)
            + conv(3, cin, cout)
            + dense(emb, cout)
            + norm(cout)
            + skip
            + conv(3, cout, cout)
        )

    def attn(c, present=True):
        if not present:
            return 0
        cross = 0 if context_dim is None else norm(c) + 2 * dense(c, c) + dense(context_dim, 2 * c)
        return norm(c) + dense(c, 3 * c) + dense(c, c) + cross

    total = dense(m.ch, emb) + dense(emb, emb) + conv(3, channels, m.ch)
    total += 0 if m.num_classes is None else (m.num_classes + 1) * emb
    skips, c, resolution = [m.ch], m.ch, size
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            total += res(c, m.ch * mult) + attn(m.ch * mult, resolution in m.attention_resolutions)
            c = m.ch * mult
            skips.append(c)
        if level != len(m.ch_mult) - 1:
            total += conv(3, c, c)
            resolution //= 2
            skips.append(c)
    total += 2 * res(c, c) + attn(c, m.mid_attention)
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            out = m.ch * m.ch_mult[level]
            total += res(c + skips.pop(), out) + attn(out, resolution in m.attention_resolutions)
            c = out
        if level != 0:
            total += conv(3, c, c)
            resolution *= 2
    return total + norm(c) + conv(3, c, channels)


def preset_config(make, size, channels):
    config = schema.get_config()
    config.model = make()
    config.data.image_size, config.data.channels = size, channels
    return config


def test_ddpm_cifar10_parameter_count():
    """DDPM paper: 35.7M parameters; the reference implementation (diffusion_tf) has exactly
    35,746,307, and so do this network and the count by hand. Exact: a count has no noise,
    and any missing or extra bias, norm or table row changes it."""
    config = preset_config(presets.ddpm_cifar10, 32, 3)
    assert unet_parameter_count(config) == 35_746_307
    assert parameter_count(config) == 35_746_307


def unet_64x64():
    """A 64x64 U-Net: levels 64->32->16->8 with 64/128/256/512 channels, attention at 16 and 8
    with 4 heads."""
    model = schema.model_section("unet")
    model.update(
        ch=64, ch_mult=(1, 2, 4, 8), num_res_blocks=2, attention_resolutions=(16, 8), num_heads=4
    )
    return model


@pytest.mark.parametrize("make,size,channels", [(unet_64x64, 64, 3), (presets.mnist_small, 28, 1)])
def test_parameter_counts_match_the_architecture(make, size, channels):
    """A 64x64 U-Net (attention at two resolutions) and the mnist_small preset build with
    exactly the parameters counted by hand from their layer shapes (`unet_parameter_count`,
    which reproduces the DDPM reference count). mnist_small's count includes the null label's
    row of the label table."""
    config = preset_config(make, size, channels)
    assert parameter_count(config) == unet_parameter_count(config)


@pytest.mark.parametrize("dim,max_period", [(16, 10000.0), (7, 100.0)])
def test_timestep_embedding_matches_formula(dim, max_period):
    t = np.array([0.0, 1.0, 2.5, 999.0])
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for b, tb in enumerate(t):
        for i in range(half):
            freq = max_period ** (-i / half)
            expected[b, i] = math.cos(tb * freq)
            expected[b, half + i] = math.sin(tb * freq)
    emb = timestep_embedding(jnp.asarray(t, jnp.float32), dim, max_period)
    assert emb.shape == (4, dim) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb, expected, atol=2e-4)
    # Integer timesteps embed like the same float values.
    np.testing.assert_array_equal(
        timestep_embedding(jnp.array([0, 1, 999]), dim, max_period), emb[jnp.array([0, 1, 3])]
    )


def test_different_t_give_different_outputs_after_a_training_step(trained):
    same_x = jnp.broadcast_to(trained["x"][:1], trained["x"].shape)
    t = jnp.array([0.0, 0.5, 10.0, 999.0])  # fractional t as ODE samplers pass
    out = jit_apply(trained["model"])(trained["variables"], same_x, t, jnp.zeros(4, jnp.int32))
    assert jnp.all(jnp.isfinite(out))
    for i in range(1, 4):
        assert float(jnp.abs(out[i] - out[0]).max()) > 1e-4, i


def test_labels_change_output_and_null_label_is_accepted(trained):
    assert null_label(trained["config"]) == 10
    assert null_label(tiny_config()) is None
    apply = jit_apply(trained["model"])
    same_x = jnp.broadcast_to(trained["x"][:1], trained["x"].shape)
    same_t = jnp.full((4,), 100)
    out = apply(trained["variables"], same_x, same_t, jnp.array([0, 1, 2, 10]))
    for i in range(1, 4):
        assert float(jnp.abs(out[i] - out[0]).max()) > 1e-4, i
    # labels=None means the null label for every example.
    np.testing.assert_allclose(
        apply(trained["variables"], same_x, same_t), jnp.repeat(out[3:], 4, axis=0), atol=1e-6
    )


def test_dropout_is_used_only_in_training(trained):
    apply = jit_apply(trained["model"])
    args = (trained["variables"], trained["x"], trained["t"])
    evals = apply(*args)
    trains = [apply(*args, train=True, rngs={"dropout": jax.random.key(i)}) for i in range(2)]
    assert float(jnp.abs(trains[0] - trains[1]).max()) > 1e-4
    assert float(jnp.abs(trains[0] - evals).max()) > 1e-4


def test_bfloat16_compute_returns_float32(trained):
    config = trained["config"].copy_and_resolve_references()
    config.model.dtype = "bfloat16"
    model16 = create_model(config)
    x, t = trained["x"], trained["t"]
    shapes16 = jax.eval_shape(model16.init, jax.random.key(1), x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))  # param_dtype
    out16 = jit_apply(model16)(trained["variables"], x, t)
    out32 = jit_apply(trained["model"])(trained["variables"], x, t)
    assert out16.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    assert 0 < float(jnp.abs(out16 - out32).max()) < 0.1 * scale


@pytest.mark.parametrize("option", ["remat", "cpu_kernels"])
def test_execution_options_give_same_output_and_gradient(trained, option):
    """remat and the runtime's CPU kernels (chunked kernel gradients, the two-pass GroupNorm
    gradient, swapped in by `runtime.wrap`) change how the network is computed, not what."""
    model, variables, x, t = trained["model"], trained["variables"], trained["x"], trained["t"]
    labels = jnp.array([3, 4, 5, 10])
    if option == "remat":
        config = trained["config"].copy_and_resolve_references()
        config.model.remat = True
        other_model = create_model(config)
        other = other_model.apply
        # Same parameter tree: a checkpoint of one loads into the other.
        chex.assert_trees_all_equal_shapes(
            variables, jax.eval_shape(other_model.init, jax.random.key(1), x, t, labels)
        )
    else:
        other = runtime.wrap(model.apply, runtime.Runtime(conv_grad_chunk=2, fast_group_norm=True))
        # The kernels are really traced: every GroupNorm and convolution is a custom_vjp
        # (2 + 2 per ResBlock), where flax's plain modules have none.
        jaxpr = str(jax.make_jaxpr(other)(variables, x, t, labels))
        assert jaxpr.count("custom_vjp_call") >= 20, jaxpr.count("custom_vjp_call")
        assert "custom_vjp_call" not in str(jax.make_jaxpr(model.apply)(variables, x, t, labels))
    np.testing.assert_allclose(
        jax.jit(other)(variables, x, t, labels),
        jit_apply(model)(variables, x, t, labels),
        rtol=1e-5,
        atol=1e-6,
    )
    chex.assert_trees_all_close(
        jit_loss_grad(other, variables, x, t, labels),
        jit_loss_grad(model.apply, variables, x, t, labels),
        rtol=1e-4,
        atol=1e-6,
    )


def test_jitted_apply_traces_once_per_shape(trained):
    traces = 0

    def apply(v, x, t, labels):
        nonlocal traces
        traces += 1
        return trained["model"].apply(v, x, t, labels)

    apply = jax.jit(apply)
    for seed in range(3):
        x, t = inputs(trained["config"], seed=seed)
        apply(trained["variables"], x, t + seed, jnp.array([seed, 1, 2, 10])).block_until_ready()
    assert traces == 1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("name", "unet3d", r"config\.model\.name='unet3d' is not one of unet, dit"),
        ("patch_size", 2, r"unknown config field\(s\): config\.model\.patch_size.*'unet' family"),
        ("ch_mult", (), r"config\.model\.ch_mult=\(\) must be a non-empty"),
        (
            "attention_resolutions",
            (17,),
            r"config\.model\.attention_resolutions=\(17,\).*resolutions: 16, 8\)",
        ),
        ("num_heads", 3, r"config\.model\.num_heads=3 does not divide the channel count 16"),
        ("head_dim", 5, r"config\.model\.head_dim=5 does not divide"),
        ("num_groups", 3, r"config\.model\.num_groups=3 does not divide the channel count 8"),
        ("num_res_blocks", 0, r"config\.model\.num_res_blocks=0"),
        ("dropout", 1.0, r"config\.model\.dropout=1\.0"),
        ("num_classes", 0, r"config\.model\.num_classes=0"),
        ("dtype", "bf16", r"config\.model\.dtype='bf16' is not one of float32, bfloat16"),
    ],
)
def test_invalid_config_fails_at_validation(field, value, message):
    config = tiny_config()
    with config.unlocked():
        config.model[field] = value
    with pytest.raises(UserError, match=message):
        validation.validate(config)
