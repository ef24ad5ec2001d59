"""DDPM's discrete process (Ho et al., 2020): the tables of a `ddpm.schedules.Schedule` at
integer timesteps t = 0..T-1, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, trained with
`ddpm.diffusion.loss` (eps / x0 / v targets, min-SNR weighting, learned variance).

Its level is the timestep, fractional between the table's entries: a VE level s is found by
interpolating log s on the table (`sigma_to_t`), like k-diffusion's `DiscreteSchedule`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import diffusion
from ddpm.processes.base import (
    ApplyFn,
    Array,
    NetFn,
    Process,
    StepLevels,
    karras_sigmas,
    respaced_beta,
    vp_of_ve,
)
from ddpm.schedules import Schedule, get_schedule

INTEGER_SPACINGS = ("leading", "trailing", "linspace")
# spacing None: the method's default (Karras sigmas for EDM's samplers).
KARRAS_METHODS = ("euler", "heun")


def timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """The discrete timesteps a sampler visits, in visiting (descending) order.  -> [n] int64.

    With T = num_timesteps and n = num_steps (0-based t, as in `Schedule`):
      leading:  (T // n) * [n-1, ..., 1, 0]            e.g. T=1000, n=50: 980, 960, ..., 0
      trailing: round(T - i T / n) - 1, i = 0..n-1      e.g. 999, 979, ..., 19 (starts at T-1)
      linspace: round(linspace(T - 1, 0, n))            e.g. 999, 979, ..., 0 (both ends)
    (the `timestep_spacing` options of diffusers). With n = T all three give T-1, ..., 0.
    The fourth sampler spacing, karras, has fractional timesteps: see `karras_sigmas`.
    """
    if spacing not in INTEGER_SPACINGS:
        raise ValueError(
            f"spacing={spacing!r}: integer timesteps are leading, trailing or linspace "
            "(karras levels: see karras_sigmas)"
        )
    if not isinstance(num_steps, int | np.integer) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps={num_steps!r} must be an integer in [1, {num_timesteps}] (the "
            "schedule's num_timesteps)"
        )
    T, n = num_timesteps, num_steps
    if spacing == "leading":
        ts = np.arange(n - 1, -1, -1) * (T // n)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(n) * (T / n)).astype(np.int64) - 1
    else:
        ts = np.round(np.linspace(T - 1, 0, n)).astype(np.int64)
    return ts.astype(np.int64)


def log_sigmas(schedule: Schedule) -> Array:
    """log s_t = log(sigma_t / alpha_t), the variance-exploding noise level of each t.  -> [T]."""
    return jnp.log(schedule.sqrt_one_minus_alpha_bars) - jnp.log(schedule.sqrt_alpha_bars)


def sigma_to_t(schedule: Schedule, sigma: Array) -> Array:
    """Fractional timestep of a VE noise level: linear interpolation of t in log s.

    sigma: any shape, > 0 -> float32 of the same shape, clamped to [0, T-1].
    """
    grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    return jnp.interp(jnp.log(sigma), log_sigmas(schedule), grid)


def t_to_sigma(schedule: Schedule, t: Array) -> Array:
    """VE noise level s(t) at a fractional timestep (inverse of `sigma_to_t`).  t: any shape."""
    grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    return jnp.exp(jnp.interp(jnp.asarray(t, jnp.float32), grid, log_sigmas(schedule)))


@dataclasses.dataclass(frozen=True, eq=False)
class Discrete(Process):
    """The discrete DDPM process of `schedule`, with the network's parameterization
    (`prediction`), its loss weighting and an optional learned variance (improved DDPM)."""

    schedule: Schedule
    prediction: str = "eps"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    learned_variance: bool = False

    name = "ddpm"
    spacings = (*INTEGER_SPACINGS, "karras")
    has_discrete_bound = True

    @classmethod
    def from_config(cls, diffusion: Any, learned_variance: bool = False) -> "Discrete":
        d = diffusion
        betas = {k: d[k] for k in ("beta_start", "beta_end") if d[k] is not None}
        schedule = get_schedule(
            d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr, **betas
        )
        return cls(
            schedule,
            prediction=d.prediction,
            loss_weighting=d.loss_weighting,
            min_snr_gamma=d.min_snr_gamma,
            learned_variance=learned_variance,
        )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {}  # its fields are config.diffusion's own (schedule, prediction, ...)

    def vp(self, level: Array) -> tuple[Array, Array]:
        return vp_of_ve(t_to_sigma(self.schedule, level))

    def level_of_ve(self, s: Array) -> Array:
        return sigma_to_t(self.schedule, s)

    def ve_range(self) -> tuple[Array, Array]:
        log_s = log_sigmas(self.schedule)  # the tables may be traced (a jit argument)
        return jnp.exp(log_s[0]), jnp.exp(log_s[-1])

    def default_spacing(self, method: str) -> str:
        return "karras" if method in KARRAS_METHODS else "trailing"

    def max_steps(self, spacing: str) -> int | None:
        return None if spacing == "karras" else self.schedule.num_timesteps

    def sampling_levels(self, num_steps: int, spacing: str, rho: float) -> StepLevels:
        """Integer timesteps (`timesteps`), or n Karras sigmas between the table's s_0 and
        s_{T-1} at fractional t. On timesteps beta is -expm1(sum of log(1 - b_s) over
        next < s <= t), so it equals `schedule.betas` for n = T."""
        schedule, n = self.schedule, num_steps
        if spacing == "karras":
            log_s = log_sigmas(schedule)
            s = karras_sigmas(jnp.exp(log_s[0]), jnp.exp(log_s[-1]), n, rho)
            alpha, sigma = vp_of_ve(s)
            return StepLevels(sigma_to_t(schedule, s), alpha, sigma, respaced_beta(alpha))
        T = schedule.num_timesteps
        ts = timesteps(T, n, spacing)
        segment = np.full(T, n)  # timesteps above ts[0] (leading) fall in the dropped segment n
        for i, (hi, lo) in enumerate(zip(ts, np.append(ts[1:], -1), strict=True)):
            segment[lo + 1 : hi + 1] = i
        log_keep = jax.ops.segment_sum(jnp.log1p(-schedule.betas), segment, num_segments=n + 1)
        return StepLevels(
            jnp.asarray(ts, jnp.float32),
            schedule.sqrt_alpha_bars[ts],
            schedule.sqrt_one_minus_alpha_bars[ts],
            -jnp.expm1(log_keep[:n]),
        )

    def loss(
        self, params: Any, apply_fn: ApplyFn, x0: Array, rng: Array
    ) -> tuple[Array, dict[str, Array]]:
        return diffusion.loss(
            params,
            apply_fn,
            self.schedule,
            x0,
            rng,
            prediction=self.prediction,
            weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            learned_variance=self.learned_variance,
        )

    def denoiser(self, net_fn: NetFn) -> NetFn:
        """The network itself: its input is x_vp = x_t, its time the (fractional) timestep."""
        return net_fn
