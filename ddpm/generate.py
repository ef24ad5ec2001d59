"""`main.py --mode=sample`: restore the EMA parameters of a workdir and draw samples;
`--mode=phema`: store a post-hoc EMA of it."""

import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from ddpm import build, conditioning, images, objectives, posthoc_ema, sharding, signals
from ddpm.config import runs, validation
from ddpm.errors import UserError
from ddpm.objectives import Objective
from ddpm.pretrained import lora


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[Objective, jax.sharding.Mesh]:
    """Validated start-up of a mode that samples from a trained `workdir` (sample, inpaint,
    img2img, eval): -> (objective, mesh). The objective's config carries what training
    decided (latent diffusion's scale factor, read from the workdir). Bad input: UserError."""
    validation.validate(config)
    runs.check_resumable(config, workdir)
    mesh = build.mesh(config)
    return objectives.create(config, workdir=workdir, mesh=mesh), mesh


def restore(objective: Objective, workdir: str, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
    """(EMA parameters, step) of the latest checkpoint of `workdir` for `objective`, with
    config.pretrained.lora merged in (`ddpm.pretrained.lora`) and, for a text model,
    config.sample.negative_prompt as its null context (`conditioning.with_negative_prompt`)."""
    config = objective.config
    params, step = objective.restore_ema(workdir, mesh)
    params = lora.apply_to(config, params)
    return conditioning.with_negative_prompt(config, params), step


def write_posthoc_ema(config: ml_collections.ConfigDict, workdir: str) -> str:
    """--mode=phema: the post-hoc EMA of config.phema.sigma_rel, reconstructed from the run's
    snapshots and stored in the workdir (`ddpm.posthoc_ema`), where every mode that reads the
    EMA finds it. -> its path."""
    sigma_rel = config.phema.sigma_rel
    if sigma_rel is None:
        raise UserError(
            "--mode=phema needs config.phema.sigma_rel, the width to reconstruct, e.g. "
            "--config.phema.sigma_rel=0.08"
        )
    objective, mesh = prepare(config, workdir)
    return posthoc_ema.write(workdir, sigma_rel, objective.placed_params(mesh))


def save_samples(stem: str, samples: np.ndarray, labels: np.ndarray, num_cols: int) -> str:
    """Writes `stem`.png (a grid; signals: a plot) and `stem`.npz (uint8 images, or float32
    signals, and labels), and for 1-D signals [N, L, C] also `stem`.wav, on process 0 only.
    -> the PNG's path."""
    if jax.process_index() == 0:
        images.save_png(stem + ".png", images.sample_grid(samples, num_cols))
        if samples.ndim == 3:
            signals.save_wav(stem + ".wav", samples)
            np.savez_compressed(stem + ".npz", signals=samples.astype(np.float32), labels=labels)
        else:
            np.savez_compressed(stem + ".npz", images=images.to_uint8(samples), labels=labels)
        wav = " and .wav" if samples.ndim == 3 else ""
        print(f"Wrote {stem}.png and .npz{wav}", flush=True)
    return stem + ".png"


def draw_samples(
    sampler: Callable[..., jax.Array],
    params: Any,
    rng: jax.Array,
    cond,
    num: int,
    batch: int,
    mesh: jax.sharding.Mesh,
    desc: str = "sample",
) -> np.ndarray:
    """`num` samples from a sampler of `batch` rows (`Objective.sampler`), batch i drawn with
    fold_in(rng, i) and rows [i batch, (i + 1) batch) of the host condition `cond` (wrapping
    around; None if unconditional), gathered to every process.  -> [num, ...] float32."""
    outputs = []
    for i, start in enumerate(tqdm.trange(0, num, batch, desc=desc)):
        x = sampler(params, jax.random.fold_in(rng, i), conditioning.take(cond, start, batch))
        outputs.append(sharding.to_host(x, mesh))
    return np.concatenate(outputs)[:num]


def sample_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `samples/<method>_<steps>.png` (a grid) and `.npz` (uint8 images, labels); for
    1-D signals a plot, float32 signals and a `.wav` (see `save_samples`).

    Samples `config.sample.num_samples` images in batches of `config.sample.batch_size` with
    the method, steps and guidance of `config.sample`; returns the PNG's path. Latent
    diffusion: sampled latents decoded by the frozen stage-1 decoder.
    """
    objective, mesh = prepare(config, workdir)
    config = objective.config
    s = config.sample
    batch = min(s.batch_size, s.num_samples)
    sampler = objective.sampler(batch)
    labels, num_cols, prompts = conditioning.grid_cond(config)  # labels: any condition pytree
    params, step = restore(objective, workdir, mesh)
    print(
        f"Sampling {s.num_samples} images with {s.method}, {s.num_steps} steps, guidance "
        f"{s.guidance_scale}, from the EMA parameters of step {step}"
        + (f"; prompts {sorted(set(prompts))}" if prompts else ""),
        flush=True,
    )

    rng = jax.random.fold_in(jax.random.key(config.seed), 2)
    samples = draw_samples(sampler, params, rng, labels, s.num_samples, batch, mesh)

    stem = os.path.join(workdir, "samples", f"{s.method}_{s.num_steps}")
    if not isinstance(labels, np.ndarray):  # unconditional, or text (prompts printed above)
        labels = np.zeros(len(samples), np.int32)
    labels = labels[: s.num_samples]
    return save_samples(stem, samples, labels, num_cols)
