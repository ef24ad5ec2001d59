"""Research sweeps: one base config, many trials, each trained in its own sub-workdir.

A sweep file `configs/sweeps/<name>.py` is a config file with one more function:
`get_config()` returns the base run config (so `--config.<path>=value` overrides it as
usual) and `get_sweep()` returns `{"grid": {path: [values, ...]}, "trials": [{path: value}]}`.
The trials are every point of the grid (the product of its value lists) crossed with every
override dict of "trials"; either key may be left out. Paths name config fields without the
`config.` prefix, e.g. "training.learning_rate".

`run_sweep` trains each trial with `train.train_and_evaluate` in `workdir/<trial name>`,
skips trials whose `result.json` says they finished, resumes the others from their latest
checkpoint, then writes `results.csv` (one row per trial: overrides and final metrics),
prints the same table and draws every trial's loss curve into `results.png`.

Backends: "local" runs the trials one after another in this process; "ray" runs each as a
Ray task (`ray.init(address)`, a new local Ray instance when the address is None), one GPU
per trial when the cluster has GPUs. Ray is imported only for that backend.
"""

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import traceback
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from ddpm import train

BACKENDS = ("local", "ray")
RESULT_FILE = "result.json"
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


def run_trial(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) one trial; returns and writes its final metrics, or its error.

    Returns {"step": int, <metric>: float, ...} from the last line of metrics.jsonl, or
    {"error": traceback text} if training raised.
    """
    try:
        train.train_and_evaluate(config, workdir)
    except Exception:  # one failed trial must not stop the sweep
        return {"error": traceback.format_exc()}
    result = _read_metrics(workdir)[-1]
    with open(os.path.join(workdir, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=1)
    return result


def run_sweep(
    sweep_path: str,
    base: ml_collections.ConfigDict,
    workdir: str,
    *,
    backend: str = "local",
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Runs the unfinished trials of the sweep file at `sweep_path`; one row per trial.

    Writes `workdir/results.csv`, prints the table and draws `workdir/results.png`. A row is
    {"trial", "status" ("done", "skipped (finished)" or "failed"), the overrides, "step",
    the final metrics}. Raises RuntimeError after writing them if any trial failed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sweep backend {backend!r} is not one of {', '.join(BACKENDS)}")
    trials = expand_trials(load_sweep(sweep_path))
    configs = {t.name: trial_config(base, t.overrides) for t in trials}  # errors before training
    dirs = {t.name: os.path.join(workdir, t.name) for t in trials}
    todo = [t for t in trials if not is_finished(dirs[t.name], configs[t.name].training.num_steps)]
    print(
        f"Sweep {sweep_path}: {len(trials)} trials, {len(trials) - len(todo)} finished, "
        f"running {len(todo)} on {backend}",
        flush=True,
    )
    jobs = [(configs[t.name], dirs[t.name]) for t in todo]
    if backend == "ray":
        outcomes = _run_on_ray(jobs, ray_address)
    else:
        outcomes = [run_trial(config, trial_dir) for config, trial_dir in jobs]
    outcome = dict(zip((t.name for t in todo), outcomes, strict=True))

    rows = []
    for t in trials:
        if t.name in outcome:
            result = outcome[t.name]
            status = "failed" if "error" in result else "done"
        else:
            with open(os.path.join(dirs[t.name], RESULT_FILE)) as f:
                result, status = json.load(f), "skipped (finished)"
        metrics = {k: v for k, v in result.items() if k != "error"}
        rows.append({"trial": t.name, "status": status, **t.overrides, **metrics})
    write_results(rows, workdir)
    plot_losses({t.name: _read_metrics(dirs[t.name]) for t in trials}, workdir)
    failed = {name: r["error"] for name, r in outcome.items() if "error" in r}
    if failed:
        for name, error in failed.items():
            print(f"Trial {name} failed:\n{error}", flush=True)
        raise RuntimeError(f"{len(failed)} of {len(trials)} trials failed: {', '.join(failed)}")
    return rows


def _run_on_ray(jobs: list[tuple[ml_collections.ConfigDict, str]], address: str | None) -> list:
    """Runs `run_trial` on each (config, workdir) as a Ray task; results in job order.

    Each task gets a fresh worker process (max_calls=1, so JAX starts anew on the GPU Ray gave
    it) and one GPU when the cluster has any. Workers import this checkout: on a cluster it
    must be at the same path on every node, and the workdir on shared storage.
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
        return ray.get([task.remote(config, os.path.abspath(d)) for config, d in jobs])
    finally:
        ray.shutdown()


def _read_metrics(workdir: str) -> list[dict[str, float]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_results(rows: list[dict[str, Any]], workdir: str) -> str:
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
    curves = {name: lines for name, lines in curves.items() if lines}
    if not curves:
        return None
    width, height, margin = 640, 400, 50
    steps = np.array([line["step"] for lines in curves.values() for line in lines], float)
    losses = np.array([line["loss"] for lines in curves.values() for line in lines], float)
    s_lo, s_hi = steps.min(), max(steps.max(), steps.min() + 1)
    l_lo, l_hi = losses.min(), max(losses.max(), losses.min() + 1e-6)
    image = Image.new("RGB", (width, height + 16 * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
    draw.text((margin, height - margin + 5), f"step {s_lo:g}", fill="black")
    draw.text((width - 90, height - margin + 5), f"{s_hi:g}", fill="black")
    draw.text((5, 10), f"{l_hi:.3g}", fill="black")
    draw.text((5, height - margin - 12), f"{l_lo:.3g}", fill="black")
    draw.text((5, height // 2), "loss", fill="black")
    for i, (name, lines) in enumerate(curves.items()):
        color = tuple(int(255 * c) for c in _PALETTE[i % len(_PALETTE)])
        x = [
            margin + (line["step"] - s_lo) / (s_hi - s_lo) * (width - 10 - margin) for line in lines
        ]
        y = [10 + (l_hi - line["loss"]) / (l_hi - l_lo) * (height - margin - 10) for line in lines]
        draw.line(list(zip(x, y, strict=True)), fill=color, width=2)
        draw.text((margin, height + 16 * i), name, fill=color)
    path = os.path.join(workdir, "results.png")
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
