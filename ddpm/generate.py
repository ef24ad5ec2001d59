"""`main.py --mode=sample`: restore the EMA parameters of a workdir and draw samples."""

import os

import jax
import ml_collections
import numpy as np
import tqdm

from ddpm import (
    checkpoint,
    conditioning,
    config_check,
    images,
    latent,
    models,
    sharding,
    signals,
    train,
)


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str, model) -> tuple[dict, int]:
    """(EMA parameters, step) of the latest checkpoint in `workdir`, on this run's devices.

    Laid out as training lays them out (replicated, or split over config.training.fsdp devices),
    whatever the devices the checkpoint was written on.
    """
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt.directory}; train first: python main.py "
                f"--config=<config> --workdir={workdir}"
            )
        tx, _ = train.make_optimizer(config.training)
        mesh = sharding.create_mesh(fsdp=config.training.fsdp)
        target = train.abstract_train_state(config, model, tx, mesh)
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return state.ema_params, step


def prepare(config: ml_collections.ConfigDict, workdir: str):
    """Validated start-up of a mode that samples from a trained `workdir` (sample, inpaint,
    img2img): -> (config, model, schedule, stage1 or None); config gets latent diffusion's
    saved scale factor (read from the stage-1 and this workdir). Bad config: a ValueError."""
    config_check.validate(config)
    if config.model.name == "autoencoder":
        raise ValueError(
            "config.model.name='autoencoder' is not a generative model: --mode=sample needs a "
            "diffusion run (its reconstructions are the grids in the workdir's samples/)"
        )
    stage1 = latent.load_stage1(config, sharding.create_mesh(fsdp=config.training.fsdp))
    if stage1 is not None:  # the scale factor training used, saved in workdir/config.json
        config = latent.with_scale_factor(config, workdir, stage1, estimate=False)
    config_check.check_workdir_compatible(config, workdir)
    return config, models.create_model(config), train.build_schedule(config), stage1


def save_samples(stem: str, samples: np.ndarray, labels: np.ndarray, num_cols: int) -> str:
    """Writes `stem`.png (a grid; signals: a plot) and `stem`.npz (uint8 images, or float32
    signals, and labels), and for 1-D signals [N, L, C] also `stem`.wav. -> the PNG's path."""
    images.save_png(stem + ".png", images.sample_grid(samples, num_cols))
    if samples.ndim == 3:
        signals.save_wav(stem + ".wav", samples)
        np.savez_compressed(stem + ".npz", signals=samples.astype(np.float32), labels=labels)
    else:
        np.savez_compressed(stem + ".npz", images=images.to_uint8(samples), labels=labels)
    print(f"Wrote {stem}.png and .npz" + (" and .wav" if samples.ndim == 3 else ""), flush=True)
    return stem + ".png"


def draw_samples(
    sampler, params, rng: jax.Array, cond, num: int, batch: int, desc: str = "sample"
) -> np.ndarray:
    """`num` samples from a grid sampler of `batch` rows (`train.make_grid_sampler`), batch i
    drawn with fold_in(rng, i) and rows [i batch, (i + 1) batch) of the host condition `cond`
    (wrapping around; None if unconditional).  -> [num, ...] float32 numpy."""
    outputs = []
    for i, start in enumerate(tqdm.trange(0, num, batch, desc=desc)):
        x = sampler(params, jax.random.fold_in(rng, i), conditioning.take(cond, start, batch))
        outputs.append(np.asarray(x))
    return np.concatenate(outputs)[:num]


def sample_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `samples/<method>_<steps>.png` (a grid) and `.npz` (uint8 images, labels); for
    1-D signals a plot, float32 signals and a `.wav` (see `save_samples`).

    Samples `config.sample.num_samples` images in batches of `config.sample.batch_size` with
    the method, steps and guidance of `config.sample`; returns the PNG's path. Latent
    diffusion: sampled latents decoded by the frozen stage-1 decoder.
    """
    config, model, schedule, stage1 = prepare(config, workdir)
    s = config.sample
    batch = min(s.batch_size, s.num_samples)
    sampler = train.make_grid_sampler(config, model, schedule, batch, stage1)
    labels, num_cols, prompts = conditioning.grid_cond(config)  # labels: any condition pytree
    params, step = restore_ema_params(config, workdir, model)
    print(
        f"Sampling {s.num_samples} images with {s.method}, {s.num_steps} steps, guidance "
        f"{s.guidance_scale}, from the EMA parameters of step {step}"
        + (f"; prompts {sorted(set(prompts))}" if prompts else ""),
        flush=True,
    )

    rng = jax.random.fold_in(jax.random.key(config.seed), 2)
    samples = draw_samples(sampler, params, rng, labels, s.num_samples, batch)

    stem = os.path.join(workdir, "samples", f"{s.method}_{s.num_steps}")
    if not isinstance(labels, np.ndarray):  # unconditional, or text (prompts printed above)
        labels = np.zeros(len(samples), np.int32)
    labels = labels[: s.num_samples]
    return save_samples(stem, samples, labels, num_cols)
