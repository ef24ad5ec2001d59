"""The one interface every noise process implements, and the math they share.

A process writes noisy data at its level (its own time: a DDPM timestep, EDM's sigma, a flow's
t) as x = a x_0 + b eps. Everything outside `ddpm.processes` sees it through `Process`:

  training     `loss` (the levels it draws, the network's input scaling, target and weight)
  sampling     `denoiser` (network -> output in `prediction`), `sampling_levels` (the grid a
               sampler steps on for a spacing), `level_of_ve`, `ve_range`, `ode_variable`
  likelihood   `ve_range` and `level_of_ve` give the probability-flow ODE (`ddpm.likelihood`),
               `prior_logp` its end; `vp` is (alpha, sigma) at a level

The samplers and the likelihood carry x in the variance-preserving (VP) scale,
x_vp = x / sqrt(a^2 + b^2) = alpha x_0 + sigma eps with alpha^2 + sigma^2 = 1, and name levels
across processes by the variance-exploding (VE) level s = sigma / alpha = b / a (EDM's sigma),
which every process maps to its own level with `level_of_ve`.
"""

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.diffusion import expand

Array = jax.Array
# net_fn(params, inputs [B, ...], model_time [B] float32, cond) -> network output.
NetFn = Callable[[Any, Array, Array, Any], Array]
# apply_fn(params, inputs [B, ...], model_time [B], dropout rng) -> network output (training).
ApplyFn = Callable[[Any, Array, Array, Array], Array]


class Level(NamedTuple):
    """A noise level: t (model time), alpha, sigma (VP); scalars, or [n] arrays of levels."""

    t: Array
    alpha: Array
    sigma: Array


class StepLevels(NamedTuple):
    """The levels a sampler visits, descending; the grid appends x_0 (alpha 1, sigma 0).

    t: [n] model time; alpha, sigma: [n] VP level; beta: [n] the beta of the respaced process
    from each level to the next, 1 - alpha^2 / alpha_next^2 (improved DDPM), float32."""

    t: Array
    alpha: Array
    sigma: Array
    beta: Array


def karras_sigmas(sigma_min: Array, sigma_max: Array, num_steps: int, rho: float = 7.0) -> Array:
    """EDM noise levels s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    Returns [n] float32, descending from sigma_max to sigma_min (n = 1: just sigma_max).
    """
    ramp = jnp.linspace(0.0, 1.0, num_steps) if num_steps > 1 else jnp.zeros((1,))
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def vp_of_ve(s: Array) -> tuple[Array, Array]:
    """(alpha, sigma) of VE level s: alpha = 1 / sqrt(1 + s^2), sigma = s alpha (0 and 1 at
    s = inf, a flow's t = 1).  s: any shape -> float32 of its shape."""
    alpha = jax.lax.rsqrt(1.0 + jnp.square(s))
    return alpha, jnp.where(jnp.isinf(s), 1.0, s * alpha)


def respaced_beta(alpha: Array) -> Array:
    """beta_i = 1 - alpha_i^2 / alpha_{i+1}^2 between consecutive levels [n], the last one to
    x_0 (alpha 1).  -> [n] float32."""
    alpha_next = jnp.append(alpha[1:], 1.0)
    return -jnp.expm1(2.0 * (jnp.log(alpha) - jnp.log(alpha_next)))


def standard_normal_logp(x: Array) -> Array:
    """log N(x; 0, I) summed over all but the batch axis.  x: [B, ...] -> [B] float32."""
    dims = math.prod(x.shape[1:])
    sq = jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))
    return -0.5 * dims * jnp.log(2.0 * jnp.pi) - 0.5 * sq


