"""Samplers checked against data whose exact denoiser is known (tests/gaussian.py).

Tolerances are stated from the sample count N: the standard error of a mean is s / sqrt(N),
of a variance s^2 sqrt(2 / N); bounds allow 4 standard errors plus the sampler's own
discretisation error where it has one (measured against the float64 ODE reference).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import gaussian_denoiser, mixture_denoiser, mixture_flow

from ddpm import processes, samplers
from ddpm.diffusion import alpha_sigma, velocity
from ddpm.schedules import get_schedule

SCHEDULE = get_schedule("linear", 1000)
MEANS = np.array([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]])
STDS = np.array([[0.3, 0.2], [0.25, 0.4], [0.2, 0.2]])
NULL = 3  # the mixture's "no class" label
G_MEAN, G_STD = np.array([0.5, -0.3]), np.array([0.5, 0.2])


MIX = mixture_denoiser(SCHEDULE, MEANS, STDS, null_label=NULL)
GAUSS = gaussian_denoiser(SCHEDULE, G_MEAN, G_STD)
_COMPILED = {}


def draw(denoise, shape, seed=0, schedule=SCHEDULE, **kw):
    """Runs `samplers.sample` under jit; labels and guidance_scale are traced arguments, so
    calls differing only in those (or the seed) share one compiled sampler."""
    labels = kw.pop("labels", None)
    scale = kw.pop("guidance_scale", None)
    key = (denoise, shape, id(schedule), tuple(sorted(kw.items())), labels is None, scale is None)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(
            lambda rng, labels, scale: samplers.sample(
                denoise, schedule, shape, rng, labels=labels, guidance_scale=scale, **kw
            )
        )
    return np.asarray(_COMPILED[key](jax.random.key(seed), labels, scale), np.float64)


def ode_reference(shape, seed=0, r_to=0.0):
    """Float64 probability-flow solution from the same x_T the sampler draws (`sample` takes
    x_T ~ N(0, I) from the first half of split(rng)), started at s_{T-1}."""
    x_T = np.asarray(jax.random.normal(jax.random.split(jax.random.key(seed))[0], shape))
    alpha, sigma = (
        float(SCHEDULE.sqrt_alpha_bars[-1]),
        float(SCHEDULE.sqrt_one_minus_alpha_bars[-1]),
    )
    return mixture_flow(x_T / alpha, sigma / alpha, r_to, MEANS, STDS)


def rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ------------------------------------------------------------------------------------------
# Grids and validation.


def test_timesteps_documented_grids():
    np.testing.assert_array_equal(samplers.timesteps(10, 3, "leading"), [6, 3, 0])
    np.testing.assert_array_equal(samplers.timesteps(10, 3, "trailing"), [9, 6, 2])
    np.testing.assert_array_equal(samplers.timesteps(10, 3, "linspace"), [9, 4, 0])
    np.testing.assert_array_equal(samplers.timesteps(1000, 3, "trailing"), [999, 666, 332])
    t = samplers.timesteps(1000, 50, "trailing")
    np.testing.assert_array_equal(t, np.arange(999, 0, -20))
    np.testing.assert_array_equal(samplers.timesteps(1000, 50, "leading"), np.arange(980, -1, -20))
    lin = samplers.timesteps(1000, 50, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and len(set(lin)) == 50
    for spacing in ("leading", "trailing", "linspace"):
        np.testing.assert_array_equal(samplers.timesteps(7, 7, spacing), np.arange(6, -1, -1))


def test_karras_levels_and_fractional_time():
    s = samplers.karras_sigmas(jnp.float32(0.01), jnp.float32(80.0), 5, rho=7.0)
    np.testing.assert_allclose([s[0], s[-1]], [80.0, 0.01], rtol=1e-5)
    ramp = np.linspace(0, 1, 5)
    expect = (80.0 ** (1 / 7) + ramp * (0.01 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, expect, rtol=1e-5)
    table = np.sqrt(1 - np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))) / np.sqrt(
        np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    )
    t = samplers.sigma_to_t(SCHEDULE, jnp.asarray(table[[0, 17, 500, 999]], jnp.float32))
    np.testing.assert_allclose(t, [0, 17, 500, 999], atol=2e-3)
    mid = samplers.t_to_sigma(SCHEDULE, jnp.float32(17.5))
    np.testing.assert_allclose(mid, np.sqrt(table[17] * table[18]), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="ddmi"),
            re.escape("method='ddmi' is not one of ddpm, ddim, dpm++2m, dpm++2s, euler, heun"),
        ),
        (dict(spacing="even"), "spacing='even' is not one of leading, trailing, linspace, karras"),
        (dict(spacing="even", method="euler"), "spacing='even' is not one of"),
        (dict(num_steps=0), "num_steps=0 must be an integer in"),
        (
            dict(num_steps=1001),
            re.escape(
                "num_steps=1001 must be an integer in [1, 1000] (the schedule's num_timesteps)"
            ),
        ),
        (dict(num_steps=1001, method="euler", spacing="trailing"), "num_steps=1001"),
        (dict(eta=1.5), re.escape("eta=1.5 must lie in [0, 1]")),
        (dict(prediction="score"), "prediction='score' is not one of eps, x0, v"),
        (dict(variance="big", method="ddpm"), "variance='big'"),
        (
            dict(guidance_scale=3.0, labels=np.zeros(4, np.int32)),
            "guidance_scale != 1 needs labels and null_label",
        ),
        (dict(churn=1.0, method="ddim"), "churn=1.0 applies to euler, heun"),
    ],
    ids=[
        "method",
        "spacing",
        "spacing-euler",
        "steps0",
        "steps>T",
        "steps>T-euler-trailing",
        "eta",
        "prediction",
        "variance",
        "null",
        "churn",
    ],
)
def test_invalid_configuration_raises_before_tracing(kwargs, message):
    """Each message starts with the offending argument of `sample` (no config path)."""

    def never(x, t, labels):
        raise AssertionError("the model must not be traced")

    with pytest.raises(ValueError, match="^" + message):
        samplers.sample(never, SCHEDULE, (4, 2), jax.random.key(0), **kwargs)


def test_karras_steps_are_not_bounded_by_num_timesteps():
    """Euler with 12 Karras steps on a 10-step schedule reproduces its exact output moments.

    Each Euler step y' = y + (s' - s) E[eps | y] is affine in the VE variable y = x / alpha for
    Gaussian data, y - mu -> (y - mu)(1 + (s' - s) s / (std^2 + s^2)), so from x_T ~ N(0, 1)
    (y ~ N(0, 1 + s_max^2)) over the Karras levels between the schedule's s_0 and s_{T-1}
    (rho 7) and then 0, the samples are Gaussian with the mean and variance computed here in
    float64 (the last step to 0 returns E[x_0 | x at s_0], whose variance is below the data's:
    -41 % and -57 %). Tolerance: 4 standard errors of N samples (mean sqrt(var / N), variance
    var sqrt(2 / N)); with 1e5 samples (3 seeds) the float32 sampler was within 2.1 SE of them."""
    small = get_schedule("cosine", 10)
    x = draw(gaussian_denoiser(small, G_MEAN, G_STD), (N, 2), schedule=small, method="euler",
             num_steps=12)  # fmt: skip
    ab = np.asarray(small.alpha_bars, np.float64)
    s_min, s_max = np.sqrt((1 - ab[[0, -1]]) / ab[[0, -1]])
    ramp = np.linspace(0, 1, 12)
    levels = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    gain = 1.0
    for s, s_next in zip(levels, np.append(levels[1:], 0.0), strict=True):
        gain = gain * (1 + (s_next - s) * s / (G_STD**2 + s**2))
    mean, var = G_MEAN * (1 - gain), gain**2 * (1 + s_max**2)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * np.sqrt(var / N)), (x.mean(0), mean)
    assert np.all(np.abs(x.var(0) - var) < 4 * var * np.sqrt(2 / N)), (x.var(0), var)


def test_respaced_ddpm_posterior_with_all_steps_is_the_schedules():
    """On the 1000-step trailing grid the respaced process is the schedule itself: beta, and the
    ancestral step's posterior, coef_x0 = beta alpha' / sigma^2, coef_xt = (sigma'^2 / sigma^2)
    sqrt(1 - beta) and beta~ = beta sigma'^2 / sigma^2 (as `samplers.ddpm_step` forms them from
    the rows), are the schedule's tables (beta~ but at t = 0, where the step adds no noise)."""
    g = samplers.grid(SCHEDULE, 1000, "trailing")
    rev = slice(None, None, -1)
    ratio = jnp.square(g.to.sigma / g.now.sigma)
    np.testing.assert_allclose(g.beta, SCHEDULE.betas[rev], rtol=1e-5)
    coef_x0 = g.beta * g.to.alpha / jnp.square(g.now.sigma)
    np.testing.assert_allclose(coef_x0, SCHEDULE.posterior_mean_coef1[rev], rtol=1e-4)
    coef_xt = ratio * jnp.sqrt(1.0 - g.beta)
    np.testing.assert_allclose(coef_xt, SCHEDULE.posterior_mean_coef2[rev], rtol=1e-5)
    np.testing.assert_allclose(
        jnp.log(g.beta * ratio)[:-1],
        SCHEDULE.posterior_log_variance_clipped[rev][:-1],
        rtol=1e-5,
        atol=1e-4,
    )


def diffusers_euler_sigmas(num_steps, spacing):
    """diffusers' `EulerDiscreteScheduler.set_timesteps` for `timestep_spacing` (steps_offset 0,
    no Karras sigmas), in float64 from the linear betas: (timesteps [n], sigmas [n + 1]) with
    sigmas = sqrt((1 - ab) / ab) interpolated at the timesteps, then 0. Its linspace timesteps
    are fractional unless (T - 1) / (n - 1) is an integer."""
    T = 1000
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps)[::-1]
    elif spacing == "leading":
        ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1]
    else:
        ts = np.arange(T, 0, -T / num_steps).round() - 1
    return ts, np.append(np.interp(ts, np.arange(T), np.sqrt((1 - ab) / ab)), 0.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_heun_levels_on_timesteps_are_diffusers_euler_sigmas(spacing):
    """With n = 28 steps (T / n = 35.7: trailing rounds; linspace's 999 / 27 = 37 makes
    diffusers' timesteps integers too) the euler/heun grid's VE levels s [n] and s_next [n]
    (ending at 0) are diffusers' sigmas (float32 tables: rtol 2e-6); the model is called at its
    integer timesteps t [n], and heun's second call at the next ones, t_next [n] (the last row
    unused)."""
    ts, sigmas = diffusers_euler_sigmas(28, spacing)
    g = samplers.grid(SCHEDULE, 28, spacing)
    process = processes.Discrete(SCHEDULE)
    np.testing.assert_allclose(process.ode_variable(g.now)[0], sigmas[:-1], rtol=2e-6)
    np.testing.assert_allclose(process.ode_variable(g.to)[0], sigmas[1:], rtol=2e-6)
    np.testing.assert_array_equal(g.now.t, ts)
    np.testing.assert_array_equal(g.to.t[:-1], ts[1:])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
def test_churn_raises_levels_on_any_grid_and_calls_the_model_there(spacing):
    """EDM churn 5.6 over n = 28 steps (gamma 0.2), tmin 0.5: s_hat = min(1.2 s, s_{T-1}) where
    s >= 0.5, else s (float64 reference from the linear betas); the model time t [n] has level
    s_hat (t_to_sigma(t) = s_hat), and on timestep grids rows left at s keep their integer t."""
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    s_max = np.sqrt((1 - ab[-1]) / ab[-1])
    g = samplers.grid(SCHEDULE, 28, spacing)
    opts = samplers.Options(method="euler", num_steps=28, churn=5.6, churn_tmin=0.5)
    hat = samplers.churned(processes.Discrete(SCHEDULE), g.now, opts)
    s = np.asarray(g.now.sigma / g.now.alpha, np.float64)
    s_hat = np.where(s >= 0.5, np.minimum(1.2 * s, s_max), s)
    np.testing.assert_allclose(hat.sigma / hat.alpha, s_hat, rtol=1e-5)
    np.testing.assert_allclose(samplers.t_to_sigma(SCHEDULE, hat.t), s_hat, rtol=1e-4)
    raised = s_hat > s * (1 + 1e-6)
    assert raised.any() and not raised.all()
    if spacing != "karras":
        np.testing.assert_array_equal(
            hat.t[~raised], samplers.timesteps(1000, 28, spacing)[~raised]
        )


@pytest.mark.parametrize("method", samplers.METHODS)
def test_spacing_none_builds_the_methods_default_grid(method):
    """spacing=None: the method's grid [n] is bitwise that of karras for euler/heun and of
    trailing for the others, and so are the samples."""
    process = processes.Discrete(SCHEDULE)
    default = "karras" if method in ("euler", "heun") else "trailing"
    resolved = samplers.Options(method=method).spacing_for(process)
    assert resolved == default
    none, explicit = samplers.grid(SCHEDULE, 28, resolved), samplers.grid(SCHEDULE, 28, default)
    for got, want in zip(jax.tree.leaves(none), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(got, want)
    denoise = gaussian_denoiser(SCHEDULE, G_MEAN, G_STD)
    a = draw(denoise, (8, 2), method=method, num_steps=6)
    b = draw(denoise, (8, 2), method=method, num_steps=6, spacing=default)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Distribution checks.

N = 4000  # samples of 2-d data: mean SE = s / 63, variance SE = s^2 / 45 (about 2.2 %)


def gaussian_ddim_moments(ts, mean, std, eta):
    """Exact mean and variance of DDIM (Song et al., 2021, eq. 12) over timesteps `ts` then
    x_0, for N(mean, std^2) data and its exact denoiser, from x_T ~ N(0, 1); in float64 from
    the linear betas directly. Every step is affine in x_t: D = mean + k (x - a mean),
    eps = (x - a D) / sg. eta = 1 over all T steps is DDPM ancestral (fixed_small variance)."""
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    levels = np.append(ab[ts], 1.0)
    m, v = 0.0, 1.0
    for ab_t, ab_next in zip(levels[:-1], levels[1:], strict=True):
        a, sg, an, sn = np.sqrt(ab_t), np.sqrt(1 - ab_t), np.sqrt(ab_next), np.sqrt(1 - ab_next)
        k = a * std**2 / (a**2 * std**2 + sg**2)
        var_eta = eta**2 * (sn / sg) ** 2 * (1 - ab_t / ab_next)
        c = np.sqrt(sn**2 - var_eta)
        slope = an * k + c * (1 - a * k) / sg
        offset = (an - c * a / sg) * mean * (1 - a * k)
        m, v = slope * m + offset, slope**2 * v + var_eta
    return m, v


@pytest.mark.parametrize(
    "kwargs, eta",
    [
        (dict(method="ddpm", num_steps=1000), 1.0),
        (dict(method="ddim", num_steps=50), 0.0),
        (dict(method="ddim", num_steps=100, eta=0.5, spacing="linspace"), 0.5),
    ],
    ids=["ddpm1000", "ddim50", "ddim100-eta0.5"],
)
def test_ddpm_ddim_match_their_exact_gaussian_moments(kwargs, eta):
    """Samples within 4 SE of the exact moments of the sampler; those are the data's up to
    DDPM's own bias (fixed_small: variance -1.5 % at s = 0.5, -3.7 % at s = 0.2) and DDIM's
    discretisation (50 steps: -11 %, -25 %)."""
    x = draw(GAUSS, (N, 2), **kwargs)
    ts = samplers.timesteps(1000, kwargs["num_steps"], kwargs.get("spacing", "trailing"))
    mean, var = gaussian_ddim_moments(ts, G_MEAN, G_STD, eta)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * np.sqrt(var / N)), (x.mean(0), mean)
    assert np.all(np.abs(x.var(0) - var) < 4 * var * np.sqrt(2 / N)), (x.var(0), var)
    if kwargs["method"] == "ddpm":  # all T steps: the data distribution itself, to 4 %
        assert np.all(np.abs(mean - G_MEAN) < 0.01 * G_STD)
        np.testing.assert_allclose(var, G_STD**2, rtol=0.04)


@pytest.mark.parametrize(
    "kwargs, bias",
    [
        # Discretisation bias of the variance, measured with 1e5 samples: dpm++2m-20 on
        # Karras levels +10 %, heun-80 < 0.3 %, heun-40 with churn 5: +4 %.
        (dict(method="dpm++2m", num_steps=20, spacing="karras"), 0.12),
        (dict(method="heun", num_steps=80), 0.01),
        (dict(method="heun", num_steps=40, churn=5.0), 0.06),
    ],
    ids=["dpm++2m-20", "heun80", "heun40-churn"],
)
def test_samples_reproduce_gaussian_mean_and_variance(kwargs, bias):
    x = draw(GAUSS, (N, 2), **kwargs)
    assert np.all(np.abs(x.mean(0) - G_MEAN) < 4 * G_STD / np.sqrt(N) + 0.01 * G_STD)
    rel = x.var(0) / G_STD**2 - 1
    assert np.all(np.abs(rel) < 4 * np.sqrt(2 / N) + bias), rel


def test_ddpm_on_mixture_reproduces_component_statistics():
    """Samples of the 3-component mixture, assigned to the nearest mean: weights 1/3 each
    (SE sqrt(2/9 / N) = 0.0075 -> tol 0.03) and per-component means (SE <= 0.4 / 36)."""
    x = draw(MIX, (N, 2), method="ddpm", num_steps=1000)
    k = np.argmin(((x[:, None] - MEANS) ** 2 / STDS**2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(k, minlength=3) / N, 1 / 3, atol=0.03)
    for j in range(3):
        np.testing.assert_allclose(x[k == j].mean(0), MEANS[j], atol=4 * 0.4 / 36)


# ------------------------------------------------------------------------------------------
# Deterministic samplers against the float64 probability-flow ODE.

M = 256  # trajectories (a pure numerical comparison: no sampling error)


@pytest.mark.parametrize(
    "kwargs, bound",
    [
        # Measured rms distance to the exact ODE solution on the mixture: ddim-50 0.04,
        # dpm++2m-20 0.05, dpm++2s-10 (karras) 0.06, euler-50 0.04, heun-20 0.027; on trailing
        # timesteps euler-50 0.027, heun-20 0.039.
        (dict(method="ddim", num_steps=50), 0.06),
        (dict(method="dpm++2m", num_steps=20), 0.08),
        (dict(method="dpm++2s", num_steps=10, spacing="karras"), 0.09),
        (dict(method="euler", num_steps=50), 0.06),
        (dict(method="heun", num_steps=20), 0.04),
        (dict(method="euler", num_steps=50, spacing="trailing"), 0.04),
        (dict(method="heun", num_steps=20, spacing="trailing"), 0.055),
    ],
    ids=[
        "ddim50",
        "dpm++2m-20",
        "dpm++2s-10",
        "euler50",
        "heun20",
        "euler50-trailing",
        "heun20-trailing",
    ],
)
def test_deterministic_samplers_follow_the_ode(kwargs, bound):
    x = draw(MIX, (M, 2), **kwargs)
    assert rms(x, ode_reference((M, 2))) < bound


@pytest.mark.parametrize("method, default", [("euler", "karras"), ("ddim", "trailing")])
def test_spacing_none_samples_as_the_methods_default(method, default):
    """`sample` without a spacing is bitwise the default spacing's: [M, 2] mixture samples of
    50 steps (the spacing-less draw is the one of `test_deterministic_samplers_follow_the_ode`)."""
    x = draw(MIX, (M, 2), method=method, num_steps=50)
    np.testing.assert_array_equal(
        x, draw(MIX, (M, 2), method=method, num_steps=50, spacing=default)
    )


def test_euler_on_timesteps_takes_diffusers_euler_steps():
    """Gaussian data and its exact denoiser, euler on 10 trailing timesteps: the [64, 2] samples
    are the float64 Euler recursion over diffusers' sigmas s_i in the VE variable x = x_t /
    alpha, x <- x + (s_{i+1} - s_i) s_i (x - mu) / (std^2 + s_i^2), started from the sampler's
    own x_T: x = x_T sqrt(1 + s_0^2)."""
    shape, n = (64, 2), 10
    _, sigmas = diffusers_euler_sigmas(n, "trailing")
    x_T = np.asarray(jax.random.normal(jax.random.split(jax.random.key(0))[0], shape))
    x = x_T.astype(np.float64) * np.sqrt(1 + sigmas[0] ** 2)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = x + (s_next - s) * s * (x - G_MEAN) / (G_STD**2 + s**2)
    got = draw(GAUSS, shape, method="euler", num_steps=n, spacing="trailing")
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)


def test_reference_flow_is_exact_on_a_gaussian():
    """For N(mu, s^2) the flow is x(r) = mu + sqrt(s^2 + r^2) / sqrt(s^2 + R^2) (x(R) - mu)."""
    x_R = np.random.default_rng(0).standard_normal((16, 2)) * 30
    got = mixture_flow(x_R, 30.0, 0.0, G_MEAN[None], G_STD[None])
    expect = G_MEAN + G_STD / np.sqrt(G_STD**2 + 900.0) * (x_R - G_MEAN)
    np.testing.assert_allclose(got, expect, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(
    "method, order",
    [("dpm++2m", 2), ("dpm++2s", 2), ("heun", 2), ("ddim", 1)],
)
def test_convergence_order_as_steps_double(method, order):
    """Error against the reference that ends at the grid's last level s_0 and denoises there
    (every grid here ends with that same step), at 20, 40, 80 steps on Karras levels.
    Measured ratios: 2nd order 3.4-4.8, ddim 1.8-2.2; required >= 3 resp. in [1.6, 2.5]."""
    r_min = float(SCHEDULE.sqrt_one_minus_alpha_bars[0] / SCHEDULE.sqrt_alpha_bars[0])
    ref = ode_reference((M, 2), r_to=r_min)
    den = MIX
    errors = [rms(draw(den, (M, 2), method=method, num_steps=n, spacing="karras"), ref)
              for n in (20, 40, 80)]  # fmt: skip
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    if order == 2:
        assert np.all(ratios >= 3.0), (errors, ratios)
    else:
        assert np.all((ratios > 1.6) & (ratios < 2.5)), (errors, ratios)


def test_ddim_eta1_with_all_steps_equals_ddpm_with_the_same_noise():
    shape = (64, 4, 4, 1)  # any data rank: the mixture is per-pixel broadcast to 4x4x1
    den = mixture_denoiser(
        SCHEDULE, np.broadcast_to(MEANS[:, :1, None, None], (3, 4, 4, 1)),
        np.broadcast_to(STDS[:, :1, None, None], (3, 4, 4, 1)),
    )  # fmt: skip
    ddpm = draw(den, shape, method="ddpm", num_steps=1000)
    ddim = draw(den, shape, method="ddim", num_steps=1000, eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="ddpm", num_steps=20, variance="fixed_large"),
        dict(method="dpm++2m", num_steps=15),
        dict(method="heun", num_steps=10, churn=5.0),
    ],
    ids=lambda kw: kw["method"],
)
def test_eps_x0_v_parameterizations_give_the_same_samples(kwargs):
    shape = (128, 2)
    out = {
        p: draw(mixture_denoiser(SCHEDULE, MEANS, STDS, prediction=p), shape, prediction=p,
                **kwargs)
        for p in ("eps", "x0", "v")
    }  # fmt: skip
    np.testing.assert_allclose(out["x0"], out["eps"], atol=2e-3)
    np.testing.assert_allclose(out["v"], out["eps"], atol=2e-3)


