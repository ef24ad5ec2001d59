"""Reverse-process samplers: DDPM, DDIM, DPM-Solver++ (2M, 2S), Euler and Heun (EDM).

One core. `sample` builds the method's *grid* (a table of noise levels, one row per step) and
runs the method's *step* function over it in a single `lax.scan`; methods differ only in those
two functions. Between steps the state is x in the variance-preserving scale,
x_t = alpha x_0 + sigma eps with alpha = sqrt(ab), sigma = sqrt(1 - ab). The ODE samplers also
use the variance-exploding variable x / alpha and its noise level s = sigma / alpha (Karras et
al., 2022), in which the probability-flow ODE reads dx/ds = eps(x, s).

The grid's levels come from the noise process (`ddpm.processes.Process.sampling_levels`) and
`spacing`, for every method. A discrete schedule has leading, trailing or linspace (the integer
timesteps of `timesteps`) or karras (Karras sigmas, exponent rho, at fractional t); None is
the method's default: karras for euler/heun, trailing for the others. On timesteps,
euler/heun use the VE levels s_t = sqrt((1 - ab_t) / ab_t) of those t, the sigmas of
diffusers' `EulerDiscreteScheduler` for that `timestep_spacing` (steps_offset 0; its linspace
takes fractional timesteps where ours are rounded). Continuous processes (EDM, flow matching,
the VP-SDE) have their own spacings.

The model is called as `denoise_fn(x_t, t, labels)` with t: [B] float32, the process's level
(model time). A level the grid reaches by its VE level s (the DPM++2S midpoints, levels raised
by EDM churn) is called at `Process.level_of_ve(s)`: a fractional timestep of a discrete
schedule, found by interpolating log s on its table like k-diffusion's `DiscreteSchedule`.
Every grid ends at s = 0: the last step returns x_0. A flow's first level t = 1 is s = inf
(alpha = 0), which every method handles. Euler / Heun integrate each process's own ODE
(`Process.ode_variable`): the VE variable above, a flow's x and t with the velocity.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import processes
from ddpm.diffusion import PREDICTIONS, VARIANCES, expand, predict_x0_eps, x0_to_eps
from ddpm.processes import Process, karras_sigmas, vp_of_ve
from ddpm.processes.discrete import KARRAS_METHODS, sigma_to_t, t_to_sigma, timesteps
from ddpm.schedules import Schedule

Array = jax.Array
ProcessLike = Process | Schedule  # a bare Schedule is the DDPM process of its tables
Grid = dict[str, Array]  # every value has shape [num_steps]
DenoiseFn = Callable[[Array, Array, Array | None], Array]
Predict = Callable[[Array, Array, Array, Array], tuple[Array, Array, Array | None]]

METHODS = ("ddpm", "ddim", "dpm++2m", "dpm++2s", "euler", "heun")
SPACINGS = ("leading", "trailing", "linspace", "karras")
# Public names of the grids' levels (tests, distillation and benchmarks use them).
__all__ = ["karras_sigmas", "sigma_to_t", "t_to_sigma", "timesteps"]


def _log_snr(alpha: Array, sigma: Array) -> Array:
    """lambda = log(alpha / sigma), the half log-SNR of DPM-Solver."""
    return jnp.log(alpha) - jnp.log(sigma)


# --------------------------------------------------------------------------------------------
# Grids: one row per step. Common fields: index (int32), last (bool), t (model time of the
# current level), alpha, sigma (current VP level, that of the carried x), alpha_next, sigma_next.


def _grid(num_steps: int, **rows: Array) -> Grid:
    """A grid of `num_steps` rows: the given per-step arrays plus `index` and `last`."""
    return dict(
        index=jnp.arange(num_steps, dtype=jnp.int32),
        last=jnp.arange(num_steps) == num_steps - 1,
        **rows,
    )


def _discrete_grid(
    process: ProcessLike, num_steps: int, spacing: str | None, opts: "_Options"
) -> Grid:
    """The process's levels for `spacing` (None: its default for DDIM), then x_0 (alpha = 1,
    sigma = 0): t (model time), alpha, sigma, their next values, and `beta`, the beta of the
    respaced process (improved DDPM), 1 - ab_t / ab_next (`Process.sampling_levels`)."""
    process = processes.as_process(process)
    spacing = process.default_spacing("ddim") if spacing is None else spacing
    levels = process.sampling_levels(num_steps, spacing, opts.rho)
    return _grid(
        num_steps,
        t=levels.t,
        alpha=levels.alpha,
        sigma=levels.sigma,
        alpha_next=jnp.append(levels.alpha[1:], 1.0),
        sigma_next=jnp.append(levels.sigma[1:], 0.0),
        beta=levels.beta,
    )


def _ddpm_grid(process: ProcessLike, num_steps: int, spacing: str | None, opts: "_Options") -> Grid:
    """Adds the posterior q(x_next | x_t, x_0) of the (respaced) process:

    mean = coef_x0 x_0 + coef_xt x_t, coef_x0 = beta alpha_next / sigma^2,
    coef_xt = sigma_next^2 sqrt(1 - beta) / sigma^2; variance beta~ = beta sigma_next^2 / sigma^2,
    its log clipped at the last step to the previous step's value (as in DDPM).
    """
    g = _discrete_grid(process, num_steps, spacing, opts)
    beta, var_ratio = g["beta"], jnp.square(g["sigma_next"] / g["sigma"])
    posterior = beta * var_ratio
    clip_last = posterior[-2] if num_steps > 1 else beta[-1]
    g["log_var_small"] = jnp.log(posterior.at[-1].set(clip_last))
    g["log_var_large"] = jnp.log(beta)
    g["coef_x0"] = beta * g["alpha_next"] / jnp.square(g["sigma"])
    g["coef_xt"] = var_ratio * jnp.sqrt(1.0 - beta)
    return g


def _dpm_grid(process: ProcessLike, num_steps: int, spacing: str | None, opts: "_Options") -> Grid:
    """Adds DPM-Solver++ coefficients, in lambda = log(alpha / sigma), h = lambda_next - lambda:

    first order (DDIM): x_next = ratio x + coef D with ratio = sigma_next / sigma and
    coef = -alpha_next expm1(-h); second-order multistep (2M) uses
    D + c (D - D_prev), c = h / (2 h_prev), except at the first and the last step (c = 0).
    The last step (to sigma = 0, lambda = inf) is first order: ratio = 0, coef = 1, x_next = D.
    """
    process = processes.as_process(process)
    g = _discrete_grid(process, num_steps, spacing, opts)
    lam = _log_snr(g["alpha"], g["sigma"])
    h = lam[1:] - lam[:-1]  # [n-1]: all steps but the last
    g["ratio"] = jnp.append(g["sigma"][1:] / g["sigma"][:-1], 0.0)
    g["coef"] = jnp.append(-g["alpha"][1:] * jnp.expm1(-h), 1.0)
    g["c"] = jnp.concatenate([jnp.zeros(1), 0.5 * h[1:] / h[:-1], jnp.zeros(1)])[:num_steps]
    # 2S midpoint: lambda + h/2, i.e. the geometric mean of the VE levels.
    s = g["sigma"] / g["alpha"]
    s_mid = jnp.append(jnp.sqrt(s[1:] * s[:-1]), s[-1])  # the last row is unused
    g["alpha_mid"], g["sigma_mid"] = vp_of_ve(s_mid)
    g["t_mid"] = process.level_of_ve(s_mid)
    g["coef_mid"] = jnp.append(-g["alpha_mid"][:-1] * jnp.expm1(-0.5 * h), 0.0)
    return g


def _karras_grid(
    process: ProcessLike, num_steps: int, spacing: str | None, opts: "_Options"
) -> Grid:
    """Levels for Euler / Heun on the probability-flow ODE in the process's ODE variable
    y = x / y_scale at ODE time u (`Process.ode_variable`), dy/du = eps + ode_x0_coef x_0, then
    u = 0. The VE variable for every process but a flow (y = x / alpha, u = s = sigma / alpha,
    dy/ds = eps; Karras et al., 2022, alg. 2); a flow: x itself in t, dy/dt = eps - x_0 = v.
    spacing None: the process's default for euler (a discrete schedule: Karras sigmas).

    Churn (VE ODEs only): s_hat = min(s (1 + gamma), s_max), gamma = min(churn / n,
    sqrt(2) - 1) where tmin <= s <= tmax, s_max the highest level the model was trained on
    (`Process.ve_range`); a raised level s_hat > s is called at its own model time.
    """
    process = processes.as_process(process)
    spacing = process.default_spacing("euler") if spacing is None else spacing
    levels = process.sampling_levels(num_steps, spacing, opts.rho)
    u, y_scale = process.ode_variable(levels)
    u_hat, alpha_hat, sigma_hat, t, y_scale_hat = u, levels.alpha, levels.sigma, levels.t, y_scale
    if opts.churn > 0:
        in_range = (u >= opts.churn_tmin) & (u <= opts.churn_tmax)
        gamma = jnp.where(in_range, min(opts.churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)
        u_hat = jnp.minimum(u * (1.0 + gamma), process.ve_range()[1])  # the model's levels
        alpha_hat, sigma_hat = vp_of_ve(u_hat)
        t = jnp.where(u_hat > u, process.level_of_ve(u_hat), levels.t)
        y_scale_hat = alpha_hat
    return _grid(
        num_steps,
        t=t,
        alpha=levels.alpha,
        sigma=levels.sigma,
        alpha_next=jnp.append(levels.alpha[1:], 1.0),
        sigma_next=jnp.append(levels.sigma[1:], 0.0),
        u=u,
        u_hat=u_hat,
        u_next=jnp.append(u[1:], 0.0),
        y_scale=y_scale,
        y_scale_hat=y_scale_hat,
        y_scale_next=jnp.append(y_scale[1:], 1.0),
        alpha_hat=alpha_hat,
        sigma_hat=sigma_hat,
        t_next=jnp.append(levels.t[1:], levels.t[-1]),  # the last row is unused
    )


# --------------------------------------------------------------------------------------------
# Steps: (predict, x, aux, row, key, opts) -> (x_next, aux). `predict(x, t, alpha, sigma)`
# returns (x_0, eps, variance channels or None) for x: [B, ...] at a scalar level.


def _ddpm_step(predict: Predict, x: Array, aux: Any, g: Grid, key: Array, opts: "_Options"):
    """Ancestral step x_next ~ N(posterior mean, variance); no noise at the last step.

    learned variance (improved DDPM): log var = f log beta + (1 - f) log beta~, f = (v + 1) / 2.
    """
    x0, _, v = predict(x, g["t"], g["alpha"], g["sigma"])
    mean = g["coef_x0"] * x0 + g["coef_xt"] * x
    if opts.variance == "fixed_small":
        log_var = g["log_var_small"]
    elif opts.variance == "fixed_large":
        log_var = g["log_var_large"]
    else:
        frac = (v + 1.0) / 2.0
        log_var = frac * g["log_var_large"] + (1.0 - frac) * g["log_var_small"]
    std = jnp.where(g["last"], 0.0, jnp.exp(0.5 * log_var))
    return mean + std * jax.random.normal(key, x.shape, x.dtype), aux


def _ddim_step(predict: Predict, x: Array, aux: Any, g: Grid, key: Array, opts: "_Options"):
    """x_next = alpha_next x_0 + sqrt(sigma_next^2 - s^2) eps + s z,
    s^2 = eta^2 (sigma_next^2 / sigma^2) (1 - ab_t / ab_next)  (Song et al., 2021, eq. 16)."""
    x0, eps, _ = predict(x, g["t"], g["alpha"], g["sigma"])
    var = opts.eta**2 * g["beta"] * jnp.square(g["sigma_next"] / g["sigma"])
    x_next = g["alpha_next"] * x0 + jnp.sqrt(jnp.maximum(g["sigma_next"] ** 2 - var, 0.0)) * eps
    if opts.eta > 0:
        x_next = x_next + jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype)
    return x_next, aux


def _dpmpp_2m_step(predict: Predict, x: Array, d_prev: Array, g: Grid, key: Array, opts):
    """DPM-Solver++(2M) (Lu et al., 2022, alg. 2): ratio x + coef (D + c (D - D_prev))."""
    del key, opts
    x0, _, _ = predict(x, g["t"], g["alpha"], g["sigma"])
    return g["ratio"] * x + g["coef"] * (x0 + g["c"] * (x0 - d_prev)), x0


def _dpmpp_2s_step(predict: Predict, x: Array, aux: Any, g: Grid, key: Array, opts):
    """DPM-Solver++(2S) (Lu et al., 2022, alg. 1, r = 1/2): a first-order step to the lambda
    midpoint, then ratio x + coef D(x_mid); the last step returns D(x) (one model call)."""
    del key, opts
    x0, _, _ = predict(x, g["t"], g["alpha"], g["sigma"])

    def second_order() -> Array:
        x_mid = (g["sigma_mid"] / g["sigma"]) * x + g["coef_mid"] * x0
        x0_mid, _, _ = predict(x_mid, g["t_mid"], g["alpha_mid"], g["sigma_mid"])
        return g["ratio"] * x + g["coef"] * x0_mid

    return jax.lax.cond(g["last"], lambda: x0, second_order), aux


def _karras_step(heun: bool) -> Callable[..., tuple[Array, Any]]:
    """Euler / Heun on dy/du = eps + ode_x0_coef x_0 in the ODE variable of `_karras_grid`
    (Karras et al., 2022, alg. 2; for a flow, Euler / Heun on t with the velocity)."""

    def step(predict: Predict, x: Array, aux: Any, g: Grid, key: Array, opts: "_Options"):
        y = x / g["y_scale"]
        if opts.churn > 0:
            extra = jnp.sqrt(jnp.maximum(jnp.square(g["u_hat"]) - jnp.square(g["u"]), 0.0))
            y = y + extra * opts.churn_noise * jax.random.normal(key, x.shape, x.dtype)
        du = g["u_next"] - g["u_hat"]

        def slope(x0: Array, eps: Array) -> Array:
            return eps if opts.ode_x0_coef == 0.0 else eps + opts.ode_x0_coef * x0

        x0, eps, _ = predict(y * g["y_scale_hat"], g["t"], g["alpha_hat"], g["sigma_hat"])
        d = slope(x0, eps)
        euler = y + du * d
        if heun:

            def correct() -> Array:
                x0_next, eps_next, _ = predict(
                    euler * g["y_scale_next"], g["t_next"], g["alpha_next"], g["sigma_next"]
                )
                return y + du * 0.5 * (d + slope(x0_next, eps_next))

            euler = jax.lax.cond(g["last"], lambda: euler, correct)
        return euler * g["y_scale_next"], aux

    return step


def _no_aux(x: Array) -> tuple[()]:
    return ()


# --------------------------------------------------------------------------------------------
# Editing: SDEdit start strength, inpainting by replacement, RePaint resampling. All three
# reshape the grid (host side, static) and add a few lines to the one scan body.


def kept_steps(num_steps: int, strength: float) -> int:
    """Steps an SDEdit run of `strength` in (0, 1] takes: floor(strength n) (as diffusers), the
    last ones of the n-step grid; 0 means no step (the input is returned as it is)."""
    return min(int(np.floor(strength * num_steps + 1e-6)), num_steps)


def _truncate(grid: Grid, keep: int) -> Grid:
    """The last `keep` rows of `grid`; the first of them restarts the multistep history (c = 0)."""
    g = {k: v[len(v) - keep :] for k, v in grid.items()}
    if "c" in g:
        g["c"] = g["c"].at[0].set(0.0)
    return g


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


def _repaint_grid(grid: Grid, jump_length: int, resample: int) -> Grid:
    """`grid` expanded by `repaint_order`: rows repeated, plus `jump` (bool) and the level
    `alpha_from`, `sigma_from` a jump starts at; `index` counts scan items (per-item keys), and
    the first step after a jump restarts the multistep history (c = 0)."""
    rows, jumps, srcs = repaint_order(len(grid["index"]), jump_length, resample)
    g = {k: v[rows] for k, v in grid.items()}
    g["index"] = jnp.arange(len(rows), dtype=jnp.int32)
    g["jump"] = jnp.asarray(jumps)
    g["alpha_from"], g["sigma_from"] = grid["alpha_next"][srcs], grid["sigma_next"][srcs]
    if "c" in g:
        g["c"] = jnp.where(jnp.asarray(np.append(False, jumps[:-1])), 0.0, g["c"])
    return g


def _renoise(x: Array, g: Grid, key: Array) -> Array:
    """Forward process from level (alpha_from, sigma_from) up to (alpha, sigma) of row g:
    x' = (alpha / alpha_from) x + sqrt(sigma^2 - (alpha / alpha_from)^2 sigma_from^2) z."""
    ratio = g["alpha"] / g["alpha_from"]
    std = jnp.sqrt(jnp.maximum(jnp.square(g["sigma"]) - jnp.square(ratio * g["sigma_from"]), 0.0))
    return ratio * x + std * jax.random.normal(key, x.shape, x.dtype)


