"""Sampling throughput: images/s and compile time per method and step count on a U-Net, and
DDIM as one `lax.scan` against a Python loop over a jitted single step. One JSON line each.

python -m bench.sampling [--config=configs.mnist_ddpm] [--batch=16] [--methods=ddim,dpm++2m,...]
    [--steps=20,50] [--repeats=3]

Parameters are random (the speed does not depend on them); the config gives the network,
schedule, parameterization, guidance scale and null label.
"""

import argparse
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import build, objectives, samplers
from ddpm.diffusion import alpha_sigma, predict_x0_eps
from ddpm.models import null_label

# Model evaluations per sample for a given step count.
NFE = {"dpm++2s": lambda n: 2 * n - 1, "heun": lambda n: 2 * n - 1}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def timed(fn, *args, repeats: int) -> float:
    """Best wall time of `repeats` calls (the result is waited for)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def sampler(objective, batch: int, **sample):
    """`build.sampler` of the objective's config with `config.sample` fields overridden,
    jitted here so that it can be lowered: fn(params, rng, labels)."""
    config = objective.config.copy_and_resolve_references()
    config.sample.update(sample)
    shape = (batch, *objective.input_shape)
    fn = build.sampler(config, objective.apply, objective.process, shape)
    return jax.jit(fn, compiler_options=objective.speed.compiler_options)


def python_loop_ddim(model_fn, schedule, params, x_T, labels, num_steps, prediction):
    """DDIM (eta = 0, no guidance) as a host loop over a jitted single step; returns
    (run function, compile seconds)."""
    ts = samplers.timesteps(schedule.num_timesteps, num_steps, "trailing")
    nexts = np.append(ts[1:], -1)

    @jax.jit
    def step(params, x, t, t_next, labels):
        alpha, sigma = alpha_sigma(schedule, t, x.ndim)
        out = model_fn(params, x, jnp.asarray(t, jnp.float32), labels).astype(jnp.float32)
        x0, eps = predict_x0_eps(out, x, alpha, sigma, prediction)
        last = t_next < 0
        a_next, s_next = alpha_sigma(schedule, jnp.maximum(t_next, 0), x.ndim)
        a_next = jnp.where(last[:, None, None, None], 1.0, a_next)
        s_next = jnp.where(last[:, None, None, None], 0.0, s_next)
        return a_next * x0 + s_next * eps

    batch = x_T.shape[0]
    per_step = [(jnp.full((batch,), t, jnp.int32), jnp.full((batch,), n, jnp.int32))
                for t, n in zip(ts, nexts, strict=True)]  # fmt: skip
    start = time.perf_counter()
    step.lower(params, x_T, *per_step[0], labels).compile()
    compile_s = time.perf_counter() - start

    def run(params, x):
        for t, t_next in per_step:
            x = step(params, x, t, t_next, labels)
        return x

    return run, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs.mnist_ddpm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default=",".join(samplers.METHODS))
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = importlib.import_module(args.config).get_config()
    objective = objectives.create(config, workdir=None, mesh=build.mesh(config))
    schedule = objective.process.schedule
    shape = (args.batch, *objective.input_shape)
    null = null_label(config)
    labels = None if null is None else jnp.arange(args.batch, dtype=jnp.int32) % null
    params = jax.jit(objective.init_params)(jax.random.key(0))
    # Perturb every leaf, so the zero-initialised output layer does not make the net constant.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = [
        p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(treedef, noisy)
    guided = null is not None and config.sample.guidance_scale != 1.0
    prediction = config.diffusion.prediction
    learned = config.model.get("learn_sigma", False)

    def model_fn(params, x, t, y):
        return objective.apply({"params": params}, x, t, y, train=False)

    device = str(jax.devices()[0].device_kind)
    common = dict(config=args.config, batch=args.batch, device=device, guidance=guided)
    for method in args.methods.split(","):
        for num_steps in (int(s) for s in args.steps.split(",")):
            fn = sampler(objective, args.batch, method=method, num_steps=num_steps)
            call = (params, jax.random.key(1), labels)
            start = time.perf_counter()
            compiled = fn.lower(*call).compile()
            compile_s = time.perf_counter() - start
            seconds = timed(compiled, *call, repeats=args.repeats)
            nfe = NFE.get(method, lambda n: n)(num_steps)
            emit(
                figure="sampling",
                method=method,
                num_steps=num_steps,
                nfe=nfe,
                compile_s=round(compile_s, 2),
                seconds=round(seconds, 4),
                images_per_s=round(args.batch / seconds, 2),
                **common,
            )

    # DDIM-50, no guidance: one scan vs a Python loop over a jitted step, same x_T.
    num_steps, rng = 50, jax.random.key(2)
    scan_fn = sampler(
        objective, args.batch, method="ddim", num_steps=num_steps, guidance_scale=1.0, clip_x0=False
    )
    if learned:  # the loop below reads the first half of the channels only
        model_fn_loop = lambda p, x, t, y: jnp.split(model_fn(p, x, t, y), 2, axis=-1)[0]
    else:
        model_fn_loop = model_fn
    x_T = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
    loop_fn, loop_compile_s = python_loop_ddim(
        model_fn_loop, schedule, params, x_T, labels, num_steps, prediction
    )
    start = time.perf_counter()
    scan_compiled = scan_fn.lower(params, rng, labels).compile()
    scan_compile_s = time.perf_counter() - start
    scan_s = timed(scan_compiled, params, rng, labels, repeats=args.repeats)
    loop_s = timed(loop_fn, params, x_T, repeats=args.repeats)
    diff = float(jnp.max(jnp.abs(scan_compiled(params, rng, labels) - loop_fn(params, x_T))))
    emit(
        figure="ddim50_scan_vs_python_loop",
        scan_images_per_s=round(args.batch / scan_s, 2),
        loop_images_per_s=round(args.batch / loop_s, 2),
        loop_over_scan_time=round(loop_s / scan_s, 3),
        scan_compile_s=round(scan_compile_s, 2),
        loop_compile_s=round(loop_compile_s, 2),
        max_abs_diff=diff,
        **common | {"guidance": False},
    )


if __name__ == "__main__":
    main()
