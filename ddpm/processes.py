"""Continuous-time noise processes: EDM (Karras et al., 2022) and flow matching (rectified
flow: Lipman et al., 2023; Liu et al., 2023), beside the discrete DDPM tables of
`ddpm.schedules`. Pure and config-free, like `ddpm.diffusion`.

Each process writes the noisy data at its own time tau as x = a(tau) x_0 + b(tau) eps:

  EDM:  tau = sigma in (0, inf),  a = 1,     b = sigma   (variance exploding)
  flow: tau = t in [0, 1],        a = 1 - t, b = t       (x_1 = eps; velocity v = eps - x_0)

and defines how tau is drawn in training, the network's input scaling and output
preconditioning, the regression target and its weight. The network F is called as
F(c_in x, model_time, cond):

  EDM:  c_in = 1 / sqrt(sigma^2 + sd^2), model_time = 1000 c_noise = 250 ln(sigma);
        D(x) = c_skip x + c_out F with c_skip = sd^2 / (sigma^2 + sd^2),
        c_out = sigma sd / sqrt(sigma^2 + sd^2) (sd: sigma_data). The loss
        lambda(sigma) ||D - x_0||^2 with lambda = 1 / c_out^2 is ||F - (x_0 - c_skip x) / c_out||^2.
  flow: c_in = 1, model_time = 1000 t; F is the velocity, x_0 = x - t F; the loss is
        ||F - (eps - x_0)||^2.

(model_time is scaled by 1000 so that the networks' sinusoidal embedding sees the spread of
DDPM's integer timesteps.) The samplers (`ddpm.samplers`) carry x in the variance-preserving
scale x / sqrt(a^2 + b^2), with VE level s = b / a; `precondition` wraps a network as the x_0
predictor they call at (x_vp, tau).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.diffusion import expand

Array = jax.Array
PROCESSES = ("ddpm", "edm", "flow")
FLOW_T_SAMPLINGS = ("logit_normal", "uniform")
# Time scaling of the network's embedding input (see the module docstring).
_TIME_SCALE = 1000.0


def karras_sigmas(sigma_min: Array, sigma_max: Array, num_steps: int, rho: float = 7.0) -> Array:
    """EDM noise levels s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    Returns [n] float32, descending from sigma_max to sigma_min (n = 1: just sigma_max).
    """
    ramp = jnp.linspace(0.0, 1.0, num_steps) if num_steps > 1 else jnp.zeros((1,))
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclasses.dataclass(frozen=True)
class EDM:
    """Karras et al. (2022)'s process and preconditioning; the defaults are the paper's
    (table 1): sigma_data 0.5, ln sigma ~ N(p_mean, p_std^2) in training, and the sampler's
    levels in [sigma_min, sigma_max]."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2

    name = "edm"
    spacings = ("karras", "trailing")  # sampler levels: rho-spaced, or uniform in sigma
    default_spacing = "karras"
    ode_x0_coef = 0.0  # dx/dsigma = eps (Euler / Heun run in x itself)

    def coefficients(self, tau: Array) -> tuple[Array, Array]:
        """(a, b) of x = a x_0 + b eps at sigma = tau (any shape)."""
        tau = jnp.asarray(tau, jnp.float32)
        return jnp.ones_like(tau), tau

    def tau_of_ve(self, s: Array) -> Array:
        return jnp.asarray(s, jnp.float32)

    def draw(self, rng: Array, batch: int) -> Array:
        """Training levels: sigma = exp(p_mean + p_std z), z ~ N(0, 1).  -> [batch] float32."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, (batch,), jnp.float32))

    def levels(self, num_steps: int, spacing: str, rho: float) -> Array:
        """The sampler's n levels, descending; the grid appends sigma = 0.  -> [n] float32.
        karras: sigma_max^(1/rho) to sigma_min^(1/rho) in n equal steps, to the power rho;
        trailing: sigma_max (1 - i / n)."""
        if spacing == "karras":
            return karras_sigmas(self.sigma_min, self.sigma_max, num_steps, rho)
        return jnp.asarray(self.sigma_max * (1.0 - np.arange(num_steps) / num_steps), jnp.float32)

    def _scalings(self, tau: Array) -> tuple[Array, Array, Array]:
        """(c_skip, c_out, c_in) at sigma = tau."""
        sd2 = self.sigma_data**2
        total = jnp.square(tau) + sd2
        return sd2 / total, tau * self.sigma_data * jax.lax.rsqrt(total), jax.lax.rsqrt(total)

    def net_input(self, x: Array, tau: Array) -> tuple[Array, Array]:
        """(c_in x, model_time) of x [B, ...] at sigma = tau [B]."""
        _, _, c_in = self._scalings(tau)
        return expand(c_in, x.ndim) * x, 0.25 * _TIME_SCALE * jnp.log(tau)

    def denoise(self, out: Array, x: Array, tau: Array) -> Array:
        """D(x) = c_skip x + c_out F: the x_0 estimate from the network output F."""
        c_skip, c_out, _ = self._scalings(tau)
        return expand(c_skip, x.ndim) * x + expand(c_out, x.ndim) * out

    def target(self, x0: Array, eps: Array, x: Array, tau: Array) -> Array:
        """F's regression target (x_0 - c_skip x) / c_out (loss weight 1)."""
        del eps
        c_skip, c_out, _ = self._scalings(tau)
        return (x0 - expand(c_skip, x.ndim) * x) / expand(c_out, x.ndim)


