"""EDM and flow matching (ddpm.processes) against closed forms on Gaussian data, and their
runs end to end.

For data x_0 ~ N(mu, diag v) and x = a x_0 + b eps (EDM: a = 1, b = sigma; flow: a = 1 - t,
b = t), everything the objectives need is closed form (float64 NumPy here, written from the
papers, not from ddpm.processes):
  E[x_0 | x] = mu + a v (x - a mu) / (a^2 v + b^2),  Var[x_0 | x] = v b^2 / (a^2 v + b^2);
  the probability-flow ODE moves x from level (a0, b0) to (a1, b1) by the affine map
  x1 = a1 mu + sqrt((a1^2 v + b1^2) / (a0^2 v + b0^2)) (x0 - a0 mu).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import cifar10_edm, cifar10_flow, mnist_edm, mnist_flow
from ddpm import (
    build,
    classifier,
    editing,
    evaluate,
    generate,
    processes,
    samplers,
    sharding,
    train,
)
from ddpm.config import validation
from ddpm.errors import UserError
from tests.tiny import create_model, step_parts, tiny_config

MU = np.array([0.5, -0.3, 0.0])
VAR = np.array([0.16, 0.81, 0.25])  # the last one is sigma_data^2: EDM's loss is 1 there
EDM = processes.EDM()
FLOW = processes.Flow()


def native(process, tau):
    """(a, b) of x = a x_0 + b eps, float64, from the papers' definitions."""
    tau = np.asarray(tau, np.float64)
    if process.name == "edm":
        return np.ones_like(tau), tau
    return 1.0 - tau, tau


def posterior_mean(x, a, b, mean=MU):
    """E[x_0 | x] for x [..., D], a, b (and the data mean) broadcastable."""
    return mean + a * VAR * (x - a * mean) / (a**2 * VAR + b**2)


def exact_network(process):
    """The exact F(c_in x, model_time, cond) of the Gaussian in each parameterisation, built
    from EDM's table 1 (c_in, c_skip, c_out, c_noise = ln(sigma) / 4) and the flow's velocity,
    model time x 1000."""

    def edm(params, inputs, time, cond):
        sigma = jnp.exp(time / 250.0)[:, None]
        sd2 = EDM.sigma_data**2
        x = inputs * jnp.sqrt(sigma**2 + sd2)
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * EDM.sigma_data / jnp.sqrt(sigma**2 + sd2)
        return (posterior_mean(x, 1.0, sigma) - c_skip * x) / c_out

    def flow(params, inputs, time, cond):
        t = (time / 1000.0)[:, None]
        x0 = posterior_mean(inputs, 1.0 - t, t)
        eps = (inputs - (1.0 - t) * x0) / t
        return eps - x0

    return edm if process.name == "edm" else flow


