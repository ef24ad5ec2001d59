"""score_sde's VP-SDE (Song et al., 2021): the continuous-time DDPM, level tau = t in
[t_min, 1], dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW with beta(t) = beta_min + t (beta_max -
beta_min), so x_t = alpha x_0 + sigma eps with log alpha = -t^2 (beta_max - beta_min) / 4 -
t beta_min / 2 and sigma = sqrt(1 - alpha^2).

The network predicts eps, called as F(x, 999 t, cond) (score_sde's DDPM++ time input), and
is trained on ||F - eps||^2 with t ~ U[t_min, 1]; x_0 = (x - sigma F) / alpha.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.diffusion import expand
from ddpm.processes.base import Array, Interpolant, check_number, karras_sigmas, uniform_levels

TIME_SCALE = 999.0


@dataclasses.dataclass(frozen=True)
class VPSDE(Interpolant):
    """score_sde's defaults: beta_min 0.1, beta_max 20, training t ~ U[1e-5, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-5

    name = "vpsde"
    spacings = ("trailing", "karras")  # uniform in t from 1 to t_min; or Karras VE levels

    def __post_init__(self):
        check_number("beta_min", self.beta_min, 0.0)
        check_number("beta_max", self.beta_max, self.beta_min)
        check_number("t_min", self.t_min, 0.0)
        if self.t_min >= 1.0:
            raise ValueError(f"t_min={self.t_min!r} must be a number < 1")

    def _log_alpha(self, t: Array) -> Array:
        return -0.25 * jnp.square(t) * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def coefficients(self, tau: Array) -> tuple[Array, Array]:
        log_alpha = self._log_alpha(jnp.asarray(tau, jnp.float32))
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

    def level_of_ve(self, s: Array) -> Array:
        """The root t of t^2 (beta_max - beta_min) / 4 + t beta_min / 2 = log(1 + s^2) / 2,
        written without cancellation at small s."""
        c = jnp.log1p(jnp.square(jnp.asarray(s, jnp.float32)))
        half_b0 = 0.5 * self.beta_min
        return c / (half_b0 + jnp.sqrt(half_b0**2 + 0.5 * (self.beta_max - self.beta_min) * c))

    def ve_range(self) -> tuple[float, float]:
        """s = sigma / alpha = sqrt(exp(-2 log alpha) - 1) at t_min and 1 (float64)."""
        t = np.array([self.t_min, 1.0])
        log_alpha = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = np.sqrt(np.expm1(-2.0 * log_alpha))
        return float(s[0]), float(s[1])

    def draw_levels(self, rng: Array, batch: int) -> Array:
        return jax.random.uniform(rng, (batch,), jnp.float32, self.t_min, 1.0)

    def levels(self, num_steps: int, spacing: str, rho: float) -> Array:
        """trailing: 1 - i (1 - t_min) / n; karras: Karras sigmas between the VE levels of
        t_min and 1, at their t."""
        if spacing == "karras":
            return self.level_of_ve(karras_sigmas(*self.ve_range(), num_steps, rho))
        return jnp.asarray(uniform_levels(1.0, self.t_min, num_steps), jnp.float32)

    def net_input(self, x: Array, tau: Array) -> tuple[Array, Array]:
        return x, TIME_SCALE * jnp.asarray(tau, jnp.float32)

    def denoise(self, out: Array, x: Array, tau: Array) -> Array:
        """x_0 = (x - sigma eps) / alpha."""
        a, b = self.coefficients(tau)
        return (x - expand(b, x.ndim) * out) / expand(a, x.ndim)

    def target(self, x0: Array, eps: Array, x: Array, tau: Array) -> Array:
        del x0, x, tau
        return eps
