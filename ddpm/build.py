"""config -> the parts of a run: runtime, mesh, noise process, model, optimizer, sampler, and the
EMA parameters of a trained workdir.

Every mode builds what it needs here (training, sampling, editing, evaluation, sweeps,
benchmarks), so none of them imports the trainer. Objectives (`ddpm.objectives`) compose
these parts into a loss and a sampler.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm import (
    checkpoint,
    conditioning,
    models,
    posthoc_ema,
    processes,
    runtime,
    samplers,
    sharding,
)
from ddpm.config import runs
from ddpm.errors import UserError


def run_runtime(config: ml_collections.ConfigDict) -> runtime.Runtime:
    """`config.runtime` resolved for this process's devices."""
    return runtime.resolve(config.runtime)


def mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp) mesh over `devices` (default: every device), split as
    `config.training.fsdp` says."""
    return sharding.create_mesh(devices, fsdp=config.training.fsdp)


def process(config: ml_collections.ConfigDict) -> processes.Process:
    """The noise process of `config.diffusion` (`diffusion.process`: ddpm, edm, flow, vpsde)."""
    return processes.create(config.diffusion, config.model.get("learn_sigma", False))


def model(
    config: ml_collections.ConfigDict, input_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """The network of `config.model` for inputs of `input_shape` (default: what the config
    trains on, `ddpm.config.runs.input_shape`: the data's shape, or latent diffusion's)."""
    shape = runs.input_shape(config) if input_shape is None else input_shape
    return models.create_model(config, shape)


def abstract_params(config: ml_collections.ConfigDict, net: nn.Module, shape) -> Any:
    """`net`'s parameters as float32 `jax.ShapeDtypeStruct`s (the EMA's layout); nothing is
    computed."""
    inputs = models.init_inputs(config, shape)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), *inputs)["params"])
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)


def optimizer(
    training: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax chain: global-norm clip -> Adam(W) with linear warmup then constant or cosine LR.

    Wrapped in `optax.MultiSteps` when `grad_accum_steps > 1` (the LR schedule then counts
    real updates).
    """
    warmup = max(training.warmup_steps, 0)
    lr = training.learning_rate
    if training.lr_schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(
            0.0,
            lr,
            max(warmup, 1),
            max(training.num_steps // training.grad_accum_steps, warmup + 1),
        )
    else:
        lr_fn = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if training.optimizer == "adamw":
        opt = optax.adamw(lr_fn, b2=training.adam_b2, weight_decay=training.weight_decay)
    else:
        opt = optax.adam(lr_fn, b2=training.adam_b2)
    tx = optax.chain(optax.clip_by_global_norm(training.grad_clip), opt)
    if training.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=training.grad_accum_steps)
    return tx, lr_fn


@dataclasses.dataclass(frozen=True)
class Guide:
    """The weaker model of autoguidance (config.sample.guide, loaded by `ddpm.autoguide`):
    its `apply(variables, x_t, t, cond, train=False)`, its noise process (the run's, maybe
    with another network) and its EMA parameters, laid out like the run's."""

    apply: Callable[..., jax.Array]
    process: processes.Process
    params: Any


