"""Flow matching on the straight path (rectified flow: Lipman et al., 2023; Liu et al., 2023):
x_t = (1 - t) x_0 + t eps, level tau = t in [0, 1], x_1 = eps.

The network F is the velocity v = eps - x_0, called as F(x, 1000 t, cond); x_0 = x - t F; the
loss is ||F - (eps - x_0)||^2. Euler / Heun run in x itself with dx/dt = v.
"""

import dataclasses

import jax
import jax.numpy as jnp

from ddpm.diffusion import expand
from ddpm.processes.base import Array, Interpolant, Level, check_number, uniform_levels
from ddpm.processes.edm import TIME_SCALE

T_SAMPLINGS = ("logit_normal", "uniform")
# The likelihood integrates t over [T_EPS, 1 - T_EPS] (VE levels 1e-3 ... 1e3): the flow's
# own ends are s = 0 and s = inf.
T_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class Flow(Interpolant):
    """Training t: logit-normal (sigmoid of N(logit_mean, logit_std^2), SD3's default) or
    uniform, then shifted, t -> shift t / (1 + (shift - 1) t) (shift > 1 spends more time at
    high noise, as SD3 does for large images); the sampler's levels are uniform in t, shifted
    the same way."""

    t_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    name = "flow"
    spacings = ("trailing",)  # uniform in t (from t = 1), shifted
    ode_x0_coef = -1.0  # dx/dt = eps - x_0 = v (Euler / Heun run in x itself)

    def __post_init__(self):
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(
                f"t_sampling={self.t_sampling!r} is not one of {', '.join(T_SAMPLINGS)}"
            )
        check_number("logit_mean", self.logit_mean)
        check_number("logit_std", self.logit_std, 0.0)
        check_number("shift", self.shift, 0.0)

    def coefficients(self, tau: Array) -> tuple[Array, Array]:
        tau = jnp.asarray(tau, jnp.float32)
        return 1.0 - tau, tau

    def level_of_ve(self, s: Array) -> Array:
        """t = s / (1 + s), written to give 1 at s = inf and 0 at s = 0."""
        return 1.0 / (1.0 + 1.0 / jnp.asarray(s, jnp.float32))

    def ve_range(self) -> tuple[float, float]:
        return T_EPS / (1.0 - T_EPS), (1.0 - T_EPS) / T_EPS

    def _shifted(self, t: Array) -> Array:
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def draw_levels(self, rng: Array, batch: int) -> Array:
        """Training times in (0, 1).  -> [batch] float32."""
        if self.t_sampling == "uniform":
            t = jax.random.uniform(rng, (batch,), jnp.float32)
        else:
            z = jax.random.normal(rng, (batch,), jnp.float32)
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * z)
        return self._shifted(t)

    def levels(self, num_steps: int, spacing: str, rho: float) -> Array:
        """t_i = shift(1 - i / n), i = 0..n-1."""
        del spacing, rho
        return self._shifted(jnp.asarray(uniform_levels(1.0, 0.0, num_steps), jnp.float32))

    def ode_variable(self, level: Level) -> tuple[Array, Array]:
        """x in its own scale, y = x_vp sqrt(a^2 + b^2), at time t."""
        return level.t, 1.0 / self.native_scale(level.t)

    def net_input(self, x: Array, tau: Array) -> tuple[Array, Array]:
        return x, TIME_SCALE * jnp.asarray(tau, jnp.float32)

    def denoise(self, out: Array, x: Array, tau: Array) -> Array:
        """x_0 = x - t v."""
        return x - expand(tau, x.ndim) * out

    def target(self, x0: Array, eps: Array, x: Array, tau: Array) -> Array:
        """The velocity eps - x_0."""
        del x, tau
        return eps - x0