def test_learned_variance_interpolates_between_fixed_variances():
    """v = +1 selects log beta (fixed_large), v = -1 the posterior log beta~ (fixed_small)."""
    gauss = GAUSS

    def with_v(v):
        return lambda x, t, y: jnp.concatenate([gauss(x, t, y), jnp.full_like(x, v)], axis=-1)

    kw = dict(method="ddpm", num_steps=25)
    for v, variance in ((1.0, "fixed_large"), (-1.0, "fixed_small")):
        learned = draw(with_v(v), (64, 2), variance="learned", **kw)
        np.testing.assert_allclose(learned, draw(gauss, (64, 2), variance=variance, **kw),
                                   atol=1e-5)  # fmt: skip


def test_x0_clipping_and_dynamic_thresholding_keep_samples_in_range():
    den = gaussian_denoiser(SCHEDULE, np.array([2.5, 0.0]), np.array([0.3, 0.3]))
    raw = draw(den, (512, 2), method="ddim", num_steps=20)
    assert raw[:, 0].mean() > 2.0
    for kw in (dict(clip_x0=True), dict(dynamic_threshold=0.9)):
        x = draw(den, (512, 2), method="ddim", num_steps=20, **kw)
        assert np.abs(x).max() <= 1.0 + 1e-5


# ------------------------------------------------------------------------------------------
# Guidance and compilation.


