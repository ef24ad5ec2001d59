"""Objectives by name (`config.objective`): what a run trains and draws.

Adding one is a module with an `Objective` subclass (`ddpm.objectives.base`) and a line in
`_FACTORIES`. `create(config, ...)` is what the modes call.
"""

import dataclasses
from collections.abc import Callable

import jax
import ml_collections

from ddpm import autoguide, build
from ddpm.objectives import consistency, distill, latent, lora
from ddpm.objectives.autoencoder import Autoencoder
from ddpm.objectives.base import Objective
from ddpm.objectives.consistency import Consistency
from ddpm.objectives.diffusion import Diffusion
from ddpm.objectives.distill import Distillation
from ddpm.objectives.latent import LatentDiffusion

__all__ = [
    "Autoencoder",
    "Consistency",
    "Diffusion",
    "Distillation",
    "LatentDiffusion",
    "Objective",
    "create",
]


def _diffusion(config, speed, *, workdir: str | None, mesh, training: bool) -> Diffusion:
    """Diffusion; sampling a trained run (not the trainer's grids) with config.sample.guide
    loads the autoguidance model."""
    guide = None
    if config.sample.guide is not None and not training:
        guide = autoguide.load(config, workdir, mesh)
    return Diffusion.from_config(config, speed, guide=guide)


_FACTORIES: dict[str, Callable[..., Objective]] = {
    "diffusion": lambda config, speed, **run: _diffusion(config, speed, **run),
    "autoencoder": lambda config, speed, **_: Autoencoder.from_config(config, speed),
    "latent": latent.create,
    "distill": distill.create,
    "consistency": consistency.create,
}


def create(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | None,
    mesh: jax.sharding.Mesh,
    training: bool = False,
) -> Objective:
    """The objective `config.objective` names, for a validated `config` trained (or read) in
    `workdir` (None: none yet) on `mesh`. `training`: the trainer's call, where latent
    diffusion may estimate its scale factor (elsewhere it must be saved) and distillation
    loads its teacher (sampling does not need it)."""
    speed = build.run_runtime(config)
    objective = _FACTORIES[config.objective](
        config, speed, workdir=workdir, mesh=mesh, training=training
    )
    objective = dataclasses.replace(objective, mesh=mesh)
    if config.lora.rank is not None:  # adapters on its frozen U-Net
        objective = lora.create(objective, mesh)
    return objective
