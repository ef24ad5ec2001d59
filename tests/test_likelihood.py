"""Bits/dim from the probability-flow ODE (ddpm.likelihood) for every noise process, against
closed forms on Gaussian data, and score_sde's VP-SDE added as one class.

Data x_0 ~ N(mu, C) in 3-D with a full covariance C (so the denoiser's Jacobian is not
diagonal and Hutchinson's estimate is not exact per probe). At VP level (alpha, sigma):
  E[x_0 | x] = mu + alpha C (alpha^2 C + sigma^2 I)^-1 (x - alpha mu),
and the likelihood's data enter at VE level s_0 (the process's lowest), where y = x_0 + s_0 eps
~ N(mu, C + s_0^2 I) exactly: the reference log-density (float64 SciPy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import gaussian_denoiser
from scipy import stats

from ddpm import diffusion, likelihood, processes, samplers
from ddpm.schedules import get_schedule

MU = np.array([0.5, -0.3, 0.1])
_A = np.array([[0.4, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.25, 0.3]])
COV = _A @ _A.T  # eigenvalues 0.02 ... 0.5: correlated dimensions
PROCESSES = {
    "ddpm": processes.Discrete(get_schedule("cosine", 1000)),
    "edm": processes.EDM(),
    "flow": processes.Flow(),
    "vpsde": processes.VPSDE(),
}


def exact_x0(x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """E[x_0 | x] of N(MU, COV) at VP level (alpha, sigma) [B, 1]; x: [B, 3]."""
    cov, mu = jnp.asarray(COV, jnp.float32), jnp.asarray(MU, jnp.float32)
    gain = jax.vmap(lambda a, s: a * cov @ jnp.linalg.inv(a**2 * cov + s**2 * jnp.eye(3)))(
        alpha[:, 0], sigma[:, 0]
    )
    return mu + jnp.einsum("bij,bj->bi", gain, x - alpha * mu)


def exact_output(process):
    """denoise_fn(x_vp, level) -> the exact output in the process's `prediction`, from the
    level's own (alpha, sigma) (`Process.vp`): so `level_of_ve` must invert the levels."""

    def fn(x, level):
        alpha, sigma = (v[:, None] for v in process.vp(level))
        x0 = exact_x0(x, alpha, sigma)
        return diffusion.x0_to_eps(x, x0, alpha, sigma) if process.prediction == "eps" else x0

    return fn


def reference_logp(y: np.ndarray, process) -> np.ndarray:
    s0 = float(process.ve_range()[0])
    return stats.multivariate_normal(MU, COV + s0**2 * np.eye(3)).logpdf(y)


