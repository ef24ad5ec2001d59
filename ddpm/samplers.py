"""Reverse-process samplers: DDPM, DDIM, DPM-Solver++ (2M, 2S), Euler and Heun (EDM).

One core. A sampler walks a *grid*, the noise levels of the process from the highest to x_0
itself, one `Row` per step (from level `now` to level `to`), in a single `lax.scan`; methods
differ only in their step function, each written below beside its algorithm. Between steps
the state is x in the variance-preserving scale, x = alpha x_0 + sigma eps with
alpha^2 + sigma^2 = 1. The ODE samplers also use the variance-exploding level
s = sigma / alpha (Karras et al., 2022), in which the probability-flow ODE reads
d(x / alpha)/ds = eps.

The levels come from the noise process (`ddpm.processes.Process.sampling_levels`) and
`spacing`, for every method. A discrete schedule has leading, trailing or linspace (the integer
timesteps of `timesteps`) or karras (Karras sigmas, exponent rho, at fractional t); None is
the method's default (`Process.default_spacing`: karras for euler / heun on a discrete
schedule, trailing otherwise). On timesteps, euler / heun use the VE levels
s_t = sqrt((1 - ab_t) / ab_t) of those t, the sigmas of diffusers' `EulerDiscreteScheduler`
for that `timestep_spacing` (steps_offset 0; its linspace takes fractional timesteps where ours
are rounded). Continuous processes (EDM, flow matching, the VP-SDE) have their own spacings.

The model is called as `denoise_fn(x_t, t, labels)` with t: [B] float32, the process's level
(model time). A level the sampler reaches by its VE level s (the DPM++2S midpoints, levels
raised by EDM churn) is called at `Process.level_of_ve(s)`: a fractional timestep of a
discrete schedule, found by interpolating log s on its table like k-diffusion's
`DiscreteSchedule`. Every grid ends at s = 0: the last step returns x_0. A flow's first level
t = 1 is s = inf (alpha = 0), which every method handles. Euler / Heun integrate each
process's own ODE (`Process.ode_variable`): the VE variable above, a flow's x and t with the
velocity.

Guidance lives in the model wrapper (`make_predict`), editing around the step (`sample`):
SDEdit starts from a later row, inpainting replaces the known region after every step, RePaint
repeats blocks of rows with a jump back up between them.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import processes, runtime
from ddpm.diffusion import (
    PREDICTIONS,
    VARIANCES,
    expand,
    learned_log_variance,
    predict_x0_eps,
    x0_to_eps,
)
from ddpm.processes import Level, Process, karras_sigmas, vp_of_ve
from ddpm.processes.discrete import KARRAS_METHODS, sigma_to_t, t_to_sigma, timesteps
from ddpm.schedules import Schedule

Array = jax.Array
ProcessLike = Process | Schedule  # a bare Schedule is the DDPM process of its tables
DenoiseFn = Callable[[Array, Array, Array | None], Array]
# predict(x [B, ...], t, alpha, sigma) -> (x_0, eps, variance channels | None).
Predict = Callable[[Array, Array, Array, Array], tuple[Array, Array, Array | None]]

METHODS = ("ddpm", "ddim", "dpm++2m", "dpm++2s", "euler", "heun", "consistency")
SPACINGS = ("leading", "trailing", "linspace", "karras")
# Public names of the grids' levels (tests, distillation and benchmarks use them).
__all__ = ["karras_sigmas", "sigma_to_t", "t_to_sigma", "timesteps"]


# --------------------------------------------------------------------------------------------
# Options: every default written once.


@dataclasses.dataclass(frozen=True)
class Options:
    """The static configuration of a sampler (the keywords of `sample` and `make_sampler`).

    method: one of `METHODS`. ddpm: ancestral, respaced to num_steps as in improved DDPM;
      ddim: eta in [0, 1]; dpm++2m / dpm++2s: DPM-Solver++ second order; euler / heun: the
      probability-flow ODE (EDM), with optional churn; consistency: multistep consistency
      sampling (Song et al., 2023, alg. 1) of a consistency model, on its process's levels
      (`ddpm.consistency.ConsistencyProcess`).
    num_steps: steps; in [1, T] on a discrete schedule's timesteps. Model calls: num_steps,
      except dpm++2s and heun: 2 num_steps - 1 (a doubled batch with guidance).
    eta: DDIM noise (0 = deterministic; 1 with all T steps = DDPM ancestral).
    spacing: the levels (see the module docstring); None: the method's default.
    prediction: the model's parameterization, eps | x0 | v.
    clip_x0: clip predicted x_0 to [-1, 1] (pixel space only).
    dynamic_threshold: quantile p of Imagen's dynamic thresholding (replaces clip_x0).
    variance: ddpm's variance: fixed_small (posterior beta~), fixed_large (beta) or learned.
    null_label: the "no class" id fed for the unconditional half of guidance; for a pytree of
      labels, a pytree of fill values, one per leaf.
    guidance_interval: (s_lo, s_hi): guide only where the VE level sigma / alpha lies in it.
    rho: the Karras sigmas' exponent.
    churn, churn_tmin, churn_tmax, churn_noise: euler / heun (EDM's S_churn, S_tmin, S_tmax,
      S_noise); churn > 0 is an error for other methods and for a non-VE ODE (a flow's).
    jump_length, resample: RePaint (with a mask): each block of jump_length steps runs
      resample times, noised back to the block's start level in between (`repaint_order`).
    strength: SDEdit in (0, 1]: run only the last `kept_steps(num_steps, strength)` steps,
      from alpha init + sigma x_T; 1 is plain sampling.
    """

    method: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    spacing: str | None = None
    prediction: str = "eps"
    clip_x0: bool = False
    dynamic_threshold: float | None = None
    variance: str = "fixed_small"
    null_label: Any = None
    guidance_interval: tuple[float, float] | None = None
    rho: float = 7.0
    churn: float = 0.0
    churn_tmin: float = 0.0
    churn_tmax: float = math.inf
    churn_noise: float = 1.0
    jump_length: int = 10
    resample: int = 1
    strength: float = 1.0

    def spacing_for(self, process: Process) -> str:
        """The spacing, None resolved to the process's default for the method."""
        return process.default_spacing(self.method) if self.spacing is None else self.spacing

    def validate(self, process: Process, *, inpaint: bool, init: bool) -> None:
        """Raises ValueError naming the option of an unusable configuration (before tracing)."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(
                f"spacing={self.spacing!r} is not one of {', '.join(SPACINGS)} "
                "(or None: the method's default)"
            )
        if self.spacing is not None and self.spacing not in process.spacings:
            raise ValueError(
                f"spacing={self.spacing!r}: a {process.name} process's levels are "
                f"{' or '.join(process.spacings)}"
            )
        high = process.max_steps(self.spacing_for(process))
        n = self.num_steps
        if not isinstance(n, int | np.integer) or n < 1 or (high is not None and n > high):
            bound = f"in [1, {high}] (the schedule's num_timesteps)" if high else ">= 1"
            raise ValueError(f"num_steps={n!r} must be an integer {bound}")
        if self.churn > 0 and process.ode_x0_coef != 0.0:
            raise ValueError(
                f"churn={self.churn}: churn needs a VE ODE, not a {process.name} process"
            )
        if self.churn > 0 and self.method not in KARRAS_METHODS:
            raise ValueError(
                f"churn={self.churn} applies to {', '.join(KARRAS_METHODS)}, not {self.method!r}"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta!r} must lie in [0, 1]")
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"prediction={self.prediction!r} is not one of {', '.join(PREDICTIONS)}"
            )
        if self.variance not in VARIANCES:
            raise ValueError(f"variance={self.variance!r} is not one of {', '.join(VARIANCES)}")
        threshold = self.dynamic_threshold
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"dynamic_threshold={threshold!r} must lie in (0, 1]")
        for name in ("jump_length", "resample"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.resample > 1 and not inpaint:
            raise ValueError(f"resample={self.resample} (RePaint) needs a mask to inpaint")
        strength = self.strength
        if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r} must lie in (0, 1]")
        if strength < 1.0 and not init:
            raise ValueError(f"strength={strength} < 1 needs an input image (init)")


# --------------------------------------------------------------------------------------------
# The grid: the levels, one row per step.


class Row(NamedTuple):
    """One step, from level `now` to level `to` (x_0 itself after the last: alpha 1, sigma 0).
    beta: the respaced process's 1 - alpha_now^2 / alpha_to^2; restart: a multistep method has
    no history here (the first row, SDEdit's first kept row, the row after a RePaint jump);
    index: the scan item (its key is fold_in(key, index)). A grid is a Row of [n] arrays."""

    index: Array
    now: Level
    to: Level
    beta: Array
    restart: Array
    last: Array


def grid(process: ProcessLike, num_steps: int, spacing: str, rho: float = 7.0) -> Row:
    """The `num_steps` rows of the process's levels for `spacing` (`Process.sampling_levels`)."""
    process = processes.as_process(process)
    levels = process.sampling_levels(num_steps, spacing, rho)
    index = jnp.arange(num_steps, dtype=jnp.int32)
    return Row(
        index=index,
        now=Level(levels.t, levels.alpha, levels.sigma),
        to=Level(
            jnp.append(levels.t[1:], process.level_of_ve(0.0)),
            jnp.append(levels.alpha[1:], 1.0),
            jnp.append(levels.sigma[1:], 0.0),
        ),
        beta=levels.beta,
        restart=index == 0,
        last=index == num_steps - 1,
    )


def _log_snr(level: Level) -> Array:
    """lambda = log(alpha / sigma), the half log-SNR of DPM-Solver (inf at x_0)."""
    return jnp.log(level.alpha) - jnp.log(level.sigma)


# --------------------------------------------------------------------------------------------
# Steps: step(ctx, x, history, row, key) -> (x at row.to, history). `ctx.predict(x, *level)`
# returns (x_0, eps, variance channels or None) for x: [B, ...] at a scalar level.


class _Context(NamedTuple):
    predict: Predict
    process: Process
    opts: Options


def ddpm_step(ctx: _Context, x: Array, history: Any, row: Row, key: Array):
    """Ancestral step (Ho et al., 2020) of the respaced process (improved DDPM): x' ~
    q(x' | x, x_0) = N(beta alpha' / sigma^2 x_0 + (sigma'^2 / sigma^2) sqrt(1 - beta) x, var),
    var = beta~ = beta sigma'^2 / sigma^2 (fixed_small), beta (fixed_large), or learned:
    exp(f log beta + (1 - f) log beta~), f = (v + 1) / 2. No noise at the last step."""
    now, to = row.now, row.to
    x0, _, v = ctx.predict(x, *now)
    ratio = jnp.square(to.sigma / now.sigma)
    mean = row.beta * to.alpha / jnp.square(now.sigma) * x0 + ratio * jnp.sqrt(1.0 - row.beta) * x
    log_large = jnp.log(row.beta)
    log_small = jnp.log(jnp.where(row.last, row.beta, row.beta * ratio))  # beta~ = 0 at x_0
    log_var = {
        "fixed_small": lambda: log_small,
        "fixed_large": lambda: log_large,
        "learned": lambda: learned_log_variance(v, log_small, log_large),
    }[ctx.opts.variance]()
    std = jnp.where(row.last, 0.0, jnp.exp(0.5 * log_var))
    return mean + std * jax.random.normal(key, x.shape, x.dtype), history


def ddim_step(ctx: _Context, x: Array, history: Any, row: Row, key: Array):
    """DDIM (Song et al., 2021, eq. 12): x' = alpha' x_0 + sqrt(sigma'^2 - s^2) eps + s z with
    s^2 = eta^2 beta sigma'^2 / sigma^2 (eq. 16; eta = 1 on all T steps is DDPM's sampler)."""
    now, to = row.now, row.to
    x0, eps, _ = ctx.predict(x, *now)
    var = ctx.opts.eta**2 * row.beta * jnp.square(to.sigma / now.sigma)
    x_next = to.alpha * x0 + jnp.sqrt(jnp.maximum(jnp.square(to.sigma) - var, 0.0)) * eps
    if ctx.opts.eta > 0:
        x_next = x_next + jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype)
    return x_next, history


def dpmpp_2m_step(ctx: _Context, x: Array, history: tuple[Array, Array], row: Row, key: Array):
    """DPM-Solver++(2M) (Lu et al., 2022, alg. 2), with h = lambda' - lambda:
    x' = (sigma' / sigma) x - alpha' expm1(-h) (D + c (D - D_prev)), c = h / (2 h_prev); first
    order (c = 0) at a restart, and x' = D at the last step (lambda' = inf).
    history: (D_prev, h_prev)."""
    del key
    d_prev, h_prev = history
    now, to = row.now, row.to
    d, _, _ = ctx.predict(x, *now)
    h = _log_snr(to) - _log_snr(now)
    c = jnp.where(row.restart | row.last, 0.0, 0.5 * h / h_prev)
    x_next = (to.sigma / now.sigma) * x - to.alpha * jnp.expm1(-h) * (d + c * (d - d_prev))
    return jnp.where(row.last, d, x_next), (d, h)


def dpmpp_2s_step(ctx: _Context, x: Array, history: Any, row: Row, key: Array):
    """DPM-Solver++(2S) (Lu et al., 2022, alg. 1, r = 1/2): a first-order step to the lambda
    midpoint (the geometric mean of the VE levels), then (sigma' / sigma) x - alpha' expm1(-h)
    D(x_mid); the last step returns D(x) (one model call)."""
    del key
    now, to = row.now, row.to
    d, _, _ = ctx.predict(x, *now)

    def second_order() -> Array:
        h = _log_snr(to) - _log_snr(now)
        s_mid = jnp.sqrt((now.sigma / now.alpha) * (to.sigma / to.alpha))
        alpha_mid, sigma_mid = vp_of_ve(s_mid)
        x_mid = (sigma_mid / now.sigma) * x - alpha_mid * jnp.expm1(-0.5 * h) * d
        d_mid, _, _ = ctx.predict(x_mid, ctx.process.level_of_ve(s_mid), alpha_mid, sigma_mid)
        return (to.sigma / now.sigma) * x - to.alpha * jnp.expm1(-h) * d_mid

    return jax.lax.cond(row.last, lambda: d, second_order), history


def churned(process: Process, level: Level, opts: Options) -> Level:
    """EDM's churn (Karras et al., 2022, alg. 2): the VE level s raised to s_hat = min(s (1 +
    gamma), s_max), gamma = min(churn / n, sqrt(2) - 1) where tmin <= s <= tmax, s_max the
    highest level the model was trained on (`Process.ve_range`); a raised level is called at
    its own model time, one left as it is keeps its t."""
    s = level.sigma / level.alpha
    in_range = (s >= opts.churn_tmin) & (s <= opts.churn_tmax)
    gamma = jnp.where(in_range, min(opts.churn / opts.num_steps, np.sqrt(2.0) - 1.0), 0.0)
    s_hat = jnp.minimum(s * (1.0 + gamma), process.ve_range()[1])
    alpha, sigma = vp_of_ve(s_hat)
    return Level(jnp.where(s_hat > s, process.level_of_ve(s_hat), level.t), alpha, sigma)


def _ode_step(heun: bool) -> Callable[..., tuple[Array, Any]]:
    """Euler / Heun (Karras et al., 2022, alg. 2) on dy/du = eps + c x_0 in the process's ODE
    variable y = x / scale at time u (`Process.ode_variable`; c = `ode_x0_coef`): the VE
    variable, dy/ds = eps, or for a flow x itself in t, dx/dt = eps - x_0 = v."""

    def step(ctx: _Context, x: Array, history: Any, row: Row, key: Array):
        process, opts = ctx.process, ctx.opts
        u, scale = process.ode_variable(row.now)
        u_next, scale_next = process.ode_variable(row.to)
        y, at, u_hat, scale_hat = x / scale, row.now, u, scale
        if opts.churn > 0:  # raise the level, adding the noise that takes y there
            at = churned(process, row.now, opts)
            u_hat, scale_hat = at.sigma / at.alpha, at.alpha
            extra = jnp.sqrt(jnp.maximum(jnp.square(u_hat) - jnp.square(u), 0.0))
            y = y + extra * opts.churn_noise * jax.random.normal(key, x.shape, x.dtype)

        def slope(x0: Array, eps: Array) -> Array:
            return eps if process.ode_x0_coef == 0.0 else eps + process.ode_x0_coef * x0

        # Euler step.
        d = slope(*ctx.predict(y * scale_hat, *at)[:2])
        y_next = y + (u_next - u_hat) * d
        if heun:  # 2nd-order correction (not at the last step, which lands on x_0)

            def correct() -> Array:
                d_next = slope(*ctx.predict(y_next * scale_next, *row.to)[:2])
                return y + (u_next - u_hat) * 0.5 * (d + d_next)

            y_next = jax.lax.cond(row.last, lambda: y_next, correct)
        return y_next * scale_next, history

    return step


def consistency_step(ctx: _Context, x: Array, history: Any, row: Row, key: Array):
    """Multistep consistency sampling (Song et al., 2023, alg. 1): the model's x_0 is the
    trajectory's point at the lowest level s_min (`ddpm.consistency`); it is noised afresh to
    the next level s', x' = alpha' (x_0 + sqrt(s'^2 - s_min^2) z). The last step returns x_0."""
    x0, _, _ = ctx.predict(x, *row.now)
    s_min = ctx.process.ve_range()[0]
    to = row.to
    std = jnp.sqrt(jnp.maximum(jnp.square(to.sigma) - jnp.square(s_min * to.alpha), 0.0))
    noise = jnp.where(row.last, 0.0, std) * jax.random.normal(key, x.shape, x.dtype)
    return to.alpha * x0 + noise, history


def _no_history(x: Array) -> tuple[()]:
    return ()


def _dpm_history(x: Array) -> tuple[Array, Array]:
    return jnp.zeros_like(x), jnp.ones((), x.dtype)


# name -> (step, initial history from x_T)
STEPS = {
    "ddpm": (ddpm_step, _no_history),
    "ddim": (ddim_step, _no_history),
    "dpm++2m": (dpmpp_2m_step, _dpm_history),
    "dpm++2s": (dpmpp_2s_step, _no_history),
    "euler": (_ode_step(heun=False), _no_history),
    "heun": (_ode_step(heun=True), _no_history),
    "consistency": (consistency_step, _no_history),
}


# --------------------------------------------------------------------------------------------
# Editing around the step: SDEdit's start, inpainting by replacement, RePaint's jumps.


def kept_steps(num_steps: int, strength: float) -> int:
    """Steps an SDEdit run of `strength` in (0, 1] takes: floor(strength n) (as diffusers), the
    last ones of the n-step grid; 0 means no step (the input is returned as it is)."""
    return min(int(np.floor(strength * num_steps + 1e-6)), num_steps)


def _last_rows(rows: Row, keep: int) -> Row:
    """The last `keep` rows; the first of them restarts the multistep history."""
    rows = jax.tree.map(lambda a: a[a.shape[0] - keep :], rows)
    return rows._replace(restart=rows.restart.at[0].set(True))


def repaint_order(num_steps: int, jump_length: int, resample: int) -> tuple[np.ndarray, ...]:
    """RePaint's schedule (Lugmayr et al., 2022) over the rows of an n-step grid.

    The rows are taken in blocks of `jump_length`; each block is run `resample` times, and
    before every repeat the state is noised back from the block's end level to its start
    level (a "jump"). Returns (row [M] int, jump [M] bool, src [M] int): scan item i runs grid
    row `row[i]`, or for a jump goes from the level after row `src[i]` to the level of row
    `row[i]`; M = resample n + (resample - 1) ceil(n / jump_length) items.
    """
    rows, jumps, srcs = [], [], []
    for begin in range(0, num_steps, jump_length):
        end = min(begin + jump_length, num_steps)
        for r in range(resample):
            if r:
                rows.append(begin), jumps.append(True), srcs.append(end - 1)
            rows.extend(range(begin, end))
            jumps.extend([False] * (end - begin))
            srcs.extend(range(begin, end))
    return np.array(rows), np.array(jumps), np.array(srcs)


class Jump(NamedTuple):
    """A RePaint item's jump: `flag` (this item noises the state back up instead of a step)
    from level `source` to the row's `now`."""

    flag: Array
    source: Level


def _repaint(rows: Row, jump_length: int, resample: int) -> tuple[Row, Jump]:
    """`rows` expanded by `repaint_order`, with the jumps; `index` counts scan items, and the
    first step after a jump restarts the multistep history."""
    order, jumps, srcs = repaint_order(rows.index.shape[0], jump_length, resample)
    expanded = jax.tree.map(lambda a: a[order], rows)
    after_jump = jnp.asarray(np.append(False, jumps[:-1]))
    expanded = expanded._replace(
        index=jnp.arange(len(order), dtype=jnp.int32), restart=expanded.restart | after_jump
    )
    source = jax.tree.map(lambda a: a[srcs], rows.to)
    return expanded, Jump(jnp.asarray(jumps), source)


def _renoise(x: Array, source: Level, to: Level, key: Array) -> Array:
    """The forward process from level `source` up to level `to`:
    x' = (alpha' / alpha) x + sqrt(sigma'^2 - (alpha' / alpha)^2 sigma^2) z."""
    ratio = to.alpha / source.alpha
    std = jnp.sqrt(jnp.maximum(jnp.square(to.sigma) - jnp.square(ratio * source.sigma), 0.0))
    return ratio * x + std * jax.random.normal(key, x.shape, x.dtype)


def _replace_known(x: Array, known: Array, mask: Array, level: Level, key: Array) -> Array:
    """Replacement inpainting: where mask = 1 the state becomes q_sample(known) at the state's
    level, alpha known + sigma z; elsewhere it is kept.  x: [B, ...]; known, mask broadcast."""
    noisy = level.alpha * known + level.sigma * jax.random.normal(key, x.shape, x.dtype)
    return jnp.where(mask > 0.5, noisy, x)


# --------------------------------------------------------------------------------------------
# Model wrapper: guidance, parameterization, variance channels, x_0 clipping.


def _threshold_x0(x0: Array, opts: Options) -> Array:
    """Dynamic thresholding (Saharia et al., 2022): per sample, r = max(quantile(|x_0|, p), 1),
    x_0 -> clip(x_0, -r, r) / r; or plain clipping to [-1, 1]. Pixel space only."""
    if opts.dynamic_threshold is not None:
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        r = jnp.maximum(jnp.quantile(flat, opts.dynamic_threshold, axis=1), 1.0)
        r = r.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -r, r) / r
    return jnp.clip(x0, -1.0, 1.0)


