"""Latent diffusion's stage 2: the diffusion objective on the latents of a frozen stage-1
autoencoder (`config.latent.autoencoder_workdir`: a run, whose EMA parameters this objective
keeps frozen, or a diffusers AutoencoderKL folder such as a Stable Diffusion pipeline's vae/).
Batches are encoded inside the train step; samples are drawn in latent space and decoded."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm import build, data, runtime, sharding
from ddpm.config import runs
from ddpm.errors import UserError
from ddpm.objectives.base import Array, Batch
from ddpm.objectives.diffusion import Diffusion

# Images encoded to estimate the latent scale factor (from the start of the train split).
SCALE_ESTIMATE_IMAGES = 512


def encode_latents(
    apply_fn: Callable[..., Any],
    params: Any,
    images: Array,
    rng: Array,
    *,
    scale_factor: float,
    sample_posterior: bool,
) -> Array:
    """Diffusion data of stage 2: scale_factor * z, z ~ q(z | x) (or its mean).

    `apply_fn`: the autoencoder's apply. images: [B, H, W, C] float32 in [-1, 1]. Returns
    [B, H/f, W/f, z_channels] float32.
    """
    mean, logvar = apply_fn({"params": params}, images, method="encode")
    z = mean
    if sample_posterior:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return scale_factor * z


def decode_latents(
    apply_fn: Callable[..., Any], params: Any, latents: Array, *, scale_factor: float
) -> Array:
    """Images [B, H, W, C] float32 (about [-1, 1]) of latents [B, H/f, W/f, z] (scaled)."""
    return apply_fn({"params": params}, latents / scale_factor, method="decode")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentDiffusion(Diffusion):
    """frozen: the stage-1 EMA parameters; stage1: the autoencoder module."""

    stage1: nn.Module

    @functools.cached_property
    def stage1_apply(self) -> Callable[..., Any]:
        return runtime.wrap(self.stage1.apply, self.speed)

    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        del carry
        lat = self.config.latent
        x0 = encode_latents(
            self.stage1_apply,
            frozen,
            batch["image"],
            jax.random.fold_in(rng, 2),
            scale_factor=lat.scale_factor,
            sample_posterior=lat.sample_posterior,
        )
        return self.denoising_loss(params, x0, batch, rng), {}

    def sampler(self, num: int, **edit: Any) -> Callable[..., Array]:
        """Samples in latent space, decoded. Editing (`edit`: inpainting's or SDEdit's
        options) takes its arrays in data space: `init` / `known` [1 or num, H, W, C] are
        encoded to the posterior mean's latents, and `mask` [.., H, W, 1] (1 = keep) keeps a
        latent pixel only where all the pixels it covers are kept (a min-pool by the
        autoencoder's factor), so every pixel to fill is regenerated."""
        sample = super().sampler(num, **edit)
        scale = self.config.latent.scale_factor
        decode = jax.jit(functools.partial(decode_latents, self.stage1_apply, scale_factor=scale))
        if not edit:
            return lambda params, rng, cond: decode(self.frozen, sample(params, rng, cond))
        encode = jax.jit(
            functools.partial(
                encode_latents, self.stage1_apply, scale_factor=scale, sample_posterior=False
            )
        )

        def edited(params, rng, cond, **arrays):
            latents = {k: encode(self.frozen, v, rng) for k, v in arrays.items() if k != "mask"}
            if "mask" in arrays:
                f = arrays["mask"].shape[1] // self.input_shape[0]  # the autoencoder's factor
                latents["mask"] = -nn.max_pool(-arrays["mask"], (f, f), strides=(f, f))
            return decode(self.frozen, sample(params, rng, cond, **latents))

        return edited


def estimate_scale_factor(
    config: ml_collections.ConfigDict, stage1_apply: Callable[..., Any], params: Any
) -> float:
    """1 / std of the unscaled latents of the first SCALE_ESTIMATE_IMAGES training images.

    Every process reads the same images, so all agree on the value.
    """
    batch = min(SCALE_ESTIMATE_IMAGES, 256)
    images = data.create_dataset(config, "train", batch_size=batch, seed=config.seed, shuffle=False)
    encode = jax.jit(
        functools.partial(
            encode_latents,
            stage1_apply,
            scale_factor=1.0,
            sample_posterior=config.latent.sample_posterior,
        )
    )
    rng = jax.random.fold_in(jax.random.key(config.seed), 3)
    latents = [
        np.asarray(encode(params, next(images)["image"], jax.random.fold_in(rng, i)))
        for i in range(-(-SCALE_ESTIMATE_IMAGES // batch))
    ]
    images.close()
    return float(1.0 / np.std(np.concatenate(latents)))


def saved_scale_factor(workdir: str) -> float | None:
    """latent.scale_factor of the run in `workdir` (None: no run, or none saved)."""
    saved = runs.read_saved(workdir)
    return None if saved is None else saved.get("latent", {}).get("scale_factor")


def create(
    config: ml_collections.ConfigDict,
    speed: runtime.Runtime,
    *,
    workdir: str | None,
    mesh: jax.sharding.Mesh,
    training: bool,
) -> LatentDiffusion:
    """The stage-2 objective: the stage-1 autoencoder restored (EMA, replicated on `mesh`),
    and `config.latent.scale_factor` completed: its own value if set, else the one saved in
    `workdir/config.json` (what training used; None: no workdir), else (when `training`)
    estimated. A set value that differs from the saved one is a UserError."""
    stage1_workdir = config.latent.autoencoder_workdir
    stage1_config = runs.stage1_config(config)
    shape = runs.data_shape(stage1_config)
    stage1 = build.model(stage1_config, shape)
    if runs.is_diffusers_model(stage1_workdir):  # a pipeline's vae/, read as it is
        from ddpm import pretrained  # (imports the objectives' modules)

        params, origin = pretrained.load(stage1_workdir).params, "the diffusers weights"
    else:
        params, step = build.restore_ema(stage1_config, stage1_workdir, stage1, shape, mesh)
        origin = f"EMA parameters of step {step}"
    params = jax.device_put(params, sharding.replicated(mesh))
    print(f"Frozen autoencoder: {origin} of {stage1_workdir}", flush=True)

    saved = None if workdir is None else saved_scale_factor(workdir)
    value = config.latent.scale_factor
    if value is not None and saved is not None and value != saved:
        raise UserError(
            f"config.latent.scale_factor={value!r} but the run in {workdir} was trained with "
            f"{saved!r}; leave it unset to use the saved value"
        )
    value = saved if value is None else value
    if value is None:
        if not training:
            raise UserError(
                f"config.latent.scale_factor is unset and {runs.config_path(workdir)} does not "
                "give it; train first"
            )
        value = estimate_scale_factor(config, runtime.wrap(stage1.apply, speed), params)
        print(f"Estimated config.latent.scale_factor={value:.6g} (latent std -> 1)", flush=True)
    config = config.copy_and_resolve_references()
    config.latent.scale_factor = float(value)
    return LatentDiffusion.from_config(config, speed, frozen=params, stage1=stage1)