def draws(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(MU, COV, size=n)


def solve(process, y, divergence, seed=0, tolerance=1e-5):
    fn = jax.jit(
        lambda y, key: likelihood.log_likelihood(
            likelihood.x0_predictor(exact_output(process), process),
            process,
            y,
            key,
            divergence=divergence,
            tolerance=tolerance,
        )
    )
    return fn(jnp.asarray(y, jnp.float32), jax.random.key(seed))


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ode_log_likelihood_equals_the_analytic_one(name):
    """Exact divergence, rtol = atol = 1e-5, 64 draws.

    The ODE part: with the prior's term replaced by the true end marginal at z,
    N(alpha_1 mu, alpha_1^2 C + sigma_1^2 I), log p(y) is within 2e-3 nats per example (3-D)
    of the closed form (the solver's error; measured ~1e-4). A trace without its alpha, a
    level map off by a step or a wrong time change each move it by > 0.01.
    The prior N(0, I) standing in for that marginal costs alpha_1 mu^T z per example, first
    order in alpha_1 (EDM: 1/80) with mean alpha_1^2 |mu|^2: the estimate itself is within
    0.05 per example and 2e-3 on average."""
    process = PROCESSES[name]
    y = draws(64)
    out = solve(process, y, "exact")
    reference = reference_logp(y, process)
    s1 = float(process.ve_range()[1])
    alpha1 = 1.0 / np.sqrt(1.0 + s1**2)
    end = stats.multivariate_normal(alpha1 * MU, alpha1**2 * COV + (1 - alpha1**2) * np.eye(3))
    z, prior = np.asarray(out["z"], np.float64), np.asarray(out["prior"], np.float64)
    ode_part = np.asarray(out["logp"], np.float64) - prior + end.logpdf(z)
    np.testing.assert_allclose(ode_part, reference, atol=2e-3)
    np.testing.assert_allclose(np.asarray(out["logp"]), reference, atol=0.05)
    assert abs(np.mean(np.asarray(out["logp"]) - reference)) < 2e-3
    assert 20 < int(out["nfe"]) < 2000


def test_hutchinson_divergence_is_unbiased():
    """One data point, 512 Rademacher probes (one per row): the mean estimate equals the exact
    log-likelihood within 4 standard errors of the probes' spread, which is not zero (the
    Jacobian has off-diagonal terms, so a single probe is not exact)."""
    process = PROCESSES["flow"]
    y = np.repeat(draws(1, seed=3), 512, axis=0)
    exact = float(solve(process, y[:1], "exact")["logp"][0])
    estimates = np.asarray(solve(process, y, "hutchinson", seed=1)["logp"], np.float64)
    spread = estimates.std(ddof=1)
    assert spread > 1e-3
    assert abs(estimates.mean() - exact) < 4 * spread / np.sqrt(len(estimates))


def test_dequantized_bits_per_dim_of_8bit_data():
    """`dequantize` spreads each 8-bit value uniformly over its bin of width 2/256 (mean
    offset 1/256, bins from -1), and bits/dim = -log p / (n ln 2) + 7: for data uniform over
    [-1, 1] (density 2^-n) that is exactly 8 bits/dim, a uniform model's figure."""
    k = np.random.default_rng(0).integers(0, 256, (4096, 3))
    x = jnp.asarray(k / 127.5 - 1.0, jnp.float32)
    y = np.asarray(likelihood.dequantize(x, jax.random.key(0)), np.float64)
    offset = y - (2 * k / 256 - 1)
    assert offset.min() >= 0 and offset.max() < 2 / 256
    np.testing.assert_allclose(offset.mean(), 1 / 256, rtol=0.02)
    uniform_logp = jnp.full((4,), -3 * np.log(2.0))
    np.testing.assert_allclose(likelihood.bits_per_dim(uniform_logp, (3,)), 8.0, rtol=1e-6)


def test_ddpm_ode_likelihood_is_below_its_discrete_bound():
    """The DDPM model of continuous data N(0.1, 0.3^2) in 4-D on the 8-bit grid, with its exact
    denoiser: the ODE's bits/dim of the dequantized data (the model's exact likelihood up to
    the solver) lies below the variational bound of the same model (T = 1000 steps, its
    discretized decoder), by a margin larger than 4 standard errors of the paired difference,
    and both lie above the data's own discrete entropy minus the errors."""
    schedule = get_schedule("cosine", 1000)
    process = processes.Discrete(schedule)
    mu, std, batch, dims = 0.1, 0.3, 256, 4
    denoiser = gaussian_denoiser(schedule, np.full(dims, mu), np.full(dims, std))
    rng = np.random.default_rng(0)
    x0 = np.clip(np.round((mu + std * rng.standard_normal((batch, dims)) + 1) * 127.5), 0, 255)
    x0 = jnp.asarray(x0 / 127.5 - 1.0, jnp.float32)
    bound = jax.jit(
        lambda x: diffusion.vlb_bpd(
            lambda x, t: denoiser(x, t, None), schedule, x, jax.random.key(1)
        )["bpd"]
    )(x0)

    def ode(x, key):
        y = likelihood.dequantize(x, key)
        x0_fn = likelihood.x0_predictor(lambda x, t: denoiser(x, t, None), process)
        out = likelihood.log_likelihood(x0_fn, process, y, jax.random.key(2), divergence="exact")
        return likelihood.bits_per_dim(out["logp"], x.shape[1:])

    ode_bpd = jax.jit(ode)(x0, jax.random.key(3))
    gap = np.asarray(bound - ode_bpd, np.float64)
    assert gap.mean() > 4 * gap.std(ddof=1) / np.sqrt(batch)
    # -log2 P(k) of the data under its own rounding, per dimension (the entropy's estimate).
    grid = np.arange(256) / 127.5 - 1.0
    edges = np.concatenate([[-np.inf], (grid[:-1] + grid[1:]) / 2, [np.inf]])
    probs = np.diff(stats.norm.cdf(edges, mu, std))
    k = np.round((np.asarray(x0) + 1) * 127.5).astype(int)
    nll = -np.log2(probs[k]).mean(axis=1)
    for figure in (np.asarray(bound), np.asarray(ode_bpd)):
        diff = figure - nll
        assert diff.mean() > -4 * diff.std(ddof=1) / np.sqrt(batch)


def test_vpsde_is_score_sdes_process():
    """score_sde's `VPSDE.marginal_prob` (float64 here): mean coefficient
    exp(-t^2 (b1 - b0) / 4 - t b0 / 2), std sqrt(1 - mean^2); level_of_ve inverts it; the
    training levels are U[t_min, 1] (KS test, n = 20000); the sampler's trailing levels run
    from t = 1 toward t_min."""
    process = processes.VPSDE()
    t = np.array([1e-5, 0.01, 0.3, 0.7, 1.0])
    log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha, sigma = process.vp(t)
    np.testing.assert_allclose(alpha, np.exp(log_mean), rtol=1e-5)
    np.testing.assert_allclose(sigma, np.sqrt(-np.expm1(2 * log_mean)), rtol=2e-4)
    np.testing.assert_allclose(process.level_of_ve(sigma / alpha), t, rtol=2e-3, atol=1e-8)
    levels = np.asarray(process.draw_levels(jax.random.key(0), 20_000), np.float64)
    assert stats.kstest(levels, stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3
    expected = 1.0 - np.arange(4) * (1.0 - 1e-5) / 4
    np.testing.assert_allclose(process.levels(4, "trailing", 7.0), expected, rtol=1e-6)


@pytest.mark.parametrize(("method", "num_steps"), [("heun", 20), ("dpm++2m", 20)])
def test_vpsde_samplers_reproduce_the_gaussian(method, num_steps):
    """The exact VP-SDE network (eps at 999 t) through `Process.denoiser`, sampled with the one
    sampler core: 4096 samples have the data's mean and covariance within 5 standard errors
    (mean: sqrt(C_ii / n); covariance entries: sqrt((C_ii C_jj + C_ij^2) / n)) plus the
    sampler's own discretisation error (measured < 0.01 at 20 steps)."""
    process = processes.VPSDE()

    def net(params, inputs, time, cond):
        alpha, sigma = (v[:, None] for v in process.vp(time / 999.0))
        return diffusion.x0_to_eps(inputs, exact_x0(inputs, alpha, sigma), alpha, sigma)

    n = 4096
    model = process.denoiser(net)
    x = samplers.sample(
        lambda x, t, y: model(None, x, t, y),
        process,
        (n, 3),
        jax.random.key(0),
        method=method,
        num_steps=num_steps,
        prediction=process.prediction,
    )
    x = np.asarray(x, np.float64)
    var = np.diag(COV)
    assert np.all(np.abs(x.mean(0) - MU) < 5 * np.sqrt(var / n) + 0.01)
    err = np.sqrt((np.outer(var, var) + COV**2) / n)
    assert np.all(np.abs(np.cov(x.T) - COV) < 5 * err + 0.01)
