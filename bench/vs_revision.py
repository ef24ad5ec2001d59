"""Training throughput of this checkout against another git revision, side by side in one run:
images/s of the real CLI (`main.py --config=configs/mnist.py`) in each tree. One JSON line per
batch size.

python -m bench.vs_revision [--rev=4795b51] [--batches=16,64] [--steps=60] [--log-every=15]
    [--rounds=2] [--run-timeout=600]

`--rev` is checked out as a detached `git worktree` under the temp dir (reused when it is
already there); "ours" is this working tree, uncommitted changes included. For each batch size
B, `--rounds` rounds each train once in either tree, in a fresh workdir, with the tree as the
working directory; the order is reversed every round (ours, theirs, theirs, ours, ...), so a
drift in machine load hits both sides alike. Each run is

    python main.py --config=configs/mnist.py --workdir=<fresh> --config.training.batch_size=B
        --config.training.num_steps=N --config.training.log_every=K
        --config.training.sample_every=<never> --config.training.checkpoint_every=<never>
        --config.sample.num_steps=1

(the end-of-run sample grid and checkpoint come after the last logged interval; one sampler
step keeps the grid cheap). Both trees take the MNIST recipe's CPU speed-ups as they default
them. Every run logs N / K intervals to metrics.jsonl; the first holds the compile and is
dropped. The figure is images/s = steps_per_sec * B, the median over the other intervals of
all rounds; `*_rounds` give each round's median, to judge the noise.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

OURS = Path(__file__).resolve().parents[1]
NEVER = 10**9  # a sample/checkpoint interval no run reaches


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def git(*args: str, cwd: Path = OURS) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args)} in {cwd}: {out.stderr.strip()}")
    return out.stdout.strip()


def worktree(rev: str) -> tuple[Path, str]:
    """(a checkout of `rev` under the temp dir, its full commit id): created with
    `git worktree add --detach`, or reused when it exists at that commit."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.gettempdir()) / f"ddpm-rev-{commit[:12]}"
    if not path.exists():
        git("worktree", "add", "--detach", str(path), commit)
    elif not (path / ".git").exists() or git("rev-parse", "HEAD", cwd=path) != commit:
        raise RuntimeError(f"{path} exists but is not a worktree at {commit}: remove it")
    return path, commit


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def train_images_per_s(tree: Path, batch: int, args, workdir: Path) -> list[float]:
    """images/s of every logged interval but the first of one `main.py` training run in
    `tree`. A run that fails or outlives --run-timeout (killed, with whatever it started) is a
    RuntimeError quoting the end of its log."""
    flags = {
        "batch_size": batch,
        "num_steps": args.steps,
        "log_every": args.log_every,
        "sample_every": NEVER,
        "checkpoint_every": NEVER,
    }
    cmd = [sys.executable, "main.py", "--config=configs/mnist.py", f"--workdir={workdir}"]
    cmd += [f"--config.training.{k}={v}" for k, v in flags.items()]
    cmd.append("--config.sample.num_steps=1")
    log = workdir.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tree, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=args.run_timeout)
            problem = f"exited with code {code}" if code else None
        except subprocess.TimeoutExpired:
            problem = f"ran past --run-timeout={args.run_timeout:g} s"
        finally:  # a timeout, ^C or SIGTERM: end the run and everything it started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if problem:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} in {tree} {problem}; its log ends:\n{tail}")
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    records = sorted((r for r in records if "steps_per_sec" in r), key=lambda r: r["step"])
    speeds = [r["steps_per_sec"] for r in records]
    return [s * batch for s in speeds[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="4795b51", help="the git revision to compare with")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--log-every", type=int, default=15, help="steps per timed interval")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args()
    if args.steps % args.log_every or args.steps // args.log_every < 2:
        raise ValueError("--steps must be a multiple of --log-every, at least two intervals")
    batches = [int(b) for b in args.batches.split(",")]
    other, commit = worktree(args.rev)
    trees = {"ours": OURS, "theirs": other}
    # A time limit (`timeout`) ends us with SIGTERM: unwind, so the running child is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    common = dict(
        rev=args.rev,
        rev_commit=commit[:12],
        ours_head=git("rev-parse", "--short=12", "HEAD"),
        config="configs/mnist.py",
        steps=args.steps,
        log_every=args.log_every,
        rounds=args.rounds,
        units="images/s",
        cpu=cpu_name(),
        cores=os.cpu_count(),
        jax=metadata.version("jax"),
    )
    with tempfile.TemporaryDirectory(prefix="vs_revision-") as tmp:
        for batch in batches:
            load_start = os.getloadavg()[0]
            rounds = {"ours": [], "theirs": []}
            start = time.perf_counter()
            for r in range(args.rounds):
                for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                    workdir = Path(tmp) / f"{side}_b{batch}_r{r}"
                    rounds[side].append(train_images_per_s(trees[side], batch, args, workdir))
            ours, theirs = (statistics.median(sum(rounds[s], [])) for s in ("ours", "theirs"))
            emit(
                figure=f"train_mnist@{batch}",
                ours_img_s=round(ours, 1),
                theirs_img_s=round(theirs, 1),
                ratio=round(ours / theirs, 3),
                batch=batch,
                ours_rounds=[round(statistics.median(run), 1) for run in rounds["ours"]],
                theirs_rounds=[round(statistics.median(run), 1) for run in rounds["theirs"]],
                load_1m={"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
                seconds=round(time.perf_counter() - start),
                **common,
            )


if __name__ == "__main__":
    main()