def _replace_known(
    x: Array, known: Array, mask: Array, alpha: Array, sigma: Array, key: Array
) -> Array:
    """Replacement inpainting: where mask = 1 the state becomes q_sample(known) at the state's
    level, alpha known + sigma z; elsewhere it is kept.  x: [B, ...]; known, mask broadcast."""
    noisy = alpha * known + sigma * jax.random.normal(key, x.shape, x.dtype)
    return jnp.where(mask > 0.5, noisy, x)


# name -> (grid, step, initial aux from x_T)
_METHOD_TABLE = {
    "ddpm": (_ddpm_grid, _ddpm_step, _no_aux),
    "ddim": (_discrete_grid, _ddim_step, _no_aux),
    "dpm++2m": (_dpm_grid, _dpmpp_2m_step, jnp.zeros_like),
    "dpm++2s": (_dpm_grid, _dpmpp_2s_step, _no_aux),
    "euler": (_karras_grid, _karras_step(heun=False), _no_aux),
    "heun": (_karras_grid, _karras_step(heun=True), _no_aux),
}


# --------------------------------------------------------------------------------------------
# Model wrapper: guidance, parameterization, variance channels, x_0 clipping.


class _Options(NamedTuple):
    eta: float = 0.0
    variance: str = "fixed_small"
    prediction: str = "eps"
    clip_x0: bool = False
    dynamic_threshold: float | None = None
    guidance_interval: tuple[float, float] | None = None
    null_label: Any = None  # int, or a pytree of fill values like the conditioning
    rho: float = 7.0
    churn: float = 0.0
    churn_tmin: float = 0.0
    churn_tmax: float = float("inf")
    churn_noise: float = 1.0
    ode_x0_coef: float = 0.0  # euler / heun: the ODE's slope is eps + ode_x0_coef x_0


