"""Consistency models (Song et al., 2023; improved consistency training, Song & Dhariwal,
2023): the math, for every noise process.

Pure and config-free, like `ddpm.distillation`: the objective composes these functions with
its networks, and the tests with the exact consistency function of Gaussian data.

Levels are named by the VE level s = sigma / alpha of `ddpm.processes` (EDM's sigma), which
every process maps to its own model time (`Process.level_of_ve`); x is in the VP scale,
x = alpha x_0 + sigma eps, as in the samplers. A consistency function maps a point at level s
of a probability-flow ODE trajectory to the trajectory's point at the lowest level s_min, in
the VE scale (x / alpha): f(x, s_min) = x / alpha.

Parameterization (`consistency_fn`): the process's own x_0 prediction D of a diffusion network
(so a distilled student starts as its teacher) blended with the input by Song et al.'s skip
coefficient c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2) (sd: sigma_data):

    f(x, s) = c_skip(s) x / alpha + (1 - c_skip(s)) D(x, s),

which is x / alpha at s = s_min exactly, whatever the network, and D where s >> sd. Written
with (alpha, sigma), x's coefficient sd^2 alpha / ((sigma - s_min alpha)^2 + sd^2 alpha^2)
stays finite at a flow's t = 1 (alpha = 0), where f = D.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddpm.diffusion import expand, predict_x0_eps
from ddpm.processes import Level, Process, StepLevels, karras_sigmas, vp_of_ve
from ddpm.processes.base import NetFn, respaced_beta

Array = jax.Array
# denoise(x [B, ...], level) -> x_0 prediction [B, ...] at per-example levels (t, alpha, sigma).
Denoise = Callable[[Array, Level], Array]
# predict(x [B, ...], t, alpha, sigma [B]) -> (x_0, eps): a teacher with its guidance.
Predict = Callable[[Array, Array, Array, Array], tuple[Array, Array]]
DISTANCES = ("l2", "pseudo_huber")


def level_at(process: Process, s: Array) -> Level:
    """The process's Level (model time, alpha, sigma) of VE level s (any shape)."""
    alpha, sigma = vp_of_ve(s)
    return Level(process.level_of_ve(s), alpha, sigma)


def skip_coefficients(level: Level, s_min: float, sigma_data: float) -> tuple[Array, Array]:
    """(c_skip, x's coefficient c_skip / alpha) at `level` ([B] or scalar), float32."""
    sd2 = sigma_data**2
    alpha, sigma = level.alpha, level.sigma
    denominator = jnp.square(sigma - s_min * alpha) + sd2 * jnp.square(alpha)
    return sd2 * jnp.square(alpha) / denominator, sd2 * alpha / denominator


def consistency_fn(denoise: Denoise, s_min: float, sigma_data: float) -> Denoise:
    """f(x [B, ...], level) -> [B, ...]: the consistency function of a denoiser (see the
    module docstring); f(x, s_min) = x / alpha exactly."""

    def f(x: Array, level: Level) -> Array:
        c_skip, x_coef = (expand(v, x.ndim) for v in skip_coefficients(level, s_min, sigma_data))
        return x_coef * x + (1.0 - c_skip) * denoise(x, level)

    return f


