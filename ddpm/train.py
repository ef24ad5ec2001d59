"""Training: TrainState, one jitted data-parallel train step over any objective, and the loop.

`train_and_evaluate(config, workdir)` is the whole job: validate the config, build the
objective (`ddpm.objectives`), the mesh and the data, restore the latest checkpoint of
`workdir` if any, then step, log, checkpoint and draw sample grids until
`config.training.num_steps`. Nothing here knows which objective or network it trains.
"""

import collections
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
from jax.experimental import multihost_utils

from ddpm import (
    build,
    checkpoint,
    conditioning,
    data,
    objectives,
    phema,
    posthoc_ema,
    runtime,
    sharding,
)
from ddpm.config import runs, validation
from ddpm.errors import UserError
from ddpm.objectives import Objective
from ddpm.run_logging import RunLogger

# Train steps dispatched ahead of the host: enough to overlap data loading with compute,
# few enough that a stop request is served within a step or two.
MAX_STEPS_IN_FLIGHT = 2


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, so jit/orbax/shardings treat it as data.

    step: [] int32, number of updates done. rng: [2] uint32, base key data; step s draws with
    fold_in(rng, s). ema_params: float32 exponential moving average of params. carry: what the
    objective carries between steps (`Objective.init_carry`; None for most). phema: the
    float32 power-function EMAs of config.phema.track, a tuple of params-like trees (None
    when none are tracked).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    carry: Any = None
    phema: Any = None


def create_train_state(
    rng: jax.Array, objective: Objective, tx: optax.GradientTransformation
) -> TrainState:
    """Initial parameters (EMA starts equal to them) and optimizer state.  Pure: jit it.

    rng: a threefry key; parameters are drawn with a key of `config.runtime.init_key`'s kind
    derived from it (`ddpm.runtime.init_key`), the training key stays threefry, whose draws do
    not depend on how the batch is sharded.
    """
    init_rng, train_rng = jax.random.split(rng)
    params = objective.init_params(init_rng)
    ema = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    track = objective.config.phema.track
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=ema,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_rng),
        carry=objective.init_carry(params),
        phema=tuple(ema for _ in track) if track else None,
    )


def abstract_train_state(
    objective: Objective, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """`create_train_state`'s output as `jax.ShapeDtypeStruct`s with their shardings on `mesh`.

    Nothing is computed. The shardings follow `sharding.state_shardings` (params, EMA and
    optimizer moments split over the mesh's `fsdp` axis, small arrays replicated): the layout
    the train step, `init_train_state` and checkpoint restores (onto any topology) share.
    """
    init = functools.partial(create_train_state, objective=objective, tx=tx)
    shapes = jax.eval_shape(init, jax.random.key(0))
    min_size = objective.config.training.fsdp_min_size
    shardings = sharding.state_shardings(shapes, mesh, min_size)
    return jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings
    )


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf.sharding, tree)