def _threshold_x0(x0: Array, opts: _Options) -> Array:
    """Dynamic thresholding (Saharia et al., 2022): per sample, r = max(quantile(|x_0|, p), 1),
    x_0 -> clip(x_0, -r, r) / r; or plain clipping to [-1, 1]. Pixel space only."""
    if opts.dynamic_threshold is not None:
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        r = jnp.maximum(jnp.quantile(flat, opts.dynamic_threshold, axis=1), 1.0)
        r = r.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -r, r) / r
    return jnp.clip(x0, -1.0, 1.0)


def _make_predict(
    denoise_fn: DenoiseFn, labels: Array | None, scale: Array | None, opts: _Options
) -> Predict:
    """predict(x, t, alpha, sigma) -> (x_0, eps, variance channels | None); t, alpha, sigma
    (and the guidance scale) are scalars, or per-example [B]. With guidance (scale not None)
    cond and uncond go through one batched call: out = uncond + s (cond - uncond) on the
    model output (the variance channels: cond's)."""
    learned = opts.variance == "learned"

    def call(x: Array, t: Array, sigma_ve: Array) -> Array:
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        if scale is None:
            return denoise_fn(x, t, labels).astype(jnp.float32)
        # labels may be a pytree (text conditioning): null_label holds one fill value per leaf.
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
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    null_label: Any = None,
    variance: str = "fixed_small",
) -> Predict:
    """The model wrapper every sampler step calls, for use outside `sample` (a distillation
    teacher): predict(x [B, ...], t, alpha, sigma) -> (x_0, eps, variance channels | None),
    levels scalars or per-example [B]; `guidance_scale` None (off), a scalar or [B]. The
    options mean what they mean in `sample`."""
    opts = _Options(
        prediction=prediction,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
        null_label=null_label,
        variance=variance,
    )
    return _make_predict(denoise_fn, labels, guidance_scale, opts)


