"""Orbax checkpoints of a run: train state, data-iterator position and config, by step.

Each step is one orbax composite checkpoint under `workdir/checkpoints/<step>` with items
`state` (the TrainState pytree), `data` (the iterator state, JSON) and `config` (JSON).
Orbax writes to a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest.
"""

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores the checkpoints of one workdir (async saves, last `keep` kept)."""

    def __init__(self, workdir: str, *, keep: int, save_async: bool = True, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=save_async
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config_json: dict) -> None:
        """Starts saving `state` at `step` (returns before an async save finishes)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_json),
            ),
            force=True,
        )

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """(state, data_state) of `step`, placed like `target_state`.

        `target_state` is a pytree of arrays (or `jax.ShapeDtypeStruct`s with shardings) that
        gives each leaf's shape, dtype and sharding: a checkpoint saved on any number of
        devices restores onto the current mesh.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        try:
            restored = self._restore(step, abstract)
        except ValueError as e:
            # Checkpoints written before the train state had `carry` or `phema` (None then,
            # as they are for most runs now) restore into the state without them.
            absent = [
                name
                for name in ("carry", "phema")
                if getattr(abstract, name, 0) is None and f"{name}:" in str(e)
            ]
            if not absent:
                raise
            fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
            restored = self._restore(step, {k: v for k, v in fields.items() if k not in absent})
            return dataclasses.replace(abstract, **restored.state), restored.data
        return restored.state, restored.data

    def _restore(self, step: int, abstract: Any):
        return self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )

    def restore_ema(self, step: int, target_ema: Any) -> Any:
        """The EMA parameters alone of `step`, placed like `target_ema` (a pytree of
        `jax.ShapeDtypeStruct`s with shardings): an orbax partial restore of the state's
        `ema_params` subtree, so the optimizer state, whatever its layout, is not read."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(target_ema)
        # A manager of its own: the partial restore registers `state` with a PyTree handler,
        # which would refuse this manager's later StandardSave of the same item.
        manager = ocp.CheckpointManager(self.directory)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={"ema_params": target_ema},
                        restore_args={"ema_params": restore_args},
                        partial_restore=True,
                    )
                ),
            )
        finally:
            manager.close()
        return restored.state["ema_params"]

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
