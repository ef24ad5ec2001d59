"""Power-function EMA and post-hoc reconstruction (`ddpm.phema`): sigma_rel and gamma, the
profiles' inner products against numerical integration, the tracked EMA's weights in closed
form, and reconstructions on a synthetic parameter trajectory against EMAs tracked directly;
then the power EMAs of the train step, their snapshots and --mode=phema on tiny runs."""

import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy.integrate import quad

from ddpm import (
    build,
    data,
    evaluate,
    generate,
    objectives,
    phema,
    posthoc_ema,
    sharding,
    sweep,
    train,
)
from ddpm.config import runs, validation
from ddpm.errors import UserError
from tests import tiny_phema_sweep
from tests.tiny import step_parts, tiny_config

TRACK = tiny_phema_sweep.TRACK
PHEMA_SWEEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_phema_sweep.py")


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_and_gamma_invert_each_other(sigma_rel):
    gamma = phema.gamma_of(sigma_rel)
    assert gamma > 0
    assert phema.sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # sigma_rel is the standard deviation of the profile (gamma + 1) t^gamma on [0, 1].
    mean = quad(lambda t: t * (gamma + 1) * t**gamma, 0, 1)[0]
    var = quad(lambda t: (t - mean) ** 2 * (gamma + 1) * t**gamma, 0, 1)[0]
    assert math.sqrt(var) == pytest.approx(sigma_rel, rel=1e-8)


def test_gamma_of_refuses_impossible_widths():
    for bad in (0.0, 0.3, -0.1):
        with pytest.raises(ValueError, match="sigma_rel"):
            phema.gamma_of(bad)


def test_inner_products_match_numerical_integration():
    pairs = [(1000, 6.9, 1000, 6.9), (400, 17.0, 1000, 6.9), (1000, 3.0, 250, 30.0)]
    for ta, ga, tb, gb in pairs:

        def product(t, ta=ta, ga=ga, tb=tb, gb=gb):
            return (ga + 1) * t**ga / ta ** (ga + 1) * (gb + 1) * t**gb / tb ** (gb + 1)

        expected = quad(product, 0, min(ta, tb))[0]
        got = phema.profile_inner_products(ta, ga, tb, gb)
        assert got == pytest.approx(expected, rel=1e-8)


def _track(thetas: np.ndarray, gamma: float, snapshot_every: int | None = None):
    """The power EMA of `thetas` [T, D] by the recurrence with `phema.beta` (float32 betas,
    float64 sums), and its snapshots every `snapshot_every` steps: -> (final, {step: ema})."""
    ema, snapshots = np.zeros(thetas.shape[1]), {}
    betas = np.asarray(phema.beta(gamma, np.arange(len(thetas))), np.float64)
    for step, (b, theta) in enumerate(zip(betas, thetas, strict=True)):
        ema = b * ema + (1.0 - b) * theta
        if snapshot_every and (step + 1) % snapshot_every == 0:
            snapshots[step + 1] = ema.copy()
    return ema, snapshots


def test_tracked_ema_weights_are_the_power_profile():
    """The recurrence gives theta_i the weight (1 - (1 - 1/i)^(g + 1)) (i / T)^(g + 1), which
    sums to 1 and approaches the profile (g + 1) i^g / T^(g + 1)."""
    steps, gamma = 500, phema.gamma_of(0.1)
    assert float(phema.beta(gamma, 0)) == 0.0
    final, _ = _track(np.eye(steps), gamma)  # column i: theta_i's weight
    i = np.arange(1, steps + 1, dtype=np.float64)
    expected = (1 - (1 - 1 / i) ** (gamma + 1)) * (i / steps) ** (gamma + 1)
    np.testing.assert_allclose(final, expected, rtol=2e-5, atol=1e-12)
    assert final.sum() == pytest.approx(1.0, abs=1e-5)
    late = i > steps / 2  # the relative gap is about gamma / 2i
    profile = (gamma + 1) * i**gamma / steps ** (gamma + 1)
    np.testing.assert_allclose(final[late], profile[late], rtol=0.02)


def _trajectory(steps: int = 2000, dims: int = 64) -> np.ndarray:
    """Parameters drifting like a training run's: a random walk around a decaying trend."""
    rng = np.random.default_rng(0)
    t = np.arange(1, steps + 1)[:, None] / steps
    trend = rng.normal(size=(1, dims)) * np.exp(-3 * t) + rng.normal(size=(1, dims)) * t
    return trend + 0.02 * np.cumsum(rng.normal(size=(steps, dims)), axis=0) / math.sqrt(steps)


def test_reconstruction_of_a_tracked_profile_is_its_snapshot():
    """Asking for a profile that was tracked, at a snapshot's step, weighs that snapshot 1."""
    gammas = [phema.gamma_of(0.05), phema.gamma_of(0.10)]
    steps = [s for s in range(100, 2001, 100) for _ in gammas]
    snapshot_gammas = gammas * 20
    x = phema.reconstruction_weights(steps, snapshot_gammas, 2000, gammas)
    expected = np.zeros_like(x)
    expected[-2, 0] = expected[-1, 1] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
