"""Progressive and guided distillation: the closed-form target against the samplers, the real
objective (`ddpm.objectives.distill`, driven by the real train step) on analytic Gaussian
data, and a distillation run of the tiny U-Net that resumes mid-round exactly."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm import build, distillation, editing, generate, runtime, samplers, sharding, train
from ddpm.config import runs, schema, validation
from ddpm.diffusion import predict_x0_eps
from ddpm.errors import UserError
from ddpm.objectives.distill import Distillation
from ddpm.schedules import get_schedule
from tests.gaussian import gaussian_denoiser, mixture_denoiser
from tests.tiny import preempt_at, tiny_config

SCHEDULE = get_schedule("cosine", 1000)


# --------------------------------------------------------------------------------------------
# The target, against the samplers' own DDIM.


def _teacher_fn(prediction: str):
    """A fixed nonlinear network output in `prediction`'s parameterization."""
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)) * 0.7)

    def fn(x, t, labels):
        del labels
        return jnp.tanh(x @ weights + (t / 1000.0)[:, None]) * 0.8 + 0.1 * x

    return fn


def _levels_of(table: distillation.Grids, round_index: int, t: jax.Array):
    """The (start, mid, end) levels of the student step starting at timestep t (per example)."""
    ts = table.t[round_index]
    n = table.teacher_steps >> round_index
    i = jnp.argmin(jnp.abs(ts[:n][None] - t[:, None]), axis=1)
    return tuple(
        distillation.Levels(*(v[round_index][i + k] for v in (table.t, table.alpha, table.sigma)))
        for k in range(3)
    )


