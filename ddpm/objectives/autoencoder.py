"""Latent diffusion's stage 1: the KL-autoencoder objective (reconstruction + beta KL); its
grids show held-out inputs above their reconstructions."""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm import data
from ddpm.models.autoencoder import gaussian_kl
from ddpm.objectives.base import Array, Batch, Objective


def autoencoder_loss(
    params: Any,
    apply_fn: Callable[..., Any],
    model: nn.Module,
    x: Array,
    rng: Array,
    *,
    recon_loss: str = "l1",
    kl_weight: float = 1e-6,
) -> tuple[Array, dict[str, Array]]:
    """Stage-1 loss: mean |x - D(z)| (l1) or (x - D(z))^2 (l2) + kl_weight * KL / (H W C).

    z = mean + exp(logvar / 2) * noise ~ q(z | x). Dividing the KL (summed over latent
    dimensions) by the pixel count gives kl_weight LDM's meaning, whose reconstruction term is
    summed over pixels. `apply_fn` is `model.apply` (or a runtime-wrapped one). x: [B, H, W, C]
    float32 in [-1, 1]; rng splits into noise and dropout keys. Returns (scalar loss,
    {"recon": per-pixel reconstruction error, "kl": mean KL}).
    """
    if recon_loss not in ("l1", "l2"):
        raise ValueError(f"recon_loss={recon_loss!r} is not one of l1, l2")
    noise_rng, dropout_rng = jax.random.split(rng)
    f = 2 ** (len(model.ch_mult) - 1)
    b, h, w, c = x.shape
    noise = jax.random.normal(noise_rng, (b, h // f, w // f, model.z_channels), jnp.float32)
    recon, mean, logvar = apply_fn(
        {"params": params}, x, noise, train=True, rngs={"dropout": dropout_rng}
    )
    error = recon - x.astype(jnp.float32)
    recon_error = jnp.mean(jnp.abs(error) if recon_loss == "l1" else jnp.square(error))
    kl = jnp.mean(gaussian_kl(mean, logvar))
    return recon_error + kl_weight * kl / (h * w * c), {"recon": recon_error, "kl": kl}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Autoencoder(Objective):
    """Trains `config.model` (the autoencoder family) with `config.latent`'s recon_loss and
    kl_weight."""

    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        del frozen, carry
        _, loss_rng = jax.random.split(rng)
        lat = self.config.latent
        return autoencoder_loss(
            params,
            self.apply,
            self.model,
            batch["image"],
            loss_rng,
            recon_loss=lat.recon_loss,
            kl_weight=lat.kl_weight,
        )

    def training_grid(self, rng: Array) -> tuple[Callable[[Any, int], Array], int]:
        """Rows of held-out inputs each followed by the row of their reconstructions
        (posterior means): N images of the eval split (a fixed shuffle), the whole rows of
        ceil(sqrt(config.sample.num_samples)) columns that fit in num_samples."""
        del rng
        config = self.config
        num = config.sample.num_samples
        cols = int(np.ceil(np.sqrt(num)))
        rows = max(num // cols, 1)
        source = data.create_dataset(
            config, config.data.eval_split, batch_size=rows * cols, seed=config.seed
        )
        inputs = jnp.asarray(next(source)["image"])
        source.close()
        apply = self.apply

        @jax.jit
        def grid(params: Any, x: Array) -> Array:
            recon, _, _ = apply({"params": params}, x)
            pairs = jnp.stack([x, recon]).reshape(2, rows, cols, *x.shape[1:])
            return pairs.transpose(1, 0, 2, 3, 4, 5).reshape(2 * rows * cols, *x.shape[1:])

        return (lambda params, step: grid(params, inputs)), cols
