"""Latent diffusion: the KL-autoencoder (stage 1) and diffusion on its latents (stage 2)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist_autoencoder
from ddpm import data, generate, objectives, sharding, train
from ddpm.errors import UserError
from ddpm.models.autoencoder import gaussian_kl
from ddpm.objectives import latent
from tests.tiny import create_model, preempt_at, step_parts, tiny_config

# PSNR (peak-to-peak 2 of [-1, 1]) of the tiny autoencoder's reconstructions of held-out digits
# after AE_STEPS steps; it measured 19.1 dB (the mean digit as output: 12.8 dB).
AE_STEPS = 300
MIN_PSNR = 17.0


def tiny_autoencoder_config(**training):
    """16x16 digits -> 4x4x4 latents (f = 4) with an 8/16/16-channel autoencoder."""
    config = mnist_autoencoder.get_config()
    config.data.image_size = 16
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.num_groups, m.mid_attention = 8, (1, 2, 2), 1, 4, False
    t = config.training
    t.num_steps, t.batch_size, t.learning_rate, t.warmup_steps = AE_STEPS, 16, 3e-3, 20
    t.log_every, t.checkpoint_every, t.sample_every = 50, 1000, 1000
    t.update(training)
    config.sample.num_samples = 16
    return config


def tiny_ldm_config(autoencoder_workdir: str, **training):
    """tests/tiny.py's class-conditional U-Net (one level) on the tiny autoencoder's latents."""
    config = tiny_config(**training)
    config.objective = "latent"
    config.latent.autoencoder_workdir = str(autoencoder_workdir)
    config.sample.clip_x0 = False
    return config


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * np.log10(4.0 / np.mean(np.square(x - y))))


def held_out_digits(config, num: int = 100) -> np.ndarray:
    source = data.create_dataset(config, "test", batch_size=num, seed=0)  # all digits
    images = next(source)["image"]
    source.close()
    return images


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny autoencoder trained for AE_STEPS steps: (workdir, final metrics)."""
    workdir = tmp_path_factory.mktemp("autoencoder")
    metrics = train.train_and_evaluate(tiny_autoencoder_config(), str(workdir))
    return workdir, metrics


@pytest.mark.parametrize(
    ("ch_mult", "factor", "channels"), [((1, 2, 2), 4, 1), ((1, 1, 2, 2), 8, 3)]
)
def test_encoder_and_decoder_shapes(ch_mult, factor, channels):
    config = tiny_autoencoder_config()
    config.data.channels, config.model.z_channels, config.model.ch_mult = channels, 3, ch_mult
    model = create_model(config)
    x = jnp.zeros((2, 32, 32, channels))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    mean, logvar = jax.eval_shape(lambda v: model.apply(v, x, method="encode"), variables)
    assert mean.shape == logvar.shape == (2, 32 // factor, 32 // factor, 3)
    out = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, mean)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_gaussian_kl_closed_form():
    zeros = jnp.zeros((2, 4, 4, 3))
    np.testing.assert_array_equal(gaussian_kl(zeros, zeros), [0.0, 0.0])  # posterior = prior
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 per dimension, in float64.
    s = np.exp(logvar / 2)
    expected = np.sum(-np.log(s) + (s**2 + mean**2) / 2 - 0.5, axis=(1, 2, 3))
    np.testing.assert_allclose(
        gaussian_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)),
        expected,
        rtol=1e-5,
    )


def test_autoencoder_config_errors(tmp_path):
    config = tiny_autoencoder_config()
    config.objective = "diffusion"
    with pytest.raises(UserError, match=r"config\.objective='diffusion' with config\.model"):
        create_model(config)
    ldm = tiny_ldm_config(tmp_path / "missing")
    with pytest.raises(UserError, match="config.latent.autoencoder_workdir="):
        train.train_and_evaluate(ldm, str(tmp_path / "ldm"))
    assert not os.path.exists(tmp_path / "ldm")
    ldm.sample.clip_x0 = True
    with pytest.raises(ValueError, match="config.sample.clip_x0=True"):
        train.train_and_evaluate(ldm, str(tmp_path / "ldm"))


