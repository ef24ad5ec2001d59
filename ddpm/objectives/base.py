"""The objective interface: what a run trains and what it draws, for one train step and one
sampler core to serve every model family.

An objective holds the network, its input shape and whatever it keeps frozen (a stage-1
autoencoder's parameters, a distillation teacher's), and supplies three things, as in vdm's
experiment classes: the loss of a batch, the grid the trainer draws, and (for generative
objectives) a sampler. The frozen parameters are an explicit argument of the compiled train
step (`loss(params, frozen, batch, rng, carry)`) and of the samplers, never a compile-time
constant.

An objective whose training moves through stages (distillation's rounds) keeps what it
carries between steps in the train state's `carry` (`init_carry`; checkpointed with the run,
so a resumed run continues mid-stage exactly) and may reset the state at a stage's first step
(`begin_step`). Both default to nothing.
"""

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from ddpm import build, models, runtime
from ddpm.config import runs
from ddpm.errors import UserError

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective(abc.ABC):
    """config: the run's config, completed where the objective decides a value (latent
    diffusion's scale factor), as saved in the workdir; model: the trained network;
    input_shape: one example as the network sees it; speed: the resolved `config.runtime`;
    frozen: parameters held fixed (None if nothing is), replicated; mesh: the devices the
    run trains and samples on (None: the sampler leaves the layout to XLA, replicated)."""

    config: ml_collections.ConfigDict
    model: nn.Module
    input_shape: tuple[int, ...]
    speed: runtime.Runtime
    frozen: Any = None
    mesh: jax.sharding.Mesh | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, speed: runtime.Runtime, **fields):
        """The objective of a validated `config`: its network for the input shape the config
        trains on (`ddpm.config.runs.input_shape`), plus the subclass's own `fields`."""
        shape = runs.input_shape(config)
        model = models.create_model(config, shape)
        return cls(config=config, model=model, input_shape=shape, speed=speed, **fields)

    @functools.cached_property
    def apply(self) -> Callable[..., Any]:
        """`model.apply` with the runtime's kernels (`ddpm.runtime.wrap`)."""
        return runtime.wrap(self.model.apply, self.speed)

    def init_params(self, rng: Array) -> Any:
        """Fresh parameters of the network (traceable: jit it)."""
        inputs = models.init_inputs(self.config, self.input_shape)
        return self.model.init(runtime.init_key(rng, self.speed), *inputs)["params"]

    def placed_params(self, mesh: jax.sharding.Mesh) -> Any:
        """The trained parameters as `jax.ShapeDtypeStruct`s with the shardings training
        gives them on `mesh` (what checkpoints hold as EMA parameters)."""
        return build.placed_params(self.config, self.model, self.input_shape, mesh)

    def restore_ema(self, workdir: str, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
        """(the network's parameters for the samplers, step) from the EMA parameters of the
        latest checkpoint of `workdir` (`build.restore_ema_into`)."""
        return build.restore_ema_into(self.config, workdir, self.placed_params(mesh))

    def export(self, workdir: str, ema_params: Any) -> None:
        """Writes what the objective exports into `workdir` at each checkpoint, from the EMA
        parameters (the train state's arrays; called on process 0). Default: nothing."""
        del workdir, ema_params

    def init_carry(self, params: Any) -> Any:
        """What the objective carries from step to step in the train state, for freshly
        initialised `params` (traceable); None: nothing."""
        del params

    def begin_step(self, state: Any, frozen: Any, tx: Any) -> Any:
        """The train state (`ddpm.train.TrainState`: step, params, ema_params, opt_state, carry)
        a step starts from, given the state the previous step left and `tx`, the optimizer;
        traced inside the train step. Default: unchanged."""
        del frozen, tx
        return state

    def ends_stage(self, step: int) -> bool:
        """Whether `step` (train steps done, host side) ends a stage of training, which the
        trainer closes with a checkpoint and a sample grid. Default: no stages."""
        del step
        return False

    @abc.abstractmethod
    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        """(scalar float32 loss, {name: scalar} extra metrics) of a training batch
        {"image": [B, ...] float32 in [-1, 1], "label": [B] int32}; carry: the state's
        (`init_carry`). Traceable."""

    @abc.abstractmethod
    def training_grid(self, rng: Array) -> tuple[Callable[[Any, int], Array], int]:
        """(fn(params, step) -> images [N, ...] float32, columns) drawn every sample_every
        steps from the EMA parameters after `step` steps."""

    def sampler(self, num: int, **edit: Any) -> Callable[..., Array]:
        """Jitted fn(params, rng, cond, **arrays) -> [num, ...] samples in data space with
        `config.sample`'s method (see `ddpm.build.sampler`); generative objectives only."""
        del num, edit
        raise UserError(
            f"config.objective={self.config.objective!r} is not a generative model: sampling "
            "needs a diffusion run (an autoencoder's reconstructions are the grids in its "
            "workdir's samples/)"
        )
