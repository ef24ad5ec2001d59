"""`main.py --mode=eval`: numbers for a trained run, written to `workdir/eval/<step>.json`.

Metrics (`config.eval.metrics`):
  bpd       negative log-likelihood in bits/dim on the test split, for every process: from the
            probability-flow ODE (`ddpm.likelihood`; "bpd_ode") on `eval.bpd_ode_examples`
            images, uniformly dequantized, with the divergence by Hutchinson's estimator (or
            exact) and diffrax's adaptive solver at `eval.bpd_ode_tolerance`. A discrete DDPM
            process also reports its variational bound ("bpd"): the full bound over all T
            timesteps on `eval.bpd_examples` images, and an importance-sampled estimate
            (`eval.bpd_importance_draws` timesteps per image, proposal ~ sqrt(E[L_t^2]) measured
            by the full bound) on `eval.bpd_importance_examples` images. Class-conditional
            models are scored unconditionally (the null label: the model of p(x)).
  fd        Fréchet distance between the features of generated and real images
            (`eval.reference_split`) in the penultimate layer of the dataset's classifier
            (`ddpm.classifier`); plus that of the real test split as a floor.
  accuracy  fraction of class-conditional samples the classifier assigns to their class, with
            the Inception-Score-style confidence of its predictions.
  pr        improved precision and recall (k = 3) in the classifier's feature space.
  fid       Fréchet distance in the pool features of the FID Inception network
            (`eval.inception_weights`).
Sample metrics are computed at every scale of `eval.guidance_scales` (class-conditional
models; default: `sample.guidance_scale` alone), `eval.num_samples` samples each with the
method and steps of `config.sample`; a sweep writes a CSV table and a plot of them too.
"""

import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from ddpm import classifier, diffusion, generate, images, likelihood, metrics, models
from ddpm.config import validation
from ddpm.data.transforms import to_float
from ddpm.objectives import Objective

_CLASSIFIER_METRICS = ("fd", "accuracy", "pr")


# --------------------------------------------------------------------------------------------
# Likelihood.


def _unconditional(objective: Objective) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """fn(params, x_vp, level) -> the process's `denoiser` output with the null label (or no
    label): the model of p(x)."""
    null = models.null_label(objective.config)
    denoiser = objective.process.denoiser(
        lambda params, x, t, labels: objective.apply({"params": params}, x, t, labels, train=False)
    )

    def fn(params: Any, x: jax.Array, level: jax.Array) -> jax.Array:
        labels = None if null is None else jnp.full((x.shape[0],), null, jnp.int32)
        return denoiser(params, x, level, labels)

    return fn


def _make_bound_fns(objective: Objective, params) -> tuple[Callable, Callable]:
    """Jitted (full bound, importance-sampled bound) of an image batch, unconditional."""
    config, process = objective.config, objective.process
    schedule = process.schedule
    term_kw = {
        "prediction": process.prediction,
        "variance": "learned" if process.learned_variance else config.sample.variance,
        "clip_x0": config.sample.clip_x0,
    }
    unconditional = _unconditional(objective)

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return unconditional(params, x_t, t)

    @jax.jit
    def full(x0, rng):
        out = diffusion.vlb_bpd(model_fn, schedule, x0, rng, **term_kw)
        return out["bpd"], out["terms"]

    @jax.jit
    def importance(x0, rng, proposal):
        out = diffusion.vlb_bpd_importance(
            model_fn, schedule, x0, rng, proposal, config.eval.bpd_importance_draws, **term_kw
        )
        return out["bpd"], out["stderr"]

    return full, importance


