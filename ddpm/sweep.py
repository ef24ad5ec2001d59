"""Research sweeps: one base config, many trials, each trained in its own sub-workdir.

A sweep file `configs/sweeps/<name>.py` is a config file with one more function:
`get_config()` returns the base run config (so `--config.<path>=value` overrides it as
usual) and `get_sweep()` returns `{"grid": {path: [values, ...]}, "trials": [{path: value}]}`.
The trials are every point of the grid (the product of its value lists) crossed with every
override dict of "trials"; either key may be left out. Paths name config fields without the
`config.` prefix, e.g. "training.learning_rate".

`run_sweep` trains each trial with the `train_fn(config, workdir)` it is given (the CLI passes
the trainer) in `workdir/<trial name>`, skips trials whose `result.json` says they finished,
resumes the others from their latest checkpoint, then writes `results.csv` (one row per
trial: overrides and final metrics), prints the same table and draws every trial's loss curve
into `results.png`.

SIGTERM / SIGINT stop a sweep: the trial that is running stops (the trainer saves a checkpoint
and returns; while no handler of the trainer's is installed, the sweep's interrupts it), is not
marked done, no further trial starts, and `run_sweep` raises `SweepStopped`, a SystemExit with
status 143 / 130. Rerunning the same command resumes the stopped trial from its checkpoint.

Post-hoc sweeps: when every trial overrides only fields that act after training
(`POST_HOC_FIELDS`: the post-hoc EMA width, sampling, evaluation), the base config is trained
once, in `workdir/trained`, and each trial is an evaluation of that run with its overrides
(`evaluate_fn(config, workdir)`, the CLI's `ddpm.evaluate.evaluate`): its eval files move to
the trial's folder, its result.json holds the eval figures, and results.png plots the first
sample-quality figure (FD, else the first) against the first swept field.

Backends: "local" runs the trials one after another in this process; "ray" runs each as a
Ray task (`ray.init(address)`, a new local Ray instance when the address is None), one GPU
per trial when the cluster has GPUs. Ray is imported only for that backend.
"""

import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

BACKENDS = ("local", "ray")
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TrainFn = Callable[[ml_collections.ConfigDict, str], dict]
EvaluateFn = Callable[[ml_collections.ConfigDict, str], dict]
# Fields a trial may vary without retraining (a trailing dot: the whole section).
POST_HOC_FIELDS = ("phema.sigma_rel", "sample.", "eval.")
TRAINED = "trained"  # a post-hoc sweep's one training run
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of a sweep: its sub-workdir name and the config fields it overrides."""

    name: str
    overrides: dict[str, Any]


def load_sweep(path: str) -> dict[str, Any]:
    """`get_sweep()` of the sweep file at `path` (a ValueError if it has none)."""
    spec = importlib.util.spec_from_file_location("_sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} has no get_sweep(): a sweep file defines get_config() and it")
    return module.get_sweep()


def expand_trials(sweep: dict[str, Any]) -> list[Trial]:
    """The trials of a `get_sweep()` dict: grid points x listed override dicts, in order."""
    unknown = set(sweep) - {"grid", "trials"}
    if unknown:
        raise ValueError(f"sweep keys {sorted(unknown)} are not one of grid, trials")
    grid = dict(sweep.get("grid") or {})
    listed = list(sweep.get("trials") or [{}])
    for path, values in grid.items():
        if isinstance(values, str) or not len(values):
            raise ValueError(f"sweep grid {path!r} must be a non-empty list of values")
    trials = []
    for point in itertools.product(*grid.values()):
        for extra in listed:
            overrides = {**dict(zip(grid, point, strict=True)), **extra}
            trials.append(Trial(trial_name(overrides), overrides))
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(
            f"sweep has repeated trials: {sorted({n for n in names if names.count(n) > 1})}"
        )
    return trials


def trial_name(overrides: dict[str, Any]) -> str:
    """A folder name from the overrides, e.g. "training.learning_rate=0.001,model.ch=16"."""
    if not overrides:
        return "base"
    text = ",".join(f"{path}={value}" for path, value in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(name) > 120:  # file systems cap names at 255 bytes; keep them readable and unique
        name = name[:110] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def trial_config(
    base: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `base` with `overrides` ({"training.learning_rate": 1e-3, ...}) applied."""
    config = copy.deepcopy(base)
    for path, value in overrides.items():
        *parents, key = path.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            raise ValueError(f"sweep override {path!r}: config.{path} is not a config field")
        try:
            node[key] = value
        except TypeError as e:
            raise ValueError(f"sweep override {path!r}={value!r}: {e}") from e
    return config


