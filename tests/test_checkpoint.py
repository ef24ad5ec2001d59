"""Checkpoints: restoring workdirs written by earlier versions of the train state."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import checkpoint, train


@flax.struct.dataclass
class _StateBeforeCarry:
    """The train state's layout before `carry` and `phema` existed."""

    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: tuple
    rng: jax.Array


@flax.struct.dataclass
class _StateBeforePhema:
    """The train state's layout before `phema` existed (carry None, as for most runs)."""

    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: tuple
    rng: jax.Array
    carry: object = None


@pytest.mark.parametrize("layout", [_StateBeforeCarry, _StateBeforePhema], ids=["carry", "phema"])
def test_a_checkpoint_written_before_a_state_field_existed_restores(tmp_path, layout):
    """Workdirs saved before TrainState had `carry` and `phema` (or `phema` alone) resume: the
    restore retries without the fields the checkpoint lacks."""
    old = layout(
        step=jnp.int32(7),
        params={"w": jnp.arange(3.0)},
        ema_params={"w": jnp.arange(3.0) + 1},
        opt_state=(jnp.ones(2),),
        rng=jnp.zeros(2, jnp.uint32),
    )
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, save_async=False)
    ckpt.save(7, old, {"position": 3}, {})
    target = train.TrainState(
        **{k: getattr(old, k) for k in ("step", "params", "ema_params", "opt_state", "rng")}
    )
    target = jax.tree.map(jnp.zeros_like, target)
    state, data_state = ckpt.restore(7, target)
    ckpt.close()
    assert isinstance(state, train.TrainState) and state.carry is None and state.phema is None
    assert int(state.step) == 7 and data_state == {"position": 3}
    np.testing.assert_array_equal(state.ema_params["w"], [1.0, 2.0, 3.0])
