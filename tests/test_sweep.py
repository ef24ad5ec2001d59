"""Sweeps: trial expansion, overrides, a 2-trial local sweep that a SIGTERM stops and a rerun
resumes and skips, stops and missing metrics with a fake trainer, Ray."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from ddpm import run_logging, sweep, train
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


def _send_self(signum: int) -> None:
    """Sends `signum` to this (the main) thread: its Python handler has run on return."""
    signal.pthread_kill(threading.get_ident(), signum)


def _statuses(workdir) -> list[str]:
    return [row["status"] for row in _read_csv(workdir / "results.csv")]


def test_local_sweep_stops_on_sigterm_resumes_and_skips_finished(tmp_path, capsys, monkeypatch):
    base = tiny_sweep.get_config()
    slow, fast = sweep.expand_trials(tiny_sweep.get_sweep())
    # SIGTERM inside the real trainer's loop, as it logs step 2 of the first trial: the trainer
    # serves it after the next step (it checks for a stop once per step, before logging),
    # saves a checkpoint at step 3 and returns; the sweep must stop there, the trial not done.
    log_step = run_logging.RunLogger.log_step

    def log_step_then_sigterm(self, step, metrics):
        averages = log_step(self, step, metrics)
        if step == 2:
            _send_self(signal.SIGTERM)
        return averages

    with monkeypatch.context() as patch:
        patch.setattr(run_logging.RunLogger, "log_step", log_step_then_sigterm)
        with pytest.raises(sweep.SweepStopped) as stopped:
            sweep.run_sweep(SWEEP_FILE, base, str(tmp_path), train_fn=train.train_and_evaluate)
    assert stopped.value.code == 143
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"sweep: stopped during trial {slow.name} at step 3/4; rerun the same command to resume"
    )
    assert _statuses(tmp_path) == ["stopped", "not run"]
    assert not (tmp_path / slow.name / sweep.RESULT_FILE).exists()
    assert not (tmp_path / fast.name).exists()  # the next trial did not start

    # Rerunning resumes the stopped trial from its checkpoint and runs the other.
    rows = sweep.run_sweep(SWEEP_FILE, base, str(tmp_path), train_fn=train.train_and_evaluate)
    out = capsys.readouterr().out
    assert "2 trials, 0 finished, running 2 on local" in out
    assert out.count("Resumed from checkpoint at step 3") == 1
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
    rows = sweep.run_sweep(
        SWEEP_FILE,
        tiny_sweep.get_config(),
        str(tmp_path),
        train_fn=train.train_and_evaluate,
        backend="ray",
    )
    assert [r["status"] for r in rows] == ["done", "done"]
    for row in rows:
        lines = (tmp_path / row["trial"] / "metrics.jsonl").read_text().splitlines()
        assert row["step"] == 4 and row["loss"] == json.loads(lines[-1])["loss"]
    # Same trials, same seeds: Ray's workers reproduce the local backend's numbers exactly.
    local = sweep.run_sweep(
        SWEEP_FILE,
        tiny_sweep.get_config(),
        str(tmp_path / "local"),
        train_fn=train.train_and_evaluate,
    )
    assert [r["loss"] for r in local] == [r["loss"] for r in rows]


def _fake_trainer(started: list, *, signal_at: int | None = None, signum=signal.SIGTERM, log=True):
    """A train_fn that leaves what the trainer leaves on disk, in no time: it resumes from
    its latest `checkpoints/<step>`, records every step in metrics.jsonl (none if not `log`)
    and checkpoints the step it finishes or stops at. Like the trainer, its own handler turns
    SIGTERM / SIGINT into a stop at the current step.

    Appends (trial, start step) to `started`. At step `signal_at` it sends itself `signum`;
    0 sends it before installing its handler (during set-up: the sweep's handler takes it).
    """

    def train_fn(config, workdir):
        ckpts = os.path.join(workdir, "checkpoints")
        os.makedirs(ckpts, exist_ok=True)
        step = max((int(n) for n in os.listdir(ckpts)), default=0)
        started.append((os.path.basename(workdir), step))
        if signal_at == 0:
            _send_self(signum)
        stops = []
        previous = {s: signal.signal(s, lambda n, _: stops.append(n)) for s in sweep.STOP_SIGNALS}
        try:
            with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                while step < config.training.num_steps and not stops:
                    step += 1
                    if log:
                        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
                    if step == signal_at:
                        _send_self(signum)
            os.makedirs(os.path.join(ckpts, str(step)), exist_ok=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {}

    return train_fn


def test_a_signal_absorbed_by_a_trial_stops_the_sweep_and_a_rerun_resumes(tmp_path, capsys):
    base = tiny_sweep.get_config()
    first, second = sweep.expand_trials(tiny_sweep.get_sweep())
    handlers = [signal.getsignal(s) for s in sweep.STOP_SIGNALS]
    started = []
    with pytest.raises(sweep.SweepStopped) as stopped:
        sweep.run_sweep(
            SWEEP_FILE, base, str(tmp_path), train_fn=_fake_trainer(started, signal_at=3)
        )
    assert stopped.value.code == 128 + signal.SIGTERM
    line = f"sweep: stopped during trial {first.name} at step 3/4; rerun the same command to resume"
    assert capsys.readouterr().out.splitlines()[-1] == str(stopped.value) == line
    assert started == [(first.name, 0)]  # the next trial did not start
    assert _statuses(tmp_path) == ["stopped", "not run"]
    assert _read_csv(tmp_path / "results.csv")[0]["step"] == "3"
    assert not (tmp_path / first.name / sweep.RESULT_FILE).exists()
    assert [signal.getsignal(s) for s in sweep.STOP_SIGNALS] == handlers

    started.clear()
    rows = sweep.run_sweep(SWEEP_FILE, base, str(tmp_path), train_fn=_fake_trainer(started))
    assert started == [(first.name, 3), (second.name, 0)]  # resumed where it stopped
    assert [(r["status"], r["step"]) for r in rows] == [("done", 4), ("done", 4)]
    started.clear()
    sweep.run_sweep(SWEEP_FILE, base, str(tmp_path), train_fn=_fake_trainer(started))
    assert started == [] and _statuses(tmp_path) == ["skipped (finished)"] * 2


@pytest.mark.parametrize(
    "signal_at, signum, statuses, last_line",
    [
        # During set-up, before the trial has a handler of its own: the sweep's interrupts it.
        (0, signal.SIGINT, ["stopped", "not run"], "stopped during trial {0} at step 0/4"),
        # At the trial's last step: it finishes (and is done), the next one does not start.
        (4, signal.SIGTERM, ["done", "not run"], "SIGTERM received; stopped before trial {1}"),
    ],
)
def test_a_signal_before_or_after_training_stops_the_sweep(
    tmp_path, capsys, signal_at, signum, statuses, last_line
):
    first, second = sweep.expand_trials(tiny_sweep.get_sweep())
    started = []
    train_fn = _fake_trainer(started, signal_at=signal_at, signum=signum)
    with pytest.raises(sweep.SweepStopped) as stopped:
        sweep.run_sweep(SWEEP_FILE, tiny_sweep.get_config(), str(tmp_path), train_fn=train_fn)
    assert stopped.value.code == 128 + signum
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"sweep: {last_line.format(first.name, second.name)}; rerun the same command to resume"
    )
    assert started == [(first.name, 0)]
    assert _statuses(tmp_path) == statuses


def test_a_trial_without_metrics_records_is_a_clear_error(tmp_path, capsys):
    first, _ = sweep.expand_trials(tiny_sweep.get_sweep())
    train_fn = _fake_trainer([], log=False)  # trains, checkpoints, records nothing
    with pytest.raises(RuntimeError, match="2 of 2 trials failed"):
        sweep.run_sweep(SWEEP_FILE, tiny_sweep.get_config(), str(tmp_path), train_fn=train_fn)
    out = capsys.readouterr().out
    metrics = tmp_path / first.name / "metrics.jsonl"
    error = f"trial {first.name}: training returned but {metrics} has no metrics records"
    assert f"Trial {first.name} failed:\n{error}\n" in out
    assert "Traceback" not in out and "IndexError" not in out
    assert _statuses(tmp_path) == ["failed", "failed"]
