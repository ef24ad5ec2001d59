"""Few-step students of the MNIST DDPM run (issue 22's table): the teacher's guided
samplers against the distilled student at 8, 4, 2 and 1 steps, by the project's own eval.

python -m bench.distill [--root=/tmp/bench_distill] [--teacher=WORKDIR]

Trains the teacher (configs/mnist_ddpm.py; or takes --teacher) and times it, then runs
configs/mnist_distill.py in one go, timed, keeping every checkpoint. The student as it was at
the end of each round (a copy of the workdir without the later checkpoints) is evaluated
like the teacher's samplers: FD and class accuracy of 1,000 samples at guidance 3,
with the teacher workdir's classifier (copied, so every row uses the same features), and
sampling throughput (images/s, batches of 100 after compilation). One JSON line per figure.
"""

import argparse
import json
import os
import shutil
import time

import jax

from configs import mnist_ddpm, mnist_distill
from ddpm import evaluate, generate, train
from ddpm.objectives.distill import distilled_steps

GUIDANCE = 3.0
TEACHER_SAMPLERS = (("dpm++2m", 20), ("ddim", 8), ("ddim", 4), ("ddim", 2), ("ddim", 1))


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def images_per_second(config, workdir: str, batch: int = 100, repeats: int = 3) -> float:
    """Samples per second of config.sample's sampler on `workdir`, after one compiling call."""
    objective, mesh = generate.prepare(config, workdir)
    params, _ = generate.restore(objective, workdir, mesh)
    sampler = objective.sampler(batch)
    labels = jax.numpy.arange(batch, dtype=jax.numpy.int32) % 10
    rng = jax.random.key(0)
    jax.block_until_ready(sampler(params, rng, labels))
    start = time.perf_counter()
    for i in range(repeats):
        jax.block_until_ready(sampler(params, jax.random.fold_in(rng, i), labels))
    return batch * repeats / (time.perf_counter() - start)


def score(config, workdir: str, num_samples: int) -> dict:
    """FD and accuracy at guidance 3 (`ddpm.evaluate`), plus images/s."""
    config.eval.metrics = ("fd", "accuracy")
    config.eval.guidance_scales = (GUIDANCE,)
    config.eval.num_samples = num_samples
    row = evaluate.evaluate(config, workdir)["guidance"][0]
    return {
        "fd": row["fd"],
        "accuracy": row["accuracy"],
        "images_per_s": images_per_second(config, workdir),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench_distill")
    parser.add_argument("--teacher", default=None, help="a trained default-run workdir")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--student-only", action="store_true", help="skip the teacher's rows")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)

    teacher = args.teacher or os.path.join(args.root, "teacher")
    if args.teacher is None:
        start = time.perf_counter()
        train.train_and_evaluate(mnist_ddpm.get_config(), teacher)
        emit(figure="teacher_train_wall_s", value=time.perf_counter() - start)

    teacher_rows = () if args.student_only else TEACHER_SAMPLERS
    for method, steps in teacher_rows:
        config = mnist_ddpm.get_config()
        config.sample.method, config.sample.num_steps = method, steps
        config.sample.spacing = "trailing"
        emit(
            figure="teacher",
            method=method,
            steps=steps,
            network_calls=2 * steps,
            guidance=GUIDANCE,
            **score(config, teacher, args.samples),
        )

    student = os.path.join(args.root, "student")
    shutil.rmtree(student, ignore_errors=True)
    config = mnist_distill.get_config(teacher)
    config.training.keep_checkpoints = 100  # every stage's end stays to be evaluated
    start = time.perf_counter()
    train.train_and_evaluate(config, student)
    emit(figure="distill_train_wall_s", value=time.perf_counter() - start)
    d = config.distill
    for end in [d.guided_steps + r * d.steps_per_round for r in range(1, 5)]:
        stage = os.path.join(args.root, f"student_{end}")  # the run as it was at step `end`
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(
            student,
            stage,
            ignore=lambda _, names, end=end: [n for n in names if n.isdigit() and int(n) > end],
        )
        shutil.copytree(
            os.path.join(teacher, "classifier"),
            os.path.join(stage, "classifier"),
            dirs_exist_ok=True,
        )
        steps = distilled_steps(config, end)
        stage_config = mnist_distill.get_config(teacher)
        stage_config.sample.num_steps = steps
        emit(
            figure="student",
            method="ddim",
            steps=steps,
            network_calls=steps,
            guidance=GUIDANCE,
            train_steps=end,
            **score(stage_config, stage, args.samples),
        )


if __name__ == "__main__":
    main()
