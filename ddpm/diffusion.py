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


def expand(values: Array, ndim: int) -> Array:
    """Per-example values [B] (or a scalar) reshaped to rank `ndim`, [B, 1, ..., 1], so they
    broadcast over data [B, ...]."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def gather(table: Array, t: Array, ndim: int) -> Array:
    """table[t] reshaped to [B, 1, ..., 1] (rank `ndim`) so it broadcasts over data [B, ...]."""
    return expand(jnp.take(table, jnp.asarray(t, jnp.int32)), ndim)


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
    learned_variance: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Denoising loss E_{t, eps} w(t) ||target - model(x_t, t)||^2 with t ~ U{0..T-1}.

    With `learned_variance` the output carries the variance channels v after the mean's
    (improved DDPM's learned interpolation); the loss is then L_hybrid = the MSE of the mean
    channels + (T / 1000) L_t, the bound's term at t in bits/dim (`vlb_term`, variance
    "learned") with the mean held fixed (stop-gradient), so the bound trains only v: iDDPM's
    L_simple + 0.001 L_vlb with L_vlb = T E_t[L_t], per example.

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
    if learned_variance:
        output, v = jnp.split(output, 2, axis=-1)
    if output.shape != target.shape:
        raise ValueError(
            f"the model's output {output.shape} does not match the data {target.shape}"
            + ("" if learned_variance else " (learned variance: set learned_variance=True)")
        )
    mse = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x0.ndim)))
    per_example = loss_weight(snr(schedule, t), prediction, weighting, min_snr_gamma) * mse
    if learned_variance:
        frozen_mean = jnp.concatenate([jax.lax.stop_gradient(output), v], axis=-1)
        bound = vlb_term(
            schedule, x0, x_t, t, frozen_mean, prediction=prediction, variance="learned"
        )
        per_example = per_example + schedule.num_timesteps / 1000.0 * bound
    return jnp.mean(per_example), {"per_example": per_example, "t": t}


# --------------------------------------------------------------------------------------------
# Variational bound (Ho et al., 2020, eq. 5), in bits per dimension.

VARIANCES = ("fixed_small", "fixed_large", "learned")


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
        - 1.0
    )


def _log_diff_exp(a: Array, b: Array) -> Array:
    """log(exp(a) - exp(b)) for a >= b, without cancelling to log(0) when b -> a.

    A difference that underflows (b == a in float32) counts as exp(a) * 1e-30, so the value and
    its gradient stay finite (a NaN gradient would leak through `jnp.where` into training).
    """
    return a + jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(b - a, 0.0)), 1e-30))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log P(x) of 8-bit data under N(mean, exp(log_scale)^2) discretized to 256 bins.

    x: float32 on the grid k / 127.5 - 1, k = 0..255; bin k covers x +- 1/255, the first and the
    last bin extend to -inf and +inf, so the probabilities of the 256 bins sum to 1. Computed
    with log-CDF differences taken in whichever tail the bin lies (no 1e-12 floor). Elementwise,
    in nats.
    """
    inv_scale = jnp.exp(-log_scale)
    upper = (x - mean + 1.0 / 255.0) * inv_scale
    lower = (x - mean - 1.0 / 255.0) * inv_scale
    log_ndtr = jax.scipy.special.log_ndtr
    # A bin right of the mean: P = Phi(-lower) - Phi(-upper); left of it: Phi(upper) - Phi(lower).
    right = (lower + upper) > 0
    inner = jnp.where(
        right,
        _log_diff_exp(log_ndtr(-lower), log_ndtr(-upper)),
        _log_diff_exp(log_ndtr(upper), log_ndtr(lower)),
    )
    return jnp.where(x < -0.999, log_ndtr(upper), jnp.where(x > 0.999, log_ndtr(-lower), inner))


def reverse_log_variance(
    schedule: Schedule, t: Array, ndim: int, variance: str, v: Array | None = None
) -> Array:
    """log variance of the model's reverse step p(x_{t-1} | x_t).  t: [B] int.

    fixed_small: the posterior's beta~_t (its log clipped at t = 0); fixed_large: beta_t, with
    beta~_1 at t = 0 as in DDPM; learned (improved DDPM): f log beta_t + (1 - f) log beta~_t with
    f = (v + 1) / 2 from the model's variance channels v [B, ...]. -> [B, 1, ...] or v's shape.
    """
    small = gather(schedule.posterior_log_variance_clipped, t, ndim)
    large_table = jnp.log(schedule.betas).at[0].set(schedule.posterior_log_variance_clipped[0])
    large = gather(large_table, t, ndim)
    if variance == "fixed_small":
        return small
    if variance == "fixed_large":
        return large
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs the model's variance channels v")
        return learned_log_variance(v, small, jnp.log(gather(schedule.betas, t, ndim)))
    raise ValueError(f"variance={variance!r} is not one of {', '.join(VARIANCES)}")


def learned_log_variance(v: Array, log_small: Array, log_large: Array) -> Array:
    """Improved DDPM's learned variance: log var = f log beta + (1 - f) log beta~ with
    f = (v + 1) / 2 from the model's variance channels v (broadcast with the logs)."""
    frac = (v + 1.0) / 2.0
    return frac * log_large + (1.0 - frac) * log_small