def test_classifier_free_guidance():
    """Two overlapping classes N(-+0.4, 0.4^2) (x 2 dims; null label 2). The Bayes classifier
    of the clean data labels a class-0 sample correctly with P = Phi(1) = 0.84 (SE 0.008 for
    N = 2000, bound 0.04 with discretisation); unconditional: 0.5. s = 1 (a traced scale) equals
    the conditional sampler, s = 0 the unconditional one, and s = 3 moves samples towards and
    past the class mean, away from the other class: accuracy rises by clearly more than 4 SE."""
    n, means, stds = 2000, np.array([[-0.4, 0.0], [0.4, 0.0]]), np.full((2, 2), 0.4)
    den = mixture_denoiser(SCHEDULE, means, stds, null_label=2)
    labels = np.zeros(n, np.int32)
    kw = dict(method="dpm++2m", num_steps=40, spacing="karras", null_label=2)
    cond = draw(den, (n, 2), labels=labels, **kw)
    uncond = draw(den, (n, 2), labels=np.full(n, 2, np.int32), **kw)
    at = {s: draw(den, (n, 2), labels=labels, guidance_scale=jnp.float32(s), **kw)
          for s in (0.0, 1.0, 3.0)}  # fmt: skip
    np.testing.assert_allclose(at[1.0], cond, atol=1e-5)
    np.testing.assert_allclose(at[0.0], uncond, atol=1e-5)
    accuracy = {s: float(np.mean(x[:, 0] < 0)) for s, x in at.items()}
    assert abs(accuracy[1.0] - 0.841) < 0.04 and abs(accuracy[0.0] - 0.5) < 0.05, accuracy
    assert accuracy[3.0] > accuracy[1.0] + 0.05, accuracy
    shift = {s: float(x[:, 0].mean()) for s, x in at.items()}  # class mean -0.4
    assert shift[0.0] > shift[1.0] > shift[3.0] and abs(shift[1.0] + 0.4) < 0.04, shift