def test_reconstruction_of_an_untracked_profile_matches_tracking_it(sigma_rel):
    """EMAs with sigma_rel 0.05 and 0.10 snapshotted every 100 of 2,000 steps: the post-hoc
    EMA of another sigma_rel at step 2,000 is the one tracked directly within 0.5% of how far
    that EMA lies from the final parameters (the EMA's whole effect; measured 0.01% for 0.07
    and 0.06% for 0.15, where the nearest tracked EMA is 30% and 39% off)."""
    thetas = _trajectory()
    tracked = [phema.gamma_of(0.05), phema.gamma_of(0.10)]
    steps, gammas, snapshots = [], [], []
    for gamma in tracked:
        _, shots = _track(thetas, gamma, snapshot_every=100)
        for step, ema in shots.items():
            steps.append(step)
            gammas.append(gamma)
            snapshots.append(ema)
    x = phema.reconstruction_weights(steps, gammas, 2000, [phema.gamma_of(sigma_rel)])
    reconstructed = np.tensordot(x[:, 0], np.stack(snapshots), axes=1)
    direct, _ = _track(thetas, phema.gamma_of(sigma_rel))
    error = np.linalg.norm(reconstructed - direct)
    effect = np.linalg.norm(direct - thetas[-1])
    assert error < 0.005 * effect, (error, effect)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[str, list[dict]]:
    """tests/tiny_phema_sweep.py run once: (sweep workdir, rows)."""
    workdir = str(tmp_path_factory.mktemp("phema_sweep"))
    return workdir, _run_phema_sweep(workdir)


def _run_phema_sweep(workdir: str) -> list[dict]:
    return sweep.run_sweep(
        PHEMA_SWEEP,
        tiny_phema_sweep.get_config(),
        workdir,
        train_fn=train.train_and_evaluate,
        evaluate_fn=evaluate.evaluate,
    )


def test_train_step_keeps_the_power_emas_of_its_parameter_trajectory():
    """After T train steps each tracked EMA is sum_i w_i theta_i over the parameters after
    steps 1..T, w_i = (1 - (1 - 1/i)^(g+1)) (i/T)^(g+1): the recurrence's closed form,
    computed here in float64 from the trajectory (float32 rounding of 6 updates: 1e-6)."""
    objective, step_fn, state, mesh = step_parts(tiny_phema_sweep.get_config())
    batches = data.create_dataset(objective.config, "train", batch_size=8, seed=0)
    trajectory = []
    for _ in range(6):
        state, _ = step_fn(state, sharding.global_batch(next(batches), mesh), objective.frozen)
        trajectory.append(jax.tree.map(lambda p: np.asarray(p, np.float64), state.params))
    assert len(state.phema) == len(TRACK)
    steps = np.arange(1, 7, dtype=np.float64)
    for width, tracked in zip(TRACK, state.phema, strict=True):
        g = phema.gamma_of(width)
        weights = (1 - (1 - 1 / steps) ** (g + 1)) * (steps / 6) ** (g + 1)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        expected = jax.tree.map(
            lambda *ps, w=weights: sum(wi * p for wi, p in zip(w, ps, strict=True)), *trajectory
        )
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(tracked), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    # The narrower profile weighs the last step more than the wider one does.
    last = [jax.tree.leaves(t)[0] for t in state.phema]
    closest = [np.abs(x - jax.tree.leaves(trajectory[-1])[0]).max() for x in last]
    assert closest[0] < closest[1]


def test_snapshots_reconstruct_tracked_widths_and_serve_every_reader(swept, capsys):
    """A tiny run tracking sigma_rel 0.05 and 0.10 stores snapshots at steps 2, 4, 6. The
    reconstruction of a tracked width is its own snapshot (float tolerance); an untracked
    width is a normalised combination that is neither; --mode=phema's stored set is what
    the sample / eval path restores."""
    config = tiny_phema_sweep.get_config()
    workdir = os.path.join(swept[0], sweep.TRAINED)
    assert sorted(os.listdir(os.path.join(workdir, "phema", "snapshots"))) == ["2", "4", "6"]
    objective, mesh = generate.prepare(config, workdir)
    target = build.placed_params(config, objective.model, objective.input_shape, mesh)
    snapshot = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "phema", "snapshots", "6", "default")
    )
    for i, width in enumerate(TRACK):
        params, step, fit = posthoc_ema.reconstruct(workdir, width, target)
        assert step == 6 and fit < 1e-6
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(snapshot[i]), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    config.phema.sigma_rel = 0.07
    path = generate.write_posthoc_ema(config, workdir)
    assert path == os.path.join(workdir, "phema", "sigma_rel_0.0700", "6")
    assert "profile fit" in capsys.readouterr().out
    objective = objectives.create(config, workdir=workdir, mesh=mesh)  # phema.sigma_rel 0.07
    restored, step = generate.restore(objective, workdir, mesh)
    assert step == 6 and "reconstructed" not in capsys.readouterr().out  # the stored set
    rebuilt, _, fit = posthoc_ema.reconstruct(workdir, 0.07, target)
    assert fit < 0.05
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(rebuilt), strict=True):
        np.testing.assert_array_equal(a, b)
    # A combination that is neither tracked EMA (the parameters moved in 6 steps).
    mid = np.asarray(jax.tree.leaves(restored)[0])
    assert all(np.abs(mid - jax.tree.leaves(s)[0]).max() > 1e-6 for s in snapshot)

    config.phema.sigma_rel = 0.2  # never written: reconstructed on the fly, with a note
    generate.restore(objectives.create(config, workdir=workdir, mesh=mesh), workdir, mesh)
    assert "reconstructed from the snapshots" in capsys.readouterr().out