def _numpy_predict(prediction: str, x, t, alpha, sigma):
    """The teacher's (x_0, eps) in float64 NumPy (an independent conversion)."""
    weights = np.random.default_rng(0).normal(size=(3, 3)) * 0.7
    out = np.tanh(x @ weights + (t / 1000.0)[:, None]) * 0.8 + 0.1 * x
    a, s = alpha[:, None], sigma[:, None]
    if prediction == "eps":
        return (x - s * out) / a, out
    if prediction == "x0":
        return out, (x - a * out) / s
    return a * x - s * out, s * x + a * out  # v = alpha eps - sigma x_0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_one_ddim_step_on_the_target_is_two_teacher_steps(prediction):
    """Closed form, float64: for every student step of a 4-step round (the last one ends at
    x_0), alpha'' x~ + sigma'' eps(x~) equals the teacher's two DDIM steps computed in NumPy
    (1e-10); and in float32 the whole n-step DDIM of a "student" whose x_0 prediction is x~
    equals the teacher's 2n-step DDIM of `ddpm.samplers` from the same x_T (1e-5 relative)."""
    grids = distillation.round_grids(SCHEDULE, 8, 1)
    x = np.random.default_rng(1).normal(size=(16, 3))
    with jax.enable_x64(True):
        teacher = lambda x, t, a, s: tuple(
            jnp.asarray(v) for v in _numpy_predict(prediction, *map(np.asarray, (x, t, a, s)))
        )
        for i in range(4):
            start, mid, end = (
                distillation.Levels(
                    *(jnp.full(16, v[0, 2 * i + k], jnp.float64) for v in grids[:3])
                )
                for k in range(3)
            )
            target = distillation.two_step_target(teacher, jnp.asarray(x), start, mid, end)
            assert target.dtype == jnp.float64
            eps = (x - float(start.alpha[0]) * np.asarray(target)) / float(start.sigma[0])
            student = float(end.alpha[0]) * np.asarray(target) + float(end.sigma[0]) * eps
            x_mid = np.asarray(x)
            for lo, hi in ((start, mid), (mid, end)):
                x0, e = _numpy_predict(prediction, x_mid, *(np.asarray(v) for v in lo))
                x_mid = float(hi.alpha[0]) * x0 + float(hi.sigma[0]) * e
            np.testing.assert_allclose(student, x_mid, rtol=1e-10, atol=1e-10)

    teacher_fn = _teacher_fn(prediction)

    def predict(x, t, alpha, sigma):
        return predict_x0_eps(teacher_fn(x, t, None), x, alpha[:, None], sigma[:, None], prediction)

    for n in (1, 2, 4):
        grids = distillation.round_grids(SCHEDULE, 2 * n, 1)

        def student_fn(x, t, labels, grids=grids):
            return distillation.two_step_target(predict, x, *_levels_of(grids, 0, t))

        common = dict(method="ddim", spacing="trailing", clip_x0=False)
        rng = jax.random.key(1)
        want = samplers.sample(
            teacher_fn, SCHEDULE, (64, 3), rng, num_steps=2 * n, prediction=prediction, **common
        )
        got = samplers.sample(
            student_fn, SCHEDULE, (64, 3), rng, num_steps=n, prediction="x0", **common
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_round_grids_nest_and_reject_bad_step_counts():
    grids = distillation.round_grids(SCHEDULE, 16, 4)
    for r in range(4):
        n = 16 >> r
        np.testing.assert_array_equal(
            grids.t[r, :n], samplers.timesteps(1000, n, "trailing").astype(np.float32)
        )
        assert grids.alpha[r, n] == 1.0 and grids.sigma[r, n] == 0.0
        if r:  # round r's grid is every other level of round r - 1's
            np.testing.assert_array_equal(grids.t[r, :n], grids.t[r - 1, : 2 * n : 2])
    with pytest.raises(ValueError, match="divisible by 2"):
        distillation.round_grids(SCHEDULE, 12, 3)


# --------------------------------------------------------------------------------------------
# The objective on analytic Gaussian data, with students that can represent the optimum.


class TableDenoiser(nn.Module):
    """x_0 = A z + b with (A, b) per level of `timesteps` (nearest) and per class; with
    `guided`, A and b are affine in the guidance scale s. z: [B, D]."""

    timesteps: tuple[int, ...]
    dim: int
    classes: int = 1
    guided: bool = False

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del train
        labels = cond.get("labels") if isinstance(cond, dict) else cond
        k = jnp.argmin(jnp.abs(jnp.asarray(self.timesteps)[None] - t[:, None]), axis=1)
        c = jnp.zeros_like(k) if labels is None else labels
        shape = (len(self.timesteps), self.classes, 1 + self.guided)
        a = self.param("A", nn.initializers.zeros, (*shape, self.dim, self.dim))[k, c]
        b = self.param("b", nn.initializers.zeros, (*shape, self.dim))[k, c]
        coef = jnp.ones((x.shape[0], 1))
        if self.guided:
            coef = jnp.stack([jnp.ones(x.shape[0]), cond["guidance"]], axis=1)
        return jnp.einsum("bg,bgij,bj->bi", coef, a, x) + jnp.einsum("bg,bgi->bi", coef, b)


def _config(guided: bool, **distill):
    config = schema.get_config()
    config.diffusion.schedule, config.diffusion.prediction = "cosine", "x0"
    config.sample.clip_x0 = False
    config.distill.update(guided=guided, **distill)
    t = config.training
    t.optimizer, t.learning_rate, t.warmup_steps, t.grad_clip = "adam", 3e-2, 0, 1e3
    t.ema_decay, t.batch_size = 0.0, 256
    return config


def _objective(config, model, teacher, frozen, input_shape):
    return Distillation(
        config=config,
        model=model,
        input_shape=input_shape,
        speed=runtime.resolve(config.runtime),
        frozen=frozen,
        process=build.process(config),
        teacher=teacher,
        grids=distillation.round_grids(
            build.process(config), config.distill.teacher_steps, runs.distill_rounds(config)
        ),
    )


def _train(objective, draw_batch, num_steps, snapshot_at=()):
    """Runs the real train step `num_steps` times; -> (final state, {step: EMA params})."""
    mesh = sharding.create_mesh()
    tx, lr_fn = build.optimizer(objective.config.training)
    step_fn = train.make_train_step(objective, tx, lr_fn, mesh)
    state = train.init_train_state(jax.random.key(0), objective, tx, mesh)
    snapshots = {}
    for step in range(1, num_steps + 1):
        state, _ = step_fn(state, draw_batch(step), objective.frozen)
        if step in snapshot_at:
            snapshots[step] = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), state.ema_params)
    assert step_fn._cache_size() == 1  # rounds and stages change no shape: one compile
    return state, snapshots


