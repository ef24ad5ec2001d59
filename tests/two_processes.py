"""Subprocess of test_multihost: one of the processes of a local JAX job (gloo collectives).

`python -m tests.two_processes PROCESS_ID NUM_PROCESSES PORT WORKDIR [--slow] [--preempt=N]`
trains as `python main.py --config=tests/two_processes.py --workdir=WORKDIR
--coordinator_address=127.0.0.1:PORT --num_processes=NUM_PROCESSES --process_id=PROCESS_ID`
does (`ddpm.cli.run()`, all that main.py calls): it joins the job and trains this file's
config, the tiny one for NUM_STEPS steps (checkpoints every 2) with the parameters split over
two processes (fsdp=2). NUM_PROCESSES=1 trains the same run alone on one device (fsdp=1, no
coordinator), as a job that came back with one host. With `--slow` every step waits 0.25 s, so
a test can preempt the job mid-run; `--preempt=N` sends this process SIGTERM during its N-th
step. A two-process job that finished then restores the latest checkpoint, prints the shape of
its own piece of the largest parameter, and draws 4 samples with `--mode=sample`'s function
(gathered from both processes; process 0 writes them).
"""

import sys

import jax
import ml_collections
import pytest

from ddpm import build, checkpoint, cli, generate, objectives, sharding, train
from tests.tiny import preempt_at, slow_down_steps, tiny_config

NUM_STEPS = 8


def get_config() -> ml_collections.ConfigDict:
    """The tiny config of this run (the test's one-process reference trains it too)."""
    return tiny_config(num_steps=NUM_STEPS, checkpoint_every=2, fsdp=2, fsdp_min_size=512)


def _print_piece_and_sample(process_id: int, workdir: str) -> None:
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    config = get_config()
    tx, _ = build.optimizer(config.training)
    mesh = sharding.create_mesh(fsdp=2)
    objective = objectives.create(config, workdir=workdir, mesh=mesh)
    target = train.abstract_train_state(objective, tx, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    ckpt_step = ckpt.latest_step()
    state, _ = ckpt.restore(ckpt_step, target)
    ckpt.close()
    largest = max(jax.tree.leaves(state.params), key=lambda leaf: leaf.size)
    (piece,) = largest.addressable_shards
    print(f"process {process_id} holds {piece.data.shape} of {largest.shape}", flush=True)
    if ckpt_step == NUM_STEPS:
        config.sample.num_samples, config.sample.batch_size = 4, 4
        generate.sample_from_workdir(config, workdir)


if __name__ == "__main__":
    process_id, num_processes, port, workdir = sys.argv[1:5]
    process_id, num_processes = int(process_id), int(num_processes)
    if "--slow" in sys.argv:
        slow_down_steps(0.25)
    for arg in sys.argv[5:]:
        if arg.startswith("--preempt="):
            preempt_at(int(arg.split("=")[1]), pytest.MonkeyPatch())
    job = (
        [
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={process_id}",
        ]
        if num_processes > 1
        else ["--config.training.fsdp=1"]
    )
    sys.argv = ["main.py", "--config=tests/two_processes.py", f"--workdir={workdir}", *job]
    try:
        cli.run()
    except SystemExit as e:  # absl's app.run exits when the mode returns
        assert not e.code, e.code
    if num_processes == 2:
        _print_piece_and_sample(process_id, workdir)
