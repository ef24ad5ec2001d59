"""EDM2's research tools on the default MNIST run (issue 33's README table): post-hoc EMA
widths and autoguidance, chosen after one training run, by the project's own eval.

python -m bench.posthoc [--root=runs/bench_posthoc] [--samples=1000]

1. The post-hoc sweep configs/sweeps/mnist_phema.py in ROOT/phema: the default run (which
   tracks power EMAs of sigma_rel 0.05 and 0.10) trains once, then FD and class accuracy of
   `--samples` samples (the recipe's DPM++2M-20 at guidance 1.5, 40 network calls) for each
   sigma_rel; and the same for the run's ordinary EMA (training.ema_decay).
2. Autoguidance: a guide with half the channels (8/16/32, a quarter of the parameters),
   trained for 300 steps in ROOT/guide; the main run guided by it at several scales (40
   calls, as classifier-free guidance's), class-conditional; then unconditional (every label
   the null one), unguided at 20 and 40 steps against autoguided.
One JSON line per figure, with the seconds each evaluation took. A workdir already trained
or evaluated is reused (the sweep skips what it finished).
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from ddpm import classifier, evaluate, generate, metrics, sweep, train
from ddpm.config import presets

SWEEP = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "configs", "sweeps", "mnist_phema.py"
)
AUTO_SCALES = (1.5, 2.0, 2.5)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def recipe(samples: int):
    config = presets.mnist()
    config.eval.metrics = ("fd", "accuracy")
    config.eval.num_samples = samples
    return config


def conditional(config, workdir: str) -> dict:
    start = time.perf_counter()
    row = evaluate.evaluate(config, workdir)["guidance"][0]
    return {"fd": row["fd"], "accuracy": row["accuracy"], "seconds": time.perf_counter() - start}


def unconditional_fd(config, workdir: str, scale: float) -> dict:
    """FD of config.eval.num_samples samples drawn with every label the null one (the run's
    unconditional model; autoguided when config.sample.guide is set), against the classifier
    reference statistics of the run's eval."""
    start = time.perf_counter()
    objective, mesh = generate.prepare(config, workdir)
    params, _ = generate.restore(objective, workdir, mesh)
    null = np.full(config.eval.num_samples, config.model.num_classes, np.int32)
    samples = evaluate.generate_samples(objective, params, mesh, scale, null)
    features_fn, meta = classifier.load_classifier(config, workdir)
    reference, _ = evaluate.reference_stats(
        config, workdir, "classifier", features_fn, meta["params_sha256"]
    )
    feats = classifier.apply_in_batches(features_fn, samples)[-1]
    fd = metrics.frechet_distance_of(metrics.feature_stats(feats), reference)
    return {"fd": fd, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="runs/bench_posthoc")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    samples = args.samples
    phema_dir = os.path.join(args.root, "phema")
    run = os.path.join(phema_dir, sweep.TRAINED)

    base = recipe(samples)
    start = time.perf_counter()
    rows = sweep.run_sweep(
        SWEEP,
        base,
        phema_dir,
        train_fn=train.train_and_evaluate,
        evaluate_fn=evaluate.evaluate,
    )
    emit(figure="phema_sweep_wall_s", value=time.perf_counter() - start)
    for row in rows:
        emit(
            figure="phema",
            sigma_rel=row["phema.sigma_rel"],
            fd=row["fd"],
            accuracy=row["accuracy"],
            seconds=row["seconds"],
        )
    emit(figure="ema_decay", ema_decay=base.training.ema_decay, **conditional(recipe(samples), run))

    guide = os.path.join(args.root, "guide")
    weak = presets.mnist()
    weak.model.ch, weak.training.num_steps = 8, 300
    start = time.perf_counter()
    train.train_and_evaluate(weak, guide)
    emit(figure="guide_train_wall_s", value=time.perf_counter() - start, ch=8, steps=300)

    for scale in AUTO_SCALES:
        config = recipe(samples)
        config.sample.guide, config.eval.guidance_scales = guide, (scale,)
        emit(figure="autoguidance", scale=scale, network_calls=40, **conditional(config, run))
    for steps in (20, 40):  # unconditional: the null label, no guidance
        config = recipe(samples)
        config.sample.num_steps = steps
        emit(
            figure="unconditional",
            guide=None,
            network_calls=steps,
            **unconditional_fd(config, run, 1.0),
        )
    for scale in AUTO_SCALES[:2]:
        config = recipe(samples)
        config.sample.guide = guide
        emit(
            figure="unconditional",
            guide="ch8_300",
            scale=scale,
            network_calls=40,
            **unconditional_fd(config, run, scale),
        )
    emit(figure="device", value=str(jax.devices()[0]))


if __name__ == "__main__":
    main()