def gauss_hermite(fn, mean: float, std: float, nodes: int = 120) -> float:
    """E[fn(mean + std z)], z ~ N(0, 1), by Gauss-Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    return float(np.sum(w * fn(mean + std * z)) / np.sqrt(2.0 * np.pi))


def analytic_loss(process) -> float:
    """The minimum of each objective's loss (mean over dimensions) at the exact network.

    EDM: lambda(sigma) Var[x_0 | x] with lambda = 1 / c_out^2, averaged over ln sigma ~
    N(P_mean, P_std^2): (sigma^2 + sd^2) v / (sd^2 (v + sigma^2)). Flow: Var[eps - x_0 | x] =
    1 + v - (t - (1 - t) v)^2 / ((1 - t)^2 v + t^2), averaged over t = sigmoid(N(0, 1))."""
    v = VAR[:, None]
    if process.name == "edm":
        sd2 = process.sigma_data**2

        def per_sigma(log_sigma):
            s2 = np.exp(2 * log_sigma)
            return np.mean((s2 + sd2) * v / (sd2 * (v + s2)), axis=0)

        return gauss_hermite(per_sigma, process.p_mean, process.p_std)

    def per_logit(logit):
        t = 1.0 / (1.0 + np.exp(-logit))
        return np.mean(1 + v - (t - (1 - t) * v) ** 2 / ((1 - t) ** 2 * v + t**2), axis=0)

    return gauss_hermite(per_logit, process.logit_mean, process.logit_std)


@pytest.mark.parametrize("process", [EDM, FLOW], ids=["edm", "flow"])
def test_exact_network_has_the_analytic_loss_and_beats_perturbed_ones(process):
    """`Process.loss` of the exact network on 400k draws equals the analytic minimum within 4
    standard errors (and 1 %); adding delta = 0.1 to F raises it by delta^2 = 0.01 (paired
    draws, within 4 standard errors of the difference), scaling F by 0.9 raises it too."""
    n = 400_000
    x0 = jnp.asarray(MU + np.sqrt(VAR) * np.random.default_rng(0).standard_normal((n, 3)))
    net = exact_network(process)
    rng = jax.random.key(1)

    def loss_of(fn):
        apply_fn = lambda params, inputs, time, _rng: fn(None, inputs, time, None)  # noqa: E731
        return process.loss(None, apply_fn, x0, rng)[1]["per_example"]

    exact = np.asarray(loss_of(net), np.float64)
    want = analytic_loss(process)
    stderr = exact.std() / math.sqrt(n)
    assert abs(exact.mean() - want) < 4 * stderr, (exact.mean(), want, stderr)
    assert abs(exact.mean() / want - 1) < 0.01
    shifted = np.asarray(loss_of(lambda *a: net(*a) + 0.1), np.float64) - exact
    assert abs(shifted.mean() - 0.01) < 4 * shifted.std() / math.sqrt(n), shifted.mean()
    scaled = np.asarray(loss_of(lambda *a: 0.9 * net(*a)), np.float64) - exact
    assert scaled.mean() > 10 * scaled.std() / math.sqrt(n)


def test_training_levels_follow_their_distributions():
    """EDM: ln sigma has mean P_mean and std P_std; flow: the shifted t = 3u / (1 + 2u) of
    u ~ U(0, 1) has P(t <= q) = q / (3 - 2q), the logit of an unshifted logit-normal t has
    mean 0.5 and std 2 for those fields (4 standard errors, 200k draws)."""
    n, key = 200_000, jax.random.key(0)
    log_sigma = np.log(np.asarray(processes.EDM(p_mean=-1.2, p_std=1.2).draw_levels(key, n)))
    assert abs(log_sigma.mean() + 1.2) < 4 * 1.2 / math.sqrt(n)
    assert abs(log_sigma.std() - 1.2) < 4 * 1.2 / math.sqrt(2 * n)
    t = np.asarray(processes.Flow(t_sampling="uniform", shift=3.0).draw_levels(key, n))
    for q in (0.2, 0.5, 0.8):
        p = q / (3 - 2 * q)
        assert abs(np.mean(t <= q) - p) < 4 * math.sqrt(p * (1 - p) / n), q
    t = np.asarray(processes.Flow(logit_mean=0.5, logit_std=2.0).draw_levels(key, n), np.float64)
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 4 * 2.0 / math.sqrt(n)
    assert abs(logit.std() - 2.0) < 4 * 2.0 / math.sqrt(2 * n)


@pytest.mark.parametrize("process", [EDM, FLOW], ids=["edm", "flow"])
def test_preconditioning_recovers_the_exact_denoiser(process):
    """`Process.denoiser` of the exact network, called as the samplers call it (x in
    the VP scale x / sqrt(a^2 + b^2)), returns E[x_0 | x] (float32: 2e-5 relative) at levels
    across the sampler's range, including a flow's t = 1 (x = eps)."""
    taus = (
        np.array([80.0, 10.0, 1.0, 0.1, 0.002])
        if process.name == "edm"
        else np.array([1.0, 0.9, 0.5, 0.1, 0.01])
    )
    x_native = np.random.default_rng(1).standard_normal((len(taus), 3)) * 2.0
    a, b = native(process, taus[:, None])
    want = posterior_mean(x_native, a, b)
    x_vp = x_native / np.sqrt(a**2 + b**2)
    fn = process.denoiser(exact_network(process))
    got = fn(None, jnp.asarray(x_vp, jnp.float32), jnp.asarray(taus, jnp.float32), None)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def exact_x0(process, mean=MU):
    """The sampler-side exact x_0 predictor at (x_vp, tau), written directly, of the Gaussian
    with `mean` ([D], or per example [B, D])."""

    def fn(x_vp, tau, labels):
        a, b = process.coefficients(tau)
        a, b = a[:, None], b[:, None]
        return posterior_mean(x_vp * jnp.sqrt(a * a + b * b), a, b, mean)

    return fn


def ode_errors(process, method: str, steps: tuple[int, ...], n: int = 2048) -> list[float]:
    """RMS distance from each sampler run to the float64 probability-flow map of its x_T."""
    key = jax.random.key(0)
    z = np.asarray(jax.random.normal(jax.random.split(key)[0], (n, 3)), np.float64)
    errors = []
    for num_steps in steps:
        tau0 = float(process.levels(num_steps, process.default_spacing("heun"), 7.0)[0])
        (a0,), (b0,) = native(process, [tau0])
        x = z * np.sqrt(a0**2 + b0**2)
        want = MU + np.sqrt(VAR / (a0**2 * VAR + b0**2)) * (x - a0 * MU)
        got = samplers.sample(
            exact_x0(process),
            process,
            (n, 3),
            key,
            method=method,
            num_steps=num_steps,
            prediction="x0",
        )
        errors.append(float(np.sqrt(np.mean((np.asarray(got, np.float64) - want) ** 2))))
    return errors


@pytest.mark.parametrize(
    "process, method, order",
    [
        (EDM, "euler", 1),
        (EDM, "heun", 2),
        (EDM, "dpm++2m", 2),
        (FLOW, "euler", 1),
        (FLOW, "heun", 2),
        (FLOW, "dpm++2s", 2),
    ],
    ids=["edm-euler", "edm-heun", "edm-dpm++2m", "flow-euler", "flow-heun", "flow-dpm++2s"],
)
def test_ode_samplers_converge_to_the_flow_map_with_their_order(process, method, order):
    """Each sampler of the exact model lands on the probability-flow ODE's solution (the
    float64 affine map) with its order: log2(e_n / e_2n) at n = 16, 32, 64 within
    [order - 0.2, order + 0.45], and the 64-step error is small (EDM's rho = 7 sigma grid and
    the paper's Heun, a flow's uniform t with Euler / Heun on t)."""
    errors = ode_errors(process, method, (16, 32, 64))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > order - 0.2) & (orders < order + 0.45)), (errors, orders)
    assert errors[-1] < (0.05 if order == 1 else 5e-3), errors


def test_flow_dpm_solver_equals_euler_as_steps_grow():
    """Interpolant equivalence: DPM-Solver++(2M) through the flow's alpha = 1 - t, sigma = t
    and Euler on t (= DDIM) from the same x_T end within 2e-3 RMS of each other at 512 steps,
    having differed by over 10x that at 16; and a flow's Euler is DDIM step for step."""
    shape, key = (2048, 3), jax.random.key(3)
    kw = dict(prediction="x0")

    def run(method, num_steps):
        return np.asarray(
            samplers.sample(
                exact_x0(FLOW), FLOW, shape, key, method=method, num_steps=num_steps, **kw
            ),
            np.float64,
        )

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    far = rms(run("dpm++2m", 16), run("euler", 16))
    near = rms(run("dpm++2m", 512), run("euler", 512))
    assert near < 2e-3 and far > 10 * near, (far, near)
    np.testing.assert_allclose(run("ddim", 16), run("euler", 16), atol=2e-5)