MEAN, STD = np.array([0.5, -0.3]), np.array([0.4, 0.9])


def _gaussian_tables(timesteps):
    """The exact x_0 denoiser of N(MEAN, diag STD^2) at each level, as TableDenoiser params."""
    a_list, b_list = [], []
    for t in timesteps:
        alpha = float(SCHEDULE.sqrt_alpha_bars[t])
        sigma = float(SCHEDULE.sqrt_one_minus_alpha_bars[t])
        gain = alpha * STD**2 / (alpha**2 * STD**2 + sigma**2)
        a_list.append(np.diag(gain))
        b_list.append(MEAN - gain * alpha * MEAN)
    a = np.asarray(a_list, np.float32)[:, None, None]
    return {"A": jnp.asarray(a), "b": jnp.asarray(np.asarray(b_list, np.float32)[:, None, None])}


def test_progressive_rounds_keep_the_teachers_distribution_on_gaussian_data():
    """Teacher: the exact denoiser of a 2-D Gaussian, DDIM with 8 steps. Three rounds of the
    real objective (8 -> 4 -> 2 -> 1 steps) with a per-level affine student: the 4-, 2- and
    1-step students map each x_T where the teacher's 8 steps do (max |diff| < 0.03, the data
    std being 0.4 / 0.9), so mean and covariance stay the teacher's (within 0.02); the mean is
    the data's (within 0.05)."""
    config = _config(False, teacher_steps=8, final_steps=1, steps_per_round=300)
    ts = tuple(int(t) for t in samplers.timesteps(1000, 8, "trailing"))
    net = TableDenoiser(ts, 2)
    objective = _objective(config, net, net, _gaussian_tables(ts), (2,))
    rng = np.random.default_rng(0)

    def draw_batch(step):
        x0 = MEAN + STD * rng.normal(size=(256, 2))
        return {"image": jnp.asarray(x0, jnp.float32), "label": jnp.zeros(256, jnp.int32)}

    _, snapshots = _train(objective, draw_batch, 900, snapshot_at=(300, 600, 900))
    common = dict(method="ddim", spacing="trailing", prediction="x0", clip_x0=False)
    key, shape = jax.random.key(5), (20_000, 2)
    exact = gaussian_denoiser(SCHEDULE, MEAN, STD, prediction="x0")
    teacher = np.asarray(samplers.sample(exact, SCHEDULE, shape, key, num_steps=8, **common))
    np.testing.assert_allclose(teacher.mean(0), MEAN, atol=0.05)
    # (8 DDIM steps shrink the variance: about 0.10 / 0.59 instead of 0.16 / 0.81.)
    for step, n in ((300, 4), (600, 2), (900, 1)):
        params = snapshots[step]
        student = np.asarray(
            samplers.sample(
                lambda x, t, y, p=params: net.apply({"params": p}, x, t),
                SCHEDULE,
                shape,
                key,
                num_steps=n,
                **common,
            )
        )
        assert np.abs(student - teacher).max() < 0.03, (n, np.abs(student - teacher).max())
        np.testing.assert_allclose(student.mean(0), teacher.mean(0), atol=0.02)
        np.testing.assert_allclose(np.cov(student.T), np.cov(teacher.T), atol=0.02)