@dataclasses.dataclass(frozen=True)
class Flow:
    """Flow matching on the straight path x_t = (1 - t) x_0 + t eps. Training t: logit-normal
    (sigmoid of N(logit_mean, logit_std^2), SD3's default) or uniform, then shifted,
    t -> shift t / (1 + (shift - 1) t) (shift > 1 spends more time at high noise, as SD3 does
    for large images); the sampler's levels are uniform in t, shifted the same way."""

    t_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    name = "flow"
    spacings = ("trailing",)  # uniform in t (from t = 1), shifted
    default_spacing = "trailing"
    ode_x0_coef = -1.0  # dx/dt = eps - x_0 = v (Euler / Heun run in x itself)

    def coefficients(self, tau: Array) -> tuple[Array, Array]:
        tau = jnp.asarray(tau, jnp.float32)
        return 1.0 - tau, tau

    def tau_of_ve(self, s: Array) -> Array:
        """t = s / (1 + s), written to give 1 at s = inf and 0 at s = 0."""
        return 1.0 / (1.0 + 1.0 / jnp.asarray(s, jnp.float32))

    def _shifted(self, t: Array) -> Array:
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def draw(self, rng: Array, batch: int) -> Array:
        """Training times in (0, 1).  -> [batch] float32."""
        if self.t_sampling == "uniform":
            t = jax.random.uniform(rng, (batch,), jnp.float32)
        else:
            z = jax.random.normal(rng, (batch,), jnp.float32)
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * z)
        return self._shifted(t)

    def levels(self, num_steps: int, spacing: str, rho: float) -> Array:
        """t_i = shift(1 - i / n), i = 0..n-1 (the grid appends t = 0).  -> [n] float32."""
        del spacing, rho
        return self._shifted(jnp.asarray(1.0 - np.arange(num_steps) / num_steps, jnp.float32))

    def net_input(self, x: Array, tau: Array) -> tuple[Array, Array]:
        return x, _TIME_SCALE * jnp.asarray(tau, jnp.float32)

    def denoise(self, out: Array, x: Array, tau: Array) -> Array:
        """x_0 = x - t v."""
        return x - expand(tau, x.ndim) * out

    def target(self, x0: Array, eps: Array, x: Array, tau: Array) -> Array:
        """The velocity eps - x_0 (loss weight 1)."""
        del x, tau
        return eps - x0


Continuous = EDM | Flow
BY_NAME: dict[str, type[EDM] | type[Flow]] = {"edm": EDM, "flow": Flow}  # PROCESSES but ddpm


def vp_coefficients(process: Continuous, tau: Array) -> tuple[Array, Array]:
    """(alpha, sigma) = (a, b) / sqrt(a^2 + b^2): the variance-preserving level of tau, the
    scale the samplers carry x in.  tau: any shape -> float32 of its shape."""
    a, b = process.coefficients(tau)
    norm = jax.lax.rsqrt(jnp.square(a) + jnp.square(b))
    return a * norm, b * norm


def native_scale(process: Continuous, tau: Array) -> Array:
    """sqrt(a^2 + b^2): x in the process's own scale = x_vp times this."""
    a, b = process.coefficients(tau)
    return jnp.sqrt(jnp.square(a) + jnp.square(b))


def precondition(
    process: Continuous, net_fn: Callable[[Any, Array, Array, Any], Array]
) -> Callable[[Any, Array, Array, Any], Array]:
    """The x_0 predictor the samplers call, fn(params, x_vp [B, ...], tau [B], cond) -> x_0,
    of a network net_fn(params, c_in x, model_time [B], cond) -> F (float32)."""

    def fn(params: Any, x_vp: Array, tau: Array, cond: Any) -> Array:
        x = x_vp * expand(native_scale(process, tau), x_vp.ndim)
        inputs, time = process.net_input(x, tau)
        out = net_fn(params, inputs, time, cond).astype(jnp.float32)
        return process.denoise(out, x, tau)

    return fn


def loss(
    params: Any,
    apply_fn: Callable[..., Array],
    process: Continuous,
    x0: Array,
    rng: Array,
) -> tuple[Array, dict[str, Array]]:
    """E_{tau, eps} ||F(c_in x, model_time) - target||^2 with tau from `process.draw`.

    apply_fn(params, c_in x [B, ...], model_time [B] float32, rng) -> F of x's shape; x0:
    [B, ...] float32 data. Returns (scalar mean, {"per_example": [B], "t": [B] tau}).
    """
    tau_rng, noise_rng, model_rng = jax.random.split(rng, 3)
    x0 = x0.astype(jnp.float32)
    tau = process.draw(tau_rng, x0.shape[0])
    eps = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    a, b = process.coefficients(tau)
    x = expand(a, x0.ndim) * x0 + expand(b, x0.ndim) * eps
    inputs, time = process.net_input(x, tau)
    out = apply_fn(params, inputs, time, model_rng).astype(jnp.float32)
    target = process.target(x0, eps, x, tau)
    if out.shape != target.shape:
        raise ValueError(f"the model's output {out.shape} does not match the data {target.shape}")
    per_example = jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_example), {"per_example": per_example, "t": tau}
