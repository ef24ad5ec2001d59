"""Subprocess of test_multihost on 4 simulated CPU devices (XLA_FLAGS device count 4).

`python -m tests.fsdp_devices WORKDIR`: 3 train steps with parameters split over fsdp=4 and
replicated (fsdp=1) on the same batches; prints their largest parameter difference, how the
arrays are split and the compile count. Then trains WORKDIR with fsdp=4 for 4 steps
(checkpoints at 2 and 4), resumes its step 2 on 2 of the devices and prints how far that
lands from the saved step 4 (the test resumes it on 1 device itself).
"""

import sys

import jax
import numpy as np

from ddpm import build, checkpoint, data, sharding, train
from tests.tiny import step_parts, tiny_config

# Small enough that the tiny U-Net's convolution kernels are split.
MIN_SIZE = 512


def run_config(fsdp: int):
    """The tiny config with fsdp; 4 steps, so the last run below reuses three_steps's compile."""
    return tiny_config(num_steps=4, checkpoint_every=2, fsdp=fsdp, fsdp_min_size=MIN_SIZE)


def three_steps(fsdp: int) -> tuple[train.TrainState, int]:
    """(state after 3 steps on fixed batches with config.training.fsdp=fsdp, compile count)."""
    objective, step_fn, state, mesh = step_parts(run_config(fsdp))
    for i in range(3):
        images = jax.random.uniform(jax.random.key(i), (8, 16, 16, 1), minval=-1, maxval=1)
        batch = {"image": np.asarray(images), "label": np.arange(8, dtype=np.int32) % 10}
        state, _ = step_fn(state, sharding.global_batch(batch, mesh), objective.frozen)
    return state, step_fn._cache_size()


def split_report(state: train.TrainState) -> tuple[int, int, int]:
    """(leaves, leaves split over fsdp, leaves split wrongly) of params, EMA and Adam moments.

    A split leaf of shape S has 4 shards, each S with the split axis divided by 4, one per
    device; a leaf of >= MIN_SIZE elements with an axis divisible by 4 must be split.
    """
    leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
    split = wrong = 0
    for leaf in leaves:
        shapes = {shard.data.shape for shard in leaf.addressable_shards}
        devices = {shard.device for shard in leaf.addressable_shards}
        if shapes != {leaf.shape}:
            split += 1
            (shard_shape,) = shapes
            ratios = [a // b for a, b in zip(leaf.shape, shard_shape, strict=True)]
            wrong += sorted(ratios)[-1] != 4 or np.prod(ratios) != 4 or len(devices) != 4
        elif leaf.size >= MIN_SIZE and any(n % 4 == 0 for n in leaf.shape):
            wrong += 1
    return len(leaves), split, wrong


def resume_on_two_devices(workdir: str) -> float:
    """Largest difference to the saved step 4 after resuming step 2 on 2 of the 4 devices.

    The checkpoint was written with fsdp=4 on 4 devices; it restores split over fsdp=2 on
    devices 0 and 1, and 2 more steps on the same batches (the restored data position) must
    reach the 4-device step 4.
    """
    config = run_config(2)
    objective, step_fn, _, mesh = step_parts(
        config, sharding.create_mesh(jax.devices()[:2], fsdp=2)
    )
    tx, _ = build.optimizer(config.training)
    target = train.abstract_train_state(objective, tx, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    (state, data_state), (saved, _) = ckpt.restore(2, target), ckpt.restore(4, target)
    ckpt.close()
    assert state.params["conv_out"]["kernel"].sharding.mesh.devices.size == 2
    batches = data.create_dataset(config, "train", batch_size=8, seed=config.seed)
    batches.set_state(data_state)
    for _ in range(2):
        state, _ = step_fn(state, sharding.global_batch(next(batches), mesh), objective.frozen)
    pairs = zip(jax.tree.leaves(state), jax.tree.leaves(saved), strict=True)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    (split_state, compiles), (replicated_state, _) = three_steps(4), three_steps(1)
    diffs = [
        np.max(np.abs(a - b))
        for a, b in zip(
            jax.tree.leaves(jax.device_get(split_state.params)),
            jax.tree.leaves(jax.device_get(replicated_state.params)),
            strict=True,
        )
    ]
    print("maxdiff", float(max(diffs)))
    leaves, split, wrong = split_report(split_state)
    print(f"leaves {leaves} split {split} wrong {wrong}")
    print("compiles", compiles)
    largest = max(jax.tree.leaves(split_state.params), key=lambda leaf: leaf.size)
    print(f"largest {largest.shape} spec {largest.sharding.spec}")
    try:
        sharding.create_mesh(fsdp=3)
    except ValueError as e:
        print("error", e)
    workdir = sys.argv[1]
    train.train_and_evaluate(run_config(4), workdir)
    print("restored on 2 devices: maxdiff", resume_on_two_devices(workdir))