def test_guidance_uses_one_batched_call_and_an_interval():
    batches = []
    den = MIX

    def spy(x, t, labels):
        batches.append(x.shape[0])
        return den(x, t, labels)

    labels = np.arange(8, dtype=np.int32) % 3
    kw = dict(method="ddim", num_steps=10, null_label=NULL, labels=labels)
    cond = draw(spy, (8, 2), **kw)
    guided = draw(spy, (8, 2), guidance_scale=jnp.float32(2.0), **kw)
    assert batches == [8, 16]
    never = draw(den, (8, 2), guidance_scale=2.0, guidance_interval=(1e9, 2e9), **kw)
    always = draw(den, (8, 2), guidance_scale=2.0, guidance_interval=(0.0, np.inf), **kw)
    np.testing.assert_allclose(never, cond, atol=1e-5)
    np.testing.assert_allclose(always, guided, atol=1e-5)
    assert rms(guided, cond) > 0.01


def test_make_sampler_traces_once_for_new_params_rng_labels_and_scale():
    traces = []

    def model_fn(params, x, t, labels):
        traces.append(1)
        den = MIX
        return den(x, t, labels) * params["gain"] + params["shift"]

    fn = samplers.make_sampler(
        model_fn, SCHEDULE, (8, 2), guidance=True, method="dpm++2m", num_steps=5, null_label=NULL
    )
    outs = []
    for i in range(3):
        params = {"gain": jnp.float32(1.0 + 0.1 * i), "shift": jnp.full((2,), 0.01 * i)}
        labels = jnp.full((8,), i % 3, jnp.int32)
        outs.append(fn(params, jax.random.key(i), labels, jnp.float32(1.0 + i)))
    assert len(traces) == 1
    assert all(np.all(np.isfinite(o)) for o in outs)
    assert not np.allclose(outs[0], outs[1])


