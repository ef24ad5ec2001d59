"""Consistency models (`ddpm.consistency`) on Gaussian data, where the consistency function of
every process is known in closed form: the boundary condition, the teacher's ODE step against
the exact solution map, the consistency-distillation loss at its minimiser, and multistep
sampling of the exact function reproducing the data distribution."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import mnist, mnist_cd, mnist_ct
from ddpm import consistency, generate, samplers, sharding, train
from ddpm.config import validation
from ddpm.errors import UserError
from ddpm.processes import EDM, VPSDE, Discrete, Flow, Level
from ddpm.schedules import get_schedule
from tests.tiny import preempt_at, step_parts, tiny_config

PROCESSES = {
    "edm": EDM(),
    "flow": Flow(),
    "ddpm": Discrete(get_schedule("cosine", 1000)),
    "vpsde": VPSDE(),
}
MEAN, STD = 0.5, 0.3  # the data: x_0 ~ N(MEAN, STD^2) in every dimension


def exact_predict(x: jax.Array, t, alpha, sigma) -> tuple[jax.Array, jax.Array]:
    """E[x_0 | x] and E[eps | x] of the Gaussian data at per-example (alpha, sigma) [B]."""
    del t
    a, s = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (alpha, sigma))
    var = jnp.square(a) * STD**2 + jnp.square(s)
    return MEAN + a * STD**2 * (x - a * MEAN) / var, s * (x - a * MEAN) / var


def exact_consistency(s_min: float, perturbation: float = 0.0):
    """f*(x, level): the ODE trajectory through x at level s, at level s_min in the VE scale:
    (x / alpha - MEAN) / sqrt(STD^2 + s^2) is constant along it. A perturbation scales the
    deviation from MEAN by 1 + perturbation (s - s_min) / (1 + s), keeping f(x, s_min)."""

    def f(x: jax.Array, level: Level) -> jax.Array:
        a, s = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (level.alpha, level.sigma))
        ve = s / a
        scale = math.sqrt(STD**2 + s_min**2) / jnp.sqrt(jnp.square(a) * STD**2 + jnp.square(s))
        bend = 1.0 + perturbation * (ve - s_min) / (1.0 + ve)
        return MEAN + (x - a * MEAN) * scale * bend

    return f


def exact_ode_map(process, x: jax.Array, now: Level, to: Level) -> jax.Array:
    """The probability-flow ODE's solution from level `now` to `to` (per example): x' =
    alpha' (MEAN + (x / alpha - MEAN) sqrt(STD^2 + s'^2) / sqrt(STD^2 + s^2)), s = sigma /
    alpha; the (unused) process and a teacher's predict make it a teacher step."""
    del process
    a, s, a2, s2 = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (*now[1:], *to[1:]))
    ratio = jnp.sqrt(STD**2 + jnp.square(s2 / a2)) / jnp.sqrt(STD**2 + jnp.square(s / a))
    return a2 * (MEAN + (x / a - MEAN) * ratio)


def _levels(process, s: float, size: int) -> Level:
    return consistency.level_at(process, jnp.full((size,), s, jnp.float32))


def _s_min(process) -> float:
    return float(process.ve_range()[0])


@pytest.mark.parametrize("name", PROCESSES)
def test_boundary_condition_holds_whatever_the_network(name):
    """At s_min the network's weight 1 - c_skip is exactly 0: two wildly different networks
    read through the process (`ConsistencyProcess.consistency`) give bitwise the same f,
    x / alpha to float32 rounding."""
    process = PROCESSES[name]
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
    level = _levels(process, _s_min(process), 8)
    c_skip, _ = consistency.skip_coefficients(level, _s_min(process), 0.5)
    assert np.all(np.asarray(c_skip) == 1.0)
    nets = (lambda p, x, t, c: 1e6 * jnp.ones_like(x), lambda p, x, t, c: jnp.tanh(x) - 3.0)
    outputs = [
        consistency.ConsistencyProcess(process).consistency(net)(None, x, level, None)
        for net in nets
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[0], x / level.alpha[:, None, None, None], rtol=1e-6)
    # Above s_min: Song et al.'s c_skip = sd^2 / ((s - s_min)^2 + sd^2) on x / alpha, the
    # rest on the denoiser (float64 NumPy).
    s = 2.0
    c_skip = 0.25 / ((s - _s_min(process)) ** 2 + 0.25)
    f = consistency.consistency_fn(lambda x, level: jnp.full_like(x, 7.0), _s_min(process), 0.5)
    expected = c_skip * np.asarray(x, np.float64) * math.sqrt(1 + s * s) + (1 - c_skip) * 7.0
    np.testing.assert_allclose(f(x, _levels(process, s, 8)), expected, rtol=1e-5)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("heun", [True, False])