def ode_bpd_metrics(objective: Objective, params, test_images: np.ndarray) -> dict[str, Any]:
    """Bits/dim from the probability-flow ODE on the first `eval.bpd_ode_examples` test images
    (`ddpm.likelihood`): {"bpd_ode", "bpd_ode_stderr" (over images: dequantization, probe and
    data spread together), "bpd_ode_examples", "bpd_ode_nfe" (function evaluations per batch,
    mean), "bpd_ode_seconds"}."""
    config, process = objective.config, objective.process
    e = config.eval
    unconditional = _unconditional(objective)

    progress = tqdm.tqdm(desc="bpd (probability-flow ODE), function evaluations", unit="eval")

    @jax.jit
    def batch_bpd(params, x, rng):
        dequantize_rng, probe_rng = jax.random.split(rng)
        out = likelihood.log_likelihood(
            likelihood.x0_predictor(lambda x, level: unconditional(params, x, level), process),
            process,
            likelihood.dequantize(x, dequantize_rng),
            probe_rng,
            divergence=e.bpd_ode_divergence,
            tolerance=e.bpd_ode_tolerance,
            on_evaluation=lambda: progress.update(),
        )
        return likelihood.bits_per_dim(out["logp"], x.shape[1:]), out["nfe"]

    rng = jax.random.fold_in(jax.random.key(config.seed), 5)
    start = time.perf_counter()
    totals, nfes = [], []
    batches = list(classifier.fixed_batches(test_images[: e.bpd_ode_examples], e.batch_size))
    for i, (x0, n) in enumerate(batches):
        progress.set_postfix_str(f"batch {i + 1} of {len(batches)}")
        bpd, nfe = batch_bpd(params, x0, jax.random.fold_in(rng, i))
        totals.append(np.asarray(bpd)[:n])
        nfes.append(int(nfe))
    progress.close()
    totals = np.concatenate(totals)
    return {
        "bpd_ode": float(totals.mean()),
        "bpd_ode_stderr": float(totals.std(ddof=1) / np.sqrt(len(totals)))
        if len(totals) > 1
        else 0.0,
        "bpd_ode_examples": len(totals),
        "bpd_ode_nfe": float(np.mean(nfes)),
        "bpd_ode_seconds": time.perf_counter() - start,
    }


def bound_metrics(objective: Objective, params, test_images: np.ndarray) -> dict[str, Any]:
    """The discrete process's variational bound on the first test images: {"bpd",
    "bpd_stderr", "bpd_examples", "bpd_importance", "bpd_importance_stderr",
    "bpd_importance_examples"}."""
    config, schedule = objective.config, objective.process.schedule
    e = config.eval
    full, importance = _make_bound_fns(objective, params)
    rng = jax.random.fold_in(jax.random.key(config.seed), 3)
    totals, term_sums = [], np.zeros(schedule.num_timesteps)
    subset = test_images[: e.bpd_examples]
    for i, (x0, n) in enumerate(
        tqdm.tqdm(list(classifier.fixed_batches(subset, e.batch_size)), desc="bpd")
    ):
        bpd, terms = full(x0, jax.random.fold_in(rng, i))
        totals.append(np.asarray(bpd)[:n])
        term_sums += np.sum(np.square(np.asarray(terms, np.float64)[:, :n]), axis=1)
    totals = np.concatenate(totals)
    # Proposal ~ sqrt(E[L_t^2]), mixed with 1 % uniform so that every t keeps some mass.
    root = np.sqrt(term_sums / len(totals))
    proposal = 0.99 * root / root.sum() + 0.01 / schedule.num_timesteps
    estimates, errors = [], []
    subset = test_images[: e.bpd_importance_examples]
    for i, (x0, n) in enumerate(classifier.fixed_batches(subset, e.batch_size)):
        bpd, stderr = importance(x0, jax.random.fold_in(rng, 10_000 + i), jnp.asarray(proposal))
        estimates.append(np.asarray(bpd)[:n])
        errors.append(np.asarray(stderr)[:n])
    estimates, errors = np.concatenate(estimates), np.concatenate(errors)
    return {
        "bpd": float(totals.mean()),
        "bpd_stderr": float(totals.std(ddof=1) / np.sqrt(len(totals))) if len(totals) > 1 else 0.0,
        "bpd_examples": len(totals),
        "bpd_importance": float(estimates.mean()),
        "bpd_importance_stderr": float(
            np.sqrt(np.var(estimates, ddof=1) / len(estimates)) if len(estimates) > 1 else errors[0]
        ),
        "bpd_importance_examples": len(estimates),
    }


# --------------------------------------------------------------------------------------------
# Samples.