def _continuous_tables(process, taus):
    """The exact network output F of N(MEAN, diag STD^2) for an EDM or flow process at levels
    `taus`, as TableDenoiser params over its input (c_in x for EDM, x for a flow): the x_0
    estimate mu + g (x - a mu), g = a STD^2 / (a^2 STD^2 + b^2), turned into F by the
    process's preconditioning, affine in the input."""
    a_list, b_list = [], []
    for tau in taus:
        a, b = (float(v) for v in process.coefficients(tau))
        g = a * STD**2 / (a**2 * STD**2 + b**2)
        if process.name == "flow":  # F = (x - x_0) / t, input x
            slope, offset = (1.0 - g) / tau, -(MEAN - g * a * MEAN) / tau
        else:  # EDM: F = (x_0 - c_skip x) / c_out, input c_in x
            c_skip, c_out, c_in = (float(v) for v in process._scalings(jnp.float32(tau)))
            slope, offset = (g - c_skip) / (c_out * c_in), MEAN * (1.0 - g) / c_out
        a_list.append(np.diag(slope))
        b_list.append(offset)
    a = np.asarray(a_list, np.float32)[:, None, None]
    return {"A": jnp.asarray(a), "b": jnp.asarray(np.asarray(b_list, np.float32)[:, None, None])}


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_progressive_rounds_on_flow_and_edm_teachers(name):
    """Progressive distillation of a flow (DDIM on a flow is its Euler step) and of an EDM
    teacher: the exact Gaussian network (through the process's preconditioning) with 8
    trailing steps; two rounds (8 -> 4 -> 2) of the real objective with a per-level affine
    student. The 4- and 2-step students map each x_T where the teacher's 8 steps do (max
    |diff| < 0.03; the teacher's own 4 steps land up to 0.48 (flow) / 0.16 (EDM) away). EDM's
    trailing levels are uniform in sigma (80, 70, ..., 10), so its 8-step teacher is far from
    the data's spread; what is tested is that the students keep the teacher's map."""
    config = _config(False, teacher_steps=8, final_steps=2, steps_per_round=300)
    config.diffusion.process = name
    process = build.process(config)
    levels = process.sampling_levels(8, "trailing", 7.0).t
    times = process.net_input(jnp.zeros((8, 2)), levels)[1]
    net = TableDenoiser(tuple(float(t) for t in times), 2)
    tables = _continuous_tables(process, [float(t) for t in levels])
    objective = _objective(config, net, net, tables, (2,))
    rng = np.random.default_rng(0)

    def draw_batch(step):
        x0 = MEAN + STD * rng.normal(size=(256, 2))
        return {"image": jnp.asarray(x0, jnp.float32), "label": jnp.zeros(256, jnp.int32)}

    _, snapshots = _train(objective, draw_batch, 600, snapshot_at=(300, 600))
    key, shape = jax.random.key(5), (20_000, 2)

    def draw(params, n):
        denoise = process.denoiser(lambda p, x, t, y: net.apply({"params": p}, x, t))
        return np.asarray(
            samplers.sample(
                lambda x, t, y: denoise(params, x, t, y),
                process,
                shape,
                key,
                method="ddim",
                spacing="trailing",
                num_steps=n,
                prediction=process.prediction,
            )
        )

    teacher = draw(tables, 8)
    np.testing.assert_allclose(teacher.mean(0), MEAN, atol=0.05)
    for step, n in ((300, 4), (600, 2)):
        student = draw(snapshots[step], n)
        assert np.abs(student - teacher).max() < 0.03, (n, np.abs(student - teacher).max())


class MixtureTeacher(nn.Module):
    """The exact x_0 denoiser of a two-class Gaussian mixture (`tests.gaussian`): class k's
    component, or the whole mixture for the null label 2; a parameter-free network."""

    @nn.compact
    def __call__(self, x, t, labels=None, train=False):
        del train
        fn = mixture_denoiser(SCHEDULE, MIX_MEANS, MIX_STDS, prediction="x0", null_label=2)
        return fn(x, t, labels)


MIX_MEANS = np.array([[1.0, 0.0], [-1.0, 0.5]])
MIX_STDS = np.array([[0.3, 0.5], [0.5, 0.3]])