def _make_predict(
    denoise_fn: DenoiseFn,
    labels: Array | None,
    scale: Array | None,
    opts: Options,
    guide_fn: DenoiseFn | None = None,
) -> Predict:
    """predict(x, t, alpha, sigma) -> (x_0, eps, variance channels | None); t, alpha, sigma
    (and the guidance scale) are scalars, or per-example [B]. With guidance (scale not None)
    out = uncond + s (cond - uncond) on the model output (the variance channels: cond's),
    where cond and uncond (the null label) go through one batched call; with `guide_fn`
    (autoguidance, Karras et al. 2024), uncond is instead guide_fn(x, t, labels), a weaker
    model given the same conditioning."""
    learned = opts.variance == "learned"

    def call(x: Array, t: Array, sigma_ve: Array) -> Array:
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        if scale is None:
            return denoise_fn(x, t, labels).astype(jnp.float32)
        if guide_fn is not None:
            cond = denoise_fn(x, t, labels).astype(jnp.float32)
            uncond = guide_fn(x, t, labels).astype(jnp.float32)
        else:
            # labels may be a pytree (text conditioning): null_label holds one value per leaf.
            null = jax.tree.map(jnp.full_like, labels, opts.null_label)
            both = denoise_fn(
                jnp.concatenate([x, x]),
                jnp.concatenate([t, t]),
                jax.tree.map(lambda c, n: jnp.concatenate([c, n]), labels, null),
            ).astype(jnp.float32)
            cond, uncond = both[:batch], both[batch:]
        s = scale
        if opts.guidance_interval is not None:
            lo, hi = opts.guidance_interval
            s = jnp.where((sigma_ve >= lo) & (sigma_ve <= hi), scale, 1.0)
        s = expand(s, x.ndim)
        if learned:  # guide the mean channels only
            mean_c, var_c = jnp.split(cond, 2, axis=-1)
            mean_u, _ = jnp.split(uncond, 2, axis=-1)
            return jnp.concatenate([mean_u + s * (mean_c - mean_u), var_c], axis=-1)
        return uncond + s * (cond - uncond)

    def predict(x: Array, t: Array, alpha: Array, sigma: Array):
        out = call(x, t, sigma / alpha)
        v = None
        if learned:
            out, v = jnp.split(out, 2, axis=-1)
        alpha, sigma = expand(alpha, x.ndim), expand(sigma, x.ndim)
        x0, eps = predict_x0_eps(out, x, alpha, sigma, opts.prediction)
        if opts.clip_x0 or opts.dynamic_threshold is not None:
            x0 = _threshold_x0(x0, opts)
            eps = x0_to_eps(x, x0, alpha, sigma)
        return x0, eps, v

    return predict