def generate_samples(
    objective: Objective, params, mesh, scale: float, labels: np.ndarray | None
) -> np.ndarray:
    """`config.eval.num_samples` samples at guidance `scale`, quantised to 8 bits as saved
    images are.  -> [N, H, W, C] float32 in [-1, 1]."""
    cfg = objective.config.copy_and_resolve_references()
    cfg.sample.guidance_scale = scale
    num, batch = cfg.eval.num_samples, min(cfg.eval.batch_size, cfg.eval.num_samples)
    sampler = dataclasses.replace(objective, config=cfg).sampler(batch)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 4)
    samples = generate.draw_samples(
        sampler, params, rng, labels, num, batch, mesh, desc=f"samples, guidance {scale:g}"
    )
    return to_float(images.to_uint8(samples))


def _stats_key(config, split: str, network_sha256: str) -> dict[str, Any]:
    """The identity of reference statistics: the feature network's parameter digest
    (`metrics.tree_digest`) and the data they came from (`classifier.split_identity`)."""
    key = {"network": network_sha256, **classifier.split_identity(config, split)}
    return json.loads(json.dumps(key))  # as it reads back from the .npz


def reference_stats(
    config, workdir: str, name: str, features_fn, network_sha256: str
) -> tuple[metrics.FeatureStats, np.ndarray]:
    """Feature statistics of the reference split (cached in workdir/eval/stats/ with their
    `_stats_key`; recomputed when the key differs) and the feature rows of its first
    eval.num_samples images (for precision/recall)."""
    split = config.eval.reference_split
    path = os.path.join(workdir, "eval", "stats", f"{name}_{split}.npz")
    key = _stats_key(config, split, network_sha256)
    cached = False
    if os.path.exists(path):
        stored = metrics.load_stats_key(path)
        cached = stored == key
        if stored is None:
            print(f"Recomputing {path}: it has no cache key (an older version's)", flush=True)
        elif not cached:
            changed = sorted(k for k in key.keys() | stored.keys() if key.get(k) != stored.get(k))
            print(f"Recomputing {path}: cached for another {', '.join(changed)}", flush=True)
    # With cached statistics only the images for precision/recall are read.
    limit = config.eval.num_samples if cached else None
    real_images, _ = classifier.load_split(config, split, limit=limit)
    feats = classifier.apply_in_batches(features_fn, real_images)
    if cached:
        stats = metrics.load_stats(path)
    else:
        stats = metrics.feature_stats(feats[-1])
        if jax.process_index() == 0:
            metrics.save_stats(path, stats, key)
    return stats, feats[-1][: config.eval.num_samples]


