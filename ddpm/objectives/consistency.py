"""Consistency models of any diffusion process (the math: `ddpm.consistency`): consistency
distillation (CD) from a diffusion run in `config.consistency.teacher_workdir`, or consistency
training (CT) with no teacher, from scratch or from a diffusion run's weights
(`config.consistency.init_workdir`, ECT's "tuning" start).

The student is the diffusion network read as a consistency function of its process
(`ConsistencyProcess`), so a student starting from its teacher's weights starts as the
teacher's one-step denoiser. A train step draws a pair of adjacent levels s_n < s_n+1 of the
discretisation (config.consistency.num_levels Karras levels, or improved CT's doubling
curriculum), noises the batch to s_n+1, finds the point at s_n on the same trajectory (CD: one
Heun or Euler step of the teacher's probability-flow ODE, at config.consistency
.teacher_guidance; CT: the same noise at s_n) and pulls the student's output there toward the
target network's output at s_n, in l2 or pseudo-Huber distance. The target network (the
carry) is an EMA of the student with decay target_ema (0: the student itself, no gradient, as
improved CT has it); both see the same dropout. Sampling is multistep consistency sampling at
config.sample.num_steps (method "consistency").
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddpm import build, conditioning, consistency, runtime
from ddpm.objectives.base import Array, Batch
from ddpm.objectives.diffusion import Diffusion
from ddpm.objectives.distill import graft, load_teacher, teacher_predictor


@dataclasses.dataclass(frozen=True, kw_only=True)
class Consistency(Diffusion):
    """process: the run's diffusion process read as a consistency model
    (`ConsistencyProcess`); frozen: the teacher's (CD) or the initial run's (CT from a
    diffusion run) EMA parameters, None otherwise, for the student's own network (`apply`)."""

    process: consistency.ConsistencyProcess

    @classmethod
    def from_config(cls, config, speed, **fields):
        inner = build.process(config)
        model = consistency.ConsistencyProcess(inner, config.consistency.sigma_data)
        return super(Diffusion, cls).from_config(config, speed, process=model, **fields)

    @property
    def _table_size(self) -> int:
        c = self.config.consistency
        return c.end_levels + 1 if c.curriculum == "ict" else c.num_levels

    def _num_levels(self, step: Array) -> Array:
        c = self.config.consistency
        if c.curriculum == "ict":
            total = self.config.training.num_steps
            return consistency.ict_num_levels(step, total, c.start_levels, c.end_levels)
        return jnp.int32(c.num_levels)

    def init_carry(self, params: Any) -> dict[str, Any]:
        """{"target": the target network's parameters, "num_levels": [] int32 levels of the
        discretisation at this step}; both set at every step's start."""
        return {"target": params, "num_levels": jnp.int32(self._table_size)}

    def begin_step(self, state: Any, frozen: Any, tx: Any) -> Any:
        """At step 0 a student with `frozen` weights starts from them (its EMA and the
        optimizer afresh); at every step the target moves to target_ema target + (1 -
        target_ema) student, and the discretisation to the step's level count."""
        if frozen is not None:

            def start() -> Any:
                params = graft(frozen, state.params)
                return state.replace(
                    params=params,
                    ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), params),
                    opt_state=tx.init(params),
                    carry={**state.carry, "target": params},
                )

            state = jax.lax.cond(state.step == 0, start, lambda: state)
        mu = self.config.consistency.target_ema
        target = jax.tree.map(
            lambda t, p: (mu * t + (1.0 - mu) * p).astype(p.dtype),
            state.carry["target"],
            state.params,
        )
        return state.replace(carry={"target": target, "num_levels": self._num_levels(state.step)})

    def _draw_pairs(self, rng: Array, size: int, num_levels: Array) -> tuple[Array, Array]:
        """VE levels (s_n, s_n+1) [size] of pairs drawn uniformly or by improved CT's
        lognormal weights from the first `num_levels` Karras levels on the process's range."""
        c = self.config.consistency
        s_min, s_max = self.process.ve_range()
        table = consistency.ve_levels(s_min, s_max, num_levels, self._table_size, c.rho)
        if c.level_sampling == "lognormal":
            p = consistency.lognormal_pair_probabilities(table, num_levels, c.p_mean, c.p_std)
            i = jax.random.categorical(rng, jnp.log(p), shape=(size,))
        else:
            i = jax.random.randint(rng, (size,), 0, num_levels - 1)
        return table[i], table[i + 1]

    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        """Weighted distance between the student at s_n+1 and the target at s_n (above)."""
        c, cc = self.config, self.config.consistency
        x0 = batch["image"].astype(jnp.float32)
        pair_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
        cond = conditioning.drop(
            c, conditioning.batch_cond(c, batch), label_rng, c.training.label_dropout
        )
        s_low, s_high = self._draw_pairs(pair_rng, x0.shape[0], carry["num_levels"])
        low, high = (consistency.level_at(self.process, s) for s in (s_low, s_high))
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)

        def noised(level: consistency.Level) -> Array:
            alpha, sigma = (jnp.reshape(v, (-1,) + (1,) * (x0.ndim - 1)) for v in level[1:])
            return alpha * x0 + sigma * noise

        x_high = noised(high)
        if cc.teacher_workdir is None:  # CT: the same noise one level lower
            x_low = noised(low)
        else:  # CD: one step of the teacher's probability-flow ODE
            scale = None
            if cc.teacher_guidance != 1.0:
                scale = jnp.full((x0.shape[0],), cc.teacher_guidance, jnp.float32)
            predict = teacher_predictor(c, self.process.inner, self.apply, frozen, cond, scale)
            x_low = consistency.teacher_step(
                self.process.inner, predict, x_high, high, low, cc.teacher_solver == "heun"
            )
        f = self.process.consistency(
            lambda p, x, t, y: self.apply(
                {"params": p}, x, t, y, train=True, rngs={"dropout": dropout_rng}
            )
        )
        target = jax.lax.stop_gradient(f(carry["target"], jax.lax.stop_gradient(x_low), low, cond))
        dist = consistency.distance(f(params, x_high, high, cond), target, cc.distance)
        weight = 1.0 / (s_high - s_low) if cc.weighting == "inverse_gap" else 1.0
        stats = {"num_levels": carry["num_levels"].astype(jnp.float32)}
        return jnp.mean(weight * dist), stats


def _frozen_run(config: ml_collections.ConfigDict) -> str | None:
    """The config field naming the run whose weights a student starts from, if any."""
    c = config.consistency
    if c.teacher_workdir is not None:
        return "consistency.teacher_workdir"
    return "consistency.init_workdir" if c.init_workdir is not None else None


def create(
    config: ml_collections.ConfigDict,
    speed: runtime.Runtime,
    *,
    workdir: str | None,
    mesh: jax.sharding.Mesh,
    training: bool,
) -> Consistency:
    """The consistency objective; when `training` with a teacher (or an initial run), its EMA
    parameters replicated on `mesh` as the frozen parameters, checked to match this config."""
    del workdir
    field = _frozen_run(config)
    frozen = load_teacher(field, config, mesh) if training and field is not None else None
    return Consistency.from_config(config, speed, frozen=frozen)
