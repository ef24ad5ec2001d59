"""Few-step students of a diffusion run: progressive distillation (Salimans & Ho, 2022), after
guided distillation (Meng et al., 2023) when `config.distill.guided`.

The teacher is the EMA of the diffusion run in `config.distill.teacher_workdir` (trained or
imported), frozen; the student starts from it. The train state's `carry` holds the current
teacher (the student at the end of the previous round) and the stage, so a run resumes
mid-round exactly; at each stage's first step (`begin_step`) the student, its EMA and the
teacher are reset to the stage's starting point and the optimizer starts afresh. The math is
`ddpm.distillation`; sampling is DDIM on the trailing grid, one network call per step (the
guided student takes the guidance scale as an input).
"""

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from ddpm import (
    build,
    checkpoint,
    conditioning,
    diffusion,
    distillation,
    models,
    processes,
    runtime,
    samplers,
    sharding,
)
from ddpm.config import runs
from ddpm.errors import UserError
from ddpm.objectives.base import Array, Batch
from ddpm.objectives.diffusion import Diffusion

# The diffusion fields a student shares with its teacher (the sampler's grid and the meaning
# of the network's output).
_SHARED_DIFFUSION = (
    "process",
    "schedule",
    "num_timesteps",
    "beta_start",
    "beta_end",
    "prediction",
    "zero_terminal_snr",
)


def teacher_predictor(
    config: ml_collections.ConfigDict,
    process: processes.Process,
    apply_fn: Callable[..., Any],
    params: Any,
    cond: Any,
    scale: Array | None = None,
) -> distillation.TeacherFn:
    """predict(x_t, t, alpha, sigma) -> (x_0, eps) of a network (per-example levels [B]) of
    `process`, with classifier-free guidance at per-example scales `scale` [B] (two calls in
    one batch): the samplers' own model wrapper (`samplers.make_predict`) with the process's
    parameterization and config.sample's x_0 clipping or thresholding."""
    model_fn = process.denoiser(lambda p, x, t, y: apply_fn({"params": p}, x, t, y, train=False))
    predict = samplers.make_predict(
        lambda x, t, y: model_fn(params, x, t, y),
        cond,
        scale,
        prediction=process.prediction,
        clip_x0=config.sample.clip_x0,
        dynamic_threshold=config.sample.dynamic_threshold,
        null_label=models.null_label(config),
        variance="learned" if process.learned_variance else "fixed_small",
    )
    return lambda x, t, alpha, sigma: predict(x, t, alpha, sigma)[:2]


def graft(source: Any, target: Any) -> Any:
    """`target` with every parameter that `source` also has (same path) taken from it: an
    undistilled network's parameters in a guidance-embedding student (whose embedding keeps
    its own zero-initialised output)."""
    flat_source = flax.traverse_util.flatten_dict(source)
    flat = {
        path: flat_source[path].astype(leaf.dtype) if path in flat_source else leaf
        for path, leaf in flax.traverse_util.flatten_dict(target).items()
    }
    return flax.traverse_util.unflatten_dict(flat)