def make_predict(
    denoise_fn: DenoiseFn,
    labels: Any = None,
    guidance_scale: Array | None = None,
    **options: Any,
) -> Predict:
    """The model wrapper every sampler step calls, for use outside `sample` (a distillation
    teacher): predict(x [B, ...], t, alpha, sigma) -> (x_0, eps, variance channels | None),
    levels scalars or per-example [B]; `guidance_scale` None (off), a scalar or [B]. The
    options (prediction, clip_x0, dynamic_threshold, null_label, variance) are `Options`'."""
    return _make_predict(denoise_fn, labels, guidance_scale, Options(**options))


def _guidance_on(guidance_scale: Any) -> bool:
    """Static: guidance runs unless the scale is None or the Python number 1 (a traced scale
    always runs it, so changing its value does not recompile)."""
    if guidance_scale is None:
        return False
    return not (isinstance(guidance_scale, int | float) and guidance_scale == 1.0)


# --------------------------------------------------------------------------------------------
# Entry points.


def sample(
    denoise_fn: DenoiseFn,
    process: ProcessLike,
    shape: tuple[int, ...],
    rng: Array,
    *,
    labels: Any = None,
    guidance_scale: float | Array | None = None,
    known: Array | None = None,
    mask: Array | None = None,
    init: Array | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
    guide_fn: DenoiseFn | None = None,
    noise: Array | None = None,
    **options: Any,
) -> Array:
    """Draws x_0 by running `options.method` from x_T ~ N(0, I); pure, one `lax.scan`,
    jit-compatible.

    Args:
      denoise_fn: `denoise_fn(x_t, t, labels) -> output`, x_t: [B, ...] float32, t: [B] float32,
        labels: [B] int32 or None; output: x_t's shape in the `prediction` parameterization
        (last axis doubled for variance="learned": [mean channels, variance interpolation v]).
      process: the noise process the model was trained on (`ddpm.processes`; a bare discrete
        `Schedule` is the DDPM process of its tables); t is its level (model time), and
        denoise_fn usually its `Process.denoiser` with prediction `Process.prediction`.
      shape: [B, ...] of the samples (static).
      rng: PRNG key: split into the x_T noise and per-step keys (`fold_in(key, step)`).
      labels: [B] int32 class ids, or None for an unconditional model; or any conditioning
        pytree with leading axis B (text: {"tokens": [B, L]}, see `ddpm.conditioning`).
      guidance_scale: classifier-free guidance scale s; None or the Python number 1.0 = off
        (one model call per evaluation); anything else (a jnp scalar may be traced) = on.
      known, mask: inpainting (both or neither): known [B, ...] (or broadcastable to `shape`)
        float32 image, mask of the same or a broadcastable shape, 1 = keep, 0 = generate.
        Before the first step and after every step the kept region of the state is replaced by
        q_sample(known) at the level the state has reached; at the end it equals `known`.
      init: SDEdit's input image (`shape`, or broadcastable), with options.strength < 1.
      batch_sharding: under jit, the layout of x_T and so of the state and the network's batch
        in every step (e.g. rows split over the devices); None: what XLA propagates from the
        inputs, which for a replicated key is every device drawing the whole batch. The draws
        do not depend on it (threefry is partitionable).
      guide_fn: autoguidance (Karras et al., 2024): a weaker model of the same process and
        conditioning, `guide_fn(x_t, t, labels)` like denoise_fn; with guidance on, the
        guided output is guide + s (model - guide) instead of classifier-free guidance's
        uncond + s (cond - uncond). Needs no null label; labels may be None (unconditional).
      noise: x_T itself (`shape`, float32) instead of a draw from rng: another pipeline's
        starting latents, to reproduce its samples.
      **options: the static configuration, `Options` (method, num_steps, spacing, ...).

    Returns:
      x_0: `shape` float32.
    """
    process = processes.as_process(process)
    opts = Options(**options)
    opts.validate(process, inpaint=mask is not None, init=init is not None)
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both known (the image) and mask (1 = keep)")
    guided = _guidance_on(guidance_scale)
    if guided and guide_fn is None and (labels is None or opts.null_label is None):
        raise ValueError(
            "guidance_scale != 1 needs labels and null_label (the label fed to the "
            "unconditional half)"
        )
    if labels is not None and not isinstance(labels, dict):  # a dict: text conditioning
        labels = jnp.asarray(labels, jnp.int32)
    scale = jnp.asarray(guidance_scale, jnp.float32) if guided else None
    ctx = _Context(_make_predict(denoise_fn, labels, scale, opts, guide_fn), process, opts)
    step, first_history = STEPS[opts.method]

    rows = grid(process, opts.num_steps, opts.spacing_for(process), opts.rho)
    noise_key, step_key = jax.random.split(rng)
    x = jax.random.normal(noise_key, shape, jnp.float32) if noise is None else noise
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
    if opts.strength < 1.0:  # SDEdit: start at a later row from the noised input
        keep = kept_steps(opts.num_steps, opts.strength)
        init = jnp.broadcast_to(jnp.asarray(init, jnp.float32), shape)
        if keep == 0:
            return init
        rows = _last_rows(rows, keep)
        x = rows.now.alpha[0] * init + rows.now.sigma[0] * x
    inpaint = mask is not None
    if inpaint:
        known, mask = jnp.asarray(known, jnp.float32), jnp.asarray(mask, jnp.float32)
        first = jax.tree.map(lambda a: a[0], rows.now)
        x = _replace_known(x, known, mask, first, jax.random.fold_in(noise_key, 1))
    jumps = _repaint(rows, opts.jump_length, opts.resample) if opts.resample > 1 else None
    if jumps is not None:
        rows, jumps = jumps

    def body(carry: tuple[Array, Any], item: tuple[Row, Jump | None]):
        (x, history), (row, jump) = carry, item
        key = jax.random.fold_in(step_key, row.index)
        if jump is None:
            x, history = step(ctx, x, history, row, key)
            level = row.to
        else:
            x, history = jax.lax.cond(
                jump.flag,
                lambda: (_renoise(x, jump.source, row.now, key), history),
                lambda: step(ctx, x, history, row, key),
            )
            level = jax.tree.map(lambda a, b: jnp.where(jump.flag, a, b), row.now, row.to)
        if inpaint:
            x = _replace_known(x, known, mask, level, jax.random.fold_in(key, 1))
        return (x, history), None

    (x0, _), _ = jax.lax.scan(body, (x, first_history(x)), (rows, jumps))
    return x0