@pytest.mark.parametrize("process", [EDM, FLOW], ids=["edm", "flow"])
def test_guidance_combines_the_two_predictions(process):
    """Classifier-free guidance on a continuous process: the guided sampler with the exact
    two-class model equals the sampler driven by uncond + s (cond - uncond), written by hand
    (s = 2.5, heun)."""
    means = np.array([[1.0, 0.0, -1.0], [-1.0, 0.5, 0.0]])

    def two_class(x_vp, tau, labels):  # label 2 = "no class": the mean of the two
        mean = jnp.asarray(np.vstack([means, means.mean(0)]), jnp.float32)[labels]
        return exact_x0(process, mean)(x_vp, tau, None)

    labels = jnp.arange(8, dtype=jnp.int32) % 2
    common = dict(method="heun", num_steps=6, prediction="x0")
    guided = samplers.sample(
        two_class,
        process,
        (8, 3),
        jax.random.key(0),
        labels=labels,
        null_label=2,
        guidance_scale=2.5,
        **common,
    )

    def by_hand(x_vp, tau, _):
        cond = two_class(x_vp, tau, labels)
        uncond = two_class(x_vp, tau, jnp.full_like(labels, 2))
        return uncond + 2.5 * (cond - uncond)

    want = samplers.sample(by_hand, process, (8, 3), jax.random.key(0), **common)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_sampler_options_a_process_refuses():
    with pytest.raises(ValueError, match="spacing='leading': a edm process's levels are"):
        samplers.sample(exact_x0(EDM), EDM, (2, 3), jax.random.key(0), spacing="leading")
    with pytest.raises(ValueError, match="churn needs a VE ODE, not a flow process"):
        samplers.sample(exact_x0(FLOW), FLOW, (2, 3), jax.random.key(0), method="heun", churn=1)


