"""A tiny run config shared by the training tests: seconds per run on a 2-core CPU."""

import os
import signal
import time

import jax
import ml_collections

from ddpm import build, objectives, sharding, train
from ddpm.config import presets, validation


def tiny_config(**training) -> ml_collections.ConfigDict:
    """mnist5k at 16x16, a tiny class-conditional U-Net (one level, no attention), a 5-step
    sampler.

    One level: every jitted program of the tests (train step, samplers, eval) traces, lowers
    and compiles about a third faster than with two (8 residual blocks -> 5), and most of the
    suite's time is that; two levels' down- and upsampling: tests/test_unet.py,
    tests/test_package.py."""
    config = presets.mnist_ddpm()
    config.data.image_size = 16
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.num_groups = 8, (1,), 1, 4
    m.attention_resolutions, m.mid_attention, m.dropout = (), False, 0.1
    config.diffusion.num_timesteps = 100
    # Plain eps-MSE: a fresh (zero-output) model has loss E[eps^2] = 1, which tests rely on.
    config.diffusion.prediction, config.diffusion.loss_weighting = "eps", "none"
    t = config.training
    t.num_steps, t.batch_size, t.warmup_steps = 20, 8, 2
    # A schedule that does not depend on num_steps: runs of any length share one compiled
    # train step (the suite's persistent compilation cache serves it to every test).
    t.lr_schedule = "constant"
    t.log_every, t.checkpoint_every, t.sample_every = 5, 10, 1000
    t.update(training)
    config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 5, 20, 20
    return config


def step_parts(config: ml_collections.ConfigDict, mesh=None, seed: int = 0):
    """(objective, jitted train step, initial state, mesh) of a validated `config`: the pieces
    `train.train_and_evaluate` builds, for tests that drive the step themselves."""
    validation.validate(config)
    mesh = mesh or sharding.create_mesh(fsdp=config.training.fsdp)
    objective = objectives.create(config, workdir=None, mesh=mesh)
    tx, lr_fn = build.optimizer(config.training)
    step_fn = train.make_train_step(objective, tx, lr_fn, mesh)
    state = train.init_train_state(jax.random.key(seed), objective, tx, mesh)
    return objective, step_fn, state, mesh


def create_model(config: ml_collections.ConfigDict):
    """The network of a validated `config`, as the run layer builds it."""
    validation.validate(config)
    return build.model(config)


def slow_down_steps(seconds: float) -> None:
    """Make every train step of this process wait `seconds` (in batch assembly), so a test can
    signal a subprocess's run between checkpoints."""
    assemble = sharding.global_batch

    def slow_global_batch(*args, **kwargs):
        time.sleep(seconds)
        return assemble(*args, **kwargs)

    sharding.global_batch = slow_global_batch


def preempt_at(step: int, monkeypatch) -> None:
    """Make this process send itself SIGTERM once, while it assembles the batch of train step
    `step` (1-based): a preemption notice mid-run, so `train.train_and_evaluate` saves a
    checkpoint at `step` and returns, with the config, and so the compiled train step, of
    the uninterrupted run (a shorter num_steps would compile another). `monkeypatch`: pytest's
    fixture, which undoes this after the test."""
    assemble = sharding.global_batch
    calls = 0

    def preempting_global_batch(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return assemble(*args, **kwargs)

    monkeypatch.setattr(sharding, "global_batch", preempting_global_batch)
