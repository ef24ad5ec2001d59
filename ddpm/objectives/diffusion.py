"""Diffusion on the data itself: the denoising loss of `config.diffusion.process`
(`ddpm.processes`) with classifier-free label dropout, and samples from `config.sample`'s
sampler."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddpm import build, conditioning, processes
from ddpm.objectives.base import Array, Batch, Objective


@dataclasses.dataclass(frozen=True, kw_only=True)
class Diffusion(Objective):
    """process: the noise process of `config.diffusion` (`build.process`); guide: the weaker
    model of autoguidance (config.sample.guide, `ddpm.autoguide`), None without it."""

    process: processes.Process
    guide: build.Guide | None = None

    @classmethod
    def from_config(cls, config, speed, **fields):
        return super().from_config(config, speed, process=build.process(config), **fields)

    def denoising_loss(self, params: Any, x0: Array, batch: Batch, rng: Array) -> Array:
        """The diffusion loss of data x0 [B, ...] float32 conditioned on `batch`'s condition
        (each dropped to the null one with probability config.training.label_dropout)."""
        c = self.config
        label_rng, loss_rng = jax.random.split(rng)
        cond = conditioning.drop(
            c, conditioning.batch_cond(c, batch), label_rng, c.training.label_dropout
        )

        def apply_fn(params, x_t, t, dropout_rng):
            return self.apply(
                {"params": params}, x_t, t, cond, train=True, rngs={"dropout": dropout_rng}
            )

        return self.process.loss(params, apply_fn, x0, loss_rng)[0]

    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        del frozen, carry
        return self.denoising_loss(params, batch["image"], batch, rng), {}

    def sampler(self, num: int, **edit: Any) -> Callable[..., Array]:
        return build.sampler(
            self.config,
            self.apply,
            self.process,
            (num, *self.input_shape),
            self.mesh,
            guide=self.guide,
            **edit,
        )

    def training_grid(self, rng: Array) -> tuple[Callable[[Any, int], Array], int]:
        """One row per class (or the configured labels / prompts), config.sample.num_samples
        samples drawn with the same key each time."""
        cond, cols, _ = conditioning.grid_cond(self.config)
        cond = jax.tree.map(jnp.asarray, cond)
        sample = self.sampler(self.config.sample.num_samples)
        return (lambda params, step: sample(params, rng, cond)), cols
