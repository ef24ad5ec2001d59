"""Training: TrainState, the jitted data-parallel train step, and the loop around it.

`train_and_evaluate(config, workdir)` is the whole job: validate the config, build the mesh,
model, optimizer and data, restore the latest checkpoint of `workdir` if any, then step,
log, checkpoint and draw sample grids until `config.training.num_steps`.
"""

import functools
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm import (
    checkpoint,
    conditioning,
    config_check,
    data,
    diffusion,
    latent,
    models,
    samplers,
    sharding,
)
from ddpm.run_logging import RunLogger
from ddpm.schedules import Schedule, get_schedule


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, so jit/orbax/shardings treat it as data.

    step: [] int32, number of updates done. rng: [2] uint32, base key data; step s draws with
    fold_in(rng, s). ema_params: float32 exponential moving average of params.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def make_optimizer(
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


def create_train_state(
    rng: jax.Array, config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation
) -> TrainState:
    """Initial parameters (EMA starts equal to them) and optimizer state.  Pure: jit it.

    rng: a threefry key. Parameters are drawn with an "rbg" key derived from it: XLA compiles
    the initialisers of a U-Net 3-4x faster with it on CPU (20 s -> 5.5 s for a tiny model),
    and init is replicated, so rbg's dependence on sharding does not matter. The training key
    stays threefry, whose draws do not depend on how the batch is sharded.
    """
    init_rng, train_rng = jax.random.split(rng)
    init_rng = jax.random.wrap_key_data(jax.random.bits(init_rng, (4,), jnp.uint32), impl="rbg")
    params = model.init(init_rng, *models.init_inputs(config))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), params),
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_rng),
    )


def abstract_train_state(
    config: ml_collections.ConfigDict, model, tx, mesh: jax.sharding.Mesh
) -> TrainState:
    """`create_train_state`'s output as `jax.ShapeDtypeStruct`s with their shardings on `mesh`.

    Nothing is computed. The shardings follow `sharding.state_shardings` (params, EMA and
    optimizer moments split over the mesh's `fsdp` axis, small arrays replicated): the layout
    the train step, `init_train_state` and checkpoint restores (onto any topology) share.
    """
    init = functools.partial(create_train_state, config=config, model=model, tx=tx)
    shapes = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.state_shardings(shapes, mesh, config.training.fsdp_min_size)
    return jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings
    )


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf.sharding, tree)