def test_post_hoc_width_on_a_run_without_snapshots_is_one_line(tmp_path):
    config = tiny_config(num_steps=2, checkpoint_every=2)
    config.phema.sigma_rel = 0.1
    with pytest.raises(UserError, match=r"config.phema.sigma_rel: .* has no power-EMA snapshots"):
        posthoc_ema.reconstruct(str(tmp_path), 0.1, None)
    config.phema.track = (0.05, 0.5)
    with pytest.raises(UserError, match=r"config.phema.track=0.5: a power EMA's sigma_rel"):
        validation.validate(config)


def test_post_hoc_sweep_trains_once_and_evaluates_each_width(swept, capsys):
    """Trials that vary only phema.sigma_rel share one training run (workdir/trained): no
    trial folder holds a checkpoint, each holds its own eval files and a result with FD. A
    rerun trains and evaluates nothing."""
    workdir, rows = swept
    assert [(r["phema.sigma_rel"], r["status"], r["step"]) for r in rows] == [
        (0.05, "done", 6),
        (0.2, "done", 6),
    ]
    assert rows[0]["fd"] > 0 and rows[1]["fd"] > 0 and rows[0]["fd"] != rows[1]["fd"]
    names = sorted(os.listdir(workdir))
    assert names == sorted(
        [sweep.TRAINED, "phema.sigma_rel=0.05", "phema.sigma_rel=0.2", "results.csv", "results.png"]
    )
    for row in rows:
        trial = os.path.join(workdir, row["trial"])
        assert sorted(os.listdir(trial)) == ["eval", sweep.RESULT_FILE]
        assert "6.json" in os.listdir(os.path.join(trial, "eval"))
    assert "6.json" not in os.listdir(os.path.join(workdir, sweep.TRAINED, "eval"))
    with open(os.path.join(workdir, "results.csv")) as f:
        assert "phema.sigma_rel" in f.readline()
    again = _run_phema_sweep(workdir)
    assert [r["status"] for r in again] == ["skipped (finished)"] * 2
    assert [r["fd"] for r in again] == [r["fd"] for r in rows]
    assert "2 finished, evaluating 0" in capsys.readouterr().out


def test_autoguidance_by_an_earlier_checkpoint_of_the_run(swept, tmp_path):
    """config.sample.guide="step:N" through the objective's sampler (sample / eval / edit
    modes): the run's own last checkpoint as guide is the unguided sampler (the two branches
    are equal); an earlier one changes the samples. Bad guides: one line each."""
    config = tiny_phema_sweep.get_config()
    workdir = os.path.join(swept[0], sweep.TRAINED)
    labels = jax.numpy.arange(8, dtype=jax.numpy.int32) % 10

    def draw(guide: str | None, scale: float) -> np.ndarray:
        config.sample.guide, config.sample.guidance_scale = guide, scale
        objective, mesh = generate.prepare(config, workdir)
        params, _ = generate.restore(objective, workdir, mesh)
        return np.asarray(objective.sampler(8)(params, jax.random.key(0), labels))

    plain = draw(None, 1.0)
    np.testing.assert_allclose(draw("step:6", 2.0), plain, rtol=0, atol=1e-5)
    assert np.abs(draw("step:2", 2.0) - plain).max() > 1e-3

    with pytest.raises(UserError, match=r"no checkpoint of step 3 .* it holds steps 2, 4, 6"):
        draw("step:3", 2.0)
    with pytest.raises(UserError, match=r"config.sample.guide='step:two': 'step:N' names"):
        draw("step:two", 2.0)
    other = tiny_phema_sweep.get_config()
    other.diffusion.process = "flow"
    runs.write_config(other, str(tmp_path))
    with pytest.raises(UserError, match=r"its diffusion is .* the same process"):
        draw(str(tmp_path), 2.0)


def test_training_on_with_other_tracked_widths_is_refused_reading_is_not(swept):
    """The power EMAs are part of the train state: resuming with another phema.track is one
    line before any work; sampling or evaluating with it reads the EMA as usual."""
    workdir = os.path.join(swept[0], sweep.TRAINED)
    config = tiny_phema_sweep.get_config()
    config.phema.track = ()
    with pytest.raises(UserError, match=r"config.phema.track: workdir has \(0.05, 0.1\), new"):
        train.train_and_evaluate(config, workdir)
    generate.prepare(config, workdir)