def init_train_state(
    rng: jax.Array, objective: Objective, tx: optax.GradientTransformation, mesh
) -> TrainState:
    """`create_train_state` compiled and placed on `mesh` as `abstract_train_state` says."""
    init = functools.partial(create_train_state, objective=objective, tx=tx)
    out_shardings = _shardings(abstract_train_state(objective, tx, mesh))
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
    frozen: Any,
    *,
    objective: Objective,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update: the objective's loss, grads, optax update and EMA, in one compiled function.

    batch: {"image": [B, ...] float32 in [-1, 1], "label": [B] int32}; frozen: what the
    objective keeps fixed (`objective.frozen`). The objective may first reset the state (a
    new distillation round: `Objective.begin_step`). A non-finite loss or gradient leaves the
    state unchanged and reports metrics["finite"] = False; the host reads it at log steps.
    """
    training = objective.config.training
    state = objective.begin_step(state, frozen, tx)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, frozen, batch, rng, state.carry
    )
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decay = ema_decay_at(state.step, training.ema_decay, training.ema_warmup)
    updated = tx.has_updated(opt_state) if training.grad_accum_steps > 1 else True

    def average(ema: Any, decay: jax.Array) -> Any:
        decay = jnp.where(updated, decay, 1.0)  # average only the params of real updates
        return jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params
        )

    ema_params = average(state.ema_params, decay)
    power_emas = state.phema
    if power_emas is not None:
        updates_before = state.step // training.grad_accum_steps
        power_emas = tuple(
            average(ema, phema.beta(phema.gamma_of(width), updates_before))
            for ema, width in zip(power_emas, objective.config.phema.track, strict=True)
        )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        rng=state.rng,
        carry=state.carry,
        phema=power_emas,
    )
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": lr_fn(state.step // training.grad_accum_steps),
        "finite": finite,
        **aux,
    }
    return new_state, metrics


def make_train_step(
    objective: Objective,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    mesh: jax.sharding.Mesh,
) -> Callable[..., tuple[TrainState, dict]]:
    """`train_step` jitted once for `mesh`: `fn(state, batch, frozen)`.

    The batch is split over all devices, the state laid out as `abstract_train_state` says
    (replicated, or split over `fsdp`), the frozen parameters and the metrics replicated.
    """
    step = functools.partial(train_step, objective=objective, tx=tx, lr_fn=lr_fn)
    state_shardings = _shardings(abstract_train_state(objective, tx, mesh))
    return runtime.jit(
        step,
        objective.speed.compiler_options,
        in_shardings=(state_shardings, sharding.batch_sharded(mesh), sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


class _StopRequest:
    """SIGTERM / SIGINT as a request the loop checks every step, so it can save and exit.

    One process: a Python handler records the signal. Several processes: SIGTERM stays with
    JAX's preemption service, which spreads one process's notice to all and picks a step every
    process reaches (`multihost_utils.reached_preemption_sync_point`), so all of them save the
    same checkpoint collectively and exit; SIGINT is turned into a SIGTERM to join it.
    """

    def __init__(self):
        self.reason: str | None = None
        self._multihost = jax.process_count() > 1
        self._previous = {}

    def __enter__(self):
        if self._multihost:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.reason = signal.Signals(signum).name

    def _forward(self, signum, frame):
        del signum, frame
        os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (every process of a job calls this at every step)."""
        if self._multihost and multihost_utils.reached_preemption_sync_point(step):
            self.reason = "preemption notice (SIGTERM), on every process"
        return self.reason is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteError(UserError, FloatingPointError):
    """A train step produced a non-finite loss or gradient (lower the learning rate, clip
    harder, check the data)."""


def _restore_or_init(ckpt, state, data_iter) -> TrainState:
    step = ckpt.latest_step()
    if step is None:
        return state
    if step == 0:  # imported weights (--mode=import): fine-tune from them
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state.ema_params
        )
        ema = ckpt.restore_ema(0, target)
        params = jax.tree.map(lambda e, p: jnp.array(e, p.dtype, copy=True), ema, state.params)
        print(f"Starting from the imported weights in {ckpt.directory}/0", flush=True)
        return state.replace(params=params, ema_params=ema)
    state, data_state = ckpt.restore(step, state)
    data_iter.set_state(data_state)
    print(f"Resumed from checkpoint at step {step} in {ckpt.directory}", flush=True)
    return state


