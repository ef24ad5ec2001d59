"""Training throughput of the denoising backbones: the small DiT (configs/mnist_dit.py) against
the small U-Net (configs/mnist_ddpm.py, its recipe), measured side by side in one process. One
JSON line each; any recipes can be compared (--configs).

python -m bench.backbones [--configs=configs.mnist_ddpm,configs.mnist_dit] [--steps=20] [--rounds=3]

Each round times `--steps` jitted train steps of every model in turn (interleaved, so a change
in machine load hits all of them alike); the figure is the best round. The batch is random
(the speed does not depend on it); batch size and everything else come from each config.
"""

import argparse
import importlib
import json
import time

import jax
import numpy as np

from ddpm import build, objectives, sharding, train
from ddpm.config.runs import data_shape


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def setup(config_module: str):
    """(config, jitted step fn(state, batch), state, batch, compile seconds, parameter count)
    of one config."""
    config = importlib.import_module(config_module).get_config()
    mesh = build.mesh(config)
    objective = objectives.create(config, workdir=None, mesh=mesh)
    tx, lr_fn = build.optimizer(config.training)
    step_fn = train.make_train_step(objective, tx, lr_fn, mesh)
    state = train.init_train_state(jax.random.key(0), objective, tx, mesh)
    batch_size = config.training.batch_size
    rng = np.random.default_rng(0)
    batch = sharding.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *data_shape(config))).astype(np.float32),
            "label": rng.integers(0, 10, (batch_size,)).astype(np.int32),
        },
        mesh,
    )
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, objective.frozen)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    params = sum(p.size for p in jax.tree.leaves(state.params))
    return dict(
        config=config,
        step=lambda state, batch: step_fn(state, batch, objective.frozen),
        state=state,
        batch=batch,
        compile_s=compile_s,
        params=params,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs.mnist_ddpm,configs.mnist_dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs = {name: setup(name) for name in args.configs.split(",")}
    best = dict.fromkeys(runs, np.inf)
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            state = run["state"]
            for _ in range(args.steps):
                state, metrics = run["step"](state, run["batch"])
            jax.block_until_ready(metrics)
            best[name] = min(best[name], time.perf_counter() - start)
            run["state"] = state
    for name, run in runs.items():
        config = run["config"]
        batch_size = config.training.batch_size
        emit(
            bench="train_throughput",
            config=name,
            model=config.model.name,
            params=int(run["params"]),
            batch_size=batch_size,
            steps=args.steps,
            images_per_s=round(args.steps * batch_size / best[name], 1),
            step_ms=round(1000 * best[name] / args.steps, 1),
            compile_s=round(run["compile_s"], 1),
            device=jax.devices()[0].platform,
        )


if __name__ == "__main__":
    main()
