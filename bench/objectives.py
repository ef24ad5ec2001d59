"""The DDPM objective (v + min-SNR, the default until flow matching replaced it) against EDM
and flow matching on MNIST (issue 23's table): the same data, network, optimizer and number
of steps (configs/mnist_ddpm.py, mnist_edm.py, the same with the EDM paper's training levels,
mnist_flow.py), each sampled by its candidate
samplers within 10 and 20 network calls per sample (one-call methods at 10 / 20 steps, heun at
5 / 10 steps: 9 / 19 calls).

python -m bench.objectives [--root=/tmp/bench_objectives] [--baseline=WORKDIR] [--samples=1000]
    [--only=NAME] [--trained]

Trains each run (or takes --baseline for the DDPM one; --trained: the runs already in --root)
and times it; evaluates FD and class accuracy of `--samples` samples at guidance 1, 1.5 (the
default recipe's) and 3 with the DDPM workdir's classifier (copied, so every row uses the
same features), and each run's bits/dim: the probability-flow ODE's for every process, and
the variational bound of the DDPM run. One JSON line per figure.
"""

import argparse
import json
import os
import shutil
import time

from configs import mnist_ddpm, mnist_edm, mnist_flow
from ddpm import evaluate, train


def _edm_paper_levels():
    """configs/mnist_edm.py with the paper's training levels, P_mean -1.2, P_std 1.2."""
    config = mnist_edm.get_config()
    config.diffusion.edm.p_mean, config.diffusion.edm.p_std = -1.2, 1.2
    return config


RECIPES = {
    "ddpm": mnist_ddpm.get_config,
    "edm_paper": _edm_paper_levels,
    "edm": mnist_edm.get_config,
    "flow": mnist_flow.get_config,
}
# process -> (method, steps at a 10-call budget, steps at a 20-call budget)
CANDIDATES = {
    "ddpm": (("ddim", 10, 20), ("dpm++2m", 10, 20)),
    "edm_paper": (("heun", 5, 10), ("dpm++2m", 10, 20), ("euler", 10, 20)),
    "edm": (("heun", 5, 10), ("dpm++2m", 10, 20), ("euler", 10, 20)),
    "flow": (("euler", 10, 20), ("heun", 5, 10), ("dpm++2m", 10, 20)),
}
GUIDANCE = (1.0, 1.5, 3.0)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def calls(method: str, steps: int) -> int:
    return 2 * steps - 1 if method in ("heun", "dpm++2s") else steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench_objectives")
    parser.add_argument("--baseline", default=None, help="a trained mnist_ddpm workdir")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--only", default=None, help="one of ddpm, edm_paper, edm, flow")
    parser.add_argument("--trained", action="store_true", help="evaluate the runs in --root")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)

    workdirs = {name: os.path.join(args.root, name) for name in RECIPES}
    if args.baseline is not None:
        workdirs["ddpm"] = args.baseline
    names = [args.only] if args.only else list(RECIPES)
    for name in names:
        if args.trained or (name == "ddpm" and args.baseline is not None):
            continue
        shutil.rmtree(workdirs[name], ignore_errors=True)
        start = time.perf_counter()
        train.train_and_evaluate(RECIPES[name](), workdirs[name])
        emit(figure="train_wall_s", process=name, value=time.perf_counter() - start)

    classifier = os.path.join(workdirs["ddpm"], "classifier")
    for name in names:
        if name != "ddpm" and os.path.isdir(classifier):
            shutil.copytree(
                classifier, os.path.join(workdirs[name], "classifier"), dirs_exist_ok=True
            )
        for method, *budgets in CANDIDATES[name]:
            for steps in budgets:
                config = RECIPES[name]()
                config.sample.method, config.sample.num_steps = method, steps
                config.eval.metrics = ("fd", "accuracy")
                config.eval.guidance_scales = GUIDANCE
                config.eval.num_samples = args.samples
                for row in evaluate.evaluate(config, workdirs[name])["guidance"]:
                    emit(
                        figure="samples",
                        process=name,
                        method=method,
                        steps=steps,
                        network_calls=calls(method, steps),
                        guidance=row["guidance_scale"],
                        fd=row["fd"],
                        accuracy=row["accuracy"],
                    )
        config = RECIPES[name]()
        config.eval.metrics = ("bpd",)
        results = evaluate.evaluate(config, workdirs[name])
        emit(figure="bpd", process=name, **{k: results[k] for k in results if "bpd" in k})


if __name__ == "__main__":
    main()
