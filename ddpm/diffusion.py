"""The forward process, parameterization conversions, posterior and training loss.

Notation: alpha = sqrt(ab_t) and sigma = sqrt(1 - ab_t), so x_t = alpha x_0 + sigma eps. The
conversions take `alpha, sigma` already broadcast to the data's rank, so they serve discrete
timesteps (via `alpha_sigma`) and the continuous noise levels of ODE samplers alike.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm.schedules import Schedule

Array = jax.Array
PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


def gather(table: Array, t: Array, ndim: int) -> Array:
    """table[t] reshaped to [B, 1, ..., 1] (rank `ndim`) so it broadcasts over data [B, ...]."""
    values = jnp.take(table, jnp.asarray(t, jnp.int32))
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def alpha_sigma(schedule: Schedule, t: Array, ndim: int) -> tuple[Array, Array]:
    """(sqrt(ab_t), sqrt(1 - ab_t)), each [B, 1, ..., 1] of rank `ndim`.  t: [B] int."""
    return (
        gather(schedule.sqrt_alpha_bars, t, ndim),
        gather(schedule.sqrt_one_minus_alpha_bars, t, ndim),
    )


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I).  x0, noise: [B, ...]; t: [B] int."""
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    return alpha * x0 + sigma * noise


def q_step_sample(schedule: Schedule, x_prev: Array, t: Array, noise: Array) -> Array:
    """x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t I): one forward step."""
    beta = gather(schedule.betas, t, x_prev.ndim)
    return jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * noise


# Conversions between parameterizations; v = alpha eps - sigma x_0 (Salimans & Ho, 2022).


def eps_to_x0(x_t: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """x_0 = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """eps = (x_t - alpha x_0) / sigma."""
    return (x_t - alpha * x0) / sigma


def v_to_x0(x_t: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """x_0 = alpha x_t - sigma v  (uses alpha^2 + sigma^2 = 1)."""
    return alpha * x_t - sigma * v


def v_to_eps(x_t: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """eps = sigma x_t + alpha v."""
    return sigma * x_t + alpha * v


def velocity(x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """v = alpha eps - sigma x_0, the target of v-prediction."""
    return alpha * eps - sigma * x0


def eps_to_v(x_t: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """v from (x_t, eps)."""
    return velocity(eps_to_x0(x_t, eps, alpha, sigma), eps, alpha, sigma)


def x0_to_v(x_t: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """v from (x_t, x_0)."""
    return velocity(x0, x0_to_eps(x_t, x0, alpha, sigma), alpha, sigma)


def predict_x0_eps(
    output: Array, x_t: Array, alpha: Array, sigma: Array, prediction: str
) -> tuple[Array, Array]:
    """(x_0, eps) implied by a model `output` in the given parameterization (eps | x0 | v)."""
    if prediction == "eps":
        return eps_to_x0(x_t, output, alpha, sigma), output
    if prediction == "x0":
        return output, x0_to_eps(x_t, output, alpha, sigma)
    if prediction == "v":
        return v_to_x0(x_t, output, alpha, sigma), v_to_eps(x_t, output, alpha, sigma)
    raise ValueError(f"prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t-1} | x_t, x_0) = N(mu~, beta~ I).

    mu~ = coef1 x_0 + coef2 x_t with coef1 = b_t sqrt(ab_{t-1}) / (1 - ab_t) and
    coef2 = (1 - ab_{t-1}) sqrt(a_t) / (1 - ab_t); beta~ = b_t (1 - ab_{t-1}) / (1 - ab_t).
    Returns (mean [B, ...], variance [B, 1, ...], clipped log-variance [B, 1, ...]).
    """
    ndim = x_t.ndim
    mean = (
        gather(schedule.posterior_mean_coef1, t, ndim) * x0
        + gather(schedule.posterior_mean_coef2, t, ndim) * x_t
    )
    return (
        mean,
        gather(schedule.posterior_variance, t, ndim),
        gather(schedule.posterior_log_variance_clipped, t, ndim),
    )


def snr(schedule: Schedule, t: Array) -> Array:
    """Signal-to-noise ratio ab_t / (1 - ab_t).  t: [B] int -> [B] float32."""
    ab = jnp.take(schedule.alpha_bars, t)
    return ab / (1.0 - ab)


def loss_weight(snr_t: Array, prediction: str, weighting: str, min_snr_gamma: float) -> Array:
    """Per-example weight of the MSE in the prediction's own space.

    `min_snr` (Hang et al., 2023) weights each t as an x0-loss with weight min(SNR, gamma):
    eps-MSE by min(SNR, g) / SNR, x0-MSE by min(SNR, g), v-MSE by min(SNR, g) / (SNR + 1).
    """
    if weighting == "none":
        return jnp.ones_like(snr_t)
    if weighting != "min_snr":
        raise ValueError(f"loss weighting={weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}")
    clipped = jnp.minimum(snr_t, min_snr_gamma)
    denominator = {"eps": snr_t, "x0": jnp.ones_like(snr_t), "v": snr_t + 1.0}[prediction]
    return clipped / denominator


def loss(
    params,
    apply_fn: Callable[..., Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> tuple[Array, dict[str, Array]]:
    """Denoising loss E_{t, eps} w(t) ||target - model(x_t, t)||^2 with t ~ U{0..T-1}.

    Args:
      params: model parameters, passed through to `apply_fn`.
      apply_fn: `apply_fn(params, x_t, t, rng) -> output` with x_t [B, ...] float32,
        t [B] int32 and output of x_t's shape (any dtype; the loss is computed in float32).
      schedule: the forward process.
      x0: [B, ...] float32 clean data.
      rng: PRNG key; split here into timestep, noise and model (dropout) keys.
      prediction: eps | x0 | v, the model's parameterization and thus the regression target.
      weighting: none | min_snr.

    Returns:
      (scalar mean loss, {"per_example": [B] float32, "t": [B] int32}).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
    t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
    batch = x0.shape[0]
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
    x0 = x0.astype(jnp.float32)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    target = {"eps": noise, "x0": x0, "v": velocity(x0, noise, alpha, sigma)}[prediction]
    output = apply_fn(params, x_t, t, model_rng).astype(jnp.float32)
    mse = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x0.ndim)))
    per_example = loss_weight(snr(schedule, t), prediction, weighting, min_snr_gamma) * mse
    return jnp.mean(per_example), {"per_example": per_example, "t": t}
