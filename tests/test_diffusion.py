"""Forward process, conversions, posterior and loss against independent computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import diffusion, schedules

SCHEDULE = schedules.get_schedule("linear", 1000)


def test_q_sample_broadcasts_over_any_rank():
    t = jnp.array([0, 500, 999])
    for shape in [(3, 7), (3, 16, 4), (3, 8, 8, 2)]:
        x0, noise = jnp.ones(shape), jnp.full(shape, 2.0)
        x_t = diffusion.q_sample(SCHEDULE, x0, t, noise)
        ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]  # float64 reference
        expected = np.sqrt(ab) + 2 * np.sqrt(1 - ab)
        np.testing.assert_allclose(
            x_t.reshape(3, -1), np.broadcast_to(expected[:, None], (3, x_t[0].size)), rtol=1e-6
        )


@pytest.mark.parametrize("t", [0, 9, 99, 499, 999])
def test_many_small_steps_equal_one_jump(t):
    """The seeds' central claim: t+1 steps of q(x_s | x_{s-1}) give the law of q_sample at t."""
    n = 20_000
    x0 = jnp.broadcast_to(jnp.array([1.0, -0.5, 0.0]), (n, 3))

    def step(x, s):  # x_s ~ q(x_s | x_{s-1}) = N(sqrt(1 - b_s) x_{s-1}, b_s I)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(1), s), x.shape)
        beta = jnp.take(SCHEDULE.betas, s)
        return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise, None

    stepped, _ = jax.jit(lambda x: jax.lax.scan(step, x, jnp.arange(t + 1)))(x0)
    jumped = diffusion.q_sample(
        SCHEDULE, x0, jnp.full((n,), t), jax.random.normal(jax.random.key(2), x0.shape)
    )
    ab = float(SCHEDULE.alpha_bars[t])
    mean, var = np.sqrt(ab) * np.array([1.0, -0.5, 0.0]), 1.0 - ab
    # Standard errors: mean sqrt(var / n); variance var * sqrt(2 / n). Allow 5 of them.
    for x in (stepped, jumped):
        np.testing.assert_allclose(x.mean(0), mean, atol=5 * np.sqrt(var / n))
        np.testing.assert_allclose(x.var(0), var, atol=5 * var * np.sqrt(2 / n))


def test_conversions_round_trip_for_all_t():
    t = jnp.arange(1000)
    x0 = jax.random.uniform(jax.random.key(0), (1000, 6), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.key(1), (1000, 6))
    alpha, sigma = diffusion.alpha_sigma(SCHEDULE, t, 2)
    x_t = diffusion.q_sample(SCHEDULE, x0, t, eps)
    v = diffusion.velocity(x0, eps, alpha, sigma)
    # Dividing by alpha (or sigma) amplifies the float32 rounding of x_t by 1/alpha (1/sigma).
    ulp = 2.0**-23 * (1 + jnp.abs(x_t))
    tol_x0, tol_eps = 8 * ulp / alpha, 8 * ulp / sigma
    assert jnp.all(jnp.abs(diffusion.eps_to_x0(x_t, eps, alpha, sigma) - x0) <= tol_x0)
    assert jnp.all(jnp.abs(diffusion.x0_to_eps(x_t, x0, alpha, sigma) - eps) <= tol_eps)
    assert jnp.all(jnp.abs(diffusion.v_to_x0(x_t, v, alpha, sigma) - x0) <= 8 * ulp)
    assert jnp.all(jnp.abs(diffusion.v_to_eps(x_t, v, alpha, sigma) - eps) <= 8 * ulp)
    for prediction, output in [("eps", eps), ("x0", x0), ("v", v)]:
        x0_hat, eps_hat = diffusion.predict_x0_eps(output, x_t, alpha, sigma, prediction)
        assert jnp.all(jnp.abs(x0_hat - x0) <= tol_x0) and jnp.all(
            jnp.abs(eps_hat - eps) <= tol_eps
        )