def sample_metrics(
    objective: Objective, workdir, params, mesh, step, test_images: np.ndarray
) -> list[dict[str, Any]]:
    """One dict of sample metrics per guidance scale; writes a sample grid of each."""
    config = objective.config
    chosen = validation.eval_metric_names(config)
    num_classes = config.model.num_classes
    labels = None
    if num_classes is not None:
        labels = np.arange(config.eval.num_samples, dtype=np.int32) % num_classes
    extractors: dict[str, Callable] = {}
    digests: dict[str, str] = {}  # metrics.tree_digest of each extractor's parameters
    if any(m in chosen for m in _CLASSIFIER_METRICS):
        extractors["classifier"], meta = classifier.load_classifier(config, workdir)
        digests["classifier"] = meta["params_sha256"]
    if "fid" in chosen:
        from ddpm import inception

        params_inception = inception.load_fid_inception_params(config.eval.inception_weights)
        inception_fn = inception.make_feature_fn(params_inception)
        extractors["inception"] = lambda x: (inception_fn(x),)  # apply_in_batches: tuples
        digests["inception"] = metrics.tree_digest(params_inception)
    references = {
        name: reference_stats(config, workdir, name, fn, digests[name])
        for name, fn in extractors.items()
    }

    results = []
    floor = {}
    if "fd" in chosen:
        test_feats = classifier.apply_in_batches(extractors["classifier"], test_images)[-1]
        floor["fd_real_test"] = metrics.frechet_distance_of(
            metrics.feature_stats(test_feats), references["classifier"][0]
        )
    for scale in validation.eval_guidance_scales(config):
        samples = generate_samples(objective, params, mesh, scale, labels)
        grid = images.make_grid(images.to_uint8(samples[:100]), 10)
        if jax.process_index() == 0:
            images.save_png(os.path.join(workdir, "eval", f"{step}_guidance_{scale:g}.png"), grid)
        row: dict[str, Any] = {"guidance_scale": scale, **floor}
        if "classifier" in extractors:
            probs, feats = classifier.apply_in_batches(extractors["classifier"], samples)
            ref_stats, ref_feats = references["classifier"]
            if "fd" in chosen:
                row["fd"] = metrics.frechet_distance_of(metrics.feature_stats(feats), ref_stats)
            if "accuracy" in chosen:
                row.update(metrics.classifier_scores(probs, labels))
            if "pr" in chosen:
                row.update(metrics.precision_recall(ref_feats, feats))
        if "inception" in extractors:
            (feats,) = classifier.apply_in_batches(extractors["inception"], samples)
            row["fid"] = metrics.frechet_distance_of(
                metrics.feature_stats(feats), references["inception"][0]
            )
        print(", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        results.append(row)
    return results


# --------------------------------------------------------------------------------------------
# Output.


def write_guidance_table(path_stem: str, rows: list[dict[str, Any]]) -> None:
    """`stem`.csv with one row per guidance scale, and `stem`.png plotting each metric
    against the scale (only with more than one scale)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path_stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plotted = [k for k in keys if k not in ("guidance_scale", "fd_real_test")]
    fig, axes = plt.subplots(1, len(plotted), figsize=(3.2 * len(plotted), 3.0), squeeze=False)
    scales = [row["guidance_scale"] for row in rows]
    for ax, key in zip(axes[0], plotted, strict=True):
        ax.plot(scales, [row.get(key, np.nan) for row in rows], "o-")
        ax.set_xlabel("guidance scale")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_stem + ".png", dpi=100)
    plt.close(fig)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Computes `config.eval.metrics` for the latest checkpoint of `workdir`; writes
    `eval/<step>.json` (and TensorBoard scalars under eval/); returns the same dict."""
    validation.validate_eval(config)
    objective, mesh = generate.prepare(config, workdir)
    config = objective.config
    params, step = generate.restore(objective, workdir, mesh)
    chosen = validation.eval_metric_names(config)
    results: dict[str, Any] = {"step": step, "metrics": list(chosen)}
    print(f"Evaluating {', '.join(chosen)} at step {step} of {workdir}", flush=True)
    test_images, _ = classifier.load_split(config, "test")
    if "bpd" in chosen and objective.process.has_discrete_bound:
        results.update(bound_metrics(objective, params, test_images))
        print(
            f"bpd {results['bpd']:.4f} +- {results['bpd_stderr']:.4f} (variational bound, "
            f"{results['bpd_examples']} images); importance-sampled "
            f"{results['bpd_importance']:.4f} +- {results['bpd_importance_stderr']:.4f}",
            flush=True,
        )
    if "bpd" in chosen:
        results.update(ode_bpd_metrics(objective, params, test_images))
        print(
            f"bpd_ode {results['bpd_ode']:.4f} +- {results['bpd_ode_stderr']:.4f} "
            f"(probability-flow ODE, {results['bpd_ode_examples']} images, "
            f"{results['bpd_ode_nfe']:.0f} function evaluations per batch, "
            f"{results['bpd_ode_seconds']:.0f} s)",
            flush=True,
        )
    if any(m != "bpd" for m in chosen):
        results["sample"] = {
            "method": config.sample.method,
            "num_steps": config.sample.num_steps,
            "num_samples": config.eval.num_samples,
        }
        results["guidance"] = sample_metrics(objective, workdir, params, mesh, step, test_images)
    if jax.process_index() == 0:  # every process computed the same numbers; one writes
        write_results(workdir, step, results)
    return results


def write_results(workdir: str, step: int, results: dict[str, Any]) -> None:
    """`eval/<step>.json`, the guidance table and plot, and TensorBoard scalars under eval/."""
    directory = os.path.join(workdir, "eval")
    if "guidance" in results:
        write_guidance_table(os.path.join(directory, f"{step}_guidance"), results["guidance"])
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{step}.json"), "w") as f:
        json.dump(results, f, indent=1)
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    for key, value in results.items():
        if key.startswith("bpd") and isinstance(value, float):
            writer.add_scalar(f"eval/{key}", value, step)
    for row in results.get("guidance", []):
        for key, value in row.items():
            if key != "guidance_scale":
                writer.add_scalar(f"eval/{key}@guidance_{row['guidance_scale']:g}", value, step)
    writer.close()
    print(f"Wrote {os.path.join(directory, f'{step}.json')}", flush=True)
