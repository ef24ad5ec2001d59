"""EDM (Karras et al., 2022): x = x_0 + sigma eps, level tau = sigma in (0, inf).

The network F is called as F(c_in x, 1000 c_noise, cond) with c_in = 1 / sqrt(sigma^2 + sd^2)
and c_noise = ln(sigma) / 4 (sd: sigma_data), and D(x) = c_skip x + c_out F with
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2). The loss
lambda(sigma) ||D - x_0||^2 with lambda = 1 / c_out^2 is ||F - (x_0 - c_skip x) / c_out||^2.
(The time input is scaled by 1000 so that the networks' sinusoidal embedding sees the spread of
DDPM's integer timesteps.)
"""

import dataclasses

import jax
import jax.numpy as jnp

from ddpm.diffusion import expand
from ddpm.processes.base import Array, Interpolant, check_number, karras_sigmas, uniform_levels

TIME_SCALE = 1000.0


@dataclasses.dataclass(frozen=True)
class EDM(Interpolant):
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

    def __post_init__(self):
        for field in ("sigma_data", "sigma_min", "p_std"):
            check_number(field, getattr(self, field), 0.0)
        check_number("sigma_max", self.sigma_max, self.sigma_min)
        check_number("p_mean", self.p_mean)

    def coefficients(self, tau: Array) -> tuple[Array, Array]:
        tau = jnp.asarray(tau, jnp.float32)
        return jnp.ones_like(tau), tau

    def level_of_ve(self, s: Array) -> Array:
        return jnp.asarray(s, jnp.float32)

    def ve_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def draw_levels(self, rng: Array, batch: int) -> Array:
        """sigma = exp(p_mean + p_std z), z ~ N(0, 1).  -> [batch] float32."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, (batch,), jnp.float32))

    def levels(self, num_steps: int, spacing: str, rho: float) -> Array:
        """karras: sigma_max^(1/rho) to sigma_min^(1/rho) in n equal steps, to the power rho;
        trailing: sigma_max (1 - i / n)."""
        if spacing == "karras":
            return karras_sigmas(self.sigma_min, self.sigma_max, num_steps, rho)
        return jnp.asarray(uniform_levels(self.sigma_max, 0.0, num_steps), jnp.float32)

    def _scalings(self, tau: Array) -> tuple[Array, Array, Array]:
        """(c_skip, c_out, c_in) at sigma = tau."""
        sd2 = self.sigma_data**2
        total = jnp.square(tau) + sd2
        return sd2 / total, tau * self.sigma_data * jax.lax.rsqrt(total), jax.lax.rsqrt(total)

    def net_input(self, x: Array, tau: Array) -> tuple[Array, Array]:
        _, _, c_in = self._scalings(tau)
        return expand(c_in, x.ndim) * x, 0.25 * TIME_SCALE * jnp.log(tau)

    def denoise(self, out: Array, x: Array, tau: Array) -> Array:
        """D(x) = c_skip x + c_out F."""
        c_skip, c_out, _ = self._scalings(tau)
        return expand(c_skip, x.ndim) * x + expand(c_out, x.ndim) * out

    def target(self, x0: Array, eps: Array, x: Array, tau: Array) -> Array:
        """(x_0 - c_skip x) / c_out."""
        del eps
        c_skip, c_out, _ = self._scalings(tau)
        return (x0 - expand(c_skip, x.ndim) * x) / expand(c_out, x.ndim)