def is_finished(workdir: str, num_steps: int) -> bool:
    """Whether `workdir` holds a result written after training to `num_steps`."""
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f)["step"] >= num_steps


class SweepStopped(SystemExit):
    """SIGTERM / SIGINT stopped the sweep (or a trial returned before its last step).

    A SystemExit, so the CLI exits with `code` and no traceback: 128 + the signal's number
    (143 for SIGTERM, 130 for SIGINT, what a shell reports for a process the signal killed),
    or 1 when a trial came back unfinished without a signal. `run_sweep` has printed the
    table and one line per stopped trial; rerunning the same command resumes the sweep.
    """

    def __init__(self, code: int, message: str, rows: list[dict[str, Any]]):
        super().__init__(code)
        self.message = message
        self.rows = rows

    def __str__(self) -> str:
        return self.message


class _Interrupted(BaseException):
    """Raised by the sweep's signal handler inside a guarded call (not an Exception, so no
    `except Exception` in a trainer swallows it)."""


def reached_step(workdir: str) -> int | None:
    """How far a trial's training got: its latest checkpoint step (the trainer checkpoints
    the step it stops or finishes at), else its last metrics record's step; None if neither."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir):  # checkpoints/<step>; orbax renames a save's temp folder last
        steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]
        if steps:
            return max(steps)
    lines = _read_metrics(workdir)
    return int(lines[-1]["step"]) if lines else None


def run_trial(
    config: ml_collections.ConfigDict, workdir: str, *, train_fn: TrainFn
) -> dict[str, Any]:
    """Trains (or resumes) one trial with `train_fn(config, workdir)`; its outcome.

    Returns {"status": "done", "step": int, <metric>: float, ...} (the last line of
    metrics.jsonl, also written to result.json) when training reached
    `config.training.num_steps`, {"status": "stopped", "step": int} when it returned before
    (stopped by a signal: not done, resumable), or {"status": "failed", "error": text} if
    training raised or logged no metrics.
    """
    try:
        train_fn(config, workdir)
    except Exception:  # one failed trial must not stop the sweep
        return {"status": "failed", "error": traceback.format_exc()}
    num_steps = config.training.num_steps
    step = reached_step(workdir)
    if step is not None and step < num_steps:
        return {"status": "stopped", "step": step}
    lines = _read_metrics(workdir)
    if not lines:
        path = os.path.join(workdir, METRICS_FILE)
        return {
            "status": "failed",
            "error": f"trial {os.path.basename(os.path.normpath(workdir))}: training returned "
            f"but {path} has no metrics records",
        }
    result = lines[-1]
    _write_result(workdir, result)
    return {"status": "done", **result}


def _write_result(workdir: str, result: dict[str, Any]) -> None:
    """workdir/result.json, written whole or not at all (a temporary file renamed)."""
    tmp = os.path.join(workdir, RESULT_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(workdir, RESULT_FILE))


def run_sweep(
    sweep_path: str,
    base: ml_collections.ConfigDict,
    workdir: str,
    *,
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Runs the unfinished trials of the sweep file at `sweep_path`; one row per trial.

    `train_fn(config, trial_workdir)` trains one trial, resuming from its latest checkpoint
    (the trainer's `train_and_evaluate`). Writes `workdir/results.csv`, prints the table and
    draws `workdir/results.png`. A row is {"trial", "status" ("done", "skipped (finished)",
    "failed", "stopped" or "not run"), the overrides, "step", the final metrics}. Raises
    RuntimeError after writing them if any trial failed, and `SweepStopped` if SIGTERM /
    SIGINT stopped the sweep: the running trial is left unfinished (rerunning resumes it) and
    no other trial starts. A post-hoc sweep (module docstring) needs `evaluate_fn` and runs
    here whatever the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sweep backend {backend!r} is not one of {', '.join(BACKENDS)}")
    trials = expand_trials(load_sweep(sweep_path))
    configs = {t.name: trial_config(base, t.overrides) for t in trials}  # errors before training
    if evaluate_fn is not None and is_post_hoc(trials):
        return _run_post_hoc(sweep_path, base, trials, configs, workdir, train_fn, evaluate_fn)
    dirs = {t.name: os.path.join(workdir, t.name) for t in trials}
    todo = [t for t in trials if not is_finished(dirs[t.name], configs[t.name].training.num_steps)]
    print(
        f"Sweep {sweep_path}: {len(trials)} trials, {len(trials) - len(todo)} finished, "
        f"running {len(todo)} on {backend}",
        flush=True,
    )
    outcome: dict[str, dict[str, Any]] = {}
    stopped_before = None
    with _StopSignals() as stop:
        if backend == "ray":
            jobs = [(configs[t.name], dirs[t.name]) for t in todo]
            try:
                with stop.guard():
                    results = _run_on_ray(jobs, ray_address, train_fn)
                outcome = dict(zip((t.name for t in todo), results, strict=True))
            except _Interrupted:  # Ray was shut down; what each trial left on disk tells
                for t in todo:
                    outcome[t.name] = _outcome_on_disk(dirs[t.name], configs[t.name])
        else:
            outcome, stopped_before = _run_here(todo, configs, dirs, train_fn, stop)
        signum = stop.poll()
    stop_lines = [
        f"sweep: stopped during trial {name} at step {result['step']}/"
        f"{configs[name].training.num_steps}; rerun the same command to resume"
        for name, result in outcome.items()
        if result["status"] == "stopped"
    ] + ([stopped_before] if stopped_before else [])

    return _report(
        trials,
        todo,
        dirs,
        outcome,
        stop_lines,
        signum,
        workdir,
        lambda rows: plot_losses({t.name: _read_metrics(dirs[t.name]) for t in trials}, workdir),
    )


def _report(
    trials: list[Trial],
    todo: list[Trial],
    dirs: dict[str, str],
    outcome: dict[str, dict[str, Any]],
    stop_lines: list[str],
    signum: int | None,
    workdir: str,
    plot: Callable[[list[dict[str, Any]]], Any],
) -> list[dict[str, Any]]:
    """The rows of every trial (its outcome now, "not run", or the result it finished with
    earlier), written as results.csv and the printed table, and `plot(rows)`; then
    `SweepStopped` if `stop_lines`, RuntimeError if a trial failed."""
    rows = []
    for t in trials:
        if t.name in outcome:
            result = outcome[t.name]
        elif t in todo:
            result = {"status": "not run"}
        else:
            with open(os.path.join(dirs[t.name], RESULT_FILE)) as f:
                result = {"status": "skipped (finished)", **json.load(f)}
        metrics = {k: v for k, v in result.items() if k not in ("status", "error")}
        rows.append({"trial": t.name, "status": result["status"], **t.overrides, **metrics})
    write_table(rows, workdir)
    plot(rows)
    failed = {name: r["error"] for name, r in outcome.items() if r["status"] == "failed"}
    for name, error in failed.items():
        print(f"Trial {name} failed:\n{error}", flush=True)
    if stop_lines:
        print("\n".join(stop_lines), flush=True)
        raise SweepStopped(1 if signum is None else 128 + signum, stop_lines[0], rows)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(trials)} trials failed: {', '.join(failed)}")
    return rows


def is_post_hoc(trials: list[Trial]) -> bool:
    """Whether the trials vary only `POST_HOC_FIELDS` (and vary something)."""
    paths = [path for t in trials for path in t.overrides]
    return bool(paths) and all(
        any(path == f or (f.endswith(".") and path.startswith(f)) for f in POST_HOC_FIELDS)
        for path in paths
    )


def _run_post_hoc(
    sweep_path: str,
    base: ml_collections.ConfigDict,
    trials: list[Trial],
    configs: dict[str, ml_collections.ConfigDict],
    workdir: str,
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
) -> list[dict[str, Any]]:
    """`run_sweep` for trials that vary only post-hoc fields: trains `base` once (resuming;
    skipped once finished) in workdir/trained, then evaluates each unfinished trial on it."""
    trained = os.path.join(workdir, TRAINED)
    num_steps = base.training.num_steps
    dirs = {t.name: os.path.join(workdir, t.name) for t in trials}
    todo = [t for t in trials if not is_finished(dirs[t.name], num_steps)]
    print(
        f"Sweep {sweep_path}: {len(trials)} post-hoc trials of one run ({trained}), "
        f"{len(trials) - len(todo)} finished, evaluating {len(todo)}",
        flush=True,
    )
    outcome: dict[str, dict[str, Any]] = {}
    stop_line = None
    with _StopSignals() as stop:
        if not is_finished(trained, num_steps):
            done, stop_line = _run_here(
                [Trial(TRAINED, {})], {TRAINED: base}, {TRAINED: trained}, train_fn, stop
            )
            result = done.get(TRAINED, {"status": "not run"})
            if result["status"] == "failed":
                raise RuntimeError(f"training {trained} failed:\n{result['error']}")
            if result["status"] == "stopped":
                stop_line = (
                    f"sweep: stopped while training {trained} at step {result['step']}/"
                    f"{num_steps}; rerun the same command to resume"
                )
        for t in todo if stop_line is None else []:
            if stop.poll() is not None:
                stop_line = (
                    f"sweep: stopped before trial {t.name}; rerun the same command to resume"
                )
                break
            try:
                outcome[t.name] = _evaluate_trial(
                    configs[t.name], trained, dirs[t.name], stop.guarded(evaluate_fn)
                )
            except _Interrupted:
                stop_line = (
                    f"sweep: stopped during trial {t.name}; rerun the same command to resume"
                )
                break
        signum = stop.poll()
    return _report(
        trials,
        todo,
        dirs,
        outcome,
        [stop_line] if stop_line else [],
        signum,
        workdir,
        lambda rows: plot_figure(rows, trials, workdir),
    )


def _evaluate_trial(
    config: ml_collections.ConfigDict, trained: str, trial_dir: str, evaluate_fn: EvaluateFn
) -> dict[str, Any]:
    """One post-hoc trial: `evaluate_fn(config, trained)`, its eval/<step>* files moved to
    trial_dir/eval (the reference statistics stay shared), its figures in result.json:
    {"status": "done", "step", "seconds", <figure>: float, ...} (one guidance scale: the
    figures as named; several: suffixed _g<scale>), or {"status": "failed", "error"}."""
    start = time.perf_counter()
    try:
        results = evaluate_fn(config, trained)
    except Exception:  # one failed trial must not stop the sweep
        return {"status": "failed", "error": traceback.format_exc()}
    step = results["step"]
    figures: dict[str, Any] = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
    figures.update({k: v for k, v in results.items() if isinstance(v, float)})
    rows = results.get("guidance", [])
    for row in rows:
        suffix = "" if len(rows) == 1 else f"_g{row['guidance_scale']:g}"
        figures.update({k + suffix: v for k, v in row.items() if k != "guidance_scale"})
    out = os.path.join(trial_dir, "eval")
    os.makedirs(out, exist_ok=True)
    source = os.path.join(trained, "eval")
    for name in os.listdir(source):
        if name.startswith(f"{step}.") or name.startswith(f"{step}_"):
            os.replace(os.path.join(source, name), os.path.join(out, name))
    _write_result(trial_dir, figures)
    return {"status": "done", **figures}


def _run_here(
    todo: list[Trial],
    configs: dict[str, ml_collections.ConfigDict],
    dirs: dict[str, str],
    train_fn: TrainFn,
    stop: "_StopSignals",
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Runs the trials one after another in this process until SIGTERM / SIGINT.

    Returns ({trial name: run_trial's outcome} of the trials that ran, and the line to print
    when a signal came after a trial ended and so stopped the sweep before the next one).
    """
    outcome: dict[str, dict[str, Any]] = {}
    for t in todo:
        if stop.poll() is not None:
            return outcome, (
                f"sweep: {signal.Signals(stop.signum).name} received; stopped before trial "
                f"{t.name}; rerun the same command to resume"
            )
        trial_dir, num_steps = dirs[t.name], configs[t.name].training.num_steps
        try:
            result = run_trial(configs[t.name], trial_dir, train_fn=stop.guarded(train_fn))
        except _Interrupted:  # a signal while the trainer had no handler of its own
            result = {"status": "stopped", "step": reached_step(trial_dir) or 0}
        if result["status"] == "failed" and stop.poll() is not None:
            step = reached_step(trial_dir) or 0  # e.g. a data worker that Ctrl-C killed too
            if step < num_steps:
                result = {"status": "stopped", "step": step}
        outcome[t.name] = result
        if result["status"] == "stopped":
            break
    return outcome, None


