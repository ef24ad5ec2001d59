"""Inpainting (replacement, RePaint) and SDEdit on data whose exact denoiser is known.

Tolerances follow tests/test_samplers.py: with N samples the standard error of a mean is
s / sqrt(N), of a variance s^2 sqrt(2 / N); bounds allow 4 standard errors plus the sampler's
own bias (DDPM fixed_small: variance -1.5 % at s = 0.5, -3.7 % at s = 0.2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import alpha_sigma_at, gaussian_denoiser, mixture_denoiser
from PIL import Image

from ddpm import editing, samplers
from ddpm.data import create_dataset
from ddpm.schedules import get_schedule
from tests.tiny import tiny_config

SCHEDULE = get_schedule("linear", 1000)
N = 4000
MEAN = np.array([0.5, -0.3, 0.2, 0.1])
STD = np.array([0.5, 0.2, 0.4, 0.3])
GAUSS = gaussian_denoiser(SCHEDULE, MEAN, STD)  # independent pixels
MASK = np.array([1.0, 0.0, 1.0, 0.0])  # keep pixels 0 and 2
KNOWN = np.array([0.9, 0.0, -0.4, 0.0], np.float32)
KEEP, GEN = MASK > 0, MASK == 0


def draw(denoise, shape, seed=0, **kw):
    """`samplers.sample` under jit with the editing arrays as traced arguments."""
    arrays = {k: kw.pop(k) for k in ("known", "mask", "init", "labels") if k in kw}
    fn = jax.jit(lambda rng, a: samplers.sample(denoise, SCHEDULE, shape, rng, **a, **kw))
    return np.asarray(fn(jax.random.key(seed), arrays), np.float64)


def correlated_denoiser(mean: np.ndarray, cov: np.ndarray):
    """Exact eps-denoiser of N(mean, cov) (full covariance):
    E[x_0 | x_t] = mean + alpha cov (alpha^2 cov + sigma^2 I)^-1 (x_t - alpha mean)."""
    d = len(mean)
    c, m = jnp.asarray(cov, jnp.float32), jnp.asarray(mean, jnp.float32)

    def denoise(x, t, labels):
        a, s = alpha_sigma_at(SCHEDULE, t, x.ndim)
        mat = a[:, :, None] ** 2 * c + s[:, :, None] ** 2 * jnp.eye(d)
        x0 = m + a * (jnp.linalg.solve(mat, (x - a * m)[..., None])[..., 0] @ c)
        return (x - a * x0) / s

    return denoise


# ------------------------------------------------------------------------------------------
# Inpainting.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="ddpm", num_steps=100),
        dict(method="ddim", num_steps=30, eta=0.5),
        dict(method="dpm++2m", num_steps=15, spacing="karras"),
        dict(method="dpm++2s", num_steps=8),
        dict(method="heun", num_steps=10, churn=2.0),
    ],
    ids=["ddpm", "ddim", "dpm++2m", "dpm++2s", "heun"],
)
def test_inpainting_keeps_known_pixels_and_leaves_independent_pixels_as_sampled(kwargs):
    """Pixels independent of the known ones have the unconditional sampler's law, and here the
    same draws: with a per-pixel denoiser and the same key the generated pixels equal plain
    sampling's (its moments are tested in test_samplers.py); kept pixels are `known` exactly."""
    shape = (64, 4)
    x = draw(GAUSS, shape, known=KNOWN, mask=MASK, **kwargs)
    plain = draw(GAUSS, shape, **kwargs)
    np.testing.assert_array_equal(x[:, KEEP], np.broadcast_to(KNOWN[KEEP], (64, 2)))
    np.testing.assert_allclose(x[:, GEN], plain[:, GEN], atol=1e-5)


def test_repaint_keeps_the_marginal_of_independent_pixels():
    """Jumps noise a sample of p(x_a) forward to p(x_b), so RePaint (blocks of 10 run 3 times)
    leaves the generated pixels with the law of the sampler without jumps: N(mean, std^2) up to
    ddpm-100 fixed_large's variance bias (measured with jumps: +5.6 %, +2.5 %; fixed_small's is
    -26 %, -17 % at 100 steps, which is why this test uses fixed_large)."""
    m, v = MEAN[GEN], STD[GEN] ** 2
    for resample in (1, 3):
        kw = dict(method="ddpm", num_steps=100, variance="fixed_large", resample=resample)
        x = draw(GAUSS, (N, 4), known=KNOWN, mask=MASK, **kw)
        np.testing.assert_array_equal(x[:, KEEP], np.broadcast_to(KNOWN[KEEP], (N, 2)))
        assert np.all(np.abs(x[:, GEN].mean(0) - m) < 4 * np.sqrt(1.1 * v / N)), x.mean(0)
        rel = x[:, GEN].var(0) / v - 1
        assert np.all(np.abs(rel) < 4 * np.sqrt(2 / N) + 0.07), (resample, rel)