def test_posterior_equals_gaussian_conditional():
    """Bayes' rule on the joint of (x_{t-1}, x_t) given x_0, in float64, independently."""
    betas = np.asarray(SCHEDULE.betas, np.float64)
    ab = np.cumprod(1 - betas)
    t = np.array([1, 10, 100, 500, 999])
    x0, x_t = np.array([0.3, -0.7, 0.1, 0.9, -0.2]), np.array([1.2, 0.4, -0.5, 0.0, 2.0])
    # x_{t-1} | x_0 ~ N(m1, v1); x_t | x_{t-1} ~ N(sqrt(a_t) x_{t-1}, b_t).
    m1, v1 = np.sqrt(ab[t - 1]) * x0, 1 - ab[t - 1]
    a_t = 1 - betas[t]
    m2, c12, c22 = np.sqrt(a_t) * m1, np.sqrt(a_t) * v1, a_t * v1 + betas[t]
    mean_ref = m1 + c12 / c22 * (x_t - m2)
    var_ref = v1 - c12**2 / c22

    mean, var, log_var = diffusion.q_posterior(
        SCHEDULE, jnp.asarray(x0)[:, None], jnp.asarray(x_t)[:, None], jnp.asarray(t)
    )
    np.testing.assert_allclose(mean[:, 0], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0], var_ref, rtol=1e-5)
    np.testing.assert_allclose(log_var[:, 0], np.log(var_ref), rtol=1e-5)
    # At t = 0 the posterior is a point mass on x0; its log-variance is clipped to step 1's.
    mean0, var0, log_var0 = diffusion.q_posterior(
        SCHEDULE, jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.zeros(1, int)
    )
    np.testing.assert_allclose(mean0, 1.0, rtol=1e-6)
    assert var0[0, 0] == 0 and np.isclose(log_var0[0, 0], np.log(SCHEDULE.posterior_variance[1]))


# Gaussian data x0 ~ N(MU, S^2) per dimension: E[eps | x_t] = sigma (x_t - alpha MU) / (alpha^2 S^2
# + sigma^2), and the least eps-MSE at t is Var(eps | x_t) = alpha^2 S^2 / (alpha^2 S^2 + sigma^2).
MU, S = 0.5, 0.3


def _exact_eps(params, x_t, t, rng, *, scale=1.0, offset=0.0):
    del params, rng
    alpha, sigma = diffusion.alpha_sigma(SCHEDULE, t, x_t.ndim)
    return scale * sigma * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2) + offset


def _analytic_eps_loss(schedule):
    ab = np.asarray(schedule.alpha_bars, np.float64)
    return np.mean(ab * S**2 / (ab * S**2 + 1 - ab))


def test_exact_denoiser_has_the_analytic_loss_and_beats_perturbations():
    n, d = 20_000, 4
    x0 = MU + S * jax.random.normal(jax.random.key(0), (n, d))
    loss = jax.jit(
        lambda fn: diffusion.loss(None, fn, SCHEDULE, x0, jax.random.key(1)), static_argnums=0
    )
    exact, aux = loss(_exact_eps)
    per_example = np.asarray(aux["per_example"])
    assert per_example.shape == (n,) and aux["t"].shape == (n,)
    # The per-example losses are iid with std ~ per_example.std(); allow 5 standard errors.
    np.testing.assert_allclose(
        exact, _analytic_eps_loss(SCHEDULE), atol=5 * per_example.std() / np.sqrt(n)
    )
    for perturbed in [
        functools.partial(_exact_eps, scale=1.05),
        functools.partial(_exact_eps, scale=0.95),
        functools.partial(_exact_eps, offset=0.02),
    ]:
        assert loss(perturbed)[0] > exact  # same t and noise: the excess is a sum of squares


def test_x0_and_v_targets_and_min_snr_weights():
    n = 64
    x0 = jax.random.normal(jax.random.key(0), (n, 3))
    rng = jax.random.key(5)
    t_rng, noise_rng, _ = jax.random.split(rng, 3)
    t = jax.random.randint(t_rng, (n,), 0, 1000, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape)
    alpha, sigma = diffusion.alpha_sigma(SCHEDULE, t, 2)
    targets = {"eps": noise, "x0": x0, "v": alpha * noise - sigma * x0}
    snr = np.asarray(SCHEDULE.alpha_bars)[t] / (1 - np.asarray(SCHEDULE.alpha_bars)[t])
    weights = {
        "eps": np.minimum(snr, 5) / snr,
        "x0": np.minimum(snr, 5),
        "v": np.minimum(snr, 5) / (snr + 1),
    }
    for prediction, target in targets.items():
        # A model that returns the exact target has zero loss in its own parameterization.
        exact = lambda p, x_t, t_, r, target=target: target  # noqa: ARG005
        value, aux = diffusion.loss(None, exact, SCHEDULE, x0, rng, prediction=prediction)
        assert value == 0.0 and np.array_equal(aux["t"], t)
        # A model off by one everywhere has per-example loss equal to its weight.
        off = lambda p, x_t, t_, r, target=target: target + 1.0  # noqa: ARG005
        _, aux = diffusion.loss(
            None, off, SCHEDULE, x0, rng, prediction=prediction, weighting="min_snr"
        )
        np.testing.assert_allclose(aux["per_example"], weights[prediction], rtol=1e-5)