def init_train_state(
    rng: jax.Array, config: ml_collections.ConfigDict, model, tx, mesh: jax.sharding.Mesh
) -> TrainState:
    """`create_train_state` compiled and placed on `mesh` as `abstract_train_state` says."""
    init = functools.partial(create_train_state, config=config, model=model, tx=tx)
    out_shardings = _shardings(abstract_train_state(config, model, tx, mesh))
    return jax.jit(init, out_shardings=out_shardings)(rng)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay at `step`; with warmup min(decay, (1 + step) / (10 + step)) as in TF's EMA."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    frozen: Any = None,
    *,
    model,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    schedule: Schedule,
    config: ml_collections.ConfigDict,
    autoencoder=None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update: loss, grads, optax update and EMA, all in one compiled function.

    batch: {"image": [B, H, W, C] float32 in [-1, 1], "label": [B] int32}. A non-finite loss or
    gradient leaves the state unchanged and reports metrics["finite"] = False.
    The objective: the autoencoder loss for `config.model.name == "autoencoder"` (stage 1 of
    latent diffusion), else the diffusion loss, on the images, or (latent diffusion) on their
    latents under the frozen `autoencoder` with parameters `frozen`.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    label_rng, loss_rng = jax.random.split(rng)
    labels = conditioning.drop(  # class labels, text conditioning or None
        config, conditioning.batch_cond(config, batch), label_rng, config.training.label_dropout
    )

    def apply_fn(params, x_t, t, dropout_rng):
        return model.apply(
            {"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_rng}
        )

    x0 = batch["image"]
    if autoencoder is not None:
        x0 = latent.encode_latents(
            autoencoder,
            frozen,
            x0,
            jax.random.fold_in(rng, 2),
            scale_factor=config.latent.scale_factor,
            sample_posterior=config.latent.sample_posterior,
        )
    if config.model.name == "autoencoder":
        (loss, aux), grads = jax.value_and_grad(latent.autoencoder_loss, has_aux=True)(
            state.params,
            model,
            x0,
            loss_rng,
            recon_loss=config.latent.recon_loss,
            kl_weight=config.latent.kl_weight,
        )
    else:
        (loss, _), grads = jax.value_and_grad(diffusion.loss, has_aux=True)(
            state.params,
            apply_fn,
            schedule,
            x0,
            loss_rng,
            prediction=config.diffusion.prediction,
            weighting=config.diffusion.loss_weighting,
            min_snr_gamma=config.diffusion.min_snr_gamma,
            learned_variance=config.model.learn_sigma,
        )
        aux = {}
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decay = ema_decay_at(state.step, config.training.ema_decay, config.training.ema_warmup)
    if config.training.grad_accum_steps > 1:  # average only the params of real updates
        decay = jnp.where(tx.has_updated(opt_state), decay, 1.0)
    ema_params = jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), state.ema_params, params
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        rng=state.rng,
    )
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    accum = config.training.grad_accum_steps
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": lr_fn(state.step // accum),
        "finite": finite,
        **aux,
    }
    return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    autoencoder=None,
) -> Callable[..., tuple[TrainState, dict]]:
    """`train_step` jitted once for `mesh`: `fn(state, batch)`, or for latent diffusion (the
    stage-1 `autoencoder` given) `fn(state, batch, frozen_params)`.

    The batch is split over all devices, the state laid out as `abstract_train_state` says
    (replicated, or split over `fsdp`), the frozen parameters and the metrics replicated.
    """
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        lr_fn=lr_fn,
        schedule=schedule,
        config=config,
        autoencoder=autoencoder,
    )
    state_shardings = _shardings(abstract_train_state(config, model, tx, mesh))
    frozen = () if autoencoder is None else (sharding.replicated(mesh),)
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharded(mesh), *frozen),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteError(FloatingPointError):
    """Raised when a train step produces a non-finite loss or gradient."""


def grid_labels(config: ml_collections.ConfigDict) -> tuple[Any, int]:
    """The condition of a sample grid (labels [num_samples] int32, a text conditioning dict, or
    None if unconditional) and its column count: see `conditioning.grid_cond`.

    Conditional models without `config.sample.labels` get one row per class, ceil(num_samples
    / num_classes) columns wide (the last classes miss out when num_samples is too small).
    """
    cond, cols, _ = conditioning.grid_cond(config)
    return cond, cols


def make_grid_sampler(
    config: ml_collections.ConfigDict,
    model,
    schedule: Schedule,
    num: int,
    stage1: latent.Stage1 | None = None,
    **edit: Any,
) -> Callable[..., jax.Array]:
    """Jitted `fn(params, rng, labels) -> [num, H, W, C]` with the method/guidance of config.sample.

    labels: [num] int32, or None for unconditional models. Latent diffusion (`stage1` given):
    the sampler runs in latent space and its output is decoded by the stage-1 decoder.
    `edit`: static editing options of `samplers.sample` (strength, jump_length, resample; not
    with stage1); fn then takes its editing arrays as keywords (known, mask, init).
    """
    s = config.sample
    shape = (num, *models.input_shape(config))
    guidance = models.null_label(config) is not None and s.guidance_scale != 1.0

    def model_fn(params, x_t, t, labels):
        return model.apply({"params": params}, x_t, t, labels, train=False)

    sampler = samplers.make_sampler(
        model_fn,
        schedule,
        shape,
        method=s.method,
        num_steps=s.num_steps,
        eta=s.eta,
        spacing=s.spacing,
        guidance=guidance,
        null_label=models.null_label(config),
        prediction=config.diffusion.prediction,
        clip_x0=s.clip_x0,
        dynamic_threshold=s.dynamic_threshold,
        variance="learned" if config.model.learn_sigma else s.variance,
        churn=s.churn,
        **edit,
    )
    scale = jnp.float32(s.guidance_scale) if guidance else None
    if stage1 is None:
        return lambda params, rng, labels, **arrays: sampler(params, rng, labels, scale, **arrays)
    decode = jax.jit(
        functools.partial(
            latent.decode_latents, stage1.model, scale_factor=config.latent.scale_factor
        )
    )
    return lambda params, rng, labels: decode(stage1.params, sampler(params, rng, labels, scale))


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
    d = config.diffusion
    return get_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)