def test_inpainting_correlated_gaussian_approaches_the_conditional_with_repaint():
    """N(mu, C) with correlation 0.8: the exact conditional of pixels 2, 3 given pixels 0, 1
    = (1.0, 0.4) has mean (1.273, 0.387) and variance (0.104, 0.026) (marginal: mean (0.5, 0),
    variance (0.36, 0.09)). Replacement alone is known to under-condition (it ignores how
    the kept pixels' noise correlates with the rest; measured mean (0.967, 0.279), variance
    (0.141, 0.027)); RePaint resampling (blocks of 10, 10 times) harmonises: measured mean
    (1.186, 0.348), variance (0.106, 0.023). Required: RePaint's mean error below 15 % of the
    conditioning shift and below half of replacement's; its variance within 15 %."""
    mu, std = np.array([0.3, -0.2, 0.5, 0.0]), np.array([0.5, 0.4, 0.6, 0.3])
    cov = np.outer(std, std) * (0.8 + 0.2 * np.eye(4))
    den = correlated_denoiser(mu, cov)
    mask, known = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.4, 0.0, 0.0])
    k, u = mask > 0, mask == 0
    gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
    cond_mean = mu[u] + gain @ (known[k] - mu[k])
    cond_var = np.diag(cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)])
    shift = np.abs(cond_mean - mu[u])
    err = {}
    for resample in (1, 10):
        x = draw(den, (N, 4), known=known, mask=mask, method="ddpm", num_steps=100,
                 jump_length=10, resample=resample)  # fmt: skip
        np.testing.assert_allclose(x[:, k], np.broadcast_to(known[k], (N, 2)), atol=1e-6)
        err[resample] = np.abs(x[:, u].mean(0) - cond_mean) / shift
        var_err = np.abs(x[:, u].var(0) / cond_var - 1)
    assert np.all(err[10] < 0.15) and np.all(err[10] < 0.5 * err[1]), err
    assert np.all(var_err < 0.15), var_err


def test_inpainting_with_guidance_follows_the_guided_class():
    """Classes N(-+1, 0.2^2) in 4 pixels; inpainting pixel 0 with +1 (class 1's value) while
    guiding class 0 with s = 3 gives generated pixels of class 0 (s = 3 overshoots the class
    mean a little: measured -1.10); the kept pixel is exact."""
    means = np.array([np.full(4, -1.0), np.full(4, 1.0)])
    den = mixture_denoiser(SCHEDULE, means, np.full((2, 4), 0.2), null_label=2)
    mask, known = np.array([1.0, 0.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])
    labels = jnp.zeros(256, jnp.int32)
    x = draw(den, (256, 4), known=known, mask=mask, labels=labels, method="dpm++2m",
             num_steps=20, guidance_scale=3.0, null_label=2)  # fmt: skip
    np.testing.assert_array_equal(x[:, 0], 1.0)
    assert np.all(x[:, 1:] < 0) and -1.3 < x[:, 1:].mean() < -0.9, x[:, 1:].mean()


def test_repaint_order():
    rows, jumps, srcs = samplers.repaint_order(5, 2, 2)
    np.testing.assert_array_equal(rows, [0, 1, 0, 0, 1, 2, 3, 2, 2, 3, 4, 4, 4])
    np.testing.assert_array_equal(np.flatnonzero(jumps), [2, 7, 11])
    np.testing.assert_array_equal(srcs[jumps], [1, 3, 4])  # jump from the level after row src
    rows, jumps, _ = samplers.repaint_order(7, 10, 1)
    np.testing.assert_array_equal(rows, np.arange(7))
    assert not jumps.any()


# ------------------------------------------------------------------------------------------
# SDEdit.


def test_sdedit_strength_one_is_unconditional_sampling_with_the_same_noise():
    init = np.full((32, 4), 0.7)
    for kw in (dict(method="ddpm", num_steps=20), dict(method="dpm++2m", num_steps=10)):
        edited = draw(GAUSS, (32, 4), seed=3, init=init, strength=1.0, **kw)
        np.testing.assert_array_equal(edited, draw(GAUSS, (32, 4), seed=3, **kw))


def test_sdedit_small_strength_returns_the_input():
    """No step kept (strength 0.01 of 50 steps) returns the input exactly; with all 1000 steps
    the output moves away from the input continuously as strength grows (first level s_0 =
    0.01 at strength 0.001)."""
    init = np.random.default_rng(0).uniform(-1, 1, (256, 4))
    out = draw(GAUSS, (256, 4), init=init, strength=0.01, method="ddim", num_steps=50)
    np.testing.assert_array_equal(out, init.astype(np.float32))
    kw = dict(method="ddim", num_steps=1000)
    dist = [np.abs(draw(GAUSS, (256, 4), init=init, strength=s, **kw) - init).mean()
            for s in (0.001, 0.01, 0.1, 0.5)]  # fmt: skip
    assert dist[0] < 0.01 and np.all(np.diff(dist) > 0), dist


