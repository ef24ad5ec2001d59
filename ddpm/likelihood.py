"""Log-likelihood from the probability-flow ODE, for every noise process (Song et al., 2021;
score_sde's `likelihood.py`), solved with diffrax's adaptive Dopri5.

Every process (`ddpm.processes`) maps to the same ODE once x is carried in the VP scale,
x = alpha x_0 + sigma eps, and time is lambda = log s = log(sigma / alpha) (the log VE level):
with D(x, lambda) the denoiser's E[x_0 | x],

    dx/dlambda = alpha^2 x - alpha D(x),        alpha^2 = 1 / (1 + s^2),
    div = n alpha^2 - alpha tr(dD/dx)           (n: dimensions per example),

and log p_start(x(lambda_0)) = log p_end(x(lambda_1)) + int div dlambda. The integral runs
between the process's VE levels (`Process.ve_range`); the data enter at the lowest level in
the VE variable y = x / alpha (so log p(y) = log p(x) + n log alpha_0), the end is scored by the
process's prior (`Process.prior_logp`, N(0, I)). tr(dD/dx) is Hutchinson's estimate z^T J z
with one Rademacher probe z per example held for the whole solve (unbiased), or the exact trace
(n vector-Jacobian products; for small inputs). Both use reverse-mode products, so networks
with a custom gradient (the CPU GroupNorm) work.

For 8-bit images the data are dequantized uniformly, y = 2 (k + u) / 256 - 1 with u ~ U[0, 1),
and bits/dim = -log p(y) / (n ln 2) + 7 (the 256 bins of width 2 / 256 in [-1, 1]), as
score_sde reports it: an upper bound on the discrete data's bits/dim up to the ODE's error.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddpm.diffusion import expand, predict_x0_eps
from ddpm.processes import Process, vp_of_ve

Array = jax.Array
# x0_fn(x_vp [B, ...], s [B] VE level) -> E[x_0 | x] [B, ...] float32.
X0Fn = Callable[[Array, Array], Array]
DIVERGENCES = ("hutchinson", "exact")
# Function evaluations of diffrax's Dopri5: 6 per step (first-same-as-last) and 1 more (counted
# with `on_evaluation`: 55 calls for 9 steps).
_DOPRI5_EVALS_PER_STEP, _INITIAL_EVALS = 6, 1


def _trace(x0_fn: X0Fn, x: Array, s: Array, probe: Array | None) -> tuple[Array, Array]:
    """(D(x), tr(dD/dx) [B]): Hutchinson's z^T J z with `probe` z [B, ...], or the exact trace
    (probe None) from one vector-Jacobian product per dimension."""
    d, pullback = jax.vjp(lambda x_: x0_fn(x_, s), x)
    axes = tuple(range(1, x.ndim))
    if probe is not None:
        return d, jnp.sum(pullback(probe)[0] * probe, axis=axes)
    n = math.prod(x.shape[1:])
    basis = jnp.eye(n, dtype=x.dtype).reshape((n, 1, *x.shape[1:]))
    rows = jax.vmap(lambda e: pullback(jnp.broadcast_to(e, x.shape))[0])(basis)  # [n, B, ...]
    diagonal = jnp.sum(rows * basis, axis=tuple(range(2, rows.ndim)))  # [n, B]
    return d, jnp.sum(diagonal, axis=0)


def log_likelihood(
    x0_fn: X0Fn,
    process: Process,
    y: Array,
    rng: Array,
    *,
    divergence: str = "hutchinson",
    tolerance: float = 1e-5,
    max_steps: int = 4096,
    on_evaluation: Callable[[], Any] | None = None,
) -> dict[str, Array]:
    """log p(y) in nats of data y [B, ...] at the process's lowest VE level, by the
    probability-flow ODE (see the module docstring); jit-compatible.

    rng: the Hutchinson probes (unused for the exact divergence). tolerance: the solver's
    rtol = atol (score_sde: 1e-5). on_evaluation: called on the host at every evaluation of
    the ODE (a progress bar). Returns {"logp": [B], "prior": [B] the prior's term,
    "nfe": [] function evaluations of the solve (each one network call plus its
    vector-Jacobian product per probe), "z": [B, ...] the point y maps to at the highest level
    (VP scale; the prior scores it)}.
    """
    import diffrax  # here: every run's start-up imports this module's names, few use the solver

    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")
    s_min, s_max = process.ve_range()
    lam0, lam1 = jnp.log(jnp.float32(s_min)), jnp.log(jnp.float32(s_max))
    y = y.astype(jnp.float32)
    n = math.prod(y.shape[1:])
    probe = None
    if divergence == "hutchinson":
        probe = jax.random.rademacher(rng, y.shape, jnp.float32)

    def vector_field(lam: Array, state: tuple[Array, Array], args: None):
        del args
        if on_evaluation is not None:
            jax.debug.callback(on_evaluation)
        x, _ = state
        alpha2 = jax.nn.sigmoid(-2.0 * lam)  # 1 / (1 + s^2)
        alpha = jnp.sqrt(alpha2)
        s = jnp.broadcast_to(jnp.exp(lam), (x.shape[0],))
        d, trace = _trace(x0_fn, x, s, probe)
        return alpha2 * x - alpha * d, n * alpha2 - alpha * trace

    alpha0, _ = vp_of_ve(jnp.float32(s_min))
    state0 = (alpha0 * y, jnp.zeros(y.shape[0], jnp.float32))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Dopri5(),
        t0=lam0,
        t1=lam1,
        dt0=None,
        y0=state0,
        stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=max_steps,
    )
    x_end, integral = (leaf[-1] for leaf in solution.ys)
    prior = process.prior_logp(x_end)
    steps = solution.stats["num_steps"]
    return {
        "logp": prior + integral + n * jnp.log(alpha0),
        "prior": prior,
        "nfe": _DOPRI5_EVALS_PER_STEP * steps + _INITIAL_EVALS,
        "z": x_end,
    }


def dequantize(x: Array, rng: Array) -> Array:
    """8-bit images x [B, ...] on the grid k / 127.5 - 1 -> y = 2 (k + u) / 256 - 1,
    u ~ U[0, 1) per dimension (score_sde's uniform dequantization)."""
    k = jnp.round((x.astype(jnp.float32) + 1.0) * 127.5)
    return 2.0 * (k + jax.random.uniform(rng, x.shape, jnp.float32)) / 256.0 - 1.0


def bits_per_dim(logp: Array, shape: tuple[int, ...]) -> Array:
    """bits/dim of 8-bit data from the dequantized log-density logp [B] of examples of
    `shape` (without the batch axis): -logp / (n ln 2) + 7."""
    return -logp / (math.prod(shape) * jnp.log(2.0)) + 7.0


def x0_predictor(denoise_fn: Callable[[Array, Array], Array], process: Process) -> X0Fn:
    """x0_fn(x_vp, s) of `denoise_fn(x_vp, level) -> output` in the process's `prediction`,
    called at the level of VE level s (variance channels, if any, dropped)."""

    def fn(x: Array, s: Array) -> Array:
        out = denoise_fn(x, process.level_of_ve(s)).astype(jnp.float32)
        if process.learned_variance:
            out = jnp.split(out, 2, axis=-1)[0]
        alpha, sigma = (expand(v, x.ndim) for v in vp_of_ve(s))
        return predict_x0_eps(out, x, alpha, sigma, process.prediction)[0]

    return fn
