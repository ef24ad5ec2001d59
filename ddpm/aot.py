"""`--mode=compile --topology=NAME`: a recipe's train step (and, on request, its sampler)
compiled ahead of time for a TPU slice that is not here, and what it would cost there.

With libtpu installed (`pip install '.[tpu]'`),
`jax.experimental.topologies.get_topology_desc` gives the devices of any slice libtpu knows
(v5e:2x4, v5p:2x2x2, v6e:2x4, v4:2x2x1, ...) and XLA:TPU compiles for them on this machine.
The train step is training's own (`train.make_train_step` on the recipe's mesh over those
devices), lowered with abstract inputs: the state of `train.abstract_train_state` and the
batch as `jax.ShapeDtypeStruct`s with their shardings, so no parameter is materialised.
`ddpm.compile_report` reads the compiled program (memory per device against the chip's HBM,
FLOPs, roofline bound, collectives). `--fit` tries layouts, fsdp 1, 2, 4, ... without
remat and then with it, and keeps the first that fits (skipping, uncompiled, those that a
smaller fsdp's compile already rules out).

Writes `workdir/compile/<topology>.json` (":" written "_") and the reported train step's HLO
text beside it (`.hlo.txt`).
"""

import dataclasses
import importlib.util
import json
import os
import platform
import time
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from ddpm import build, compile_report, conditioning, objectives, runtime, sharding, train
from ddpm.config import runs, validation
from ddpm.errors import UserError

TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:2x4, v5e:4x4, v5p:2x2x1, v5p:2x2x2, v6e:2x4, v4:2x2x1"


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program and what it was lowered from: `args`, the abstract arguments."""

    compiled: jax.stages.Compiled
    args: tuple
    lower_s: float
    compile_s: float


@dataclasses.dataclass(frozen=True)
class Result:
    """What `compile_for_topology` reports (the JSON written) and the programs it read (no
    train step when no layout tried fits)."""

    report: dict[str, Any]
    train_step: Program | None
    sampler: Program | None = None


def topology_devices(name: str | None) -> list:
    """The devices of TPU slice `name` (e.g. "v5e:2x4"); a UserError without libtpu or for a
    name libtpu does not know."""
    if not name:
        raise UserError(f"--mode=compile needs --topology=NAME, e.g. one of {TOPOLOGY_EXAMPLES}")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            "--mode=compile needs libtpu, the TPU compiler: pip install '.[tpu]' (or "
            f"pip install 'jax[tpu]=={jax.__version__}')"
        )
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except jax.errors.JaxRuntimeError as e:
        if "lockfile" in str(e):
            raise UserError(
                "libtpu is loaded by another process on this machine (/tmp/libtpu_lockfile): "
                "wait for it to finish, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 where no process "
                "uses a real TPU"
            ) from None
        raise UserError(
            f"--topology={name!r} is not a slice libtpu knows ({e}); e.g. {TOPOLOGY_EXAMPLES}"
        ) from None


def for_tpu(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """`config` with `config.runtime` resolved as a TPU slice of `num_devices` would resolve it
    (this process's own devices are CPUs), and a latent run's unset scale factor set to 1 (a
    constant of the program whose value does not change its cost; training estimates it from
    data)."""
    speed = runtime.resolve(config.runtime, "tpu", num_devices)
    config = config.copy_and_resolve_references()
    config.runtime.update(speed.config_values())
    if config.objective == "latent" and config.latent.scale_factor is None:
        config.latent.scale_factor = 1.0
    return config


def with_layout(
    config: ml_collections.ConfigDict, fsdp: int, remat: bool
) -> ml_collections.ConfigDict:
    """A copy of `config` with config.training.fsdp and config.model.remat set."""
    config = config.copy_and_resolve_references()
    config.training.fsdp = fsdp
    config.model.remat = remat
    return config


def fit_layouts(num_devices: int) -> list[tuple[int, bool]]:
    """(fsdp, remat) in the order `--fit` tries them: every fsdp that divides the device count,
    smallest first, without remat, then the same with remat (recomputing activations costs
    about one more forward pass per step; splitting the state over more devices costs
    gathers that XLA overlaps with compute)."""
    sizes = [f for f in range(1, num_devices + 1) if num_devices % f == 0]
    return [(fsdp, remat) for remat in (False, True) for fsdp in sizes]


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    """The batch the train step takes (`sharding.global_batch` of the data pipeline's
    {"image": [B, *data shape] float32, "label": [B] int32}), abstract, split over `mesh`."""
    size, where = config.training.batch_size, sharding.batch_sharded(mesh)
    return {
        "image": jax.ShapeDtypeStruct(
            (size, *runs.data_shape(config)), jnp.float32, sharding=where
        ),
        "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=where),
    }


def _abstract(tree: Any, where: jax.sharding.Sharding) -> Any:
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), leaf.dtype, sharding=where), tree
    )


def _compile(fn, *args) -> Program:
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return Program(compiled, args, lowered_at - start, time.perf_counter() - lowered_at)


def _objective(config: ml_collections.ConfigDict) -> objectives.Objective:
    """The objective as training creates it; what it keeps frozen (a stage-1 autoencoder, a
    teacher) is read from its workdir onto this host's first CPU."""
    host = sharding.create_mesh(jax.local_devices(backend="cpu")[:1])
    return objectives.create(config, workdir=None, mesh=host, training=True)


def train_step_program(
    config: ml_collections.ConfigDict, devices: list
) -> tuple[Program, objectives.Objective, jax.sharding.Mesh]:
    """Training's train step for `config` on the recipe's mesh over `devices`, compiled:
    -> (program, objective, mesh). Its arguments are (state, batch, frozen)."""
    mesh = build.mesh(config, devices)
    sharding.per_device_batch_size(config.training.batch_size, mesh, "config.training.batch_size")
    objective = _objective(config)
    tx, lr_fn = build.optimizer(objective.config.training)
    step = train.make_train_step(objective, tx, lr_fn, mesh)
    state = train.abstract_train_state(objective, tx, mesh)
    frozen = _abstract(objective.frozen, sharding.replicated(mesh))
    return _compile(step, state, abstract_batch(config, mesh), frozen), objective, mesh


def sampler_program(
    objective: objectives.Objective, params: Any, mesh: jax.sharding.Mesh
) -> Program:
    """The sampler of `config.sample` (one batch of min(batch_size, num_samples) grid rows)
    from the EMA parameters `params` (abstract, laid out as training lays them out)."""
    if objective.config.objective == "latent":
        raise UserError(
            "--compile_sampler: latent diffusion's sampler holds its decoder's parameters as "
            "constants; compile the sampler of a diffusion or distill run"
        )
    s = objective.config.sample
    num = min(s.batch_size, s.num_samples)
    sample = dataclasses.replace(objective, mesh=mesh).sampler(num)  # its rows split on `mesh`
    cond = conditioning.take(conditioning.grid_cond(objective.config)[0], 0, num)
    replicated = sharding.replicated(mesh)
    rng = _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    fn = jax.jit(lambda p, key, c: sample(p, key, c))
    return _compile(fn, params, rng, _abstract(cond, replicated))


def _train_report(
    config: ml_collections.ConfigDict,
    program: Program,
    mesh: jax.sharding.Mesh,
    where: compile_report.Budget,
) -> dict[str, Any]:
    state = program.args[0]
    report = compile_report.program(program.compiled, where, program.lower_s, program.compile_s)
    report["memory"] = {
        "params": compile_report.shard_bytes(state.params),
        "ema_params": compile_report.shard_bytes(state.ema_params),
        "opt_state": compile_report.shard_bytes(state.opt_state),
        "train_state": compile_report.shard_bytes(state),
        **report["memory"],
    }
    return {
        "mesh": dict(mesh.shape),
        "layout": {
            "fsdp": config.training.fsdp,
            "remat": bool(config.model.remat),
            "dtype": config.model.dtype,
            "param_dtype": config.model.param_dtype,
        },
        "batch": {
            "global": config.training.batch_size,
            "per_device": config.training.batch_size // mesh.devices.size,
        },
        "parameters": sum(leaf.size for leaf in jax.tree.leaves(state.params)),
        "train_step": report,
    }


def _versions() -> dict[str, str]:
    return {
        "jax": jax.__version__,
        "libtpu": metadata.version("libtpu"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


def _layout_line(tried: dict[str, Any]) -> str:
    """One layout `_fit` tried: its total memory per device, a bound, or XLA's refusal."""
    name = f"fsdp={tried['fsdp']} remat={'on' if tried['remat'] else 'off'}"
    if tried["outcome"] == "compiled":
        return f"{name}: {compile_report.size(tried['total'])}"
    if tried["outcome"] == "bound":
        return f"{name}: >= {compile_report.size(tried['total'])} (not compiled)"
    return f"{name}: out of memory ({tried['xla']})"


def _print_report(report: dict[str, Any], where: compile_report.Budget) -> None:
    size = compile_report.size
    lines = []
    if report["fits"]:
        layout, memory = report["layout"], report["train_step"]["memory"]
        mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items())
        lines += [
            f"Train step on {report['topology']}: {report['devices']} x {where.device_kind}, "
            f"mesh {mesh}, remat {'on' if layout['remat'] else 'off'}, {layout['dtype']} "
            f"compute; batch {report['batch']['global']} ({report['batch']['per_device']} per "
            f"device); {report['parameters']:,} parameters",
            f"Train state per device: params {size(memory['params'])}, EMA "
            f"{size(memory['ema_params'])}, optimizer {size(memory['opt_state'])}",
            *compile_report.format_program("Train step", report["train_step"]),
        ]
    if "sampler" in report:
        lines += compile_report.format_program("Sampler", report["sampler"])
    verdict = "fits" if report["fits"] else f"does NOT fit {report['topology']}"
    tried = "; ".join(_layout_line(t) for t in report["layouts"])
    lines.append(f"Layouts tried: {tried}. The train step {verdict}.")
    lines.append(compile_report.format_chip(where))
    print("\n".join(lines), flush=True)


def least_total(memory: dict[str, Any], fsdp: int, larger: int) -> float:
    """A lower bound on a train step's total memory per device at fsdp=`larger`, from its
    `memory` (the report's) at `fsdp`: only the train state and two float32 parameter-sized
    buffers (gradients, updates) shrink with fsdp; each device keeps its share of the batch,
    and so of the activations."""
    shrinkable = memory["train_state"] + 2 * memory["ema_params"]
    return memory["total"] - shrinkable * (1 - fsdp / larger)


def _out_of_memory(error: jax.errors.JaxRuntimeError) -> str | None:
    """XLA:TPU's own words when `error` is its refusal of a program too large for the
    device's HBM (it states what the program needs and what is available), else None."""
    text = str(error)
    return text.splitlines()[0] if "RESOURCE_EXHAUSTED" in text else None


def _fit(
    config: ml_collections.ConfigDict,
    devices: list,
    where: compile_report.Budget,
    layouts: list[tuple[int, bool]],
) -> tuple[dict | None, Program | None, Any, list[dict]]:
    """The train step compiled with each (fsdp, remat) of `layouts` in turn until one fits:
    -> (report, program, (objective, mesh)) of that one (None when none does) and every
    layout tried, with its outcome: "compiled" (and its total memory per device), "bound"
    (not compiled: `least_total` of the last compile with the same remat rules it out) or
    "out of memory" (XLA:TPU refused it: its message). XLA:TPU itself rematerialises what
    it must to fit the device's HBM and refuses a program it cannot fit, so a layout that
    compiles fits."""
    tried, last = [], {}  # remat -> (memory, fsdp) of the last compile with that remat
    for fsdp, remat in layouts:
        entry = {"fsdp": fsdp, "remat": remat}
        if remat in last and (bound := least_total(*last[remat], fsdp)) > where.hbm_bytes:
            tried.append({**entry, "outcome": "bound", "total": bound})
            continue
        config = with_layout(config, fsdp, remat)
        try:
            program, objective, mesh = train_step_program(config, devices)
        except jax.errors.JaxRuntimeError as e:
            if (message := _out_of_memory(e)) is None:
                raise
            tried.append({**entry, "outcome": "out of memory", "xla": message})
            continue
        report = _train_report(config, program, mesh, where)
        memory = report["train_step"]["memory"]
        last[remat] = (memory, fsdp)
        tried.append({**entry, "outcome": "compiled", "total": memory["total"]})
        if memory["fits"]:
            return report, program, (objective, mesh), tried
    return None, None, None, tried


def compile_for_topology(
    config: ml_collections.ConfigDict,
    workdir: str,
    topology: str | None,
    *,
    fit: bool = False,
    sampler: bool = False,
) -> Result:
    """Compiles `config`'s train step (and with `sampler` its sampler) for TPU slice
    `topology`, prints the report and writes it to workdir/compile/<topology>.json. With
    `fit`, the layout (config.training.fsdp, config.model.remat) is the first of
    `fit_layouts` that fits the device's HBM. Bad input: a UserError before any compile."""
    devices = topology_devices(topology)
    where = compile_report.budget(devices)
    validation.validate(config, open_data=False)
    config = for_tpu(config, len(devices))
    layouts = fit_layouts(len(devices)) if fit else [(config.training.fsdp, config.model.remat)]
    step_report, program, built, tried = _fit(config, devices, where, layouts)
    report = {"topology": topology, "devices": len(devices), "fits": program is not None}
    report.update(step_report or {})
    report["layouts"] = tried
    sample = None
    if sampler and program is not None:
        objective, mesh = built
        sample = sampler_program(objective, program.args[0].ema_params, mesh)
        report["sampler"] = compile_report.program(
            sample.compiled, where, sample.lower_s, sample.compile_s
        )
    report["chip"] = where.describe()
    report["versions"] = _versions()
    report["config"] = json.loads((built[0].config if built else config).to_json_best_effort())
    stem = os.path.join(workdir, "compile", topology.replace(":", "_"))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    written = f"{stem}.json"
    if program is not None:
        with open(stem + ".hlo.txt", "w") as f:
            f.write(program.compiled.as_text())
        written += f" and {stem}.hlo.txt"
    _print_report(report, where)
    print(f"Wrote {written}", flush=True)
    return Result(report, program, sample)
