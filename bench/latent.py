"""Sampling cost per image: latent diffusion (sampler on latents + decoder) against pixel
diffusion with the same U-Net (width, levels, blocks) on the images. One JSON line each.

python -m bench.latent [--steps=20] [--batch=16] [--repeats=3]

The networks are configs/mnist_ldm.py's U-Net and configs/mnist_autoencoder.py's decoder with
random parameters (speed does not depend on them); the pixel model is the same U-Net on the
32x32x1 images. Sampler, step count and guidance are configs/mnist_ldm.py's.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import mnist_autoencoder, mnist_ldm
from ddpm import build, objectives
from ddpm.config import runs
from ddpm.objectives.latent import LatentDiffusion, decode_latents


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call's seconds, compile included; best of `repeats` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return first, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    latent_config = mnist_ldm.get_config()
    latent_config.sample.num_steps = args.steps
    latent_config.latent.scale_factor = 1.0
    pixel_config = latent_config.copy_and_resolve_references()
    pixel_config.objective = "diffusion"
    pixel_config.latent.autoencoder_workdir = None
    mesh = build.mesh(latent_config)
    pixel = objectives.create(pixel_config, workdir=None, mesh=mesh)
    ae = objectives.create(mnist_autoencoder.get_config(), workdir=None, mesh=mesh)
    # Stage 2 without a trained stage-1 workdir: the autoencoder's parameters are random.
    f = runs.latent_factor(ae.config.model)
    size = latent_config.data.image_size
    latent_shape = (size // f, size // f, ae.config.model.z_channels)
    latent = LatentDiffusion(
        config=latent_config,
        model=build.model(latent_config, latent_shape),
        input_shape=latent_shape,
        speed=pixel.speed,
        frozen=jax.jit(ae.init_params)(jax.random.key(0)),
        process=build.process(latent_config),
        stage1=ae.model,
    )
    labels = jnp.arange(args.batch, dtype=jnp.int32) % latent_config.model.num_classes
    rng = jax.random.key(1)
    common = dict(
        device=jax.devices()[0].platform,
        method=latent_config.sample.method,
        steps=args.steps,
        batch=args.batch,
        guidance=latent_config.sample.guidance_scale,
        unet_ch=latent_config.model.ch,
        unet_ch_mult=list(latent_config.model.ch_mult),
    )

    per_image = {}
    for space, objective in (("pixel", pixel), ("latent", latent)):
        params = jax.jit(objective.init_params)(jax.random.key(0))
        sampler = objective.sampler(args.batch)
        first, best = timed(sampler, params, rng, labels, repeats=args.repeats)
        per_image[space] = best / args.batch
        emit(
            figure=f"{space}_sampling",
            input_shape=list(objective.input_shape),
            s_per_image=per_image[space],
            first_call_s=first,
            **common,
        )
    decode = jax.jit(lambda p, z: decode_latents(latent.stage1_apply, p, z, scale_factor=1.0))
    z = jnp.zeros((args.batch, *latent_shape))
    _, best = timed(decode, latent.frozen, z, repeats=args.repeats)
    emit(figure="decode_only", s_per_image=best / args.batch, **common)
    emit(figure="latent_over_pixel_ratio", ratio=per_image["latent"] / per_image["pixel"], **common)


if __name__ == "__main__":
    main()
