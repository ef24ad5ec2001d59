"""Exact denoisers and probability-flow references for Gaussian and Gaussian-mixture data.

Data x_0 ~ sum_k w_k N(mu_k, diag s_k^2) (one component: a Gaussian). At VE noise level
r = sigma / alpha the noisy x_t = alpha x_0 + sigma eps has, per component,
  E[x_0 | x_t, k] = mu_k + alpha s_k^2 (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2),
  E[eps | x_t, k] = sigma (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2),
mixed by the responsibilities p(k | x_t). These are the minimisers of the training losses, so
a sampler driven by them must produce the data distribution (up to its own discretisation).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from ddpm.diffusion import velocity
from ddpm.schedules import Schedule

Array = jax.Array


def alpha_sigma_at(schedule: Schedule, t: Array, ndim: int) -> tuple[Array, Array]:
    """(alpha, sigma) at fractional t, interpolating log(sigma/alpha) linearly in t (the
    k-diffusion convention; exact table values at integer t). -> each [B, 1, ..., 1]."""
    log_r = jnp.log(schedule.sqrt_one_minus_alpha_bars) - jnp.log(schedule.sqrt_alpha_bars)
    grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    r = jnp.exp(jnp.interp(t, grid, log_r)).reshape((-1,) + (1,) * (ndim - 1))
    alpha = 1.0 / jnp.sqrt(1.0 + r**2)
    return alpha, r * alpha


def mixture_denoiser(
    schedule: Schedule,
    means: np.ndarray,
    stds: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    prediction: str = "eps",
    null_label: int | None = None,
) -> Callable[[Array, Array, Array | None], Array]:
    """The exact `denoise_fn(x_t [B, ...], t [B], labels [B] | None) -> output` of a mixture.

    means, stds: [K, *data_shape]; weights: [K] (uniform if None). labels select component k
    (the class-conditional denoiser); labels None or == null_label give the whole mixture.
    prediction: eps | x0 | v, the parameterization of the output.
    """
    means = jnp.asarray(means, jnp.float32)
    variances = jnp.asarray(stds, jnp.float32) ** 2
    k = means.shape[0]
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights)
    log_w = jnp.asarray(np.log(w), jnp.float32)

    def denoise(x: Array, t: Array, labels: Array | None) -> Array:
        alpha, sigma = alpha_sigma_at(schedule, t, x.ndim)
        xk, a, s = x[:, None], alpha[:, None], sigma[:, None]  # [B, 1, ...]
        var_t = a**2 * variances + s**2  # [B, K, ...]
        diff = xk - a * means
        axes = tuple(range(2, xk.ndim))
        log_r = log_w - 0.5 * jnp.sum(diff**2 / var_t + jnp.log(var_t), axis=axes)  # [B, K]
        if labels is not None:
            one_hot = jnp.arange(k) == labels[:, None]
            conditional = (labels != null_label)[:, None]
            log_r = jnp.where(conditional, jnp.where(one_hot, 0.0, -jnp.inf), log_r)
        resp = jax.nn.softmax(log_r, axis=1).reshape(log_r.shape + (1,) * len(axes))
        x0 = jnp.sum(resp * (means + a * variances * diff / var_t), axis=1)
        eps = jnp.sum(resp * (s * diff / var_t), axis=1)
        return {"eps": eps, "x0": x0, "v": velocity(x0, eps, alpha, sigma)}[prediction]

    return denoise


def gaussian_denoiser(schedule: Schedule, mean, std, *, prediction: str = "eps"):
    """The exact denoiser of N(mean, diag std^2); mean, std: [*data_shape] (one component)."""
    return mixture_denoiser(
        schedule, np.asarray(mean)[None], np.asarray(std)[None], prediction=prediction
    )


def sample_mixture(rng: np.random.Generator, n, means, stds, weights=None, labels=None):
    """n draws from the mixture (or from component labels[i] for each i) -> [n, ...] float64."""
    k = means.shape[0]
    if labels is None:
        labels = rng.choice(k, size=n, p=weights)
    noise = rng.standard_normal((n,) + means.shape[1:])
    return means[labels] + stds[labels] * noise


def mixture_flow(x_ve: np.ndarray, r_from: float, r_to: float, means, stds, weights=None):
    """Probability-flow ODE dx/dr = E[eps | x, r] in the VE variable x = x_t / alpha, solved in
    float64 with DOP853 (rtol 1e-10) from level r_from to r_to, then denoised at r_to:
    returns E[x_0 | x(r_to)] (= x(0) when r_to = 0).  x_ve: [N, ...] -> [N, ...] float64.

    Per component, E[eps | x, r] = r (x - mu_k) / (s_k^2 + r^2): smooth down to r = 0.
    """
    means, var = np.asarray(means, np.float64), np.asarray(stds, np.float64) ** 2
    k, shape = means.shape[0], x_ve.shape
    log_w = np.log(np.full(k, 1.0 / k) if weights is None else np.asarray(weights))
    axes = tuple(range(2, len(shape) + 1))

    def parts(x: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        diff = x[:, None] - means  # [N, K, ...]
        var_t = var + r**2
        log_r = log_w - 0.5 * np.sum(diff**2 / var_t + np.log(var_t), axis=axes)
        resp = np.exp(log_r - log_r.max(axis=1, keepdims=True))
        resp = (resp / resp.sum(axis=1, keepdims=True)).reshape(log_r.shape + (1,) * len(axes))
        return resp, diff, var_t

    def rhs(r: float, flat: np.ndarray) -> np.ndarray:
        resp, diff, var_t = parts(flat.reshape(shape), r)
        return np.sum(resp * r * diff / var_t, axis=1).ravel()

    sol = solve_ivp(
        rhs,
        (r_from, r_to),
        x_ve.astype(np.float64).ravel(),
        method="DOP853",
        rtol=1e-10,
        atol=1e-10,
    )
    assert sol.success, sol.message
    x = sol.y[:, -1].reshape(shape)
    resp, diff, var_t = parts(x, r_to)
    return np.sum(resp * (means + var * diff / var_t), axis=1)