def make_sampler(
    model_fn: Callable[[Any, Array, Array, Array | None], Array],
    process: ProcessLike,
    shape: tuple[int, ...],
    *,
    guidance: bool = False,
    batch_sharding: jax.sharding.Sharding | None = None,
    guide_model_fn: Callable[[Any, Array, Array, Array | None], Array] | None = None,
    compiler_options: dict[str, str] | None = None,
    **options: Any,
) -> Callable[..., Array]:
    """A jitted `fn(params, rng, labels=None, guidance_scale=None, *, known=None, mask=None,
    init=None) -> x_0 [shape] float32`.

    `model_fn(params, x_t, t, labels) -> output`. params, rng, labels, guidance_scale and the
    editing arrays (known, mask: inpainting; init: SDEdit, see `sample`) are traced, so new
    values reuse the compiled sampler; the static configuration is `shape`, `guidance` (on:
    guidance_scale is required and traced) and `options` (`Options`), validated here;
    `batch_sharding`: the samples' layout (see `sample`), e.g. split over a mesh's devices.
    `guide_model_fn(guide_params, x_t, t, labels)`: autoguidance by a weaker model (`sample`'s
    guide_fn); fn's params are then the pair (params, guide_params).
    `compiler_options`: XLA's, for a top-level call (`ddpm.runtime.jit`).
    """
    for name in ("guidance_scale", "labels", "known", "mask", "init"):
        if name in options:
            raise ValueError(f"make_sampler: pass {name} to the returned function, not here")
    process = processes.as_process(process)
    opts = Options(**options)
    opts.validate(process, inpaint=opts.resample > 1, init=True)

    def run(
        params: Any,
        rng: Array,
        labels: Array | None = None,
        guidance_scale=None,
        *,
        known: Array | None = None,
        mask: Array | None = None,
        init: Array | None = None,
    ) -> Array:
        if guidance == (guidance_scale is None):
            raise ValueError(f"make_sampler(guidance={guidance}): guidance_scale={guidance_scale}")
        guide_fn = None
        if guide_model_fn is not None:
            params, guide_params = params
            guide_fn = functools.partial(guide_model_fn, guide_params)
        return sample(
            lambda x, t, y: model_fn(params, x, t, y),
            process,
            shape,
            rng,
            labels=labels,
            guidance_scale=guidance_scale,
            known=known,
            mask=mask,
            init=init,
            batch_sharding=batch_sharding,
            guide_fn=guide_fn,
            **options,
        )

    if batch_sharding is None:
        return runtime.jit(run, compiler_options)
    return runtime.jit(run, compiler_options, out_shardings=batch_sharding)
