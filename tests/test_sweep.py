"""Sweeps: trial expansion, overrides, a 2-trial local sweep that resumes and skips, Ray."""

import csv
import json
import os
import subprocess
import sys

import pytest

from ddpm import sweep, train
from tests import tiny_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILE = os.path.join(ROOT, "tests", "tiny_sweep.py")


def test_grid_crossed_with_listed_trials():
    trials = sweep.expand_trials(
        {
            "grid": {"training.learning_rate": [1e-3, 2e-3], "model.ch": [8]},
            "trials": [{"diffusion.prediction": "eps"}, {"diffusion.prediction": "v"}],
        }
    )
    assert [t.overrides for t in trials] == [
        {"training.learning_rate": lr, "model.ch": 8, "diffusion.prediction": p}
        for lr in (1e-3, 2e-3)
        for p in ("eps", "v")
    ]
    assert trials[0].name == "training.learning_rate=0.001,model.ch=8,diffusion.prediction=eps"
    assert [t.name for t in sweep.expand_trials({})] == ["base"]
    assert len(sweep.expand_trials({"trials": [{"seed": 1}, {"seed": 2}, {"seed": 3}]})) == 3
    with pytest.raises(ValueError, match="repeated trials"):
        sweep.expand_trials({"trials": [{"seed": 1}, {"seed": 1}]})
    with pytest.raises(ValueError, match=r"sweep keys \['grids'\] are not one of grid, trials"):
        sweep.expand_trials({"grids": {}})


def test_trial_config_overrides_and_errors():
    base = tiny_sweep.get_config()
    config = sweep.trial_config(base, {"training.learning_rate": 0.5, "model.ch_mult": (1, 1)})
    assert config.training.learning_rate == 0.5 and tuple(config.model.ch_mult) == (1, 1)
    assert base.training.learning_rate != 0.5  # the base is not changed
    with pytest.raises(ValueError, match=r"config.training.learning_rat is not a config field"):
        sweep.trial_config(base, {"training.learning_rat": 1.0})
    with pytest.raises(ValueError, match=r"sweep override 'model.ch'='wide'"):
        sweep.trial_config(base, {"model.ch": "wide"})


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_local_sweep_resumes_unfinished_and_skips_finished(tmp_path, capsys):
    base = tiny_sweep.get_config()
    slow, fast = sweep.expand_trials(tiny_sweep.get_sweep())
    # An interrupted trial: 2 of its 4 steps done before the sweep starts.
    partial = sweep.trial_config(base, fast.overrides)
    partial.training.num_steps = 2
    train.train_and_evaluate(partial, str(tmp_path / fast.name))
    capsys.readouterr()

    rows = sweep.run_sweep(SWEEP_FILE, base, str(tmp_path))
    out = capsys.readouterr().out
    assert "2 trials, 0 finished, running 2 on local" in out
    assert out.count("Resumed from checkpoint at step 2") == 1
    assert [r["status"] for r in rows] == ["done", "done"]
    table = _read_csv(tmp_path / "results.csv")
    assert [r["training.learning_rate"] for r in table] == ["0.001", "0.003"]
    for trial, row in zip((slow, fast), table, strict=True):
        # The table's metrics are the trial's last logged line, and it really trained there.
        lines = (tmp_path / trial.name / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        assert int(row["step"]) == last["step"] == 4 and float(row["loss"]) == last["loss"]
        saved = json.loads((tmp_path / trial.name / "config.json").read_text())
        assert saved["training"]["learning_rate"] == trial.overrides["training.learning_rate"]
        assert os.path.isdir(tmp_path / trial.name / "checkpoints" / "4")
    assert (tmp_path / "results.png").stat().st_size > 0
    metrics_before = (tmp_path / fast.name / "metrics.jsonl").read_text()

    # Rerunning the same command trains nothing: both trials are skipped, the table is rebuilt.
    os.remove(tmp_path / "results.csv")
    rerun = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--mode=sweep",
            f"--config={SWEEP_FILE}",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "2 trials, 2 finished, running 0 on local" in rerun.stdout, rerun.stdout
    assert [r["status"] for r in _read_csv(tmp_path / "results.csv")] == ["skipped (finished)"] * 2
    assert [r["loss"] for r in _read_csv(tmp_path / "results.csv")] == [r["loss"] for r in table]
    assert (tmp_path / fast.name / "metrics.jsonl").read_text() == metrics_before


@pytest.mark.slow
def test_ray_sweep_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    rows = sweep.run_sweep(SWEEP_FILE, tiny_sweep.get_config(), str(tmp_path), backend="ray")
    assert [r["status"] for r in rows] == ["done", "done"]
    for row in rows:
        lines = (tmp_path / row["trial"] / "metrics.jsonl").read_text().splitlines()
        assert row["step"] == 4 and row["loss"] == json.loads(lines[-1])["loss"]
    # Same trials, same seeds: Ray's workers reproduce the local backend's numbers exactly.
    local = sweep.run_sweep(SWEEP_FILE, tiny_sweep.get_config(), str(tmp_path / "local"))
    assert [r["loss"] for r in local] == [r["loss"] for r in rows]