class MLPStudent(nn.Module):
    """x_0 from (z, level one-hot, class one-hot, guidance scale): a 2-layer MLP."""

    timesteps: tuple[int, ...]

    @nn.compact
    def __call__(self, x, t, cond, train=False):
        del train
        if not isinstance(cond, dict):  # init: labels alone
            cond = {"labels": cond, "guidance": jnp.ones(x.shape[0])}
        k = jnp.argmin(jnp.abs(jnp.asarray(self.timesteps)[None] - t[:, None]), axis=1)
        features = [
            x,
            jax.nn.one_hot(k, len(self.timesteps)),
            jax.nn.one_hot(cond["labels"], 2),
            cond["guidance"][:, None] / 4.0,
        ]
        h = jnp.concatenate(features, axis=1)
        for _ in range(2):
            h = nn.gelu(nn.Dense(128)(h))
        return nn.Dense(2)(h)


def test_guided_stage1_student_matches_the_guided_teacher_in_one_call():
    """Stage 1 of guided distillation with the real objective: the teacher is the exact
    denoiser of a two-class mixture (its unconditional branch the whole mixture, nonlinear in
    z); after 1500 steps the student's single call matches the teacher's guided
    combination uncond + s (cond - uncond), two calls, for s in the trained range [1, 4]:
    RMS error under 6 % of the target's RMS, at held-out scales and noise levels."""
    config = _config(
        True, teacher_steps=4, final_steps=2, guided_steps=1500, guidance_min=1.0, guidance_max=4.0
    )
    config.training.learning_rate = 3e-3
    config.model.num_classes = 2
    ts = tuple(int(t) for t in samplers.timesteps(1000, 4, "trailing"))
    objective = _objective(config, MLPStudent(ts), MixtureTeacher(), {}, (2,))
    rng = np.random.default_rng(0)

    def draw_batch(step):
        labels = rng.integers(0, 2, 256)
        x0 = MIX_MEANS[labels] + MIX_STDS[labels] * rng.normal(size=(256, 2))
        return {"image": jnp.asarray(x0, jnp.float32), "label": jnp.asarray(labels, jnp.int32)}

    state, _ = _train(objective, draw_batch, 1500)
    assert not bool(state.carry["stage1"]) or int(state.step) == 1500
    exact = mixture_denoiser(SCHEDULE, MIX_MEANS, MIX_STDS, prediction="x0", null_label=2)
    keys = jax.random.split(jax.random.key(9), 3)
    n = 4096
    labels = jax.random.randint(keys[0], (n,), 0, 2)
    t = jnp.asarray(ts, jnp.float32)[jax.random.randint(keys[1], (n,), 0, 4)]
    x0 = jnp.asarray(MIX_MEANS)[labels] + jnp.asarray(MIX_STDS)[labels] * jax.random.normal(
        keys[2], (n, 2)
    )
    alpha = SCHEDULE.sqrt_alpha_bars[t.astype(int)][:, None]
    sigma = SCHEDULE.sqrt_one_minus_alpha_bars[t.astype(int)][:, None]
    z = alpha * x0 + sigma * jax.random.normal(jax.random.key(3), (n, 2))
    for s in (1.5, 2.5, 3.5):
        cond_out, uncond_out = exact(z, t, labels), exact(z, t, jnp.full_like(labels, 2))
        target = uncond_out + s * (cond_out - uncond_out)
        student = objective.model.apply(
            {"params": state.ema_params}, z, t, {"labels": labels, "guidance": jnp.full(n, s)}
        )
        rms = float(jnp.sqrt(jnp.mean(jnp.square(student - target))))
        assert rms < 0.06 * float(jnp.sqrt(jnp.mean(jnp.square(target)))), (s, rms)


def test_graft_keeps_the_students_own_parameters():
    from ddpm.objectives.distill import graft

    source = {"a": {"w": jnp.ones(2)}, "b": jnp.ones(3)}
    target = {"a": {"w": jnp.zeros(2)}, "b": jnp.zeros(3), "guidance_embed": jnp.full(4, 7.0)}
    out = graft(source, target)
    assert float(out["a"]["w"].sum()) == 2 and float(out["b"].sum()) == 3
    assert float(out["guidance_embed"].sum()) == 28


# --------------------------------------------------------------------------------------------
# A distillation run of the tiny U-Net: stages, resume, sampling, errors.


