"""The largest training batch that fits in device memory, with and without remat (issue 13).

python -m bench.max_batch [--config=configs.cifar10_ddpm] [--remat=false,true]
    [--memory-gib=N] [--run] [--probe=8,16]

For each remat setting the train step (`ddpm.train.make_train_step`, state donated) is
compiled, not run, at the `--probe` batch sizes; XLA's memory analysis of each executable
gives its peak (arguments + outputs - donated aliases + temporaries). Memory is affine in the
batch, so two probes give fixed bytes (parameters, EMA, optimizer state, workspace) and bytes
per example, and the predicted largest batch for the device's memory limit (the allocator's
`bytes_limit` on a GPU, else `--memory-gib`). With `--run` (accelerators), the prediction is
then checked by running steps: the batch is lowered by 1/16 until a step runs, then raised by
1/16 while one does (each trial compiles once), and the largest batch that ran is reported.

One JSON line per remat setting: name `max_batch/remat_<bool>`, `predicted` images per step,
the fit, the probes' peaks, the device and the versions; with --run, after all of those, one
`max_batch/remat_<bool>/measured` line each, the same with `measured` images per step.
"""

import argparse
import importlib
import json
import math
import time

import jax
import numpy as np

from ddpm import build, objectives, sharding, train
from ddpm.config.runs import data_shape

GIB = 2**30


def _train_step_at(config, batch: int):
    """(config with training.batch_size = batch, objective, tx, mesh, the jitted train step)."""
    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    mesh = build.mesh(config)
    objective = objectives.create(config, workdir=None, mesh=mesh)
    tx, lr_fn = build.optimizer(config.training)
    step = train.make_train_step(objective, tx, lr_fn, mesh)
    return config, objective, tx, mesh, step


def _batch_spec(config, batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    where = sharding.batch_sharded(mesh)
    shape = (batch, *data_shape(config))
    return {
        "image": jax.ShapeDtypeStruct(shape, np.float32, sharding=where),
        "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=where),
    }


def compiled_peak_bytes(config, batch: int) -> tuple[int, float]:
    """(peak bytes of the compiled train step at `batch`, compile seconds). Nothing runs."""
    config, objective, tx, mesh, step = _train_step_at(config, batch)
    state = train.abstract_train_state(objective, tx, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, _batch_spec(config, batch, mesh), objective.frozen).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return int(peak), seconds


def runs(config, batch: int) -> bool:
    """Whether two train steps at `batch` run on the device (False on out-of-memory)."""
    config, objective, tx, mesh, step = _train_step_at(config, batch)
    rng = np.random.default_rng(0)
    shape = (batch, *data_shape(config))
    try:
        state = train.init_train_state(jax.random.key(0), objective, tx, mesh)
        data = sharding.global_batch(
            {
                "image": rng.uniform(-1, 1, shape).astype(np.float32),
                "label": np.zeros(batch, np.int32),
            },
            mesh,
        )
        for _ in range(2):
            state, metrics = step(state, data, objective.frozen)
        jax.block_until_ready(metrics)
        return True
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
            return False
        raise


def largest_running_batch(config, start: int) -> int:
    """Step down by 1/16 from `start` until a batch runs, then up by 1/16 while one does."""
    step = lambda b: max(1, b // 16)
    batch = start
    while batch > 1 and not runs(config, batch):
        batch -= step(batch)
    while runs(config, batch + step(batch)):
        batch += step(batch)
    return batch


def memory_limit_bytes(memory_gib: float | None) -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if memory_gib is None:
        raise ValueError(
            f"--memory-gib is needed: device {jax.devices()[0].device_kind!r} reports no "
            "memory limit"
        )
    return int(memory_gib * GIB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs.cifar10_ddpm")
    parser.add_argument("--remat", default="false,true")
    parser.add_argument("--memory-gib", type=float, help="limit when the device reports none")
    parser.add_argument("--probe", default="8,16", help="two batch sizes to fit memory on")
    parser.add_argument("--run", action="store_true", help="check the prediction by running")
    args = parser.parse_args()
    remats = [{"true": True, "false": False}[r.strip().lower()] for r in args.remat.split(",")]
    probes = [int(b) for b in args.probe.split(",")]
    if len(probes) != 2 or probes[0] >= probes[1] or probes[0] < 1:
        raise ValueError(f"--probe={args.probe!r}: give two increasing batch sizes, e.g. 8,16")
    if args.run and jax.default_backend() == "cpu":
        raise ValueError(
            "--run needs an accelerator: on the CPU an oversized batch does not fail with "
            "out-of-memory, it swaps; use the prediction alone"
        )
    limit = memory_limit_bytes(args.memory_gib)
    base = importlib.import_module(args.config).get_config()
    dev = jax.devices()[0]
    predictions = []
    for remat in remats:
        config = base.copy_and_resolve_references()
        config.model.remat = remat
        peaks, compile_s = [], []
        for batch in probes:
            peak, seconds = compiled_peak_bytes(config, batch)
            peaks.append(peak)
            compile_s.append(round(seconds, 1))
        per_example = (peaks[1] - peaks[0]) / (probes[1] - probes[0])
        fixed = peaks[0] - per_example * probes[0]
        predicted = math.floor((limit - fixed) / per_example) if per_example > 0 else None
        record = dict(
            name=f"max_batch/remat_{str(remat).lower()}",
            units="images per train step",
            config=args.config,
            predicted=predicted,
            fixed_gib=round(fixed / GIB, 3),
            per_example_mib=round(per_example / 2**20, 2),
            limit_gib=round(limit / GIB, 2),
            probes={str(b): round(p / GIB, 3) for b, p in zip(probes, peaks, strict=True)},
            probe_compile_s=compile_s,
            dtype=config.model.dtype,
            device=f"{dev.platform}:{dev.device_kind}",
            versions={"jax": jax.__version__},
        )
        print(json.dumps(record), flush=True)
        predictions.append((config, record))
    # Every prediction is out before the (slower) running checks, which a time limit may cut.
    for config, record in predictions:
        if args.run and record["predicted"]:
            start = time.perf_counter()
            measured = largest_running_batch(config, record["predicted"])
            record = dict(
                record,
                name=record["name"] + "/measured",
                measured=measured,
                measure_s=round(time.perf_counter() - start, 1),
            )
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
