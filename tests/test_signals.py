"""1-D signals [B, L, C]: the sines dataset, the U-Net's 1-D path, training, sampling, WAV/plot
output, and the inpaint / img2img modes on a trained (tiny) signal run."""

import os
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sines as sines_config
from ddpm import editing, generate, signals, train
from ddpm.config import runs, validation
from ddpm.data import create_dataset, sines
from ddpm.models.unet import UNet


def tiny_signal_config(**training):
    """sines at L = 32 (levels 32, 16; attention at 16), a tiny U-Net, 5 sampler steps."""
    config = sines_config.get_config()
    config.data.length = 32
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.num_groups = 8, (1, 2), 1, 4
    m.attention_resolutions, m.mid_attention, m.num_heads = (16,), True, 2
    config.diffusion.num_timesteps = 100
    t = config.training
    t.num_steps, t.batch_size, t.warmup_steps = 6, 8, 2
    t.log_every, t.checkpoint_every, t.sample_every = 3, 6, 6
    t.update(training)
    config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 5, 8, 8
    config.edit.num_samples = 3
    return config


# ------------------------------------------------------------------------------------------
# Data.


def test_sines_are_deterministic_and_labelled_by_their_dominant_frequency():
    """The spectrum's peak (an independent FFT) falls in the labelled band, for 200 examples;
    examples are a pure function of (split, index); values within [-0.9, 0.9]."""
    length = 256
    for i in range(200):
        x, band = sines.make_example("train", i, length, 2)
        spectrum = np.abs(np.fft.rfft(x[:, 0]))
        low, high = sines.band_edges(length, band)
        assert low - 1 <= np.argmax(spectrum) <= high + 1, (i, band, np.argmax(spectrum))
        assert np.abs(x).max() <= 0.9 + 1e-6
    a, _ = sines.make_example("test", 7, length, 1)
    np.testing.assert_array_equal(a, sines.make_example("test", 7, length, 1)[0])
    assert not np.allclose(a, sines.make_example("train", 7, length, 1)[0])


def test_pipeline_yields_signal_batches_and_validates_length():
    config = tiny_signal_config()
    batch = next(create_dataset(config, "train", batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 1) and batch["image"].dtype == np.float32
    assert set(np.unique(batch["label"])) <= set(range(sines.NUM_BANDS))
    assert runs.input_shape(config) == (32, 1)
    config.data.length = None
    with pytest.raises(ValueError, match=r"config.data.length=None must be an int >= 8"):
        validation.validate(config)
    image = tiny_signal_config()
    image.data.source = "mnist5k"
    with pytest.raises(ValueError, match=r"config.data.length=32 is for 1-D signal sources"):
        validation.validate(image)


# ------------------------------------------------------------------------------------------
# The U-Net's 1-D path.


def test_one_level_unet_on_signals_equals_the_2d_unet_on_a_one_pixel_high_image():
    """With H = 1 a 'SAME' 3x3 convolution sees only its kernel's middle row, GroupNorm and
    attention see the same L positions: the 2-D U-Net's output on [B, 1, L, C] equals the 1-D
    U-Net's on [B, L, C] with every 3x3 (1x1) kernel replaced by its middle row."""
    kw = dict(out_channels=2, ch=8, ch_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
              num_heads=2, num_groups=4, num_classes=3)  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (2, 1, 16, 2))
    t, y = jnp.array([3, 70]), jnp.array([0, 3])
    net2, net1 = UNet(**kw), UNet(**{**kw, "attention_resolutions": (16,)})
    shapes = jax.eval_shape(net2.init, jax.random.key(1), x, t, y)["params"]
    leaves, tree = jax.tree.flatten(shapes)  # random parameters (init's zeros would hide rows)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten(
        [0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )
    out2 = jax.jit(net2.apply)({"params": params}, x, t, y)
    params1 = jax.tree.map(lambda p: p[1] if p.ndim == 4 and p.shape[0] == 3 else p, params)
    params1 = jax.tree.map(lambda p: p[0] if p.ndim == 4 else p, params1)  # 1x1 skip
    out1 = jax.jit(net1.apply)({"params": params1}, x[:, 0], t, y)
    assert float(jnp.abs(out2).mean()) > 0.01
    np.testing.assert_allclose(out1, out2[:, 0], rtol=1e-4, atol=1e-5)


