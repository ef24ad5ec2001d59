"""The DiT: patches, shapes, adaLN-Zero, the paper's parameter count, conditioning, training."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import generate, train
from ddpm.config import presets, schema
from ddpm.models import init_inputs
from ddpm.models.dit import patchify, sincos_2d, unpatchify
from tests.tiny import create_model
from tests.tiny import tiny_config as tiny_run_config


def dit_config(image_size=16, channels=1, **model):
    """A DiT that compiles in seconds: 4x4 patches, width 32, 2 blocks of 2 heads."""
    config = schema.get_config()
    config.data.image_size, config.data.channels = image_size, channels
    config.model = presets.mnist_dit()
    config.model.update(dict(hidden_size=32, depth=2, num_heads=2, num_classes=None))
    config.model.update(model)
    return config


def inputs(shape, batch=4, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, *shape))
    return x, jnp.arange(batch, dtype=jnp.int32) * 300


@functools.cache
def jit_apply(model):
    return jax.jit(model.apply, static_argnames="train")


@functools.partial(jax.jit, static_argnums=0)
def loss_grad(model, variables, x, t, labels):
    """Gradient of a regression of the output onto a fixed random target."""
    target = jax.random.normal(jax.random.key(7), x.shape)
    return jax.grad(lambda v: jnp.mean((model.apply(v, x, t, labels) - target) ** 2))(variables)


@pytest.fixture(scope="module")
def trained():
    """A class-conditional tiny DiT: fresh variables, and those plus N(0, 0.1^2) noise (after
    adaLN-Zero init the output depends on t and labels only after several updates)."""
    config = dit_config(num_classes=10)
    model = create_model(config)
    x, t = inputs((16, 16, 1))
    labels = jnp.array([0, 1, 2, 10])
    fresh = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, t, labels)
    leaves, treedef = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    variables = jax.tree.unflatten(treedef, noisy)
    return dict(config=config, model=model, fresh=fresh, variables=variables, x=x, t=t)


def test_patchify_matches_slicing_and_unpatchify_inverts_it():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 2 * 3, 4 * 4 * 3)
    for i in range(2):
        for j in range(3):
            patch = x[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, :].reshape(2, -1)
            np.testing.assert_array_equal(tokens[:, 3 * i + j], patch)
    np.testing.assert_array_equal(unpatchify(tokens, 4, 8, 12), x)


def test_position_embedding_formula():
    """Channels [0, D/2) encode the row, [D/2, D) the column: [sin(pos w), cos(pos w)]."""
    dim, grid_h, grid_w = 8, 3, 5
    emb = sincos_2d(dim, grid_h, grid_w)
    omega = 1.0 / 10000.0 ** (np.arange(2) / 2.0)
    for r in range(grid_h):
        for c in range(grid_w):
            expected = np.concatenate(
                [np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)]
            )
            np.testing.assert_allclose(emb[r * grid_w + c], expected, atol=1e-6)


@pytest.mark.parametrize(
    "shape,overrides",
    [
        ((28, 28, 1), {"num_classes": 10}),  # pixels (MNIST), 7x7 tokens
        ((32, 32, 4), {"patch_size": 2, "learn_sigma": True}),  # latents, 16x16 tokens
    ],
)
def test_output_shape_and_dtype(shape, overrides):
    config = dit_config(shape[0], shape[2], **overrides)
    model = create_model(config)
    x, t = inputs(shape)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    out = jax.eval_shape(model.apply, variables, x, t.astype(jnp.float32) + 0.5)
    assert out.shape == (4, *shape[:2], shape[2] * (2 if config.model.learn_sigma else 1))
    assert out.dtype == jnp.float32


def test_dit_xl2_has_the_papers_parameter_count():
    """DiT-XL/2 on 32x32x4 latents, 1000 classes, learned sigma: 675M (the reference code's
    675,129,632 counts its frozen 256 x 1152 position embedding, a constant here)."""
    config = schema.get_config()
    config.data.image_size, config.data.channels = 32, 4
    config.model = presets.dit("XL", 2, num_classes=1000, learn_sigma=True)
    model = create_model(config)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
    count = sum(p.size for p in jax.tree.leaves(shapes["params"]))
    assert abs(count - 675e6) <= 0.01 * 675e6, count
    assert count == 675_129_632 - 256 * 1152


def test_fresh_dit_outputs_zeros(trained):
    """adaLN-Zero: zero modulations and a zero final layer."""
    out = jit_apply(trained["model"])(trained["fresh"], trained["x"], trained["t"])
    np.testing.assert_array_equal(out, 0.0)


def test_t_and_labels_change_output_and_none_is_the_null_label(trained):
    apply = jit_apply(trained["model"])
    same_x = jnp.broadcast_to(trained["x"][:1], trained["x"].shape)
    out_t = apply(trained["variables"], same_x, jnp.array([0.0, 0.5, 10.0, 999.0]))
    out_y = apply(trained["variables"], same_x, jnp.full((4,), 100), jnp.array([0, 1, 2, 10]))
    for i in range(1, 4):
        assert float(jnp.abs(out_t[i] - out_t[0]).max()) > 1e-4, i
        assert float(jnp.abs(out_y[i] - out_y[0]).max()) > 1e-4, i
    np.testing.assert_allclose(
        apply(trained["variables"], same_x, jnp.full((4,), 100)),
        jnp.repeat(out_y[3:], 4, axis=0),
        atol=1e-6,
    )


def test_bfloat16_and_remat_share_the_parameters(trained):
    variables, x, t = trained["variables"], trained["x"], trained["t"]
    labels = jnp.array([3, 4, 5, 10])
    reference = jit_apply(trained["model"])(variables, x, t, labels)
    scale = float(jnp.abs(reference).max())

    config = trained["config"].copy_and_resolve_references()
    config.model.dtype = "bfloat16"
    out16 = jit_apply(create_model(config))(variables, x, t, labels)
    assert out16.dtype == jnp.float32
    assert 0 < float(jnp.abs(out16 - reference).max()) < 0.1 * scale

    config.model.dtype, config.model.remat = "float32", True
    remat_model = create_model(config)
    chex.assert_trees_all_equal_shapes(
        variables, jax.eval_shape(remat_model.init, jax.random.key(1), x, t, labels)
    )
    np.testing.assert_allclose(
        jit_apply(remat_model)(variables, x, t, labels), reference, rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
        loss_grad(remat_model, variables, x, t, labels),
        loss_grad(trained["model"], variables, x, t, labels),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "patch_size",
            3,
            r"config\.model\.patch_size=3 does not divide the input size 16x16.*"
            r"1, 2, 4, 8, 16",
        ),
        ("num_heads", 3, r"config\.model\.num_heads=3 does not divide config\.model\.hidden_size"),
        ("hidden_size", 34, r"config\.model\.hidden_size=34 must be divisible by 4"),
        ("depth", 0, r"config\.model\.depth=0 must be an int >= 1"),
        ("mlp_ratio", 0.0, r"config\.model\.mlp_ratio=0\.0 must be a number > 0"),
        ("dtype", "bf16", r"config\.model\.dtype='bf16' is not one of float32, bfloat16"),
    ],
)
def test_invalid_config_fails_at_validation(field, value, message):
    config = dit_config(num_heads=1)
    config.model[field] = value
    with pytest.raises(ValueError, match=message):
        create_model(config)


def dit_parameter_count(config) -> int:
    """The parameter count of `config`'s DiT, layer by layer from the paper's architecture:
    patch embedding p*p*C -> D, time MLP 256 -> D -> D, a label table with the null row, per
    block adaLN D -> 6D, qkv, output projection and MLP D -> 4D -> D (LayerNorms without
    parameters), final adaLN D -> 2D and linear D -> p*p*C_out; the position embedding is
    a constant."""
    m, channels = config.model, config.data.channels
    dense = lambda cin, cout: cin * cout + cout
    d, patch = m.hidden_size, m.patch_size**2
    hidden = int(d * m.mlp_ratio)
    block = dense(d, 6 * d) + dense(d, 3 * d) + dense(d, d) + dense(d, hidden) + dense(hidden, d)
    out_channels = channels * (2 if m.learn_sigma else 1)
    labels = 0 if m.num_classes is None else (m.num_classes + 1) * d
    embed = dense(patch * channels, d) + dense(256, d) + dense(d, d) + labels
    return embed + m.depth * block + dense(d, 2 * d) + dense(d, patch * out_channels)


def parameter_count(config) -> int:
    """Parameters of `config`'s network, from `model.init`'s shapes (nothing is computed)."""
    size, channels = config.data.image_size, config.data.channels
    inputs = init_inputs(config, (size, size, channels))
    shapes = jax.eval_shape(create_model(config).init, jax.random.key(0), *inputs)
    return sum(p.size for p in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("make", [presets.mnist_dit, functools.partial(presets.dit, "S", 8)])
def test_preset_parameter_counts_match_the_architecture(make):
    """mnist_dit (class-conditional: its label table has the null row) and DiT-S/8 build at
    32x32x3 with exactly the parameters counted by hand from their layer shapes
    (`dit_parameter_count`, which reproduces the reference DiT-XL/2's 675,129,632 less its
    frozen position embedding). Exact: a count has no noise."""
    config = schema.get_config()
    config.model = make()
    config.data.image_size, config.data.channels = 32, 3
    assert parameter_count(config) == dit_parameter_count(config)
    xl = schema.get_config()
    xl.model = presets.dit("XL", 2, num_classes=1000, learn_sigma=True)
    xl.data.image_size, xl.data.channels = 32, 4
    assert dit_parameter_count(xl) == 675_129_632 - 256 * 1152


def test_tiny_dit_trains_resumes_and_samples(tmp_path, capsys):
    """The standard run layer with config.model.name="dit": train 10 steps, resume to 20, then
    `main.py --mode=sample`'s function draws a grid from the EMA parameters."""
    config = tiny_run_config(num_steps=10, log_every=5, checkpoint_every=10, learning_rate=3e-3)
    config.model = dit_config(num_classes=10).model
    train.train_and_evaluate(config, str(tmp_path))
    config.training.num_steps = 20
    train.train_and_evaluate(config, str(tmp_path))
    assert "Resumed from checkpoint at step 10" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    assert all(np.isfinite(m["loss"]) for m in lines)

    png = generate.sample_from_workdir(config, str(tmp_path))
    saved = np.load(png.replace(".png", ".npz"))
    assert saved["images"].shape == (20, 16, 16, 1) and saved["images"].dtype == np.uint8
    assert saved["images"].std() > 1.0  # not a constant image
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 2))