def _write_run_files(config: ml_collections.ConfigDict, workdir: str, class_names) -> None:
    runs.write_config(config, workdir)
    if class_names is not None:
        with open(os.path.join(workdir, "class_names.json"), "w") as f:
            json.dump(class_names, f, indent=1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); final metrics.

    Writes `config.json`, `checkpoints/`, `tensorboard/`, `metrics.jsonl` and `samples/`.
    SIGTERM / SIGINT (from the start on) save a checkpoint at the current step and return.
    """
    with _StopRequest() as stop:
        return _train(config, workdir, stop)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: _StopRequest) -> dict:
    info = validation.validate(config)
    runs.check_resumable(config, workdir, training=True)
    conditioning.check_captions(config, info)
    mesh = build.mesh(config)
    global_batch = config.training.batch_size
    per_device = sharding.per_device_batch_size(global_batch, mesh, "config.training.batch_size")
    objective = objectives.create(config, workdir=workdir, mesh=mesh, training=True)
    config = objective.config  # completed by the objective (latent: the scale factor)
    captions = conditioning.caption_table(config, info)  # encoded once
    training = config.training
    if training.sample_every:
        grid_images, grid_cols = objective.training_grid(
            jax.random.fold_in(jax.random.key(config.seed), 1)
        )
    is_main = jax.process_index() == 0
    if is_main:
        _write_run_files(config, workdir, info.class_names)
    print(
        f"Devices: {mesh.devices.size} ({jax.devices()[0].platform}), processes: "
        f"{jax.process_count()}; global batch {global_batch}, per device {per_device}; "
        f"objective {config.objective}, {objective.speed}",
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
    tx, lr_fn = build.optimizer(training)
    state = init_train_state(jax.random.key(config.seed), objective, tx, mesh)
    ckpt = checkpoint.Checkpointer(
        workdir, keep=training.keep_checkpoints, save_async=objective.speed.async_checkpoint
    )
    state = _restore_or_init(ckpt, state, data_iter)
    step_fn = make_train_step(objective, tx, lr_fn, mesh)
    frozen = objective.frozen
    step = int(state.step)
    logger = RunLogger(
        workdir, training.num_steps, step, log_every=training.log_every, enabled=is_main
    )
    snapshots = (
        posthoc_ema.SnapshotWriter(workdir, config.phema.track, config.phema.snapshot_every, step)
        if state.phema is not None
        else None
    )
    config_json = json.loads(config.to_json_best_effort())
    pending: collections.deque = collections.deque()  # (step, device metrics) not yet read
    last_metrics: dict[str, float] = {}

    def read_metrics() -> dict[str, float]:
        """The host reads the pending steps' metrics (one transfer) and stops at the first
        non-finite one, before anything of it is saved."""
        host = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        pending.clear()
        averages: dict[str, float] = {}
        for s, m in zip(steps, host, strict=True):
            if not m["finite"]:
                raise NonFiniteError(
                    f"Non-finite loss or gradient at step {s} (loss={m['loss']}, grad_norm="
                    f"{m['grad_norm']}); stopped without saving it. The last good checkpoint is "
                    f"step {ckpt.latest_step()} in {ckpt.directory}."
                )
            averages = logger.log_step(s, m) or averages
        return averages

    try:
        while step < training.num_steps:
            batch = conditioning.attach_captions(next(data_iter), captions)
            batch = sharding.global_batch(batch, mesh)
            state, metrics = step_fn(state, batch, frozen)
            step += 1
            pending.append((step, metrics))
            logger.advance()
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1][1])
            stopping = stop.requested(step)
            done = step == training.num_steps
            stage_end = objective.ends_stage(step)
            save = step % training.checkpoint_every == 0 or done or stopping or stage_end
            grid = training.sample_every and (
                step % training.sample_every == 0 or done or stage_end
            )
            if save or grid or step % training.log_every == 0:
                last_metrics = read_metrics() or last_metrics
            if save:
                ckpt.save(step, state, data_iter.get_state(), config_json)
                if is_main:
                    objective.export(workdir, state.ema_params)
            if snapshots is not None:
                snapshots.maybe_save(step, state.phema, last=done)
            if grid:
                images = sharding.to_host(grid_images(state.ema_params, step), mesh)
                logger.write_grid(step, images, grid_cols)
            if stopping:
                print(f"{stop.reason}: saved checkpoint at step {step}; exiting.", flush=True)
                break
    finally:
        ckpt.close()
        logger.close()
        if snapshots is not None:
            snapshots.close()
    return last_metrics