def test_multilevel_unet_on_signals_shapes_and_resampling():
    """[B, L, C] -> [B, L, C] through 3 levels; nearest upsampling and average pooling act
    on the length axis as numpy's repeat and pairwise mean."""
    from ddpm.models.layers import _downsample_avg, _upsample_nearest

    x = jax.random.normal(jax.random.key(0), (2, 32, 3))
    np.testing.assert_allclose(_downsample_avg(x), np.asarray(x).reshape(2, 16, 2, 3).mean(2),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(_upsample_nearest(x), np.repeat(np.asarray(x), 2, axis=1))
    net = UNet(out_channels=6, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
               attention_resolutions=(8,), num_groups=4, resblock_updown=True)  # fmt: skip
    params = jax.eval_shape(net.init, jax.random.key(1), x, jnp.zeros(2))
    assert jax.eval_shape(net.apply, params, x, jnp.zeros(2)).shape == (2, 32, 6)
    with pytest.raises(ValueError, match=r"\[B, L, C\]"):
        jax.eval_shape(net.apply, params, x[:, :30], jnp.zeros(2))


# ------------------------------------------------------------------------------------------
# Output files.


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """(frames [T, C] float64 in [-1, 1], sample rate) of a 16-bit PCM WAV, read with the
    standard library's `wave`, independently of `signals.save_wav`."""
    with wave.open(path, "rb") as f:
        assert f.getsampwidth() == 2, f"{path}: {8 * f.getsampwidth()}-bit samples"
        frames = np.frombuffer(f.readframes(f.getnframes()), "<i2")
        return frames.reshape(-1, f.getnchannels()) / 32767.0, f.getframerate()


def test_wav_round_trip_and_plot(tmp_path):
    x = np.stack([np.sin(np.linspace(0, 20, 100))[:, None] * 0.8, np.full((100, 1), -0.5)])
    path = str(tmp_path / "a" / "s.wav")
    signals.save_wav(path, x, sample_rate=1000, gap=0.01)
    frames, rate = read_wav(path)
    assert rate == 1000 and frames.shape == (210, 1)
    np.testing.assert_allclose(frames[:100], x[0], atol=1 / 32767)
    np.testing.assert_array_equal(frames[100:110], 0.0)
    np.testing.assert_allclose(frames[110:], x[1], atol=1 / 32767)
    plot = signals.plot_signals(x, 2, width=50, height=20)
    assert plot.shape == (24, 106, 3) and plot.dtype == np.uint8
    assert (plot < 128).any()  # lines were drawn


# ------------------------------------------------------------------------------------------
# Train, sample and edit a tiny signal model (one workdir for the module).


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sines"))
    config = tiny_signal_config()
    metrics = train.train_and_evaluate(config, workdir)
    return config, workdir, metrics


def test_tiny_signal_model_trains_and_samples_plot_wav(trained):
    """A few steps on [B, 32, 1] signals: finite loss, a sample plot at the last step; then
    --mode=sample writes the plot, a valid WAV (read back with `wave`) and signals [8, 32, 1]."""
    config, workdir, metrics = trained
    assert np.isfinite(metrics["loss"])
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000006.png"))
    png = generate.sample_from_workdir(config, workdir)
    stem = png.removesuffix(".png")
    with np.load(stem + ".npz") as f:
        samples, labels = f["signals"], f["labels"]
    assert samples.shape == (8, 32, 1) and np.all(np.isfinite(samples))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 2))
    frames, rate = read_wav(stem + ".wav")
    gap = int(0.1 * signals.SAMPLE_RATE)
    assert rate == signals.SAMPLE_RATE and frames.shape == (8 * 32 + 7 * gap, 1)
    np.testing.assert_allclose(frames[:32], np.clip(samples[0], -1, 1), atol=1 / 32767)


def test_inpaint_and_img2img_modes_on_a_signal_run(trained):
    """--mode=inpaint keeps the unmasked part of test example 3 exactly; --mode=img2img with
    a strength keeping no step (0.1 of 5 steps) returns the input in every result."""
    config, workdir, _ = trained
    config = config.copy_and_resolve_references()
    config.edit.input, config.edit.mask, config.edit.resample = "3", "left_half", 2
    config.edit.jump_length = 2
    stem = editing.edit_from_workdir(config, workdir, "inpaint").removesuffix(".png")
    with np.load(stem + ".npz") as f:
        row = f["signals"]
    x, mask = row[0], (row[1] > 0)  # input, mask (shown as +-1), then 3 results
    assert row.shape == (5, 32, 1) and not mask[:16].any() and mask[16:].all()
    np.testing.assert_array_equal(row[2:, 16:], np.broadcast_to(x[16:], (3, 16, 1)))
    np.testing.assert_array_equal(x, sines.make_example("test", 3, 32, 1)[0])
    config.edit.strength = 0.1
    stem = editing.edit_from_workdir(config, workdir, "img2img").removesuffix(".png")
    with np.load(stem + ".npz") as f:
        row = f["signals"]
    np.testing.assert_array_equal(row[1:], np.broadcast_to(row[0], (3, 32, 1)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("strength", 0.0, r"config.edit.strength=0.0 must be a number > 0 and <= 1"),
        ("input", "nope.png", "config.edit.input='nope.png' is neither a test-set index"),
        ("mask", "ring", "config.edit.mask='ring' is not one of center, left_half, random_b"),
        ("resample", 0, "config.edit.resample=0 must be an int >= 1"),
        ("num_samples", 0, "config.edit.num_samples=0 must be an int >= 1"),
    ],
)
def test_bad_edit_config_is_a_clear_error_before_any_io(field, value, message, tmp_path):
    config = tiny_signal_config()
    config.edit[field] = value
    mode = "img2img" if field == "strength" else "inpaint"
    with pytest.raises(ValueError, match=message):
        editing.edit_from_workdir(config, str(tmp_path / "none"), mode)
    assert not os.path.exists(tmp_path / "none")


def test_named_masks():
    rng = np.random.default_rng(0)
    center = editing.named_mask("center", (8, 8), rng)
    assert center.shape == (8, 8, 1) and center[2:6, 2:6].sum() == 0 and center.sum() == 48
    left = editing.named_mask("left_half", (32,), rng)
    np.testing.assert_array_equal(left[:, 0], np.repeat([0.0, 1.0], 16))
    boxes = editing.named_mask("random_boxes", (32, 32), rng)
    assert 0 < boxes.sum() < 32 * 32 and set(np.unique(boxes)) == {0.0, 1.0}