def _outcome_on_disk(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A trial's outcome from its files: done if its result.json says so, else stopped."""
    if is_finished(workdir, config.training.num_steps):
        with open(os.path.join(workdir, RESULT_FILE)) as f:
            return {"status": "done", **json.load(f)}
    return {"status": "stopped", "step": reached_step(workdir) or 0}


class _StopSignals:
    """While active (in the main thread): SIGTERM / SIGINT stop the sweep instead of killing it.

    The handler records the first signal; inside `guard()` (a trial's `train_fn`, the wait
    for Ray) it also raises `_Interrupted` there, once. While a trainer has its own handler
    installed (it saves a checkpoint and returns), the signal still shows in `poll()`: Python
    writes every signal's number to the wakeup fd this installs, whichever handler runs.
    """

    def __init__(self):
        self.signum: int | None = None
        self._armed = False
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_fd = -1

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are only delivered to (and handled in) the main thread
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler not installed from Python
                signal.signal(sig, handler)
        if self._pipe is not None:
            self.poll()
            signal.set_wakeup_fd(self._old_fd)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
        if self._armed:
            self._armed = False
            raise _Interrupted(signum)

    def poll(self) -> int | None:
        """The first SIGTERM / SIGINT received so far (None if none)."""
        while self._pipe is not None:
            try:
                data = os.read(self._pipe[0], 512)
            except BlockingIOError:
                break
            if not data:
                break
            for signum in data:
                if self.signum is None and signum in STOP_SIGNALS:
                    self.signum = signum
        return self.signum

    @contextlib.contextmanager
    def guard(self):
        self._armed = self.signum is None
        try:
            yield
        finally:
            self._armed = False

    def guarded(self, fn: TrainFn) -> TrainFn:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self.guard():
                return fn(*args, **kwargs)

        return call


def _run_on_ray(
    jobs: list[tuple[ml_collections.ConfigDict, str]], address: str | None, train_fn: TrainFn
) -> list:
    """Runs `run_trial` on each (config, workdir) as a Ray task; results in job order.

    Each task gets a fresh worker process (max_calls=1, so JAX starts anew on the GPU Ray gave
    it) and one GPU when the cluster has any. `train_fn` is pickled by reference (a module's
    function): workers import this checkout, so on a cluster it must be at the same path on
    every node, and the workdir on shared storage.
    """
    try:
        import ray
    except ImportError as e:
        raise ImportError("the ray sweep backend needs Ray: pip install 'ray==2.60.0'") from e

    runtime_env = {"env_vars": {"PYTHONPATH": _ROOT}}
    if address is None:
        ray.init(runtime_env=runtime_env, include_dashboard=False)
    else:
        ray.init(address=address, runtime_env=runtime_env)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_calls=1)(run_trial)
        return ray.get(
            [task.remote(config, os.path.abspath(d), train_fn=train_fn) for config, d in jobs]
        )
    finally:
        ray.shutdown()


