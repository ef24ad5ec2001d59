"""Noise schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t I).

Every table is computed in float64 NumPy and stored as float32. Indexing is 0-based: `t = 0`
is the first noising step (the paper's t = 1), `t = T - 1` the last.
"""

from collections.abc import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


@flax.struct.dataclass
class Schedule:
    """Per-timestep tables of a diffusion process; a pytree, so it can be a jit argument.

    Every field is a float32 array of shape [T]; `ab` stands for alpha_bar = prod_{s<=t} alpha_s.
    """

    betas: Array
    alphas: Array  # 1 - beta_t
    alpha_bars: Array
    alpha_bars_prev: Array  # alpha_bar_{t-1}, with alpha_bars_prev[0] = 1
    sqrt_alpha_bars: Array
    sqrt_one_minus_alpha_bars: Array
    posterior_variance: Array  # beta~_t = b_t (1 - ab_{t-1}) / (1 - ab_t)
    posterior_log_variance_clipped: Array  # log beta~_t, with t = 0 clipped to beta~_1
    posterior_mean_coef1: Array  # multiplies x_0
    posterior_mean_coef2: Array  # multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def _linear(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas; rescaled by 1000 / T so any T matches the T=1000 process (iDDPM)."""
    _check_beta_range(beta_start, beta_end)
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def _scaled_linear(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    _check_beta_range(beta_start, beta_end)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def _cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM: ab(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2."""
    if s < 0:
        raise ValueError(f"cosine schedule: s={s} must be >= 0")

    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2

    return _betas_from_alpha_bar(f, num_timesteps, max_beta)


def _sigmoid(
    num_timesteps: int,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Sigmoid schedule of Jabri et al. (2023): ab(t) follows a rescaled sigmoid of t/T."""
    if not start < end or tau <= 0:
        raise ValueError(
            f"sigmoid schedule needs start < end and tau > 0, got {start}, {end}, {tau}"
        )

    def sig(z: np.ndarray | float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def f(t: np.ndarray) -> np.ndarray:
        return (v_end - sig((t / num_timesteps * (end - start) + start) / tau)) / (v_end - v_start)

    return _betas_from_alpha_bar(f, num_timesteps, max_beta)


def _betas_from_alpha_bar(
    f: Callable[[np.ndarray], np.ndarray], num_timesteps: int, max_beta: float
) -> np.ndarray:
    """b_t = min(1 - f(t+1) / f(t), max_beta) for a continuous alpha_bar shape f on [0, T]."""
    t = np.arange(num_timesteps + 1, dtype=np.float64)
    ab = f(t) / f(0.0)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
        )


_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024): shift and scale sqrt(ab) so ab_0 is unchanged and ab_{T-1} = 0.

    The last step then has SNR 0 (pure noise); eps-prediction is undefined there, so such a
    schedule needs v-prediction.
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    return 1.0 - ab / np.concatenate([[1.0], ab[:-1]])


def get_schedule(
    name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **kwargs: float
) -> Schedule:
    """Builds the named schedule with `num_timesteps` steps.

    Args:
      name: one of `SCHEDULE_NAMES` (linear, scaled_linear, cosine, sigmoid).
      num_timesteps: T >= 1.
      zero_terminal_snr: rescale so that alpha_bar at the last step is exactly 0.
      **kwargs: schedule parameters (linear/scaled_linear: beta_start, beta_end; cosine: s,
        max_beta; sigmoid: start, end, tau, max_beta).
    """
    if name not in _SCHEDULES:
        raise ValueError(f"schedule name={name!r} is not one of {', '.join(SCHEDULE_NAMES)}")
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps!r} must be an integer >= 1")
    try:
        betas = _SCHEDULES[name](int(num_timesteps), **kwargs)
    except TypeError as e:  # an unknown keyword argument
        raise ValueError(f"invalid arguments {sorted(kwargs)} for schedule {name!r}: {e}") from e
    if zero_terminal_snr:
        if num_timesteps < 2:
            raise ValueError("zero_terminal_snr needs num_timesteps >= 2")
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def schedule_from_betas(betas: np.ndarray) -> Schedule:
    """All tables of `Schedule` from betas [T] (float64 math, float32 storage)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"betas must lie in (0, 1], got min {betas.min()}, max {betas.max()}")
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
    # beta~_0 = 0: clip the log at t=0 to beta~_1 as in DDPM (the decoder step uses it).
    clipped = np.concatenate([posterior_variance[1:2], posterior_variance[1:]])
    if betas.size == 1:
        clipped = betas.copy()
    tables = dict(
        betas=betas,
        alphas=alphas,
        alpha_bars=alpha_bars,
        alpha_bars_prev=alpha_bars_prev,
        sqrt_alpha_bars=np.sqrt(alpha_bars),
        sqrt_one_minus_alpha_bars=np.sqrt(1.0 - alpha_bars),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(alpha_bars_prev) / (1.0 - alpha_bars),
        posterior_mean_coef2=(1.0 - alpha_bars_prev) * np.sqrt(alphas) / (1.0 - alpha_bars),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})