def sampler(
    config: ml_collections.ConfigDict,
    apply_fn: Callable[..., jax.Array],
    noise_process: processes.Process,
    shape: tuple[int, ...],
    mesh: jax.sharding.Mesh | None = None,
    guide: Guide | None = None,
    **edit: Any,
) -> Callable[..., jax.Array]:
    """Jitted `fn(params, rng, cond, **arrays) -> [*shape] float32` with the method, steps and
    guidance of config.sample; `apply_fn(variables, x_t, t, cond, train=False)` is the model's.
    With `guide` (config.sample.guide, `ddpm.autoguide`), guidance_scale is autoguidance's
    scale: the weaker model replaces the unconditional branch.
    On `mesh`, a batch that divides the device count is split over the devices
    (`sharding.sample_sharding`), each device drawing its rows; the samples are the same.

    cond: the conditioning pytree of shape[0] examples (`ddpm.conditioning`), or None.
    `edit`: static editing options of `samplers.sample` (strength, jump_length, resample);
    fn then takes its editing arrays as keywords (known, mask, init).
    """
    s = config.sample
    null = models.null_label(config)
    # A guidance-distilled network takes the scale as an input: one call per step.
    embedded = config.model.get("guidance_embed", False)
    guidance = (null is not None or guide is not None) and s.guidance_scale != 1.0
    guidance = guidance and not embedded

    def net_fn(params, inputs, time, cond):
        return apply_fn({"params": params}, inputs, time, cond, train=False)

    def guide_fn(params, inputs, time, cond):
        return guide.apply({"params": params}, inputs, time, cond, train=False)

    sample = samplers.make_sampler(
        noise_process.denoiser(net_fn),
        noise_process,
        shape,
        method=s.method,
        num_steps=s.num_steps,
        eta=s.eta,
        spacing=s.spacing,
        guidance=guidance,
        null_label=null,
        prediction=noise_process.prediction,
        clip_x0=s.clip_x0,
        dynamic_threshold=s.dynamic_threshold,
        variance="learned" if noise_process.learned_variance else s.variance,
        churn=s.churn,
        batch_sharding=None if mesh is None else sharding.sample_sharding(mesh, shape[0]),
        guide_model_fn=guide.process.denoiser(guide_fn) if guidance and guide else None,
        compiler_options=run_runtime(config).compiler_options,
        **edit,
    )
    if guidance and guide is not None:
        scale = jnp.float32(s.guidance_scale)
        return lambda params, rng, cond, **arrays: sample(
            (params, guide.params), rng, cond, scale, **arrays
        )
    if embedded:
        scale = jnp.float32(s.guidance_scale)
        return lambda params, rng, cond, **arrays: sample(
            params, rng, conditioning.with_guidance(cond, scale), None, **arrays
        )
    scale = jnp.float32(s.guidance_scale) if guidance else None
    return lambda params, rng, cond, **arrays: sample(params, rng, cond, scale, **arrays)


def placed_params(
    config: ml_collections.ConfigDict, net: nn.Module, shape: tuple[int, ...], where
) -> Any:
    """The float32 parameters' `jax.ShapeDtypeStruct`s with the shardings training gives them
    on `where` (replicated, or split over config.training.fsdp devices)."""
    target = abstract_params(config, net, shape)
    shardings = sharding.state_shardings(target, where, config.training.fsdp_min_size)
    return jax.tree.map(
        lambda s, w: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=w), target, shardings
    )


def restore_ema(
    config: ml_collections.ConfigDict,
    workdir: str,
    net: nn.Module,
    shape: tuple[int, ...],
    where: jax.sharding.Mesh,
    step: int | None = None,
) -> tuple[Any, int]:
    """(EMA parameters, step) of the latest checkpoint of `workdir` (or of checkpoint `step`),
    laid out on `where` as training lays them out (replicated, or split over
    config.training.fsdp devices): `restore_ema_into` the network's parameters."""
    return restore_ema_into(config, workdir, placed_params(config, net, shape, where), step)


def restore_ema_into(
    config: ml_collections.ConfigDict, workdir: str, target: Any, step: int | None = None
) -> tuple[Any, int]:
    """(EMA parameters, step) of the latest checkpoint of `workdir` (or of checkpoint `step`),
    placed as `target` (`jax.ShapeDtypeStruct`s with shardings) says.

    Only the EMA subtree is read (an orbax partial restore), so neither the optimizer section
    nor the devices need to match the run that wrote it. No checkpoint: a UserError. With
    config.phema.sigma_rel (and no `step`): that post-hoc EMA at the latest snapshot
    (`ddpm.posthoc_ema`).
    """
    if config.phema.sigma_rel is not None and step is None:
        return posthoc_ema.restore(workdir, config.phema.sigma_rel, target)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints, create=False)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise UserError(
                f"no checkpoint in {ckpt.directory}; train first: python main.py "
                f"--config=<config> --workdir={workdir}"
            )
        if step is not None and step not in ckpt.all_steps():
            raise UserError(
                f"no checkpoint of step {step} in {ckpt.directory}; it holds steps "
                f"{', '.join(map(str, ckpt.all_steps()))} (training.keep_checkpoints keeps the "
                "latest ones)"
            )
        step = latest if step is None else step
        return ckpt.restore_ema(step, target), step
    finally:
        ckpt.close()