# --------------------------------------------------------------------------------------------
# Validation (host side, before any tracing).


def _check_num_steps(num_steps: int, high: int | None) -> None:
    ok = isinstance(num_steps, int | np.integer) and num_steps >= 1
    if not ok or (high is not None and num_steps > high):
        bound = f"in [1, {high}] (the schedule's num_timesteps)" if high else ">= 1"
        raise ValueError(f"num_steps={num_steps!r} must be an integer {bound}")


def validate(
    method: str,
    num_steps: int,
    process: ProcessLike,
    *,
    spacing: str | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    churn: float = 0.0,
) -> None:
    """Raises ValueError naming the argument of an unusable sampler configuration."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    process = processes.as_process(process)
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(
            f"spacing={spacing!r} is not one of {', '.join(SPACINGS)} "
            "(or None: the method's default)"
        )
    if spacing is not None and spacing not in process.spacings:
        raise ValueError(
            f"spacing={spacing!r}: a {process.name} process's levels are "
            f"{' or '.join(process.spacings)}"
        )
    _check_num_steps(num_steps, process.max_steps(spacing or process.default_spacing(method)))
    if churn > 0 and process.ode_x0_coef != 0.0:
        raise ValueError(f"churn={churn}: churn needs a VE ODE, not a {process.name} process")
    if churn > 0 and method not in KARRAS_METHODS:
        raise ValueError(f"churn={churn} applies to {', '.join(KARRAS_METHODS)}, not {method!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} must lie in [0, 1]")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r} is not one of {', '.join(VARIANCES)}")


def validate_edit(
    jump_length: int, resample: int, strength: float, *, inpaint: bool, init: bool
) -> None:
    """Raises ValueError naming the argument of unusable editing options."""
    for name, value in (("jump_length", jump_length), ("resample", resample)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if resample > 1 and not inpaint:
        raise ValueError(f"resample={resample} (RePaint) needs a mask to inpaint")
    if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength!r} must lie in (0, 1]")
    if strength < 1.0 and not init:
        raise ValueError(f"strength={strength} < 1 needs an input image (init)")


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
    method: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    spacing: str | None = None,
    guidance_scale: float | Array | None = None,
    labels: Array | None = None,
    null_label: Any = None,
    guidance_interval: tuple[float, float] | None = None,
    prediction: str = "eps",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    variance: str = "fixed_small",
    rho: float = 7.0,
    churn: float = 0.0,
    churn_tmin: float = 0.0,
    churn_tmax: float = float("inf"),
    churn_noise: float = 1.0,
    known: Array | None = None,
    mask: Array | None = None,
    jump_length: int = 10,
    resample: int = 1,
    init: Array | None = None,
    strength: float = 1.0,
) -> Array:
    """Draws x_0 by running `method` from x_T ~ N(0, I); pure, one `lax.scan`, jit-compatible.

    Args:
      denoise_fn: `denoise_fn(x_t, t, labels) -> output`, x_t: [B, ...] float32, t: [B] float32,
        labels: [B] int32 or None; output: x_t's shape in the `prediction` parameterization
        (last axis doubled for variance="learned": [mean channels, variance interpolation v]).
      process: the noise process the model was trained on (`ddpm.processes`; a bare discrete
        `Schedule` is the DDPM process of its tables); t is its level (model time), and
        denoise_fn usually its `Process.denoiser` with prediction `Process.prediction`.
      shape: [B, ...] of the samples (static).
      rng: PRNG key: split into the x_T noise and per-step keys (`fold_in(key, step)`).
      method: one of `METHODS` (static). ddpm: ancestral, respaced to `num_steps` as in improved
        DDPM; ddim: eta in [0, 1]; dpm++2m / dpm++2s: DPM-Solver++ second order; euler / heun:
        probability-flow ODE in the VE variable (EDM), with optional churn (a flow: in x
        and t with the velocity, no churn).
      num_steps: number of steps (static); in [1, T] unless the spacing is karras. Model calls:
        num_steps, except dpm++2s and heun: 2 num_steps - 1 (doubled batch with guidance).
      eta: DDIM noise (0 = deterministic; 1 with all T steps = DDPM ancestral).
      spacing: the grid's noise levels (static), for every method: leading | trailing |
        linspace (integer timesteps, see `timesteps`; euler / heun step between their VE
        levels sqrt((1 - ab_t) / ab_t), as diffusers' EulerDiscreteScheduler) or karras
        (Karras sigmas, rho). None: the method's default, `DEFAULT_SPACING` (karras for
        euler / heun, trailing for the others). A continuous process: one of its `spacings`
        (EDM: karras, the default, or trailing = uniform in sigma; flow: trailing = uniform in
        t, shifted); None: its default, for every method.
      guidance_scale: classifier-free guidance scale s; None or the Python number 1.0 = off
        (one model call per evaluation); anything else (a jnp scalar may be traced) = on.
      labels: [B] int32 class ids, or None for an unconditional model; or any conditioning
        pytree with leading axis B (text: {"tokens": [B, L]}, see `ddpm.conditioning`).
      null_label: the "no class" id fed for the unconditional half (needed with guidance); for
        a pytree `labels`, a pytree of fill values, one per leaf.
      guidance_interval: (s_lo, s_hi): guide only where the VE level sigma/alpha lies in it.
      prediction: the model's parameterization, eps | x0 | v.
      clip_x0: clip predicted x_0 to [-1, 1] (pixel space only).
      dynamic_threshold: quantile p of Imagen's dynamic thresholding (replaces clip_x0).
      variance: ddpm's variance: fixed_small (posterior beta~), fixed_large (beta) or learned.
      rho: the Karras sigmas' exponent.
      churn, churn_tmin, churn_tmax, churn_noise: euler/heun options (EDM S_churn,
        S_tmin, S_tmax, S_noise); churn > 0 is an error for other methods.
      known, mask: inpainting (both or neither): known [B, ...] (or broadcastable to `shape`)
        float32 image, mask of the same or a broadcastable shape, 1 = keep, 0 = generate.
        Before the first step and after every step the kept region of the state is replaced by
        q_sample(known) at the level the state has reached (the replacement method); at the
        end it equals `known` exactly.
      jump_length, resample: RePaint resampling (static, with a mask): each block of
        `jump_length` steps runs `resample` times, noised back to the block's start level in
        between (`repaint_order`); resample = 1 is plain replacement.
      init, strength: SDEdit (static strength in (0, 1]): run only the last
        `kept_steps(num_steps, strength)` steps of the grid, starting from
        alpha init + sigma x_T at the first kept level (init: `shape`, or broadcastable).
        strength = 1 is unconditional sampling (x_T as drawn, init unused); a strength that
        keeps no step returns init.

    Returns:
      x_0: `shape` float32.
    """
    process = processes.as_process(process)
    validate(
        method,
        num_steps,
        process,
        spacing=spacing,
        eta=eta,
        prediction=prediction,
        variance=variance,
        churn=churn,
    )
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold={dynamic_threshold!r} must lie in (0, 1]")
    validate_edit(jump_length, resample, strength, inpaint=mask is not None, init=init is not None)
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both known (the image) and mask (1 = keep)")
    guided = _guidance_on(guidance_scale)
    if guided and (labels is None or null_label is None):
        raise ValueError(
            "guidance_scale != 1 needs labels and null_label (the label fed to the "
            "unconditional half)"
        )
    opts = _Options(
        eta=float(eta),
        variance=variance,
        prediction=prediction,
        clip_x0=bool(clip_x0),
        dynamic_threshold=dynamic_threshold,
        guidance_interval=guidance_interval,
        null_label=null_label,
        rho=float(rho),
        churn=float(churn),
        churn_tmin=float(churn_tmin),
        churn_tmax=float(churn_tmax),
        churn_noise=float(churn_noise),
        ode_x0_coef=process.ode_x0_coef,
    )
    if labels is not None and not isinstance(labels, dict):  # a dict: text conditioning
        labels = jnp.asarray(labels, jnp.int32)
    scale = jnp.asarray(guidance_scale, jnp.float32) if guided else None
    predict = _make_predict(denoise_fn, labels, scale, opts)

    make_grid, step, init_aux = _METHOD_TABLE[method]
    grid = make_grid(process, num_steps, spacing, opts)
    noise_key, step_key = jax.random.split(rng)
    x_T = jax.random.normal(noise_key, shape, jnp.float32)
    if strength < 1.0:
        keep = kept_steps(num_steps, strength)
        init = jnp.broadcast_to(jnp.asarray(init, jnp.float32), shape)
        if keep == 0:
            return init
        grid = _truncate(grid, keep)
        x_T = grid["alpha"][0] * init + grid["sigma"][0] * x_T
    inpaint = mask is not None
    if inpaint:
        known, mask = jnp.asarray(known, jnp.float32), jnp.asarray(mask, jnp.float32)
        first_key = jax.random.fold_in(noise_key, 1)
        x_T = _replace_known(x_T, known, mask, grid["alpha"][0], grid["sigma"][0], first_key)
    repaint = resample > 1
    if repaint:
        grid = _repaint_grid(grid, jump_length, resample)

    def body(carry: tuple[Array, Any], row: Grid) -> tuple[tuple[Array, Any], None]:
        x, aux = carry
        key = jax.random.fold_in(step_key, row["index"])
        if repaint:
            x, aux = jax.lax.cond(
                row["jump"],
                lambda: (_renoise(x, row, key), aux),
                lambda: step(predict, x, aux, row, key, opts),
            )
            alpha = jnp.where(row["jump"], row["alpha"], row["alpha_next"])
            sigma = jnp.where(row["jump"], row["sigma"], row["sigma_next"])
        else:
            x, aux = step(predict, x, aux, row, key, opts)
            alpha, sigma = row["alpha_next"], row["sigma_next"]
        if inpaint:
            x = _replace_known(x, known, mask, alpha, sigma, jax.random.fold_in(key, 1))
        return (x, aux), None

    (x0, _), _ = jax.lax.scan(body, (x_T, init_aux(x_T)), grid)
    return x0


def make_sampler(
    model_fn: Callable[[Any, Array, Array, Array | None], Array],
    process: ProcessLike,
    shape: tuple[int, ...],
    *,
    guidance: bool = False,
    **options: Any,
) -> Callable[..., Array]:
    """A jitted `fn(params, rng, labels=None, guidance_scale=None, *, known=None, mask=None,
    init=None) -> x_0 [shape] float32`.

    `model_fn(params, x_t, t, labels) -> output`. params, rng, labels, guidance_scale and the
    editing arrays (known, mask: inpainting; init: SDEdit, see `sample`) are traced, so new
    values reuse the compiled sampler; the static configuration is `shape`, `guidance` (on:
    guidance_scale is required and traced) and `options` (keywords of `sample` other than the
    traced ones, e.g. strength, jump_length, resample), validated here.
    """
    for name in ("guidance_scale", "labels", "known", "mask", "init"):
        if name in options:
            raise ValueError(f"make_sampler: pass {name} to the returned function, not here")
    validate(
        options.get("method", "ddim"),
        options.get("num_steps", 50),
        process,
        spacing=options.get("spacing"),
        eta=options.get("eta", 0.0),
        prediction=options.get("prediction", "eps"),
        variance=options.get("variance", "fixed_small"),
        churn=options.get("churn", 0.0),
    )
    strength = options.get("strength", 1.0)
    validate_edit(
        options.get("jump_length", 10),
        options.get("resample", 1),
        strength,
        inpaint=options.get("resample", 1) > 1,
        init=True,
    )

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
        return sample(
            lambda x, t, y: model_fn(params, x, t, y),
            process,
            shape,
            rng,
            guidance_scale=guidance_scale,
            labels=labels,
            known=known,
            mask=mask,
            init=init,
            **options,
        )

    return jax.jit(run)