def _tiny_v(**training):
    config = tiny_config(**training)
    config.diffusion.prediction = "v"
    return config


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    train.train_and_evaluate(_tiny_v(num_steps=2), str(workdir))
    return workdir


def _student_config(teacher, **training):
    config = _tiny_v(**training)
    config.objective = "distill"
    config.model.guidance_embed = True
    config.diffusion.prediction = "v"
    config.distill.update(
        teacher_workdir=str(teacher),
        teacher_steps=4,
        final_steps=1,
        guided=True,
        guided_steps=2,
        steps_per_round=2,
    )
    config.sample.method, config.sample.num_steps = "ddim", 1
    config.sample.num_samples = config.sample.batch_size = 4
    return config


def _saved(workdir, step: int):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )


def test_run_resumes_mid_round_exactly_and_samples_with_one_call(
    teacher_workdir, tmp_path, capsys, monkeypatch
):
    """Guided stage 1 (2 steps), then rounds 4 -> 2 and 2 -> 1 steps (2 steps each): a run
    preempted after step 3 (mid-round) and resumed ends bit-identical to an uninterrupted
    one, carry (teacher, round) included; every stage ends in a checkpoint and a grid;
    sampling the 1-step student needs no warning, other step counts get one (inpainting
    too)."""
    full, part = tmp_path / "full", tmp_path / "part"
    train.train_and_evaluate(_student_config(teacher_workdir, num_steps=6), str(full))
    with monkeypatch.context() as patch:
        preempt_at(3, patch)
        train.train_and_evaluate(_student_config(teacher_workdir, num_steps=6), str(part))
    out = capsys.readouterr().out
    assert "Starting from config.distill.teacher_workdir: EMA parameters of step 2" in out
    assert "SIGTERM: saved checkpoint at step 3;" in out, out
    train.train_and_evaluate(_student_config(teacher_workdir, num_steps=6), str(part))
    assert "Resumed from checkpoint at step 3" in capsys.readouterr().out
    a, b = _saved(full, 6), _saved(part, 6)
    assert int(a["carry"]["round"]) == 1 and not bool(a["carry"]["stage1"])
    jax.tree.map(np.testing.assert_array_equal, a, b)
    for step in (2, 4, 6):
        assert (full / "checkpoints" / str(step)).is_dir()
        assert (full / "samples" / f"step_{step:07d}.png").is_file()

    config = _student_config(teacher_workdir, num_steps=6)
    path = generate.sample_from_workdir(config, str(full))
    assert os.path.isfile(path) and "Warning" not in capsys.readouterr().out
    config.sample.num_steps = 2  # inpainting, with the step count of another round
    assert os.path.isfile(editing.edit_from_workdir(config, str(full), "inpaint"))
    assert "distilled for DDIM with 1 trailing steps" in capsys.readouterr().out
    # The rounds a checkpoint belongs to are part of the run: another schedule is refused.
    config.distill.steps_per_round = 3
    with pytest.raises(UserError, match=r"config.distill.steps_per_round: workdir has 2"):
        generate.sample_from_workdir(config, str(full))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.distill.update(teacher_steps=6), "power of two"),
        (lambda c: c.model.update(guidance_embed=False), "guidance_embed"),
        (lambda c: c.distill.update(teacher_workdir=None), "teacher_workdir"),
        (lambda c: c.training.update(num_steps=7), "training.num_steps"),
        (lambda c: c.model.update(num_classes=None), "must be conditional"),
    ],
)
def test_bad_distill_fields_name_the_field(teacher_workdir, change, message):
    config = _student_config(teacher_workdir, num_steps=6)
    change(config)
    with pytest.raises(UserError, match=message):
        validation.validate(config)


def test_a_student_must_share_its_teachers_network(teacher_workdir, tmp_path):
    config = _student_config(teacher_workdir, num_steps=6)
    config.model.ch = 16
    with pytest.raises(UserError, match=r"config.model.ch=16 but the teacher .* has 8"):
        train.train_and_evaluate(config, str(tmp_path))