def _bits_per_dim(nats: Array) -> Array:
    """Elementwise nats [B, ...] -> mean over all but the batch axis, in bits.  -> [B]."""
    return jnp.mean(nats, axis=tuple(range(1, nats.ndim))) / jnp.log(2.0)


def prior_bpd(schedule: Schedule, x0: Array) -> Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim.  x0: [B, ...] -> [B]."""
    t_last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    alpha, sigma = alpha_sigma(schedule, t_last, x0.ndim)
    return _bits_per_dim(normal_kl(alpha * x0, 2.0 * jnp.log(sigma), 0.0, 0.0))


def vlb_term(
    schedule: Schedule,
    x0: Array,
    x_t: Array,
    t: Array,
    output: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
) -> Array:
    """One term of the bound in bits/dim, for a model `output` at (x_t, t).  -> [B] float32.

    t >= 1 (0-based; the paper's L_{t}, t >= 2): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
    t = 0: the decoder's -log p(x_0 | x_1), a Gaussian discretized to 8 bits. The model's mean
    is the posterior mean at its predicted x_0 (clipped to [-1, 1] if `clip_x0`); its variance
    comes from `reverse_log_variance`. x0, x_t: [B, ...] float32; t: [B] int; output: model
    output in `prediction`'s parameterization (with the variance channels appended last when
    variance="learned").
    """
    v = None
    if variance == "learned":
        output, v = jnp.split(output, 2, axis=-1)
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    x0_pred, _ = predict_x0_eps(output, x_t, alpha, sigma, prediction)
    if clip_x0:
        x0_pred = jnp.clip(x0_pred, -1.0, 1.0)
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
    model_mean, _, _ = q_posterior(schedule, x0_pred, x_t, t)
    model_log_var = reverse_log_variance(schedule, t, x0.ndim, variance, v)
    kl = _bits_per_dim(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder = -_bits_per_dim(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    )
    return jnp.where(t == 0, decoder, kl)


def vlb_terms(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    t_rows: Array,
    rng: Array,
    **term_kw,
) -> Array:
    """Bound terms at the timesteps `t_rows` [n, B] int32, one `lax.scan` step per row.

    model_fn(x_t, t) -> output, with t: [B] float32. Row i draws its noise from
    fold_in(rng, i). Returns [n, B] float32 bits/dim (`vlb_term` of each row; term_kw are its
    keyword options).
    """
    x0 = x0.astype(jnp.float32)

    def body(_, row):
        i, t = row
        noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0, t, noise)
        output = model_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)
        return None, vlb_term(schedule, x0, x_t, t, output, **term_kw)

    rows = (jnp.arange(t_rows.shape[0]), t_rows.astype(jnp.int32))
    return jax.lax.scan(body, None, rows)[1]


def vlb_bpd(model_fn, schedule: Schedule, x0: Array, rng: Array, **term_kw) -> dict[str, Array]:
    """The full bound L_T + sum_t L_t over all T timesteps, in bits/dim (T model calls).

    Returns {"bpd": [B] total, "prior": [B] L_T, "terms": [T, B] L_t in timestep order}.
    """
    batch = x0.shape[0]
    t_rows = jnp.broadcast_to(
        jnp.arange(schedule.num_timesteps)[:, None], (schedule.num_timesteps, batch)
    )
    terms = vlb_terms(model_fn, schedule, x0, t_rows, rng, **term_kw)
    prior = prior_bpd(schedule, x0)
    return {"bpd": prior + jnp.sum(terms, axis=0), "prior": prior, "terms": terms}


def vlb_bpd_importance(
    model_fn,
    schedule: Schedule,
    x0: Array,
    rng: Array,
    proposal: Array,
    num_draws: int,
    **term_kw,
) -> dict[str, Array]:
    """Unbiased estimate of the bound from `num_draws` timesteps per example.

    t_k ~ proposal ([T] probabilities, all > 0), bpd = L_T + mean_k L_{t_k} / proposal[t_k]
    (improved DDPM uses proposal ~ sqrt(E[L_t^2]), which makes the estimate's variance small).
    Returns {"bpd": [B], "prior": [B], "stderr": [B] standard error of the mean over draws}.
    """
    if num_draws < 2:
        raise ValueError(f"num_draws={num_draws} must be >= 2 (its spread gives the stderr)")
    t_rng, noise_rng = jax.random.split(rng)
    batch = x0.shape[0]
    t_rows = jax.random.choice(
        t_rng, schedule.num_timesteps, (num_draws, batch), p=proposal, replace=True
    )
    weighted = vlb_terms(model_fn, schedule, x0, t_rows, noise_rng, **term_kw) / proposal[t_rows]
    prior = prior_bpd(schedule, x0)
    stderr = jnp.std(weighted, axis=0, ddof=1) / jnp.sqrt(num_draws)
    return {"bpd": prior + jnp.mean(weighted, axis=0), "prior": prior, "stderr": stderr}