def test_loss_runs_in_float32_for_bfloat16_models():
    x0 = jnp.zeros((8, 2))
    model = lambda p, x_t, t, r: x_t.astype(jnp.bfloat16)  # noqa: ARG005
    value, aux = jax.jit(lambda x: diffusion.loss(None, model, SCHEDULE, x, jax.random.key(0)))(x0)
    assert value.dtype == jnp.float32 and aux["per_example"].dtype == jnp.float32


def test_bad_arguments_raise():
    model = lambda p, x_t, t, r: x_t  # noqa: ARG005
    with pytest.raises(ValueError, match="eps, x0, v"):
        diffusion.loss(
            None, model, SCHEDULE, jnp.zeros((2, 2)), jax.random.key(0), prediction="score"
        )
    with pytest.raises(ValueError, match="none, min_snr"):
        diffusion.loss(None, model, SCHEDULE, jnp.zeros((2, 2)), jax.random.key(0), weighting="p2")
    with pytest.raises(ValueError, match="eps, x0, v"):
        diffusion.predict_x0_eps(jnp.zeros(1), jnp.zeros(1), 1.0, 0.0, "epsilon")


def test_learned_variance_hybrid_loss_trains_the_variance_by_the_bound_only():
    """L_hybrid = MSE(mean channels) + T/1000 L_t(learned variance, mean stop-gradient)."""
    n = 32
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 3)) / 127.5 - 1, jnp.float32)
    rng = jax.random.key(7)
    t_rng, noise_rng, _ = jax.random.split(rng, 3)
    t = jax.random.randint(t_rng, (n,), 0, 1000, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape)

    def model(params, x_t, t_, r):  # eps off by a learnable offset; variance channels learnable
        del t_, r
        eps = (x_t - diffusion.alpha_sigma(SCHEDULE, t, 2)[0] * x0) / (
            diffusion.alpha_sigma(SCHEDULE, t, 2)[1]
        )
        return jnp.concatenate([eps + params["m"], jnp.broadcast_to(params["v"], eps.shape)], -1)

    params = {"m": jnp.float32(0.1), "v": jnp.asarray([-0.5, 0.0, 0.5], jnp.float32)}

    def hybrid(p):
        return diffusion.loss(p, model, SCHEDULE, x0, rng, learned_variance=True)[0]

    def mse_only(p):
        mean_only = lambda p, x_t, t_, r: model(p, x_t, t_, r)[:, :3]  # noqa: E731
        return diffusion.loss(p, mean_only, SCHEDULE, x0, rng)[0]

    x_t = diffusion.q_sample(SCHEDULE, x0, t, noise)
    bound = diffusion.vlb_term(
        SCHEDULE, x0, x_t, t, model(params, x_t, t, None), variance="learned"
    )
    np.testing.assert_allclose(hybrid(params), mse_only(params) + jnp.mean(bound), rtol=1e-5)
    g_hybrid, g_mse = jax.grad(hybrid)(params), jax.grad(mse_only)(params)
    np.testing.assert_allclose(g_hybrid["m"], g_mse["m"], rtol=1e-6)  # the bound spares the mean
    assert np.all(np.abs(g_hybrid["v"]) > 0) and np.all(g_mse["v"] == 0)
    # Without the flag, doubled output channels are an error, not a silent broadcast.
    with pytest.raises(ValueError, match="learned_variance=True"):
        diffusion.loss(params, model, SCHEDULE, x0[:, :1], rng)
