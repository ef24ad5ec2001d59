"""Few-step students against their teacher, one table from one command: the default (flow)
run's DPM++2M-20 against consistency distillation, consistency training and progressive
distillation from it at 4, 2 and 1 steps (issue 32); `--recipe=ddpm` gives the DDPM run's
progressive-distillation table (issue 22) instead.

python -m bench.distill [--root=/tmp/bench_distill] [--recipe=flow|ddpm]
                        [--teacher=WORKDIR --teacher-seconds=S] [--samples=1000] [--quick]

Trains the teacher (configs/mnist.py, or configs/mnist_ddpm.py; or takes --teacher), timed,
then each student's recipe from it, timed: configs/mnist_cd.py, configs/mnist_ct.py (tuned
from the teacher's weights) and configs/mnist_pd.py (configs/mnist_distill.py for the DDPM
run), keeping the progressive run's checkpoints: the student as it was at the end of each
round (a copy of the workdir without the later checkpoints) is the student of that round's
step count. Every row is scored by the project's eval: FD and class accuracy of `--samples`
samples, with the teacher workdir's classifier (copied, so every row uses the same
features), and sampling throughput (images/s, batches of 100 after compilation); training
time as a ratio of the teacher's. One JSON line per figure. `--quick` is a dry run of the
whole command in a few minutes (a few train steps each, 100 samples): its figures mean
nothing.
"""

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable

import jax
import ml_collections

from configs import mnist, mnist_cd, mnist_ct, mnist_ddpm, mnist_distill, mnist_pd
from ddpm import evaluate, generate, train
from ddpm.objectives.distill import distilled_steps


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A teacher recipe, its own samplers' rows ((method, steps) at its guidance, two calls
    per step) and its progressive-distillation recipe (the student's step counts to score)."""

    teacher: Callable[[], ml_collections.ConfigDict]
    teacher_samplers: tuple[tuple[str, int], ...]
    progressive: Callable[[str], ml_collections.ConfigDict]
    progressive_steps: tuple[int, ...]
    consistency: bool  # also consistency distillation and training


RECIPES = {
    "flow": Recipe(mnist.get_config, (("dpm++2m", 20),), mnist_pd.get_config, (4, 2, 1), True),
    "ddpm": Recipe(
        mnist_ddpm.get_config,
        (("dpm++2m", 20), ("ddim", 8), ("ddim", 4), ("ddim", 2), ("ddim", 1)),
        mnist_distill.get_config,
        (8, 4, 2, 1),
        False,
    ),
}
CONSISTENCY_STEPS = (4, 2, 1)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` shrunk to a few train steps (the dry run of `--quick`)."""
    t = config.training
    if config.objective == "distill":
        config.distill.guided_steps = config.distill.steps_per_round = 4
        t.num_steps = 4 * (1 + 4)
    else:
        t.num_steps = 8
    t.log_every = t.checkpoint_every = 4
    t.sample_every = 10_000
    t.warmup_steps = min(t.warmup_steps, 2)
    return config


def timed_training(config: ml_collections.ConfigDict, workdir: str) -> float:
    """Trains `config` in a fresh `workdir`; its wall seconds."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    return time.perf_counter() - start


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


def score(config, workdir: str, num_samples: int, guidance: float) -> dict:
    """FD and accuracy at `guidance` (`ddpm.evaluate`, with config.sample's sampler), plus
    images/s."""
    config.sample.guidance_scale = guidance
    config.eval.metrics = ("fd", "accuracy")
    config.eval.guidance_scales = (guidance,)
    config.eval.num_samples = num_samples
    row = evaluate.evaluate(config, workdir)["guidance"][0]
    return {
        "fd": row["fd"],
        "accuracy": row["accuracy"],
        "images_per_s": images_per_second(config, workdir),
    }


def share_classifier(teacher: str, workdir: str) -> None:
    """The teacher eval's classifier in `workdir`: one feature space for every row."""
    shutil.copytree(
        os.path.join(teacher, "classifier"),
        os.path.join(workdir, "classifier"),
        dirs_exist_ok=True,
    )


def round_workdir(workdir: str, end: int) -> str:
    """A copy of the progressive run in `workdir` as it was at train step `end`."""
    stage = f"{workdir}_{end}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(
        workdir,
        stage,
        ignore=lambda _, names: [n for n in names if n.isdigit() and int(n) > end],
    )
    return stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench_distill")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="flow")
    parser.add_argument("--teacher", default=None, help="a trained workdir of the recipe")
    parser.add_argument(
        "--teacher-seconds", type=float, default=None, help="its training time, for the ratios"
    )
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="a dry run: tiny trainings")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    recipe = RECIPES[args.recipe]
    shrink = quick if args.quick else (lambda c: c)
    samples = 100 if args.quick else args.samples

    teacher, teacher_s = args.teacher, args.teacher_seconds
    if teacher is None:
        teacher = os.path.join(args.root, "teacher")
        teacher_s = timed_training(shrink(recipe.teacher()), teacher)
    emit(figure="train_wall_s", model="teacher", value=teacher_s)

    for method, steps in recipe.teacher_samplers:
        config = recipe.teacher()
        config.sample.method, config.sample.num_steps = method, steps
        config.sample.spacing = "trailing"
        guidance = config.sample.guidance_scale
        emit(
            figure="teacher",
            method=method,
            steps=steps,
            network_calls=2 * steps,
            guidance=guidance,
            train_ratio=1.0,
            **score(config, teacher, samples, guidance),
        )

    def student_rows(model: str, make: Callable[[], ml_collections.ConfigDict]) -> None:
        """Trains the consistency recipe `make()` and scores it at 4, 2 and 1 steps, at its
        eval guidance (two calls per step unless 1) and, if that is not 1, without."""
        workdir = os.path.join(args.root, model)
        seconds = timed_training(shrink(make()), workdir)
        emit(figure="train_wall_s", model=model, value=seconds)
        share_classifier(teacher, workdir)
        ratio = seconds / teacher_s if teacher_s else None
        for guidance in dict.fromkeys((make().eval.guidance_scales[0], 1.0)):
            for steps in CONSISTENCY_STEPS:
                config = shrink(make())
                config.sample.num_steps = steps
                emit(
                    figure="student",
                    model=model,
                    method="consistency",
                    steps=steps,
                    network_calls=steps * (1 if guidance == 1.0 else 2),
                    guidance=guidance,
                    train_ratio=ratio,
                    **score(config, workdir, samples, guidance),
                )

    if recipe.consistency:
        student_rows("cd", lambda: mnist_cd.get_config(teacher))
        student_rows("ct", lambda: mnist_ct.get_config(teacher))

    workdir = os.path.join(args.root, "pd")
    config = shrink(recipe.progressive(teacher))
    config.training.keep_checkpoints = 100  # every stage's end stays to be evaluated
    seconds = timed_training(config, workdir)
    emit(figure="train_wall_s", model="pd", value=seconds)
    ends = {distilled_steps(config, end): end for end in range(1, config.training.num_steps + 1)}
    for steps in recipe.progressive_steps:
        end = ends[steps]  # the round's last step
        stage = round_workdir(workdir, end)
        share_classifier(teacher, stage)
        stage_config = shrink(recipe.progressive(teacher))
        stage_config.sample.num_steps = steps
        emit(
            figure="student",
            model="pd",
            method="ddim",
            steps=steps,
            network_calls=steps,
            guidance=stage_config.sample.guidance_scale,
            train_steps=end,
            train_ratio=seconds / teacher_s if teacher_s else None,
            **score(stage_config, stage, samples, stage_config.sample.guidance_scale),
        )


if __name__ == "__main__":
    main()