def check_number(name: str, value: Any, low: float = -math.inf, *, inclusive: bool = False):
    """A process field must be a number above `low` (at or above with `inclusive`): else a
    ValueError naming the field (config validation prefixes its section)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    bound = f"{'>=' if inclusive else '>'} {low:g}" if low > -math.inf else ""
    if not ok or not (value >= low if inclusive else value > low):
        raise ValueError(f"{name}={value!r} must be a number {bound}".rstrip())


class Process(abc.ABC):
    """A noise process: how a level is drawn in training, what the network learns there, the
    levels a sampler steps on, and the probability-flow ODE. Implementations are frozen
    dataclasses built from their config section (`from_config`)."""

    name: ClassVar[str]
    spacings: ClassVar[tuple[str, ...]]  # the sampler's level spacings; the first is the default
    # Euler / Heun integrate dy/du = eps + ode_x0_coef x_0 in the variable of `ode_variable`;
    # 0 is the VE ODE dy/ds = eps (EDM's, where churn applies).
    ode_x0_coef: ClassVar[float] = 0.0
    has_discrete_bound: ClassVar[bool] = False  # the DDPM variational bound (`ddpm.diffusion`)
    prediction: str = "x0"  # the parameterization `denoiser`'s output is in: eps | x0 | v
    learned_variance: bool = False  # `denoiser` appends improved DDPM's variance channels

    @classmethod
    def from_config(cls, diffusion: Any, learned_variance: bool = False) -> "Process":
        """The process of `config.diffusion` (its own section diffusion.<name>, a plain
        field -> value mapping, for a continuous process)."""
        if learned_variance:
            raise ValueError("learned variance belongs to the ddpm process")
        return cls(**diffusion[cls.name].to_dict())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The fields of the config section diffusion.<name> with their defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    # Levels and scales.

    @abc.abstractmethod
    def vp(self, level: Array) -> tuple[Array, Array]:
        """(alpha, sigma) of the VP scale at `level` (any shape)."""

    @abc.abstractmethod
    def level_of_ve(self, s: Array) -> Array:
        """The level (model time) of VE level s (any shape)."""

    @abc.abstractmethod
    def ve_range(self) -> tuple[float | Array, float | Array]:
        """(s_min, s_max): the VE levels the model is trained on; s_max caps churn, and the
        likelihood integrates between them (a flow's open ends are clipped there)."""

    def default_spacing(self, method: str) -> str:
        del method
        return self.spacings[0]

    def max_steps(self, spacing: str) -> int | None:
        """The most sampler steps `spacing` has (None: unbounded)."""
        del spacing
        return None

    @abc.abstractmethod
    def sampling_levels(self, num_steps: int, spacing: str, rho: float) -> StepLevels:
        """The `num_steps` levels a sampler visits with `spacing` (rho: Karras' exponent)."""

    def ode_variable(self, level: Level) -> tuple[Array, Array]:
        """(u, y_scale) of a level (or of [n] levels): Euler / Heun integrate y = x_vp / y_scale
        in time u. The VE ODE: y = x_vp / alpha, u = s = sigma / alpha."""
        return level.sigma / level.alpha, level.alpha

    def prior_logp(self, x_vp: Array) -> Array:
        """log-density of the prior at the highest level, N(0, I) in the VP scale.  -> [B]."""
        return standard_normal_logp(x_vp)

    # Training and the network.

    @abc.abstractmethod
    def loss(
        self, params: Any, apply_fn: ApplyFn, x0: Array, rng: Array
    ) -> tuple[Array, dict[str, Array]]:
        """The denoising loss of data x0 [B, ...] float32 at levels the process draws.
        -> (scalar mean, {"per_example": [B], "t": [B] levels})."""

    @abc.abstractmethod
    def denoiser(self, net_fn: NetFn) -> NetFn:
        """fn(params, x_vp [B, ...], level [B], cond) -> output in `prediction` (float32),
        what the samplers and the likelihood call."""


@dataclasses.dataclass(frozen=True)
class Interpolant(Process):
    """A continuous process given by its (a, b) at level tau, whose network F is called as
    F(c_in x, model_time, cond) and preconditioned into an x_0 predictor (`net_input`,
    `denoise`), trained on `target` with weight 1 at levels from `draw_levels`. Subclasses
    define those and `coefficients`, `levels`."""

    @abc.abstractmethod
    def draw_levels(self, rng: Array, batch: int) -> Array:
        """Training levels.  -> [batch] float32."""

    @abc.abstractmethod
    def coefficients(self, tau: Array) -> tuple[Array, Array]:
        """(a, b) of x = a x_0 + b eps at level tau (any shape), float32."""

    @abc.abstractmethod
    def levels(self, num_steps: int, spacing: str, rho: float) -> Array:
        """The sampler's `num_steps` levels tau, descending.  -> [n] float32."""

    @abc.abstractmethod
    def net_input(self, x: Array, tau: Array) -> tuple[Array, Array]:
        """(network input, model_time [B]) of x [B, ...] in the process's own scale."""

    @abc.abstractmethod
    def denoise(self, out: Array, x: Array, tau: Array) -> Array:
        """The x_0 estimate from the network output F at x [B, ...], tau [B]."""

    @abc.abstractmethod
    def target(self, x0: Array, eps: Array, x: Array, tau: Array) -> Array:
        """F's regression target (loss weight 1)."""

    def vp(self, level: Array) -> tuple[Array, Array]:
        a, b = self.coefficients(level)
        norm = jax.lax.rsqrt(jnp.square(a) + jnp.square(b))
        return a * norm, b * norm

    def native_scale(self, tau: Array) -> Array:
        """sqrt(a^2 + b^2): x in the process's own scale = x_vp times this."""
        a, b = self.coefficients(tau)
        return jnp.sqrt(jnp.square(a) + jnp.square(b))

    def sampling_levels(self, num_steps: int, spacing: str, rho: float) -> StepLevels:
        tau = self.levels(num_steps, spacing, rho)
        alpha, sigma = self.vp(tau)
        return StepLevels(tau, alpha, sigma, respaced_beta(alpha))

    def denoiser(self, net_fn: NetFn) -> NetFn:
        def fn(params: Any, x_vp: Array, tau: Array, cond: Any) -> Array:
            x = x_vp * expand(self.native_scale(tau), x_vp.ndim)
            inputs, time = self.net_input(x, tau)
            out = net_fn(params, inputs, time, cond).astype(jnp.float32)
            return self.denoise(out, x, tau)

        return fn

    def loss(
        self, params: Any, apply_fn: ApplyFn, x0: Array, rng: Array
    ) -> tuple[Array, dict[str, Array]]:
        """E_{tau, eps} ||F(c_in x, model_time) - target||^2 with tau from `draw_levels`."""
        tau_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        x0 = x0.astype(jnp.float32)
        tau = self.draw_levels(tau_rng, x0.shape[0])
        eps = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        a, b = self.coefficients(tau)
        x = expand(a, x0.ndim) * x0 + expand(b, x0.ndim) * eps
        inputs, time = self.net_input(x, tau)
        out = apply_fn(params, inputs, time, model_rng).astype(jnp.float32)
        target = self.target(x0, eps, x, tau)
        if out.shape != target.shape:
            raise ValueError(
                f"the model's output {out.shape} does not match the data {target.shape}"
            )
        per_example = jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim)))
        return jnp.mean(per_example), {"per_example": per_example, "t": tau}


def uniform_levels(high: float, low: float, num_steps: int) -> np.ndarray:
    """high - i (high - low) / n, i = 0..n-1: n levels from `high` toward `low` (the grid's
    x_0 row stands for `low`).  -> [n] float64."""
    return high - np.arange(num_steps) * (high - low) / num_steps