def test_sdedit_matches_the_closed_form_posterior():
    """Per pixel, N(m, v) data started from x_t = a x_in + s z (a, s: the level at t = 299,
    strength 0.3 of 1000 ddpm steps) and denoised exactly gives x_0 with
    mean m + a^2 v (x_in - m) / (a^2 v + s^2) and variance v s^2 (2 a^2 v + s^2) / (a^2 v + s^2)^2
    ((p(x_0 | x_t) averaged over x_t)); 4 SE + DDPM's variance bias of 4 %."""
    init = np.array([1.0, -1.0, 0.0, 0.6])
    x = draw(GAUSS, (N, 4), init=init, strength=0.3, method="ddpm", num_steps=1000)
    t = samplers.kept_steps(1000, 0.3) - 1  # 300 of the steps 999, ..., 0: from t = 299 on
    assert t == 299
    a, s = float(SCHEDULE.sqrt_alpha_bars[t]), float(SCHEDULE.sqrt_one_minus_alpha_bars[t])
    v = STD**2
    d = a**2 * v + s**2
    mean, var = MEAN + a**2 * v * (init - MEAN) / d, v * s**2 * (2 * a**2 * v + s**2) / d**2
    assert np.all(np.abs(x.mean(0) - mean) < 4 * np.sqrt(var / N)), (x.mean(0), mean)
    assert np.all(np.abs(x.var(0) / var - 1) < 4 * np.sqrt(2 / N) + 0.04), (x.var(0), var)


# ------------------------------------------------------------------------------------------
# Compilation and validation.


def test_editing_sampler_traces_once_for_new_params_rng_images_and_masks():
    traces = []

    def model_fn(params, x, t, labels):
        traces.append(1)
        return GAUSS(x, t, labels) * params

    shape = (8, 4)
    inpaint = samplers.make_sampler(
        model_fn, SCHEDULE, shape, method="ddpm", num_steps=10, jump_length=3, resample=2
    )
    img2img = samplers.make_sampler(model_fn, SCHEDULE, shape, method="ddim", num_steps=10,
                                    strength=0.5)  # fmt: skip
    rng = np.random.default_rng(0)
    outs = []
    for i in range(3):
        known, mask = rng.normal(size=shape), (rng.random(shape) < 0.5).astype(np.float32)
        x = inpaint(jnp.float32(1 + 0.1 * i), jax.random.key(i), known=known, mask=mask)
        np.testing.assert_allclose(np.asarray(x)[mask > 0], known[mask > 0], atol=1e-6)
        outs.append(img2img(jnp.float32(1 + 0.1 * i), jax.random.key(i), init=known))
    assert len(traces) == 2  # one per sampler
    assert all(np.all(np.isfinite(o)) for o in outs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.0, init=np.zeros(4)), r"^strength=0.0 must lie in \(0, 1\]"),
        (dict(strength=1.5, init=np.zeros(4)), "^strength=1.5"),
        (dict(strength=0.5), "needs an input image"),
        (dict(resample=3), r"^resample=3 \(RePaint\) needs a mask"),
        (dict(jump_length=0, mask=MASK, known=KNOWN), "^jump_length=0"),
        (dict(mask=MASK), "needs both known"),
    ],
)
def test_invalid_editing_options_raise_before_tracing(kwargs, message):
    def never(x, t, labels):
        raise AssertionError("the model must not be traced")

    with pytest.raises(ValueError, match=message):
        samplers.sample(never, SCHEDULE, (2, 4), jax.random.key(0), num_steps=5, **kwargs)


# ------------------------------------------------------------------------------------------
# --mode=inpaint / img2img inputs for images (the signal run's end-to-end test is in
# test_signals.py).


def test_image_inputs_and_masks_from_the_test_set_and_png(tmp_path):
    """A test-set index reads the example the test pipeline yields at that position; a PNG is
    read as is (16x16 gray here); a PNG mask keeps its white pixels, like the named mask."""
    config = tiny_config()
    batch = next(create_dataset(config, "test", batch_size=8, seed=0, shuffle=False))
    config.edit.input = "5"
    x, label = editing.load_input(config)
    np.testing.assert_array_equal(x, batch["image"][5])
    assert label == batch["label"][5]
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    config.edit.input = str(tmp_path / "in.png")
    x, label = editing.load_input(config)
    np.testing.assert_array_equal(x[..., 0], pixels / np.float32(127.5) - 1)
    assert label is None
    mask = np.full((32, 32), 255, np.uint8)
    mask[:, :16] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")  # resized to 16x16 (nearest)
    np.testing.assert_array_equal(
        editing.load_mask(str(tmp_path / "mask.png"), (16, 16), 0),
        editing.named_mask("left_half", (16, 16), np.random.default_rng(0)),
    )
