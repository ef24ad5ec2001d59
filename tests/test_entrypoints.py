"""The command line as a user runs it: `--distributed` in each cluster environment JAX detects
(the explicit --coordinator_address / --num_processes / --process_id flags train the 2-process
job of test_multihost; Ctrl-C during training: test_train's exact-resume test).

Every test runs real processes (`python main.py ...`, or `ddpm.cli.run()`, which is all that
main.py calls) and kills every one of them when a test fails or times out: a process of a
collective job left alone would wait for its peer for minutes.
"""

import os
import pathlib
import random
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests.tiny's config (tiny_sweep's get_config: 4 steps, checkpoints and logs every 2) with a
# one-level U-Net, which compiles in 60 % of the time: the command line is under test here.
CONFIG = ["--config=tests/tiny_sweep.py", "--config.model.ch_mult=(1,)"]
# Variables by which JAX (or a scheduler around this test run) could detect a cluster: none
# leaks from the environment the tests run in into the jobs they start.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR_")
CLUSTER_NAMES = ("KUBERNETES_SERVICE_HOST", "JAX_LOCAL_DEVICE_IDS")


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(CLUSTER_PREFIXES) and k not in CLUSTER_NAMES
    }
    return {**env, "PYTHONPATH": ROOT, **extra}


def _start(args: list[str], log: pathlib.Path, env: dict[str, str]) -> subprocess.Popen:
    """`python ARGS` in the checkout, stdout and stderr to the file `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait_all(procs: list[subprocess.Popen], logs: list[pathlib.Path], timeout: float) -> list[str]:
    """The outputs of `procs` once all exited 0. As soon as one fails, or at the timeout,
    every one still running is killed and the test fails with all outputs."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        _stop_all(procs)
    outs = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), (codes, outs)
    return outs


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(low: int = 0) -> int:
    """A free local port: any (the system's choice), or one in [low, 65535]."""
    if not low:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(100):
        port = random.randint(low, 65535)
        if _port_is_free(port):
            return port
    raise RuntimeError(f"no free port in [{low}, 65535]")


# JAX's SLURM and Open MPI detection derive the coordinator's port from the job id, in
# [65535 - 2^12 + 1, 65535]; the tests choose job ids that give a free port.
DERIVED_PORTS = 65535 - 2**12 + 1


def _cluster(kind: str, process_id: int, port: int) -> tuple[dict[str, str], list[str]]:
    """(environment variables, CLI flags) of process `process_id` of a 2-process job on
    localhost as each cluster sets them up; the coordinator listens on `port`."""
    if kind == "jax_coordinator_address":  # the address from JAX's variable, the rest flags
        return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}, [
            "--distributed",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
    if kind == "slurm":  # srun --ntasks=2 --ntasks-per-node=1 on node "127.0.0.1"
        env = {
            "SLURM_JOB_ID": str(port - DERIVED_PORTS + 2**12 * 1000),
            "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(process_id),
            "SLURM_LOCALID": "0",
        }
        return env, ["--distributed"]
    if kind == "ompi":  # mpirun -np 2; the job id is a multiple of 2^12 in the HNP URI
        job_id = (port - DERIVED_PORTS + 2**12 * 7) * 2**12
        env = {
            "OMPI_MCA_orte_hnp_uri": f"{job_id}.0;tcp://127.0.0.1:41000",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_RANK": str(process_id),
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        }
        return env, ["--distributed"]
    assert kind == "tpu"  # a GKE JobSet of one 2-worker TPU slice (no metadata server asked)
    env = {
        "TPU_WORKER_HOSTNAMES": "127.0.0.1,127.0.0.1",
        "TPU_WORKER_ID": str(process_id),
        "MEGASCALE_COORDINATOR_ADDRESS": "127.0.0.1",
        "MEGASCALE_NUM_SLICES": "1",
        "MEGASCALE_SLICE_ID": "0",
        "JAX_COORDINATOR_PORT": str(port),  # JAX's TPU default, 8482, may be taken here
    }
    return env, ["--distributed"]


# `ddpm.cli.run()` (main.py's one call) with the trainer replaced by a report of the job that
# the CLI joined: this process's index and count, the devices, the process indices gathered
# from every process by a collective, and the coordinator address JAX used. TPU: JAX detects
# TPU slices only on a Cloud TPU VM (libtpu and TPU chips), which is faked here.
PROBE = """
import os
import sys

import jax
from jax._src import distributed
from jax._src.clusters import cloud_tpu_cluster
from jax.experimental import multihost_utils

from ddpm import cli, train

if "TPU_WORKER_ID" in os.environ:
    cloud_tpu_cluster.running_in_cloud_tpu_vm = True


def report(config, workdir):
    gathered = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index()))
    print(
        f"process {jax.process_index()} of {jax.process_count()}, "
        f"devices {jax.device_count()}, gathered {gathered.tolist()}, "
        f"coordinator {distributed.global_state.coordinator_address}",
        flush=True,
    )


train.train_and_evaluate = report
sys.argv[0] = "main.py"
cli.run()
"""


@pytest.mark.parametrize("kind", ["jax_coordinator_address", "slurm", "ompi", "tpu"])
def test_distributed_detects_each_cluster_environment(kind, tmp_path):
    """Two processes with `--distributed` and nothing else but what the cluster sets (an
    address in JAX_COORDINATOR_ADDRESS with the count and index as flags; SLURM's, Open MPI's
    or a GKE TPU slice's variables) form one 2-process JAX job over gloo on localhost: each
    reports its own index (the SLURM_PROCID, rank or worker id it was given) of 2, the two
    CPU devices, both indices gathered by a collective, and the coordinator address derived
    from the variables (for SLURM and Open MPI: the port from the job id)."""
    port = _free_port(DERIVED_PORTS if kind in ("slurm", "ompi") else 0)
    procs, logs = [], []
    try:
        for i in range(2):
            env, flags = _cluster(kind, i, port)
            logs.append(tmp_path / f"process{i}.log")
            args = ["-c", PROBE, *CONFIG, f"--workdir={tmp_path / 'run'}", *flags]
            procs.append(_start(args, logs[-1], _env(**env)))
        outs = _wait_all(procs, logs, timeout=120)
    finally:
        _stop_all(procs)
    for i, out in enumerate(outs):
        expected = f"process {i} of 2, devices 2, gathered [0, 1], coordinator 127.0.0.1:{port}"
        assert expected in out, out
