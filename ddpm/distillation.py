"""Progressive and guided distillation (Salimans & Ho, 2022; Meng et al., 2023): the math.

Pure and config-free, like `ddpm.diffusion`: the objective (`ddpm.objectives.distill`) and the
tests on analytic Gaussian data compose these functions with their own networks.

Progressive distillation trains a student so that one deterministic DDIM step of the student
from level t to level t'' equals two DDIM steps of the teacher, t -> t' -> t''. The levels
are those of the samplers' "trailing" grid, which nests: the 2n-step grid's even rows are the
n-step grid, so every round's student steps are pairs of its teacher's and the final student
samples with `ddpm.samplers` (method="ddim", spacing="trailing", num_steps=n).

A level is (t, alpha, sigma) with x_t = alpha x_0 + sigma eps; the end of every grid is x_0
itself (alpha = 1, sigma = 0, t unused).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.diffusion import expand
from ddpm.processes import Process, as_process
from ddpm.schedules import Schedule

Array = jax.Array
# The teacher: (x_t [B, ...], t, alpha, sigma [B]) -> (x_0, eps) predicted at that level, in any
# parameterization (`ddpm.diffusion.predict_x0_eps`), with its guidance and clipping.
TeacherFn = Callable[[Array, Array, Array, Array], tuple[Array, Array]]


class Levels(NamedTuple):
    """Per-example noise levels: t (model time), alpha, sigma, each [B] float32."""

    t: Array
    alpha: Array
    sigma: Array


class Grids(NamedTuple):
    """The teacher grids of every round, padded to one table: round r's teacher takes
    teacher_steps / 2^r trailing steps, rows [0, that) then the x_0 row (alpha 1, sigma 0).
    t, alpha, sigma: [rounds, teacher_steps + 1] float32; teacher_steps: of round 0."""

    t: Array
    alpha: Array
    sigma: Array
    teacher_steps: int


def round_grids(process: Process | Schedule, teacher_steps: int, rounds: int) -> Grids:
    """`Grids` of `rounds` halvings starting from a `teacher_steps`-step DDIM teacher, on the
    process's trailing levels (`Process.sampling_levels`).

    teacher_steps must be divisible by 2^rounds (round r's student takes teacher_steps /
    2^(r + 1) steps) and at most the process's `max_steps` (a discrete num_timesteps).
    """
    if rounds < 1 or teacher_steps % 2**rounds:
        raise ValueError(
            f"teacher_steps={teacher_steps} must be divisible by 2^rounds (rounds={rounds} >= 1)"
        )
    process = as_process(process)
    width = teacher_steps + 1
    t = np.zeros((rounds, width), np.float32)
    alpha = np.ones((rounds, width), np.float32)
    sigma = np.zeros((rounds, width), np.float32)
    for r in range(rounds):
        n = teacher_steps >> r
        levels = process.sampling_levels(n, "trailing", 7.0)
        t[r, :n], alpha[r, :n], sigma[r, :n] = levels.t, levels.alpha, levels.sigma
    return Grids(jnp.asarray(t), jnp.asarray(alpha), jnp.asarray(sigma), teacher_steps)


def _rows(grids: Grids, round_index: Array, rows: Array) -> Levels:
    return Levels(*(table[round_index][rows] for table in (grids.t, grids.alpha, grids.sigma)))


def draw_student_step(
    grids: Grids, round_index: Array, rng: Array, batch: int
) -> tuple[Levels, Levels, Levels]:
    """A student step per example, uniform over round `round_index`'s student grid (traced
    round): its (start, teacher midpoint, end) levels, rows 2i, 2i + 1, 2i + 2 of the round's
    teacher grid."""
    student_steps = jnp.right_shift(grids.teacher_steps, round_index + 1)
    i = jax.random.randint(rng, (batch,), 0, student_steps)
    return tuple(_rows(grids, round_index, 2 * i + k) for k in range(3))


def draw_level(grids: Grids, rng: Array, batch: int) -> Levels:
    """A level per example, uniform over the first teacher's grid (guided distillation's
    stage 1: the student learns the guided prediction where the rounds will ask for it)."""
    i = jax.random.randint(rng, (batch,), 0, grids.teacher_steps)
    return _rows(grids, jnp.int32(0), i)


def ddim_step(x0: Array, eps: Array, to: Levels) -> Array:
    """Deterministic DDIM: alpha' x_0 + sigma' eps at level `to`."""
    return expand(to.alpha, x0.ndim) * x0 + expand(to.sigma, x0.ndim) * eps


def two_step_target(teacher: TeacherFn, x_t: Array, start: Levels, mid: Levels, end: Levels):
    """Salimans & Ho's x~: the x_0 prediction with which one DDIM step from `start` lands
    where two teacher DDIM steps (start -> mid -> end) land, x_end:

        x~ = (x_end - (sigma_end / sigma) x_t) / (alpha_end - (sigma_end / sigma) alpha)

    (x~ = x_end when `end` is x_0). x_t: [B, ...] at `start`. -> [B, ...] float32.
    """
    x_mid = ddim_step(*teacher(x_t, start.t, start.alpha, start.sigma), mid)
    x_end = ddim_step(*teacher(x_mid, mid.t, mid.alpha, mid.sigma), end)
    ratio = expand(end.sigma / start.sigma, x_t.ndim)
    denominator = expand(end.alpha, x_t.ndim) - ratio * expand(start.alpha, x_t.ndim)
    return (x_end - ratio * x_t) / denominator


def truncated_snr_weight(level: Levels) -> Array:
    """max(alpha^2 / sigma^2, 1): the x_0-space loss weight of progressive distillation
    ("truncated SNR"), finite at sigma = 1 and at alpha -> 0.  -> [B]."""
    return jnp.maximum(jnp.square(level.alpha / level.sigma), 1.0)


def x0_loss(student_x0: Array, target: Array, level: Levels) -> Array:
    """Mean over the batch of truncated_snr_weight * mean squared error in x_0 space.
    student_x0, target: [B, ...] float32. -> [] float32."""
    err = jnp.mean(jnp.square(student_x0 - target), axis=tuple(range(1, target.ndim)))
    return jnp.mean(truncated_snr_weight(level) * err)


def stage(step: Array, guided_steps: int, steps_per_round: int) -> tuple[Array, Array]:
    """(round index >= 0, True while in guided stage 1) of train step `step` (traced): steps
    [0, guided_steps) are stage 1; round r takes the next steps_per_round steps each."""
    in_stage1 = step < guided_steps
    return jnp.maximum(step - guided_steps, 0) // steps_per_round, in_stage1


def student_steps(teacher_steps: int, round_index: int) -> int:
    """Sampling steps of round `round_index`'s student (host side)."""
    return teacher_steps >> (round_index + 1)