def test_teacher_step_converges_at_its_order(name, heun):
    """One Heun (Euler) step from s = 1.5 down by h, against the exact solution map
    (`exact_ode_map`): the local error shrinks ~8x (~4x) when h halves (third / second order;
    a little more at these h, not yet asymptotic), in the process's own ODE variable. Errors
    here are >= 1e-6, far above float32 rounding."""
    process = PROCESSES[name]
    x = MEAN + 1.2 * jax.random.normal(jax.random.key(1), (64, 3))
    errors = []
    for h in (0.3, 0.15, 0.075):
        now, to = _levels(process, 1.5, 64), _levels(process, 1.5 - h, 64)
        x_now = np.asarray(now.alpha)[:, None] * np.asarray(x)
        got = consistency.teacher_step(process, exact_predict, jnp.asarray(x_now), now, to, heun)
        expected = exact_ode_map(process, jnp.asarray(x_now), now, to)
        errors.append(float(np.max(np.abs(np.asarray(got) - expected))))
    assert errors[-1] > 1e-6, errors
    for coarse, fine in zip(errors, errors[1:], strict=False):
        low, high = (6.5, 13.0) if heun else (3.0, 5.5)
        assert low < coarse / fine < high, (errors, heun)


def _cd_loss(process, f, step, distance: str = "l2", n: int = 4096, levels: int = 18):
    """The consistency-distillation loss of student and target f: E d(f(x_n+1, s_n+1),
    f(x^_n, s_n)) over data, noise and uniform pairs of 18 Karras levels up to 80, x^_n =
    step(x_n+1) the teacher's step from x_n+1 = alpha (x_0 + s_n+1 z)."""
    s_min, s_max = _s_min(process), min(float(process.ve_range()[1]), 80.0)
    table = consistency.ve_levels(s_min, s_max, jnp.int32(levels), levels)
    k_data, k_noise, k_pair = jax.random.split(jax.random.key(2), 3)
    x0 = MEAN + STD * jax.random.normal(k_data, (n, 8))
    i = jax.random.randint(k_pair, (n,), 0, levels - 1)
    upper, lower = (consistency.level_at(process, table[j]) for j in (i + 1, i))
    noise = jax.random.normal(k_noise, x0.shape)
    x_upper = upper.alpha[:, None] * x0 + upper.sigma[:, None] * noise
    x_lower = step(x_upper, upper, lower)
    return float(jnp.mean(consistency.distance(f(x_upper, upper), f(x_lower, lower), distance)))


@pytest.mark.parametrize("name", ["edm", "flow", "ddpm"])
def test_distillation_loss_is_minimised_by_the_consistency_function(name):
    """With the exact ODE map as the teacher's step, the loss of f* is 0 up to float32
    rounding and bending f* by 5% either way raises it by orders of magnitude (l2 and
    pseudo-Huber). With a Heun teacher, f*'s loss is the step's error: small against the
    data's variance (0.09)."""
    process = PROCESSES[name]
    s_min = _s_min(process)
    exact_step = lambda x, now, to: exact_ode_map(process, x, now, to)  # noqa: E731
    for distance, floor in (("l2", 1e-10), ("pseudo_huber", 1e-6)):
        losses = [
            _cd_loss(process, exact_consistency(s_min, p), exact_step, distance)
            for p in (-0.05, 0.0, 0.05)
        ]
        assert losses[1] < floor < min(losses[0], losses[2]), (distance, losses)
    heun_step = lambda x, now, to: consistency.teacher_step(process, exact_predict, x, now, to)  # noqa: E731
    assert _cd_loss(process, exact_consistency(s_min), heun_step) < 2e-5  # 1.3e-6 to 6e-6


@pytest.mark.parametrize("name, num_steps", [("edm", 1), ("edm", 4), ("flow", 2), ("vpsde", 2)])
def test_multistep_sampling_of_the_exact_function_gives_the_data(name, num_steps):
    """`samplers.sample(method="consistency")` with f* as the model, at the levels of
    `ConsistencyProcess`: 4,096 x 8 samples whose mean and standard deviation are the data's
    within 4 standard errors (plus the prior's own offset, alpha(s_max) MEAN STD <= 0.002)."""
    process = PROCESSES[name]
    f = exact_consistency(_s_min(process))
    denoise = lambda x, t, labels: f(x, Level(t, *process.vp(t)))  # noqa: E731
    x = samplers.sample(
        denoise,
        consistency.ConsistencyProcess(process),
        (4096, 8),
        jax.random.key(3),
        method="consistency",
        num_steps=num_steps,
        prediction="x0",
    )
    x = np.asarray(x)
    n = x.size
    assert abs(x.mean() - MEAN) < 4 * STD / math.sqrt(n) + 0.002, x.mean()
    assert abs(x.std() - STD) < 4 * STD / math.sqrt(2 * n) + 0.002, x.std()