def _samples_and_inpaints(config, workdir: str) -> None:
    """`--mode=sample` (20 images of the tiny config) and `--mode=inpaint` on a trained run."""
    png = generate.sample_from_workdir(config, workdir)
    images = np.load(png.replace(".png", ".npz"))["images"]
    assert images.shape == (20, 16, 16, 1) and images.std() > 0
    config.edit.num_samples = 2
    assert os.path.isfile(editing.edit_from_workdir(config, workdir, "inpaint"))


def _saved_params(workdir: str, step: int):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_default_process_learns_beyond_the_best_affine_velocity(tmp_path):
    """The default (flow) process end to end at a tiny size, checked for learning: 120 steps
    of the tiny run (batch 8), then its network's velocity v^ = F(x_t, 1000 t, label) on 2000
    fresh (x_0, t, eps) from the *test* digits, t = (i + 1/2) / 20 for i < 20 (100 draws
    each), must beat the best per-pixel affine velocity that knows only the training data's
    mean m and variance v: with x_t = (1 - t) x_0 + t eps and x_0 ~ N(m, v),
    E[x_0 | x_t] = m + (1 - t) v (x_t - (1 - t) m) / ((1 - t)^2 v + t^2) and
    E[eps | x_t] = (x_t - (1 - t) E[x_0 | x_t]) / t. Scored on the same draws, the
    per-example difference of the two squared errors has standard error std / sqrt(2000), and
    the network must be better by more than 4 of them (measured: mean -0.41, SE 0.008, the
    network's error 0.48 against the affine 0.90; 60 steps of a cosine schedule were still
    worse than the affine, by 0.11, at high t). What this cannot catch: whether samples look
    like the digit asked for (120 steps of a 16x16 network are far from that; the README's
    99 % comes from `bench.objectives`) nor a subtle error in the sampler
    (tests/test_samplers.py).

    The run also logs, draws its grid, samples with the recipe's sampler (Heun, 3 steps),
    inpaints, and its eval reports the probability-flow ODE's bits/dim with its error bar and
    function evaluations (no discrete bound: that is the ddpm process's; the ODE's figures
    themselves: tests/test_likelihood.py); its train step compiles once; the workdir refuses
    a ddpm config on resume."""
    config = tiny_config(
        num_steps=120, log_every=20, learning_rate=3e-3, checkpoint_every=120, sample_every=120
    )
    config.diffusion.process = "flow"
    config.sample.method, config.sample.num_steps = "heun", 3
    workdir = str(tmp_path)
    final = train.train_and_evaluate(config, workdir)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [20, 40, 60, 80, 100, 120]
    assert final["loss"] == lines[-1]["loss"]
    assert (tmp_path / "samples" / "step_0000120.png").exists()
    assert os.listdir(tmp_path / "tensorboard")
    assert json.loads((tmp_path / "config.json").read_text())["diffusion"]["process"] == "flow"

    train_images, _ = classifier.load_split(config, "train")
    m, v = float(train_images.mean()), float(train_images.var())
    test_images, test_labels = classifier.load_split(config, "test", limit=500)
    rng = np.random.default_rng(0)
    n = 2000
    rows = rng.choice(len(test_images), n)
    x0 = test_images[rows].astype(np.float64)
    t = ((np.arange(n) % 20 + 0.5) / 20).reshape(-1, 1, 1, 1)
    eps = rng.standard_normal(x0.shape)
    x_t = (1 - t) * x0 + t * eps
    x0_mean = m + (1 - t) * v * (x_t - (1 - t) * m) / ((1 - t) ** 2 * v + t**2)
    affine = (x_t - (1 - t) * x0_mean) / t - x0_mean
    model = create_model(config)
    params = _saved_params(workdir, 120)
    net = jax.jit(model.apply)(
        {"params": params}, x_t.astype(np.float32), 1000.0 * t.ravel(), test_labels[rows]
    )
    target = eps - x0
    per_example = lambda pred: np.mean((np.asarray(pred, np.float64) - target) ** 2, (1, 2, 3))
    gain = per_example(net) - per_example(affine)
    assert gain.mean() < -4 * gain.std(ddof=1) / np.sqrt(n), (gain.mean(), gain.std())

    # The jitted step compiles once for repeated calls with new states and batches.
    objective, step_fn, state, mesh = step_parts(config)
    for i in range(3):
        batch = {
            "image": jax.random.uniform(jax.random.key(i), (8, 16, 16, 1), minval=-1, maxval=1),
            "label": jnp.arange(8, dtype=jnp.int32) % 10,
        }
        state, metrics = step_fn(state, sharding.global_batch(batch, mesh), objective.frozen)
    assert int(state.step) == 3 and bool(metrics["finite"])
    assert step_fn._cache_size() == 1

    _samples_and_inpaints(config, workdir)
    config.eval.metrics = ("bpd",)
    config.eval.bpd_ode_examples, config.eval.batch_size = 6, 3
    config.eval.bpd_ode_tolerance = 1e-3
    results = evaluate.evaluate(config, workdir)
    assert "bpd" not in results and results["bpd_ode_examples"] == 6
    assert np.isfinite(results["bpd_ode"]) and results["bpd_ode_stderr"] > 0
    assert results["bpd_ode_nfe"] >= 7  # at least one Dopri5 step
    with pytest.raises(UserError, match="diffusion.process"):
        train.train_and_evaluate(tiny_config(num_steps=8), workdir)