def _read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of `workdir/metrics.jsonl` ([] if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_table(rows: list[dict[str, Any]], workdir: str) -> str:
    """Writes `results.csv` (columns: the union of the rows' keys) and prints it as a table."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = os.path.join(workdir, "results.csv")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    cells = [columns] + [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)), flush=True)
    print(f"Wrote {path}", flush=True)
    return path


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_losses(curves: dict[str, list[dict[str, float]]], workdir: str) -> str | None:
    """Draws each trial's logged loss against step into `results.png` (None if none logged).

    curves: trial name -> its metrics.jsonl lines ({"step", "loss", ...}).
    """
    lines = {
        name: ([r["step"] for r in records], [r["loss"] for r in records])
        for name, records in curves.items()
        if records
    }
    return _plot(lines, "step", "loss", os.path.join(workdir, "results.png"))


def plot_figure(rows: list[dict[str, Any]], trials: list[Trial], workdir: str) -> str | None:
    """A post-hoc sweep's `results.png`: its first sample-quality figure (fd, else fid,
    accuracy, bpd_ode: the first the rows have) against the first swept numeric field, one
    line per value of the other overrides. None if there is nothing to draw."""
    done = [(t, r) for t, r in zip(trials, rows, strict=True) if r["status"] != "not run"]
    fields = [p for p in trials[0].overrides if isinstance(trials[0].overrides[p], (int, float))]
    names = [n for n in ("fd", "fid", "accuracy", "bpd_ode") if any(n in r for _, r in done)]
    if not done or not fields or not names:
        return None
    x_field, figure = fields[0], names[0]
    lines: dict[str, tuple[list, list]] = {}
    for t, r in sorted(done, key=lambda tr: tr[0].overrides[x_field]):
        if figure in r:
            rest = ",".join(f"{k}={v}" for k, v in t.overrides.items() if k != x_field)
            xs, ys = lines.setdefault(rest or figure, ([], []))
            xs.append(t.overrides[x_field])
            ys.append(r[figure])
    return _plot(lines, x_field, figure, os.path.join(workdir, "results.png"), points=True)


def _plot(
    lines: dict[str, tuple[list, list]], x_label: str, y_label: str, path: str, points=False
) -> str | None:
    """Draws named (xs, ys) lines (with their points marked if `points`) into the PNG at
    `path`, a legend under the axes. None if there are none."""
    if not lines:
        return None
    width, height, margin = 640, 400, 50
    xs = np.array([x for line in lines.values() for x in line[0]], float)
    ys = np.array([y for line in lines.values() for y in line[1]], float)
    x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1e-9)
    y_lo, y_hi = ys.min(), max(ys.max(), ys.min() + 1e-6)
    image = Image.new("RGB", (width, height + 16 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
    draw.text((margin, height - margin + 5), f"{x_label} {x_lo:g}", fill="black")
    draw.text((width - 90, height - margin + 5), f"{x_hi:g}", fill="black")
    draw.text((5, 10), f"{y_hi:.3g}", fill="black")
    draw.text((5, height - margin - 12), f"{y_lo:.3g}", fill="black")
    draw.text((5, height // 2), y_label, fill="black")
    for i, (name, (line_x, line_y)) in enumerate(lines.items()):
        color = tuple(int(255 * c) for c in _PALETTE[i % len(_PALETTE)])
        x = [margin + (v - x_lo) / (x_hi - x_lo) * (width - 10 - margin) for v in line_x]
        y = [10 + (y_hi - v) / (y_hi - y_lo) * (height - margin - 10) for v in line_y]
        draw.line(list(zip(x, y, strict=True)), fill=color, width=2)
        if points:
            for u, v in zip(x, y, strict=True):
                draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=color)
        draw.text((margin, height + 16 * i), name, fill=color)
    image.save(path)
    return path


_PALETTE = (
    (0.12, 0.47, 0.71),
    (1.0, 0.5, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.5, 0.5, 0.5),
)
