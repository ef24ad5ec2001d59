"""Power-function EMA and its post-hoc reconstruction (Karras et al., "Analyzing and Improving
the Training Dynamics of Diffusion Models", CVPR 2024, section 3 and appendix C): the math.

A power-function EMA with exponent gamma averages the parameters theta_1 .. theta_T of a run
of T steps with weights proportional to t^gamma. It is tracked during training by
    ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),
which gives theta_i the weight (1 - (1 - 1/i)^(gamma + 1)) (i / T)^(gamma + 1), about
(gamma + 1) i^gamma / T^(gamma + 1): the profile p(t) = (gamma + 1) t^gamma / T^(gamma + 1) on
[0, T]. Its width is named by sigma_rel, the profile's standard deviation relative to T,
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
Snapshots of two such EMAs taken every K steps span (in least squares) the profile of any
other sigma_rel at any step: the post-hoc EMA is the combination sum_i x_i snapshot_i whose
profile is closest in L2 to the requested one, x solving the normal equations A x = b with the
profiles' inner products, A_ij = <p_i, p_j>, b_i = <p_i, p_target>, normalised to sum 1.

Host-side float64 NumPy, except `beta` (traced in the train step).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)  # gamma = 0: the uniform average of the whole run


def sigma_rel_of(gamma: float) -> float:
    """sigma_rel of exponent gamma > -1 (0.05 <-> gamma ~ 16.97, 0.10 <-> gamma ~ 6.94)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma of `sigma_rel` in (0, sqrt(1/12) ~ 0.289): the largest real root of
    (gamma + 2)^2 (gamma + 3) = (gamma + 1) / sigma_rel^2, a cubic."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel!r} must lie in (0, 0.2887) (sqrt(1/12): gamma=0)")
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def beta(gamma: float, step: jax.Array) -> jax.Array:
    """beta_t = (1 - 1/t)^(gamma + 1) of the update with the parameters after train step
    t = step + 1 (step: the 0-based count of earlier updates, traced): 0 at the first one,
    where the EMA becomes the parameters.  -> [] float32."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    return jnp.power(1.0 - 1.0 / t, gamma + 1.0)


def profile_inner_products(
    steps_a: np.ndarray, gammas_a: np.ndarray, steps_b: np.ndarray, gammas_b: np.ndarray
) -> np.ndarray:
    """<p_a, p_b> = integral of the two power profiles' product, for every pair (broadcast):
    with m = min(T_a, T_b),
        (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) T_a^(g_a + 1) T_b^(g_b + 1)),
    computed in logs (T and gamma large).  -> float64 of the broadcast shape."""
    ta, ga, tb, gb = (np.asarray(v, np.float64) for v in (steps_a, gammas_a, steps_b, gammas_b))
    m = np.minimum(ta, tb)
    log = (
        np.log(ga + 1.0)
        + np.log(gb + 1.0)
        - np.log(ga + gb + 1.0)
        + (ga + gb + 1.0) * np.log(m)
        - (ga + 1.0) * np.log(ta)
        - (gb + 1.0) * np.log(tb)
    )
    return np.exp(log)


def reconstruction_weights(
    snapshot_steps: np.ndarray,
    snapshot_gammas: np.ndarray,
    target_step: float,
    target_gammas: np.ndarray,
) -> np.ndarray:
    """Least-squares weights of the snapshots (EMA with exponent snapshot_gammas[i] taken at
    snapshot_steps[i]) for the profiles of `target_gammas` at `target_step`, each column
    normalised to sum 1.  -> [num_snapshots, num_targets] float64."""
    steps = np.asarray(snapshot_steps, np.float64)[:, None]
    gammas = np.asarray(snapshot_gammas, np.float64)[:, None]
    targets = np.atleast_1d(np.asarray(target_gammas, np.float64))[None, :]
    a = profile_inner_products(steps, gammas, steps.T, gammas.T)
    b = profile_inner_products(steps, gammas, np.full_like(targets, target_step), targets)
    x = np.linalg.solve(a, b)
    return x / np.sum(x, axis=0, keepdims=True)


def profile_fit_error(
    snapshot_steps: np.ndarray,
    snapshot_gammas: np.ndarray,
    weights: np.ndarray,
    target_step: float,
    target_gamma: float,
) -> float:
    """||sum_i w_i p_i - p_target|| / ||p_target|| in L2 over training time: how far the
    snapshots' combination (`reconstruction_weights`) is from the requested profile."""
    steps = np.asarray(snapshot_steps, np.float64)
    gammas = np.asarray(snapshot_gammas, np.float64)
    w = np.asarray(weights, np.float64)
    a = profile_inner_products(steps[:, None], gammas[:, None], steps[None], gammas[None])
    b = profile_inner_products(steps, gammas, target_step, target_gamma)
    c = profile_inner_products(target_step, target_gamma, target_step, target_gamma)
    return float(np.sqrt(max(w @ a @ w - 2.0 * w @ b + c, 0.0) / c))
