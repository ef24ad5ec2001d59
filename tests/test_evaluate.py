"""`--mode=eval` end to end on a tiny run, config errors, and the classifier's accuracy."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from scipy import special

from ddpm import classifier, evaluate, train
from ddpm.config import validation
from ddpm.schedules import get_schedule
from tests.tiny import create_model, tiny_config


def _eval_config(**eval_fields):
    config = tiny_config(num_steps=10, checkpoint_every=10)
    e = config.eval
    e.metrics = ("bpd", "fd", "accuracy", "pr")
    e.num_samples, e.batch_size = 20, 10
    e.bpd_examples, e.bpd_importance_examples, e.bpd_importance_draws = 10, 10, 8
    e.bpd_ode_examples, e.bpd_ode_tolerance = 4, 1e-2
    e.classifier_steps = 60
    e.guidance_scales = (0.0, 2.0)
    e.update(eval_fields)
    return config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    train.train_and_evaluate(_eval_config(), workdir)
    return workdir


def _vlb_bpd_draws(config, workdir, images: np.ndarray, draws: int) -> np.ndarray:
    """The DDPM bound (Ho et al., 2020, eq. 5) of each image under the run's EMA network,
    written out in float64 NumPy / SciPy from the schedule's betas: prior KL(q(x_T | x_0) ||
    N(0, I)), then for t >= 1 KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with the model's
    mean the posterior mean at its clipped x_0 and the posterior variance (fixed_small; the
    two variances are equal, so the KL is the squared mean gap over twice it), and for t = 0
    the 8-bit bin probability of x_0 under N(x_0 estimate, beta~_1). The null label (the
    unconditional model), `draws` independent x_t per image.  -> [draws, N] bits/dim."""
    step = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    params = ocp.StandardCheckpointer().restore(path)["ema_params"]
    model = create_model(config)
    apply = jax.jit(lambda x, t, labels: model.apply({"params": params}, x, t, labels))
    betas = np.asarray(
        get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps).betas, np.float64
    )
    alpha_bars = np.cumprod(1 - betas)
    prev = np.append(1.0, alpha_bars[:-1])
    post_var = betas * (1 - prev) / (1 - alpha_bars)
    post_var[0] = post_var[1]  # DDPM clips the log-variance at t = 0
    coef_x0 = betas * np.sqrt(prev) / (1 - alpha_bars)

    x0 = np.repeat(images[None].astype(np.float64), draws, axis=0).reshape(-1, *images.shape[1:])
    axes = tuple(range(1, x0.ndim))
    rng = np.random.default_rng(0)
    last = alpha_bars[-1]
    prior = 0.5 * (last * x0**2 + (1 - last) - np.log(1 - last) - 1)
    total = prior.mean(axis=axes)
    null = np.full(len(x0), config.model.num_classes, np.int32)
    for t, ab in enumerate(alpha_bars):
        x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * rng.standard_normal(x0.shape)
        eps = np.asarray(apply(x_t.astype(np.float32), np.full(len(x0), t, np.float32), null))
        x0_pred = np.clip((x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
        gap = coef_x0[t] * (x0 - x0_pred)  # true minus model posterior mean
        if t > 0:
            nats = gap**2 / (2 * post_var[t])
        else:  # bin [x - 1/255, x + 1/255] of N(x0_pred, post_var), the end bins unbounded
            scale = np.sqrt(post_var[0])
            upper = np.where(x0 > 0.999, np.inf, (x0 + 1 / 255 - x0_pred) / scale)
            lower = np.where(x0 < -0.999, -np.inf, (x0 - 1 / 255 - x0_pred) / scale)
            right = lower + upper > 0  # the tail side of the bin, to keep its precision
            hi = np.where(right, special.log_ndtr(-lower), special.log_ndtr(upper))
            lo = np.where(right, special.log_ndtr(-upper), special.log_ndtr(lower))
            nats = -(hi + np.log1p(-np.exp(lo - hi)))
        total += nats.mean(axis=axes)
    return total.reshape(draws, -1) / np.log(2)


def test_eval_mode_writes_json_table_plot_and_grids(trained_workdir):
    """bpd: the full bound of the first eval.bpd_examples test images equals this file's own
    float64 computation of the bound (`_vlb_bpd_draws`, 4 fresh noise draws per image) within
    4 standard errors of the difference of the two means, estimated from the spread of the
    draws per image: the images are the same, so only the x_t draws differ (eval's one per
    image, ours the mean of 4: variance (1 + 1/4) var_draw / n). Accuracy and Inception Score
    recomputed from the saved sample grid with the run's classifier: the same 20 images and
    classifier batch, so float32 rounding alone (rtol 1e-5; the accuracy exactly)."""
    config = _eval_config()
    results = evaluate.evaluate(config, trained_workdir)
    step = results["step"]
    assert step == 10
    with open(os.path.join(trained_workdir, "eval", f"{step}.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))

    e = config.eval
    test_images, _ = classifier.load_split(config, "test", limit=e.bpd_examples)
    draws = _vlb_bpd_draws(config, trained_workdir, test_images, 4)
    assert results["bpd_examples"] == e.bpd_examples
    se = np.sqrt((1 + 1 / 4) * np.mean(draws.var(axis=0, ddof=1)) / e.bpd_examples)
    assert abs(results["bpd"] - draws.mean()) < 4 * se, (results["bpd"], draws.mean(), se)
    both = np.hypot(results["bpd_stderr"], results["bpd_importance_stderr"])
    assert abs(results["bpd"] - results["bpd_importance"]) < 4 * both
    # The ddpm process reports the probability-flow ODE's figure too, under its own name (its
    # correctness: tests/test_likelihood.py).
    assert results["bpd_ode_examples"] == e.bpd_ode_examples and results["bpd_ode_stderr"] > 0

    rows = results["guidance"]
    assert [row["guidance_scale"] for row in rows] == [0.0, 2.0]
    probs_fn, _ = classifier.load_classifier(config, trained_workdir)
    labels = np.arange(e.num_samples) % config.model.num_classes
    size = config.data.image_size  # grid cells: 10 columns, 2-pixel padding
    for row in rows:
        path = os.path.join(
            trained_workdir, "eval", f"{step}_guidance_{row['guidance_scale']:g}.png"
        )
        grid = np.asarray(Image.open(path), np.float32)
        corners = [2 + (size + 2) * np.array(divmod(i, 10)) for i in range(e.num_samples)]
        samples = np.stack([grid[r : r + size, c : c + size] for r, c in corners])
        probs = np.asarray(probs_fn(samples[..., None] / 127.5 - 1)[0], np.float64)
        kl = special.rel_entr(probs, probs.mean(axis=0)).sum(axis=1)  # KL(p(y|x) || p(y))
        inception_score = np.exp(kl.mean())
        assert row["accuracy"] == np.mean(probs.argmax(axis=1) == labels), row
        assert row["inception_score"] == pytest.approx(inception_score, rel=1e-5), row
        assert row["fd"] > 0 and row["fd_real_test"] >= 0
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    # Real test images are closer to the training images than 10-step-model samples are.
    assert rows[0]["fd_real_test"] < rows[0]["fd"]
    for name in (f"{step}_guidance.csv", f"{step}_guidance.png", f"{step}_guidance_2.png"):
        assert os.path.exists(os.path.join(trained_workdir, "eval", name)), name
    assert os.path.exists(os.path.join(trained_workdir, "eval", "stats", "classifier_train.npz"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("metrics", ("bpd", "ifd"), "config.eval.metrics"),
        ("guidance_scales", (-1.0,), "config.eval.guidance_scales"),
        ("bpd_importance_draws", 1, "config.eval.bpd_importance_draws"),
        ("metrics", ("fid",), "config.eval.inception_weights"),
    ],
)
def test_bad_eval_config_is_rejected_before_any_work(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(_eval_config(**{field: value}), str(tmp_path / "never_created"))
    assert not os.path.exists(tmp_path / "never_created")


def test_unconditional_model_rejects_accuracy(tmp_path):
    config = _eval_config(guidance_scales=(), metrics=("accuracy",))
    config.model.num_classes = None
    with pytest.raises(ValueError, match="class-conditional"):
        validation.validate_eval(config)


@pytest.mark.slow
def test_classifier_reaches_95_percent_on_mnist5k(tmp_path):
    """The default classifier (eval.classifier_steps of configs/mnist.py) on the 500 test digits;
    measured 0.968 (README, Evaluation: 2-core AMD EPYC, 2026-12-07)."""
    from configs import mnist

    meta = classifier.train_classifier(mnist.get_config(), str(tmp_path))
    assert meta["test_accuracy"] >= 0.95
    probs_fn, loaded = classifier.load_classifier(mnist.get_config(), str(tmp_path))
    images, labels = classifier.load_split(mnist.get_config(), "test")
    probs, features = classifier.apply_in_batches(probs_fn, images)
    assert features.shape == (500, classifier.FEATURE_DIM)
    assert np.mean(np.argmax(probs, 1) == labels) == pytest.approx(loaded["test_accuracy"])


@pytest.mark.parametrize("limit", [50, 128, 200])
def test_load_split_limit_reads_the_first_examples(limit):
    """A limit inside the first batch of 128, at its end and past it: the first `limit`
    examples of the whole split, in order."""
    from configs import mnist

    config = mnist.get_config()
    all_images, all_labels = classifier.load_split(config, "test")
    images, labels = classifier.load_split(config, "test", limit=limit)
    assert images.shape[0] == labels.shape[0] == limit
    np.testing.assert_array_equal(images, all_images[:limit])
    np.testing.assert_array_equal(labels, all_labels[:limit])


# --------------------------------------------------------------------------------------------
# The fid metric with small random Inception weights. (Imports are local: this section was
# appended to the file without touching its header.)


def _write_random_inception_weights(path: str, seed: int) -> str:
    """An .npz of FID Inception variables (`inception._variable_shapes`) that keep activations
    O(1), as tests/test_inception.py draws them: He-normal kernels, BatchNorm scale ~
    U(0.8, 1.2), bias and mean ~ N(0, 0.1^2), var ~ U(0.8, 1.25)."""
    import math

    from ddpm import inception

    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in inception._variable_shapes().items():
        if key.endswith("/kernel"):
            value = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[:3]))
        elif key.endswith("/var"):
            value = rng.uniform(0.8, 1.25, shape)
        elif key.endswith("/scale"):
            value = rng.uniform(0.8, 1.2, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        flat[key] = value.astype(np.float32)
    np.savez(path, **flat)
    return path


def _fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two feature sets' Gaussians, exact and without sqrtm: with
    C_a = A^T A, C_b = B^T B (A, B the centred rows / sqrt(n - 1)), tr (C_a C_b)^(1/2) is the
    sum of the singular values of A B^T (n_a x n_b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    mean = np.sum((a.mean(0) - b.mean(0)) ** 2)
    return float(mean + np.sum(ca**2) + np.sum(cb**2) - 2.0 * cross)


def _fd_low_rank(stats1, stats2) -> float:
    """`metrics.frechet_distance_of` for statistics of fewer samples than feature dimensions,
    exact on the range of the smaller set's covariance (C = Q M Q^T there) and without the
    minute-long sqrtm of a 2048 x 2048 product on a shared CPU."""
    small, large = sorted((stats1, stats2), key=lambda s: s.count)
    assert small.count < len(small.mu)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(small.cov @ rng.standard_normal((len(small.mu), small.count)))
    w, v = np.linalg.eigh(q.T @ small.cov @ q)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # M^(1/2)
    inner = np.linalg.eigvalsh(root @ q.T @ large.cov @ q @ root)
    diff = stats1.mu - stats2.mu
    cross = np.sum(np.sqrt(np.clip(inner, 0, None)))
    return float(diff @ diff + np.trace(stats1.cov) + np.trace(stats2.cov) - 2.0 * cross)


@pytest.mark.parametrize(
    "real_sqrtm", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fast_fd", "sqrtm"]
)
def test_fid_eval_matches_inception_features_and_rekeys_the_reference_cache(
    trained_workdir, tmp_path, monkeypatch, real_sqrtm
):
    """--mode=eval with metrics=("fid",) and random Inception weights on 4 samples against 4
    reference images (an npz: source of 16x16x1 uint8): the row's fid is the Fréchet distance
    of Inception features computed here on the very samples (captured from generate_samples)
    and on the reference images; the cached reference statistics are those features' and are
    keyed by the weights' digest, so other weights recompute them.

    Speed: Inception runs on 4-row batches (apply_in_batches would pad 4 rows to 250),
    and by default the Fréchet distance of the 2048-d statistics is computed by a low-rank
    exact route instead of scipy's sqrtm (a minute per call on a busy 2-core CPU; sqrtm's
    own tests are in test_metrics.py); the slow variant keeps sqrtm.
    """
    import functools

    from ddpm import inception, metrics
    from ddpm.data.transforms import to_float

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    data_path = str(tmp_path / "reference.npz")
    np.savez(data_path, images=reference, labels=np.arange(4, dtype=np.int32))
    weights = [
        _write_random_inception_weights(str(tmp_path / f"inception{s}.npz"), s) for s in (0, 1)
    ]

    real_apply = classifier.apply_in_batches
    monkeypatch.setattr(classifier, "apply_in_batches", functools.partial(real_apply, batch_size=4))
    samples = []
    real_generate = evaluate.generate_samples

    def capture(*args, **kwargs):
        samples.append(real_generate(*args, **kwargs))
        return samples[-1]

    monkeypatch.setattr(evaluate, "generate_samples", capture)
    fd_calls = []
    real_fd = metrics.frechet_distance_of

    def fd(stats1, stats2):
        fd_calls.append((stats1, stats2))
        return real_fd(stats1, stats2) if real_sqrtm else _fd_low_rank(stats1, stats2)

    monkeypatch.setattr(metrics, "frechet_distance_of", fd)

    def features(fn, images):  # the same 4-row shape as the eval's: one compile
        return np.concatenate([np.asarray(fn(images[i : i + 4])) for i in range(0, len(images), 4)])

    stats_path = os.path.join(trained_workdir, "eval", "stats", "inception_train.npz")
    cached_means, fids = [], []
    for round_, path in enumerate(weights):
        config = _eval_config(
            metrics=("fid",),
            num_samples=4,
            batch_size=4,
            guidance_scales=(1.0,),
            inception_weights=path,
        )
        config.data.source = f"npz:{data_path}"
        results = evaluate.evaluate(config, trained_workdir)
        (row,) = results["guidance"]
        assert len(samples) == round_ + 1 and len(fd_calls) == round_ + 1
        generated = samples[-1]
        assert generated.shape == (4, 16, 16, 1)
        np.testing.assert_array_equal(to_float(np.round((generated + 1) * 127.5)), generated)

        params = inception.load_fid_inception_params(path)
        fn = inception.make_feature_fn(params)
        sample_feats = features(fn, generated)
        reference_feats = features(fn, to_float(reference))
        assert np.std(sample_feats, 0).max() > 0.01  # the features see the images
        # The statistics the eval compared: the samples' and the reference images' features.
        got_samples, got_reference = fd_calls[-1]
        for got, feats in ((got_samples, sample_feats), (got_reference, reference_feats)):
            want = metrics.feature_stats(feats)
            assert got.count == want.count
            np.testing.assert_allclose(got.mu, want.mu, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got.cov, want.cov, rtol=1e-3, atol=1e-6)
        # The cache holds the reference statistics, keyed by these weights and this data.
        cached = metrics.load_stats(stats_path)
        np.testing.assert_array_equal(cached.mu, got_reference.mu)
        np.testing.assert_array_equal(cached.cov, got_reference.cov)
        key = metrics.load_stats_key(stats_path)
        assert key["network"] == metrics.tree_digest(params)
        assert key["source"] == config.data.source and key["split"] == "train"
        cached_means.append(cached.mu)

        # The row's fid: finite, >= 0, and the Fréchet distance of the features above.
        assert np.isfinite(row["fid"]) and row["fid"] >= 0
        want_fid = _fd_from_features(sample_feats, reference_feats)
        np.testing.assert_allclose(row["fid"], want_fid, rtol=1e-4)
        with open(os.path.join(trained_workdir, "eval", f"{results['step']}.json")) as f:
            assert json.load(f)["guidance"][0]["fid"] == row["fid"]
        fids.append(row["fid"])

    # Other weights: recomputed statistics (a stale cache would repeat round 1's mean).
    assert np.abs(cached_means[0] - cached_means[1]).max() > 1e-3
    assert fids[0] != fids[1]
