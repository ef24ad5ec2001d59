"""`main.py --mode=sample`: restore the EMA parameters of a workdir and draw samples."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from ddpm import checkpoint, config_check, images, models, sharding, train


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str, model) -> tuple[dict, int]:
    """(EMA parameters, step) of the latest checkpoint in `workdir`, replicated on all devices."""
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt.directory}; train first: python main.py "
                f"--config=<config> --workdir={workdir}"
            )
        tx, _ = train.make_optimizer(config.training)
        init = functools.partial(train.create_train_state, config=config, model=model, tx=tx)
        abstract = jax.eval_shape(init, jax.random.key(0))
        replicated = sharding.replicated(sharding.create_mesh())
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract
        )
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return state.ema_params, step


def sample_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `samples/<method>_<steps>.png` (a grid) and `.npz` (uint8 images, labels).

    Samples `config.sample.num_samples` images in batches of `config.sample.batch_size` with
    the method, steps and guidance of `config.sample`; returns the PNG's path.
    """
    config_check.validate(config)
    config_check.check_workdir_compatible(config, workdir)
    model = models.create_model(config)
    schedule = train.build_schedule(config)
    s = config.sample
    batch = min(s.batch_size, s.num_samples)
    sampler = train.make_grid_sampler(config, model, schedule, batch)
    labels, num_cols = train.grid_labels(config)
    params, step = restore_ema_params(config, workdir, model)
    print(
        f"Sampling {s.num_samples} images with {s.method}, {s.num_steps} steps, guidance "
        f"{s.guidance_scale}, from the EMA parameters of step {step}",
        flush=True,
    )

    rng = jax.random.fold_in(jax.random.key(config.seed), 2)
    outputs = []
    for i, start in enumerate(tqdm.trange(0, s.num_samples, batch, desc="sample")):
        batch_labels = None
        if labels is not None:
            batch_labels = jnp.asarray(np.resize(labels[start : start + batch], batch))
        x = sampler(params, jax.random.fold_in(rng, i), batch_labels)
        outputs.append(images.to_uint8(np.asarray(x)))
    samples = np.concatenate(outputs)[: s.num_samples]

    stem = os.path.join(workdir, "samples", f"{s.method}_{s.num_steps}")
    images.save_png(stem + ".png", images.make_grid(samples, num_cols))
    np.savez_compressed(
        stem + ".npz",
        images=samples,
        labels=np.zeros(len(samples), np.int32) if labels is None else labels[: s.num_samples],
    )
    print(f"Wrote {stem}.png and {stem}.npz", flush=True)
    return stem + ".png"
