"""What a person sees of a run: a progress bar, TensorBoard, metrics.jsonl and sample grids."""

import json
import os
import sys
import time

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from ddpm import images


def truncate_records(path: str, last_step: int) -> None:
    """Drops the records of steps after `last_step` from the JSON-lines file `path` (a run
    that crashed after its last checkpoint logged steps it will run again on resume), so each
    step is recorded once. A torn last line (a crash mid-write) goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.writelines(kept)
    os.replace(temporary, path)


class RunLogger:
    """Progress bar (plain log lines when stdout is not a TTY), TensorBoard and JSON lines.

    Scalars are averaged over `log_every` steps before they are written. Only the process
    with `enabled=True` (process 0) writes anything. metrics.jsonl keeps the records up to
    `start_step` (the restored checkpoint's) and appends from there.
    """

    def __init__(
        self,
        workdir: str,
        num_steps: int,
        start_step: int,
        *,
        log_every: int = 50,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.log_every = log_every
        self.num_steps = num_steps
        self._sums: dict[str, float] = {}
        self._count = 0
        self._last_time, self._last_step = time.perf_counter(), start_step
        if not enabled:
            return
        self.workdir = workdir
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        jsonl = os.path.join(workdir, "metrics.jsonl")
        truncate_records(jsonl, start_step)
        self._jsonl = open(jsonl, "a")  # noqa: SIM115
        self._tty = sys.stdout.isatty()
        self._bar = tqdm.tqdm(
            total=num_steps,
            initial=start_step,
            desc="train",
            dynamic_ncols=True,
            disable=not self._tty,
        )

    def advance(self) -> None:
        """One more step dispatched: moves the progress bar (reads nothing from devices)."""
        if self.enabled:
            self._bar.update(1)

    def log_step(self, step: int, metrics: dict) -> dict[str, float]:
        """Records one step's host metrics; every `log_every` steps (and at the last) writes
        their averages and returns them (else an empty dict)."""
        for key, value in metrics.items():
            if key != "finite":
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if step % self.log_every and step != self.num_steps:
            return {}
        now = time.perf_counter()
        averages = {k: v / self._count for k, v in self._sums.items()}
        averages["steps_per_sec"] = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._sums, self._count = {}, 0
        self._last_time, self._last_step = now, step
        if self.enabled:
            self.write_scalars(step, averages)
            self._bar.set_postfix(loss=f"{averages['loss']:.4f}", refresh=False)
            if not self._tty:
                text = ", ".join(f"{k}={v:.4g}" for k, v in averages.items())
                print(f"step {step}/{self.num_steps}: {text}", flush=True)
        return averages

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def write_grid(self, step: int, samples: np.ndarray, num_cols: int) -> str | None:
        """Saves samples [N, H, W, C] (or signals [N, L, C], plotted) in [-1, 1] as
        `samples/step_XXXXXXX.png` and to TensorBoard.

        Returns the PNG's path (None where this logger is disabled).
        """
        if not self.enabled:
            return None
        grid = images.sample_grid(samples, num_cols)
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        images.save_png(path, grid)
        self._writer.add_image("samples", grid, step, dataformats="HWC")
        self._writer.flush()
        print(f"Wrote sample grid {path}", flush=True)
        return path

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._writer.close()
            self._jsonl.close()
