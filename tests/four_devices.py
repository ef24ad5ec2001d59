"""Subprocess of test_train: 3 train steps on 1 and on 4 simulated CPU devices, same batches,
then the sampler of the result on both.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4; prints the largest parameter
difference, the device count each state lives on, the error for an indivisible batch, the
largest sample difference, and the most rows of a 16x16 activation in each compiled sampler.
"""

import re

import jax
import numpy as np

from ddpm import conditioning, objectives, sharding
from tests.tiny import step_parts, tiny_config


def params_after_three_steps(devices: list) -> dict:
    objective, step_fn, state, mesh = step_parts(tiny_config(), sharding.create_mesh(devices))
    for i in range(3):
        images = jax.random.uniform(jax.random.key(i), (8, 16, 16, 1), minval=-1, maxval=1)
        batch = {"image": np.asarray(images), "label": np.arange(8, dtype=np.int32) % 10}
        state, _ = step_fn(state, sharding.global_batch(batch, mesh), objective.frozen)
    print("state on devices:", len(state.params["conv_in"]["kernel"].sharding.device_set))
    return jax.device_get(state.params)


def samples_and_rows(params: dict, devices: list) -> tuple[np.ndarray, int]:
    """8 samples of the objective's sampler on a mesh of `devices` (classes 0-7, the tiny
    config's guidance, unclipped), and the most rows of a 16x16 activation in its program."""
    config = tiny_config()
    config.sample.clip_x0 = False  # 3 steps from initialisation: most samples would clip
    mesh = sharding.create_mesh(devices)
    sample = objectives.create(config, workdir=None, mesh=mesh).sampler(8)
    params = jax.device_put(params, sharding.replicated(mesh))
    cond = conditioning.take(conditioning.grid_cond(config)[0], 0, 8)
    program = jax.jit(sample).lower(params, jax.random.key(1), cond).compile().as_text()
    rows = max(int(n) for n in re.findall(r"f32\[(\d+),16,16,\d+\]", program))
    return np.asarray(sample(params, jax.random.key(1), cond)), rows


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    one, four = params_after_three_steps(jax.devices()[:1]), params_after_three_steps(jax.devices())
    diffs = [
        np.max(np.abs(a - b))
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True)
    ]
    print("maxdiff", float(max(diffs)))
    (x1, rows1), (x4, rows4) = (
        samples_and_rows(one, jax.devices()[:1]),
        samples_and_rows(one, jax.devices()),
    )
    print("sample maxdiff", float(np.max(np.abs(x1 - x4))), "scale", float(np.max(np.abs(x1))))
    print("sampler rows per device: one", rows1, "four", rows4)
    try:
        sharding.per_device_batch_size(6, sharding.create_mesh(), "config.training.batch_size")
    except ValueError as e:
        print("error", e)