def test_curriculum_and_level_distribution():
    """Improved CT's N(k): 11 levels at the start, doubling at equal intervals to 1281; the
    lognormal pair probabilities sum to 1 over the N - 1 pairs and vanish past them."""
    steps = 4000
    counts = [int(consistency.ict_num_levels(k, steps)) for k in (0, 499, 500, 2000, 3999)]
    assert counts == [11, 11, 21, 161, 1281], counts
    table = consistency.ve_levels(0.002, 80.0, jnp.int32(11), 20)
    np.testing.assert_allclose(np.asarray(table)[[0, 10, 19]], [0.002, 80.0, 80.0], rtol=1e-5)
    assert np.all(np.diff(np.asarray(table[:11])) > 0)
    p = np.asarray(consistency.lognormal_pair_probabilities(table, jnp.int32(11), -1.1, 2.0))
    assert p.shape == (19,) and np.all(p[10:] == 0) and np.all(p[:10] > 0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Runs of the tiny U-Net through the trainer: distillation from a tiny teacher, training from
# its weights; resume, sampling, errors.


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    train.train_and_evaluate(tiny_config(num_steps=2), str(workdir))
    return workdir


def _student(teacher, **training):
    config = tiny_config(**training)
    config.objective = "consistency"
    config.consistency.update(teacher_workdir=teacher and str(teacher), num_levels=6)
    config.sample.method, config.sample.num_steps = "consistency", 2
    config.sample.num_samples = config.sample.batch_size = 4
    return config


def test_distillation_run_resumes_exactly_and_samples(teacher, tmp_path, capsys, monkeypatch):
    """CD from the tiny teacher for 4 steps: a run preempted after step 2 and resumed ends
    bit-identical to an uninterrupted one (the target network in the carry included); the
    student samples in 2 steps through --mode=sample's function."""
    full, part = tmp_path / "full", tmp_path / "part"
    train.train_and_evaluate(_student(teacher, num_steps=4), str(full))
    with monkeypatch.context() as patch:
        preempt_at(2, patch)
        train.train_and_evaluate(_student(teacher, num_steps=4), str(part))
    out = capsys.readouterr().out
    assert "Starting from config.consistency.teacher_workdir: EMA parameters of step 2" in out
    assert "SIGTERM: saved checkpoint at step 2;" in out, out
    train.train_and_evaluate(_student(teacher, num_steps=4), str(part))
    assert "Resumed from checkpoint at step 2" in capsys.readouterr().out
    a, b = (
        ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints", "4", "state"))
        for w in (full, part)
    )
    assert int(a["carry"]["num_levels"]) == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)
    path = generate.sample_from_workdir(_student(teacher, num_steps=4), str(full))
    assert os.path.isfile(path) and path.endswith("consistency_2.png")


def test_training_follows_the_curriculum():
    """CT from scratch with improved CT's settings, through the trainer's step: the level
    count the loss reports is the curriculum's, 11 levels for each of its 8 stages' 2 steps
    in a 16-step run, then 21; the loss is finite."""
    config = _student(None, num_steps=16)
    config.consistency.update(
        teacher_workdir=None,
        curriculum="ict",
        level_sampling="lognormal",
        distance="pseudo_huber",
        weighting="inverse_gap",
        target_ema=0.0,
    )
    objective, step_fn, state, mesh = step_parts(config)
    counts = []
    for i in range(3):
        images = jax.random.uniform(jax.random.key(i), (8, 16, 16, 1), minval=-1, maxval=1)
        batch = {"image": np.asarray(images), "label": np.arange(8, dtype=np.int32)}
        state, metrics = step_fn(state, sharding.global_batch(batch, mesh), objective.frozen)
        assert np.isfinite(float(metrics["loss"]))
        counts.append(float(metrics["num_levels"]))
    assert counts == [11.0, 11.0, 21.0], counts


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.sample.update(method="heun"), "method='heun' with config.objective"),
        (lambda c: c.consistency.update(init_workdir="x"), "exclude each other"),
        (lambda c: c.consistency.update(distance="l1"), "consistency.distance='l1'"),
        (lambda c: c.consistency.update(target_ema=1.0), "consistency.target_ema=1.0"),
        (lambda c: c.consistency.update(num_levels=1), "consistency.num_levels=1"),
    ],
)
def test_bad_consistency_fields_name_the_field(teacher, change, message):
    config = _student(teacher, num_steps=4)
    change(config)
    with pytest.raises(UserError, match=message):
        validation.validate(config)
    diffusion_run = tiny_config()
    diffusion_run.sample.method = "consistency"
    with pytest.raises(UserError, match="only it does"):
        validation.validate(diffusion_run)


def test_recipe_validates_and_distils_the_default_run():
    """configs/mnist_cd.py validates as it is: the default run's network and flow process, its
    guidance distilled into the student, 2-step consistency sampling without guidance."""
    config = mnist_cd.get_config()
    validation.validate(config)
    default = mnist.get_config()
    assert config.model == default.model and config.diffusion == default.diffusion
    assert config.consistency.teacher_guidance == default.sample.guidance_scale != 1.0
    assert (config.sample.method, config.sample.guidance_scale) == ("consistency", 1.0)


def test_ct_recipe_validates_and_tunes_the_default_run():
    """configs/mnist_ct.py validates as it is: improved CT's settings on the default run's
    network and process, starting from its weights; from scratch with init_workdir None."""
    config = mnist_ct.get_config()
    validation.validate(config)
    assert config.model == mnist.get_config().model
    c = config.consistency
    assert (c.teacher_workdir, c.init_workdir, c.curriculum) == (None, "runs/mnist", "ict")
    assert (c.distance, c.level_sampling, c.target_ema) == ("pseudo_huber", "lognormal", 0.0)
    validation.validate(mnist_ct.get_config(None))