def _restore_or_init(ckpt, state, data_iter) -> TrainState:
    step = ckpt.latest_step()
    if step is None:
        return state
    state, data_state = ckpt.restore(step, state)
    data_iter.set_state(data_state)
    print(f"Resumed from checkpoint at step {step} in {ckpt.directory}", flush=True)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); final metrics.

    Writes `config.json`, `checkpoints/`, `tensorboard/`, `metrics.jsonl` and `samples/`.
    """
    info = config_check.validate(config)
    mesh = sharding.create_mesh(fsdp=config.training.fsdp)
    global_batch = config.training.batch_size
    per_device = sharding.per_device_batch_size(global_batch, mesh, "config.training.batch_size")
    stage1 = latent.load_stage1(config, mesh)  # latent diffusion: the frozen autoencoder
    if stage1 is not None:
        config = latent.with_scale_factor(config, workdir, stage1, estimate=True)
    model = models.create_model(config)
    schedule = build_schedule(config)
    sample_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    if config.model.name == "autoencoder":  # stage 1: held-out inputs above reconstructions
        grid_images, grid_cols = latent.make_reconstruction_grid(config, model)
    else:
        labels, grid_cols = grid_labels(config)
        labels = jax.tree.map(jnp.asarray, labels)
        sample_grid = make_grid_sampler(config, model, schedule, config.sample.num_samples, stage1)

        def grid_images(params):
            return sample_grid(params, sample_rng, labels)

    config_check.check_workdir_compatible(config, workdir)

    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        if info.class_names is not None:
            with open(os.path.join(workdir, "class_names.json"), "w") as f:
                json.dump(info.class_names, f, indent=1)
    print(
        f"Devices: {mesh.devices.size} ({jax.devices()[0].platform}), processes: "
        f"{jax.process_count()}; global batch {global_batch}, per device {per_device}",
        flush=True,
    )

    data_iter = data.create_dataset(
        config,
        "train",
        batch_size=sharding.per_process_batch_size(global_batch),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    tx, lr_fn = make_optimizer(config.training)
    state = init_train_state(jax.random.key(config.seed), config, model, tx, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    state = _restore_or_init(ckpt, state, data_iter)
    step_fn = make_train_step(
        config, model, tx, lr_fn, schedule, mesh, None if stage1 is None else stage1.model
    )
    frozen = () if stage1 is None else (stage1.params,)
    logger = RunLogger(
        workdir,
        config.training.num_steps,
        int(state.step),
        log_every=config.training.log_every,
        enabled=is_main,
    )
    config_json = json.loads(config.to_json_best_effort())

    def save(step: int) -> None:
        ckpt.save(step, state, data_iter.get_state(), config_json)

    def draw_grid(step: int) -> None:
        images = sharding.to_host(grid_images(state.ema_params), mesh)
        logger.write_grid(step, images, grid_cols)

    step = int(state.step)
    last_metrics: dict[str, float] = {}
    try:
        with _StopRequest() as stop:
            while step < config.training.num_steps:
                batch = sharding.global_batch(next(data_iter), mesh)
                state, metrics = step_fn(state, batch, *frozen)
                metrics = jax.device_get(metrics)
                if not metrics["finite"]:
                    raise NonFiniteError(
                        f"Non-finite loss or gradient at step {step + 1} (loss={metrics['loss']}, "
                        f"grad_norm={metrics['grad_norm']}); stopped without saving it. The last "
                        f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}."
                    )
                step += 1
                last_metrics = logger.log_step(step, metrics)
                done = step == config.training.num_steps
                if step % config.training.checkpoint_every == 0 or done or stop.signal_name:
                    save(step)
                if step % config.training.sample_every == 0 or done:
                    draw_grid(step)
                if stop.signal_name:
                    print(
                        f"{stop.signal_name}: saved checkpoint at step {step}; exiting.", flush=True
                    )
                    break
    finally:
        ckpt.close()
        logger.close()
    return last_metrics
