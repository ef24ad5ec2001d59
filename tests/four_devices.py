"""Subprocess of test_train: 3 train steps on 1 and on 4 simulated CPU devices, same batches.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4; prints the largest parameter
difference, the device count each state lives on, and the error for an indivisible batch.
"""

import jax
import numpy as np

from ddpm import sharding
from tests.tiny import step_parts, tiny_config


def params_after_three_steps(devices: list) -> dict:
    objective, step_fn, state, mesh = step_parts(tiny_config(), sharding.create_mesh(devices))
    for i in range(3):
        images = jax.random.uniform(jax.random.key(i), (8, 16, 16, 1), minval=-1, maxval=1)
        batch = {"image": np.asarray(images), "label": np.arange(8, dtype=np.int32) % 10}
        state, _ = step_fn(state, sharding.global_batch(batch, mesh), objective.frozen)
    print("state on devices:", len(state.params["conv_in"]["kernel"].sharding.device_set))
    return jax.device_get(state.params)


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    one, four = params_after_three_steps(jax.devices()[:1]), params_after_three_steps(jax.devices())
    diffs = [
        np.max(np.abs(a - b))
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True)
    ]
    print("maxdiff", float(max(diffs)))
    try:
        sharding.per_device_batch_size(6, sharding.create_mesh(), "config.training.batch_size")
    except ValueError as e:
        print("error", e)