def distilled_steps(config: ml_collections.ConfigDict, step: int) -> int:
    """DDIM steps the student is trained for after `step` train steps (host side): the first
    teacher's during guided stage 1, else the current round's student steps."""
    d = config.distill
    guided_steps = runs.distill_stage1_steps(config)
    if step <= guided_steps and d.guided:
        return d.teacher_steps
    last = runs.distill_rounds(config) - 1
    round_index = min((step - 1 - guided_steps) // d.steps_per_round, last)
    return distillation.student_steps(d.teacher_steps, max(round_index, 0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Distillation(Diffusion):
    """frozen: the teacher run's EMA parameters (None outside training); teacher: its network
    (the student's, without a guidance embedding); grids: every round's teacher grid."""

    teacher: nn.Module
    grids: distillation.Grids
    trained_steps: int | None = None  # train steps of the workdir's latest checkpoint

    @functools.cached_property
    def teacher_apply(self) -> Callable[..., Any]:
        return runtime.wrap(self.teacher.apply, self.speed)

    @property
    def _guided_steps(self) -> int:
        return runs.distill_stage1_steps(self.config)

    def ends_stage(self, step: int) -> bool:
        """Guided stage 1 and every round end in a checkpoint and a sample grid."""
        after = step - self._guided_steps
        return step == self._guided_steps or (
            after > 0 and after % self.config.distill.steps_per_round == 0
        )

    def init_carry(self, params: Any) -> dict[str, Any]:
        """{"teacher": the current teacher's parameters (the student's shape), "round": [] int32,
        "stage1": [] bool}; set at each stage's first step."""
        return {"teacher": params, "round": jnp.int32(0), "stage1": jnp.bool_(False)}

    def begin_step(self, state: Any, frozen: Any, tx: Any) -> Any:
        """At step 0 the student becomes the frozen teacher (grafted into its shape); at the
        first step of each round it becomes its own EMA, which is also the round's teacher. In
        both cases its EMA restarts there and the optimizer state is fresh."""
        d = self.config.distill
        step = state.step
        after = step - self._guided_steps
        first = (step == 0) | ((after >= 0) & (after % d.steps_per_round == 0))
        round_index, stage1 = distillation.stage(step, self._guided_steps, d.steps_per_round)

        def restart() -> Any:
            start = jax.lax.cond(
                step == 0,
                lambda: graft(frozen, state.params),
                lambda: jax.tree.map(
                    lambda e, p: e.astype(p.dtype), state.ema_params, state.params
                ),
            )
            return state.replace(
                params=start,
                ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), start),
                opt_state=tx.init(start),
                carry={"teacher": start, "round": round_index, "stage1": stage1},
            )

        return jax.lax.cond(first, restart, lambda: state)

    def _predictor(
        self, apply_fn: Callable[..., Any], params: Any, cond: Any, scale: Array | None = None
    ) -> distillation.TeacherFn:
        return teacher_predictor(self.config, self.process, apply_fn, params, cond, scale)

    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        """Truncated-SNR-weighted x_0 error of the student against the target of the stage:
        the teacher's guided prediction (stage 1) or the two-teacher-step x~ (a round)."""
        c, d = self.config, self.config.distill
        x0 = batch["image"]
        size = x0.shape[0]
        level_rng, noise_rng, scale_rng, dropout_rng = jax.random.split(rng, 4)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        cond = conditioning.batch_cond(c, batch)
        scale = None
        student_cond = cond
        if d.guided:
            scale = jax.random.uniform(
                scale_rng, (size,), jnp.float32, d.guidance_min, d.guidance_max
            )
            student_cond = conditioning.with_guidance(cond, scale)

        def noised(level: distillation.Levels) -> Array:
            return distillation.ddim_step(x0, noise, level)

        def round_target() -> tuple[distillation.Levels, Array, Array]:
            start, mid, end = distillation.draw_student_step(
                self.grids, carry["round"], level_rng, size
            )
            teacher = self._predictor(self.apply, carry["teacher"], student_cond)
            x_t = noised(start)
            return start, x_t, distillation.two_step_target(teacher, x_t, start, mid, end)

        def guided_target() -> tuple[distillation.Levels, Array, Array]:
            level = distillation.draw_level(self.grids, level_rng, size)
            teacher = self._predictor(self.teacher_apply, frozen, cond, scale)
            x_t = noised(level)
            return level, x_t, teacher(x_t, *level)[0]

        if d.guided:
            level, x_t, target = jax.lax.cond(carry["stage1"], guided_target, round_target)
        else:
            level, x_t, target = round_target()
        student = self.process.denoiser(
            lambda p, x, t, y: self.apply(
                {"params": p}, x, t, y, train=True, rngs={"dropout": dropout_rng}
            )
        )
        out = student(params, x_t, level.t, student_cond)[..., : x0.shape[-1]]
        a, s = (diffusion.expand(v, x0.ndim) for v in (level.alpha, level.sigma))
        student_x0, _ = diffusion.predict_x0_eps(out, x_t, a, s, self.process.prediction)
        loss = distillation.x0_loss(student_x0, jax.lax.stop_gradient(target), level)
        return loss, {"round": carry["round"].astype(jnp.float32)}

    def _with_steps(self, num_steps: int) -> "Distillation":
        cfg = self.config.copy_and_resolve_references()
        cfg.sample.method, cfg.sample.spacing, cfg.sample.num_steps = "ddim", "trailing", num_steps
        return dataclasses.replace(self, config=cfg)

    def sampler(self, num: int, **edit: Any) -> Callable[..., Array]:
        """The student's sampler; warns unless it is DDIM on the trailing grid with the step
        count the workdir's latest checkpoint is distilled for (`distilled_steps`; without a
        checkpoint, at config.training.num_steps), and at a guidance scale it was trained for."""
        s = self.config.sample
        step = self.config.training.num_steps if self.trained_steps is None else self.trained_steps
        expected = distilled_steps(self.config, step)
        if (s.method, s.spacing or "trailing", s.num_steps) != ("ddim", "trailing", expected):
            print(
                f"Warning: this student is distilled for DDIM with {expected} trailing steps "
                f"(--config.sample.method=ddim --config.sample.num_steps={expected}); sampling "
                f"with {s.method}, {s.num_steps} steps, spacing {s.spacing} is off its grid",
                flush=True,
            )
        d = self.config.distill
        if d.guided and not d.guidance_min <= s.guidance_scale <= d.guidance_max:
            print(
                f"Warning: guidance_scale={s.guidance_scale} is outside the scales this student "
                f"was distilled for, [{d.guidance_min}, {d.guidance_max}]",
                flush=True,
            )
        return super().sampler(num, **edit)

    def training_grid(self, rng: Array) -> tuple[Callable[[Any, int], Array], int]:
        """The grid of `Diffusion.training_grid`, drawn with the steps the student is being
        trained for at that step (one compiled sampler per round)."""
        cond, cols, _ = conditioning.grid_cond(self.config)
        cond = jax.tree.map(jnp.asarray, cond)
        num = self.config.sample.num_samples

        @functools.cache
        def sampler(num_steps: int) -> Callable[..., Array]:
            return Diffusion.sampler(self._with_steps(num_steps), num)

        def grid(params: Any, step: int) -> Array:
            return sampler(distilled_steps(self.config, step))(params, rng, cond)

        return grid, cols


def check_teacher(
    field: str,
    config: ml_collections.ConfigDict,
    as_teacher: ml_collections.ConfigDict,
    teacher: ml_collections.ConfigDict,
) -> None:
    """The student (`config`; `as_teacher`: it without the guidance input, as a diffusion
    run) must share the network, data shape and diffusion fields of the teacher in the
    workdir `config.<field>` (`teacher`: its config)."""
    path = config[field]
    if teacher.objective != "diffusion":
        raise UserError(
            f"config.{field}={path!r} holds a {teacher.objective!r} run; the "
            "teacher must be a diffusion run (objective 'diffusion', trained or imported)"
        )
    differences = runs.incompatibilities(teacher, as_teacher)
    differences += [
        (f"diffusion.{k}", teacher.diffusion[k], config.diffusion[k])
        for k in _SHARED_DIFFUSION
        if teacher.diffusion[k] != config.diffusion[k]
    ]
    process = config.diffusion.process
    if process != "ddpm" and process == teacher.diffusion.process:  # a continuous one's section
        old, new = teacher.diffusion[process].to_dict(), config.diffusion[process].to_dict()
        differences += [(f"diffusion.{process}", old, new)] if old != new else []
    if differences:
        field, old, new = differences[0]
        raise UserError(
            f"config.{field}={new!r} but the teacher in {path} has {old!r}: a student shares "
            "its teacher's network, data shape and diffusion fields (start from the teacher's "
            "recipe)"
        )


def as_diffusion_run(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """(the student `config` as a diffusion run without a guidance input, its network): what
    a teacher run must match, and the network its weights are read into."""
    run = config.copy_and_resolve_references()
    run.objective = "diffusion"
    run.model.guidance_embed = False
    return run, build.model(run)


def load_teacher(field: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
    """The EMA parameters of the diffusion run in the workdir `config.<field>`, checked to
    match the student `config` (`check_teacher`), replicated on `mesh`."""
    path = config[field]
    saved = runs.load_config(path)
    as_teacher, net = as_diffusion_run(config)
    check_teacher(field, config, as_teacher, saved)
    params, step = build.restore_ema(saved, path, net, runs.input_shape(config), mesh)
    print(f"Starting from config.{field}: EMA parameters of step {step} of {path}", flush=True)
    return jax.device_put(params, sharding.replicated(mesh))


def create(
    config: ml_collections.ConfigDict,
    speed: runtime.Runtime,
    *,
    workdir: str | None,
    mesh: jax.sharding.Mesh,
    training: bool,
) -> Distillation:
    """The distillation objective; when `training`, with the teacher's EMA parameters
    (replicated on `mesh`) as its frozen parameters, checked to match this config; with the
    step of `workdir`'s latest checkpoint, whose step count its sampler expects."""
    d = config.distill
    _, teacher_net = as_diffusion_run(config)
    frozen = load_teacher("distill.teacher_workdir", config, mesh) if training else None
    trained = None
    if workdir is not None and os.path.isdir(os.path.join(workdir, "checkpoints")):
        ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints, create=False)
        trained = ckpt.latest_step()
        ckpt.close()
    grids = distillation.round_grids(
        build.process(config), d.teacher_steps, runs.distill_rounds(config)
    )
    return Distillation.from_config(
        config, speed, frozen=frozen, teacher=teacher_net, grids=grids, trained_steps=trained
    )
