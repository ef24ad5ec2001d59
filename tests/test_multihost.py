"""Scale-out: two JAX processes, FSDP on 4 devices, restoring a checkpoint on other topologies.

Each test runs its multi-device or multi-process part in subprocesses (the device count and
the distributed runtime are fixed when JAX starts) and checks their numbers here.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm import data, sharding, train
from tests import two_processes
from tests.tiny import step_parts, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(module: str, *args: str, devices: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out
    return out


def _finish_all(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    """Outputs of `procs` once all exited 0; on any failure or timeout every one is killed
    (a process of a collective job left alone would wait for its peer forever)."""
    try:
        return [_finish(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_for_checkpoint(workdir, procs, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(f"no checkpoint {step} in {workdir}: {procs[0].communicate()[0]}")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved_state(workdir, step: int) -> dict:
    """The TrainState saved at `step` as a dict, on this process's first device.

    A checkpoint written on several devices needs a target on this process's devices.
    """
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one),
        checkpointer.metadata(path).item_metadata,
    )
    return checkpointer.restore(path, target)


def test_two_processes_stop_together_and_resume_on_one_then_two(tmp_path):
    """Two processes trained through main.py's --coordinator_address / --num_processes /
    --process_id (tests/two_processes.py). SIGTERM to one of them: both stop at the same
    step, save that checkpoint together and exit 0. One process alone (one device) resumes
    it for a step or two and is preempted; two processes resume that and finish. The finished
    run equals one uninterrupted process on the one-process data stream: the global batches
    do not depend on the process count (elastic resume)."""
    port = str(_free_port())
    procs = [
        _python("tests.two_processes", str(i), "2", port, str(tmp_path), "--slow") for i in range(2)
    ]
    _wait_for_checkpoint(tmp_path, procs, 2)
    procs[1].send_signal(signal.SIGTERM)  # process 0 gets no signal
    outs = _finish_all(procs)
    stops = [int(o.split("saved checkpoint at step ")[1].split(";")[0]) for o in outs]
    assert stops[0] == stops[1] and 2 <= stops[0] < two_processes.NUM_STEPS - 1, outs
    assert all("preemption notice (SIGTERM), on every process" in o for o in outs)
    assert max(int(s) for s in os.listdir(tmp_path / "checkpoints")) == stops[0]

    alone_steps = min(2, two_processes.NUM_STEPS - 1 - stops[0])
    (alone,) = _finish_all(
        [_python("tests.two_processes", "0", "1", "0", str(tmp_path), f"--preempt={alone_steps}")]
    )
    assert f"Resumed from checkpoint at step {stops[0]}" in alone, alone
    assert "Devices: 1 (cpu), processes: 1; global batch 8, per device 8" in alone, alone
    resumed_at = stops[0] + alone_steps
    assert f"saved checkpoint at step {resumed_at};" in alone, alone

    port = str(_free_port())
    procs = [_python("tests.two_processes", str(i), "2", port, str(tmp_path)) for i in range(2)]
    outs = _finish_all(procs)
    assert all(f"Resumed from checkpoint at step {resumed_at}" in o for o in outs), outs
    assert all("Devices: 2 (cpu), processes: 2; global batch 8, per device 4" in o for o in outs)

    # One process, one device, the same config, the one-process data stream. Same parameters
    # up to the order of the gradient reduction (float32 rounding, well under 1e-5); a step on
    # another batch moves them by up to the learning rate, 2e-3 (Adam).
    config = two_processes.get_config()
    config.training.fsdp = 1
    objective, step_fn, state, mesh = step_parts(config, seed=config.seed)
    batches = data.create_dataset(config, "train", batch_size=8, seed=config.seed)
    for _ in range(two_processes.NUM_STEPS):
        state, _ = step_fn(state, sharding.global_batch(next(batches), mesh), objective.frozen)
    saved = _saved_state(tmp_path, two_processes.NUM_STEPS)
    assert int(saved["step"]) == two_processes.NUM_STEPS
    expected = jax.device_get(state.params)
    assert len(jax.tree.leaves(expected)) > 10
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    # The parameters were split over the processes: each held half of the largest kernel.
    for i, out in enumerate(outs):
        assert f"process {i} holds (3, 3, 8, 8) of (3, 3, 16, 8)" in out, out
    # Process 0 alone logged (one line per logged step) and drew the grid; both wrote the
    # checkpoints.
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 8]
    assert "step 8/8" in outs[0] and "step 8/8" not in outs[1]
    # Sample mode on the finished run: both processes sampled from parameters split over
    # them (gathered to each), process 0 alone wrote.
    assert sorted(os.listdir(tmp_path / "samples")) == [
        "ddim_5.npz",
        "ddim_5.png",
        "step_0000008.png",
    ]
    assert "ddim_5.png and .npz" in outs[0] and "ddim_5.png and .npz" not in outs[1]
    written = np.load(tmp_path / "samples" / "ddim_5.npz")
    assert written["images"].shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(written["labels"], [0, 1, 2, 3])  # one row per class
    assert "8" in os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow  # ~2 min of CPU; the default run's two-process test covers FSDP and restore too
def test_fsdp_matches_replicated_and_restores_on_one_and_two_devices(tmp_path, capsys):
    four, one = tmp_path / "four", tmp_path / "one"
    out = _finish(_python("tests.fsdp_devices", str(four), devices=4))

    # 3 Adam steps with parameters split over 4 devices equal the replicated ones up to
    # float32 rounding (XLA sums the all-gathered / reduce-scattered pieces in another order).
    maxdiff = float(out.split("maxdiff ")[1].split()[0])
    assert maxdiff < 1e-5, out
    leaves, split, wrong = (
        int(out.split(f"{k} ")[1].split()[0]) for k in ("leaves", "split", "wrong")
    )
    assert split >= 10 and wrong == 0 and leaves > split, out
    assert "compiles 1" in out, out
    # The largest kernel, [3, 3, 16, 8], is split along its largest axis.
    assert "largest (3, 3, 16, 8) spec P(None, None, 'fsdp', None)" in out, out
    assert (
        "config.training.fsdp=3 must be a positive divisor of the device count (4 devices)" in out
    )

    # The fsdp=4 run on 4 devices saved steps 2 and 4. Resumed at step 2 on two of its
    # devices (fsdp=2) and here on one device (replicated), both reach its step 4.
    assert float(out.split("restored on 2 devices: maxdiff ")[1].split()[0]) < 1e-5, out
    shutil.copytree(four, one)
    shutil.rmtree(one / "checkpoints" / "4")
    train.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), str(one))
    assert "Resumed from checkpoint at step 2" in capsys.readouterr().out
    reference = jax.tree.leaves(_saved_state(four, 4))
    resumed = jax.tree.leaves(_saved_state(one, 4))
    assert len(resumed) == len(reference) > 10
    for a, b in zip(reference, resumed, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