def test_sample_is_traceable_with_static_configuration_only():
    """One jit over (rng, scale) serves many scales; one scan of num_steps, no callbacks."""
    den = MIX
    f = functools.partial(
        samplers.sample, den, SCHEDULE, (4, 2), method="heun", num_steps=4,
        labels=jnp.zeros(4, jnp.int32), null_label=NULL,
    )  # fmt: skip
    jaxpr = str(jax.make_jaxpr(lambda rng, s: f(rng, guidance_scale=s))(jax.random.key(0), 2.0))
    assert jaxpr.count("length=4") == 1 and "callback" not in jaxpr


def test_zero_terminal_snr_with_v_prediction():
    """ab_{T-1} = 0 (alpha = 0, lambda = -inf at the first step): a v-model still samples.
    Data N(0.3, 0.5^2): mean SE = 0.5 / sqrt(4000) = 0.008, bound 4 SE + 0.01."""
    zsnr = get_schedule("linear", 1000, zero_terminal_snr=True)

    def exact_v(x, t, labels):  # from the tables at integer t (log-sigma interpolation: inf)
        alpha, sigma = alpha_sigma(zsnr, t.astype(jnp.int32), x.ndim)
        var = alpha**2 * 0.25 + sigma**2
        return velocity(
            0.3 + alpha * 0.25 * (x - alpha * 0.3) / var, sigma * (x - alpha * 0.3) / var, alpha,
            sigma,
        )  # fmt: skip

    x = draw(exact_v, (N, 1), schedule=zsnr, method="dpm++2m", num_steps=20, prediction="v")
    assert np.all(np.isfinite(x)) and abs(x.mean() - 0.3) < 4 * 0.5 / np.sqrt(N) + 0.01
