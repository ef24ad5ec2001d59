"""Post-hoc EMA of a run (Karras et al. 2024, EDM2): the snapshots of the power EMAs that
training tracks (config.phema.track), and the EMA of another width reconstructed from them
(`ddpm.phema` has the math).

    workdir/phema/snapshots/<step>       the train state's `phema` tuple at that step (orbax,
                                          sharded like the EMA), every phema.snapshot_every
                                          steps and at the run's last step
    workdir/phema/tracked.json           the widths tracked, in the tuple's order
    workdir/phema/sigma_rel_<v>/<step>   a reconstruction written by --mode=phema

Every reader (sample, eval, editing, a distillation's teacher) gets a post-hoc EMA through
`build.restore_ema` when config.phema.sigma_rel is set: the one --mode=phema wrote at the
latest snapshot, else one reconstructed in memory.
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ddpm import phema
from ddpm.errors import UserError

TRACKED_FILE = "tracked.json"


def _root(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "phema"))


def _manager(directory: str, *, create: bool, save_async: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=save_async, max_to_keep=None
    )
    return ocp.CheckpointManager(directory, options=options)


class SnapshotWriter:
    """Stores the train state's power EMAs every `every` steps (and at `last_step`) in
    workdir/phema/snapshots. A run resumed at `resume_step` first drops the snapshots it
    took after that step (a run killed after a snapshot and before its checkpoint), so the
    snapshots are always those of the run that continues: resuming repeats them exactly."""

    def __init__(self, workdir: str, track: tuple[float, ...], every: int, resume_step: int):
        self.every = every
        root = _root(workdir)
        self._manager = _manager(os.path.join(root, "snapshots"), create=True, save_async=True)
        for step in self._manager.all_steps():
            if step > resume_step:
                self._manager.delete(step)
        if jax.process_index() == 0:
            with open(os.path.join(root, TRACKED_FILE), "w") as f:
                json.dump({"sigma_rel": list(track)}, f)

    def maybe_save(self, step: int, power_emas: Any, last: bool) -> None:
        if step % self.every == 0 or last:
            self._manager.save(step, args=ocp.args.StandardSave(power_emas))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _tracked(workdir: str) -> tuple[float, ...]:
    path = os.path.join(_root(workdir), TRACKED_FILE)
    try:
        with open(path) as f:
            return tuple(float(v) for v in json.load(f)["sigma_rel"])
    except FileNotFoundError:
        raise UserError(
            f"config.phema.sigma_rel: {workdir} has no power-EMA snapshots ({path} is missing); "
            "train with config.phema.track, e.g. (0.05, 0.10)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}); it lists the tracked sigma_rel") from None


def saved_dir(workdir: str, sigma_rel: float) -> str:
    return os.path.join(_root(workdir), f"sigma_rel_{sigma_rel:.4f}")


def reconstruct(workdir: str, sigma_rel: float, target: Any) -> tuple[Any, int, float]:
    """(parameters, step, fit): the EMA of width `sigma_rel` at the latest snapshot, the
    least-squares combination of every snapshot (`phema.reconstruction_weights`), laid out
    like `target` (a params tree of `jax.ShapeDtypeStruct`s with shardings). fit: the
    relative L2 distance of the combined profile from the requested one (0 = exact)."""
    track = _tracked(workdir)
    manager = _manager(os.path.join(_root(workdir), "snapshots"), create=False)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise UserError(f"config.phema.sigma_rel: no snapshots in {manager.directory} yet")
        snap_steps = np.repeat(steps, len(track))
        snap_gammas = np.tile([phema.gamma_of(w) for w in track], len(steps))
        gamma = phema.gamma_of(sigma_rel)
        weights = phema.reconstruction_weights(snap_steps, snap_gammas, steps[-1], gamma)[:, 0]
        fit = phema.profile_fit_error(snap_steps, snap_gammas, weights, steps[-1], gamma)
        abstract = tuple(target for _ in track)
        accumulate = jax.jit(
            lambda total, snapshot, w: jax.tree.map(
                lambda t, *tracked: t + sum(wi * e for wi, e in zip(w, tracked, strict=True)),
                total,
                *snapshot,
            ),
            donate_argnums=0,
        )
        total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), target)
        for i, step in enumerate(steps):
            snapshot = manager.restore(step, args=ocp.args.StandardRestore(abstract))
            w = jnp.asarray(weights[i * len(track) : (i + 1) * len(track)], jnp.float32)
            total = accumulate(total, snapshot, w)
    finally:
        manager.close()
    return total, steps[-1], fit


def restore(workdir: str, sigma_rel: float, target: Any) -> tuple[Any, int]:
    """(parameters, step) of the post-hoc EMA `sigma_rel`: the set --mode=phema wrote if it
    was written at the latest snapshot, else reconstructed now."""
    saved = _manager(saved_dir(workdir, sigma_rel), create=False)
    snapshots = _manager(os.path.join(_root(workdir), "snapshots"), create=False)
    try:
        step = saved.latest_step()
        if step is not None and step == snapshots.latest_step():
            return saved.restore(step, args=ocp.args.StandardRestore(target)), step
    finally:
        saved.close()
        snapshots.close()
    params, step, fit = reconstruct(workdir, sigma_rel, target)
    print(
        f"Post-hoc EMA sigma_rel={sigma_rel:g} at step {step} reconstructed from the snapshots "
        f"(profile fit {fit:.2%}); --mode=phema stores it",
        flush=True,
    )
    return params, step


def write(workdir: str, sigma_rel: float, target: Any) -> str:
    """--mode=phema: reconstructs `sigma_rel` and stores it in its `saved_dir`; its path."""
    params, step, fit = reconstruct(workdir, sigma_rel, target)
    manager = _manager(saved_dir(workdir, sigma_rel), create=True)
    try:
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(step, args=ocp.args.StandardSave(params))
        manager.wait_until_finished()
    finally:
        manager.close()
    path = os.path.join(saved_dir(workdir, sigma_rel), str(step))
    print(
        f"Wrote the post-hoc EMA sigma_rel={sigma_rel:g} at step {step} (tracked "
        f"{', '.join(f'{w:g}' for w in _tracked(workdir))}; profile fit {fit:.2%}) to {path}",
        flush=True,
    )
    return path