def test_tiny_edm_run_trains_samples_and_edits(tmp_path):
    """The EDM recipe's path at a tiny size: 4 steps train, draw the grid, sample with Heun
    and inpaint."""
    config = tiny_config(num_steps=4, sample_every=4, checkpoint_every=4)
    config.diffusion.process = "edm"
    config.sample.method, config.sample.num_steps = "heun", 3
    train.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "samples" / "step_0000004.png").exists()
    _samples_and_inpaints(config, str(tmp_path))


def test_recipes():
    """configs/mnist_edm.py and mnist_flow.py validate as they are; the CIFAR-10 recipes hold
    EDM's table 7 arithmetic: the DDPM++-size U-Net (56.5M parameters; the paper's 55.7M),
    200M images of batch 512, a 10M-image warmup and an EMA whose half-life is 0.5M images."""
    for recipe, process in ((mnist_edm, "edm"), (mnist_flow, "flow")):
        config = recipe.get_config()
        validation.validate(config)
        assert config.diffusion.process == process
    for recipe, process in ((cifar10_edm, "edm"), (cifar10_flow, "flow")):
        config = recipe.get_config()
        validation.check_known_fields(config)
        assert config.diffusion.process == process
        t = config.training
        assert abs(t.num_steps * t.batch_size - 200e6) < t.batch_size
        assert abs(t.warmup_steps * t.batch_size - 10e6) < t.batch_size
        assert abs(t.ema_decay ** (0.5e6 / t.batch_size) - 0.5) < 0.005
        net = build.model(config, (32, 32, 3))
        params = build.abstract_params(config, net, (32, 32, 3))
        count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
        assert 56.5e6 < count < 56.6e6, count