def ve_levels(s_min: float, s_max: float, num_levels: Array, size: int, rho: float = 7.0):
    """The first `num_levels` (traced) of Karras et al.'s levels s_1 = s_min < ... < s_N =
    s_max, s_i = (s_min^(1/rho) + (i - 1) / (N - 1) (s_max^(1/rho) - s_min^(1/rho)))^rho,
    in a table of static `size` >= N (rows past N repeat s_max).  -> [size] float32."""
    i = jnp.minimum(jnp.arange(size, dtype=jnp.float32), num_levels - 1.0)
    ramp = i / (num_levels - 1.0)
    lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_num_levels(step: Array, total_steps: int, start: int = 10, end: int = 1280) -> Array:
    """Improved CT's discretisation curriculum (Song & Dhariwal, 2023, eq. 5): N(k) =
    min(start 2^floor(k / K'), end) + 1 levels at train step k, K' = floor(K / (log2(end /
    start) + 1)): doubling `start` at equal intervals up to `end`.  -> [] int32."""
    stage = max(total_steps // (int(math.log2(end // start)) + 1), 1)
    doublings = jnp.asarray(step, jnp.int32) // stage
    return jnp.minimum(start * 2 ** jnp.minimum(doublings, 30), end).astype(jnp.int32) + 1


def lognormal_pair_probabilities(levels: Array, num_levels: Array, p_mean: float, p_std: float):
    """p(i) of the pair (s_i, s_i+1), i < N - 1, proportional to erf((ln s_i+1 - P_mean) /
    (sqrt(2) P_std)) - erf((ln s_i - P_mean) / (sqrt(2) P_std)) (improved CT's lognormal
    level distribution); 0 past the table's N levels.  levels: [size] -> [size - 1]."""
    cdf = jax.scipy.special.erf((jnp.log(levels) - p_mean) / (math.sqrt(2.0) * p_std))
    weights = cdf[1:] - cdf[:-1]
    weights = jnp.where(jnp.arange(weights.shape[0]) < num_levels - 1, weights, 0.0)
    return weights / jnp.sum(weights)


def teacher_step(
    process: Process, predict: Predict, x: Array, now: Level, to: Level, heun: bool = True
) -> Array:
    """One Euler or Heun step of the probability-flow ODE from level `now` to level `to`
    (per example, [B]) in the process's ODE variable (`Process.ode_variable`, as the samplers'
    euler / heun integrate it): dy/du = eps + c x_0, c = `Process.ode_x0_coef`.
    x: [B, ...] (VP scale) -> [B, ...] at `to`."""
    (u, scale), (u_next, scale_next) = process.ode_variable(now), process.ode_variable(to)
    du = expand(u_next - u, x.ndim)

    def slope(x_at: Array, level: Level) -> Array:
        x0, eps = predict(x_at, *level)
        return eps + process.ode_x0_coef * x0

    y = x / expand(scale, x.ndim)
    d = slope(x, now)
    y_next = y + du * d
    if heun:
        y_next = y + du * 0.5 * (d + slope(y_next * expand(scale_next, x.ndim), to))
    return y_next * expand(scale_next, x.ndim)


def distance(a: Array, b: Array, kind: str) -> Array:
    """Per-example distance of [B, ...] arrays: l2, the mean squared difference; pseudo_huber,
    sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) (improved CT; d: dimensions per
    example), about ||a - b|| far from 0 and ||a - b||^2 / 2c near it.  -> [B] float32."""
    axes = tuple(range(1, a.ndim))
    squared = jnp.sum(jnp.square(a - b), axis=axes)
    if kind == "l2":
        return squared / math.prod(a.shape[1:])
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(math.prod(a.shape[1:]))
        return jnp.sqrt(squared + c * c) - c
    raise ValueError(f"distance={kind!r} is not one of {', '.join(DISTANCES)}")


@dataclasses.dataclass(frozen=True)
class ConsistencyProcess(Process):
    """A diffusion process read through a consistency model of it, for the samplers: the
    inner process's levels and scales; `denoiser` is the consistency function of the inner
    process's denoiser (x_0 prediction); `sampling_levels` are those multistep consistency
    sampling (method "consistency") denoises at: s_max, then num_steps - 1 levels of Karras
    et al.'s rho-spacing of num_steps + 1 points on [s_min, s_max] (s_min itself, where f
    is the identity, left out). [s_min, s_max] is the inner process's `ve_range`."""

    inner: Process
    sigma_data: float = 0.5

    name = "consistency"
    spacings = ("karras",)

    def vp(self, level: Array) -> tuple[Array, Array]:
        return self.inner.vp(level)

    def level_of_ve(self, s: Array) -> Array:
        return self.inner.level_of_ve(s)

    def ve_range(self) -> tuple[Any, Any]:
        return self.inner.ve_range()

    def sampling_levels(self, num_steps: int, spacing: str, rho: float) -> StepLevels:
        del spacing
        s_min, s_max = self.ve_range()
        s = karras_sigmas(s_min, s_max, num_steps + 1, rho)[:num_steps]
        alpha, sigma = vp_of_ve(s)
        return StepLevels(self.level_of_ve(s), alpha, sigma, respaced_beta(alpha))

    def loss(self, params, apply_fn, x0, rng):
        """Not a denoising loss: a consistency model trains on pairs of levels
        (`ddpm.objectives.consistency`)."""
        raise ValueError("a consistency model's loss is ddpm.objectives.consistency's")

    def consistency(self, net_fn: NetFn) -> Callable[[Any, Array, Level, Any], Array]:
        """fn(params, x [B, ...], level (per example), cond) -> f(x, level): the consistency
        function over the inner process's x_0 prediction of `net_fn` (`consistency_fn`)."""
        inner = self.inner.denoiser(net_fn)

        def fn(params: Any, x: Array, level: Level, cond: Any) -> Array:
            def denoise(x: Array, level: Level) -> Array:
                out = inner(params, x, level.t, cond)[..., : x.shape[-1]]
                a, s = expand(level.alpha, x.ndim), expand(level.sigma, x.ndim)
                return predict_x0_eps(out, x, a, s, self.inner.prediction)[0]

            s_min = self.ve_range()[0]
            return consistency_fn(denoise, s_min, self.sigma_data)(x, level)

        return fn

    def denoiser(self, net_fn: NetFn) -> NetFn:
        """fn(params, x, t [B] model time, cond) -> f(x, level of t): an x_0 prediction."""
        f = self.consistency(net_fn)

        def fn(params: Any, x: Array, t: Array, cond: Any) -> Array:
            return f(params, x, Level(t, *self.vp(t)), cond)

        return fn