def test_short_run_reconstructs_held_out_digits(stage1):
    workdir, metrics = stage1
    assert metrics["recon"] > 0 and metrics["kl"] > 0
    assert os.path.exists(workdir / "samples" / f"step_{AE_STEPS:07d}.png")
    objective, mesh = generate.prepare(tiny_autoencoder_config(), str(workdir))
    params, step = generate.restore(objective, str(workdir), mesh)
    config, model = objective.config, objective.model
    assert step == AE_STEPS
    x = held_out_digits(config)
    recon, _, _ = jax.jit(model.apply)({"params": params}, x)
    mean_digit = np.broadcast_to(np.mean(x, axis=0), x.shape)
    print(f"PSNR {psnr(x, np.asarray(recon)):.2f} dB (mean digit {psnr(x, mean_digit):.2f} dB)")
    assert psnr(x, np.asarray(recon)) > MIN_PSNR


def test_scale_factor_gives_unit_latent_std(stage1, tmp_path):
    workdir, _ = stage1
    objective = objectives.create(
        tiny_ldm_config(workdir),
        workdir=str(tmp_path),
        mesh=sharding.create_mesh(),
        training=True,
    )
    config = objective.config
    # Estimated on training digits; checked on held-out ones.
    z = latent.encode_latents(
        objective.stage1_apply,
        objective.frozen,
        held_out_digits(config, 200),
        jax.random.key(5),
        scale_factor=config.latent.scale_factor,
        sample_posterior=True,
    )
    assert z.shape == (200, 4, 4, 4)
    assert 0.9 < float(jnp.std(z)) < 1.1, (config.latent.scale_factor, float(jnp.std(z)))


def test_latent_diffusion_trains_resumes_and_samples(stage1, tmp_path, capsys, monkeypatch):
    ae_workdir, _ = stage1
    workdir = str(tmp_path)
    with monkeypatch.context() as patch:
        preempt_at(4, patch)
        train.train_and_evaluate(tiny_ldm_config(ae_workdir, num_steps=6), workdir)
    out = capsys.readouterr().out
    assert "Estimated config.latent.scale_factor=" in out
    assert "SIGTERM: saved checkpoint at step 4;" in out, out
    scale = json.loads((tmp_path / "config.json").read_text())["latent"]["scale_factor"]
    assert scale > 0

    final = train.train_and_evaluate(tiny_ldm_config(ae_workdir, num_steps=6), workdir)
    out = capsys.readouterr().out
    assert "Resumed from checkpoint at step 4" in out and "Estimated" not in out
    assert np.isfinite(final["loss"])
    assert json.loads((tmp_path / "config.json").read_text())["latent"]["scale_factor"] == scale
    # Decoded grids: 20 samples (two per class) of 16x16 in 10 rows of 2 with 2-pixel padding.
    from PIL import Image

    grid = Image.open(tmp_path / "samples" / "step_0000006.png")
    assert grid.size == (2 + 2 * 18, 2 + 10 * 18)

    config = tiny_ldm_config(ae_workdir, num_steps=6)  # the run's: the same compiled step
    config.sample.num_samples, config.sample.batch_size = 4, 4
    png = generate.sample_from_workdir(config, workdir)
    saved = np.load(png.replace(".png", ".npz"))
    assert saved["images"].shape == (4, 16, 16, 1)

    # The latent train step (frozen parameters as an argument) compiles once.
    config.latent.scale_factor = scale
    objective, step_fn, state, mesh = step_parts(config)
    for i in range(2):
        batch = {
            "image": jax.random.uniform(jax.random.key(i), (8, 16, 16, 1), minval=-1, maxval=1),
            "label": jnp.arange(8, dtype=jnp.int32),
        }
        frozen = jax.tree.map(lambda p, i=i: p * (1 + 0.01 * i), objective.frozen)  # new values
        state, metrics = step_fn(state, sharding.global_batch(batch, mesh), frozen)
    assert bool(metrics["finite"]) and step_fn._cache_size() == 1

    mismatched = tiny_ldm_config(ae_workdir)
    mismatched.data.image_size = 32
    with pytest.raises(UserError, match=r"config.data.image_size=32 does not match"):
        train.train_and_evaluate(mismatched, str(tmp_path / "other"))
