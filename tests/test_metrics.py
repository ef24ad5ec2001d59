"""Fréchet distance, precision/recall and classifier scores against independent computations."""

import numpy as np
import pytest
from scipy import linalg

from ddpm import metrics


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_direct_symmetric_formula():
    """tr((C1 C2)^(1/2)) = tr((C1^(1/2) C2 C1^(1/2))^(1/2)): the second form has a symmetric PSD
    argument, computed here by eigendecomposition, a different route from sqrtm(C1 C2)."""
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _random_cov(rng, d), _random_cov(rng, d)
    w, v = np.linalg.eigh(c1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ c2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(inner))
    np.testing.assert_allclose(metrics.frechet_distance(mu1, c1, mu2, c2), expected, rtol=1e-9)


def test_frechet_distance_of_shifted_diagonal_gaussians_is_closed_form():
    """Commuting covariances: ||mu1 - mu2||^2 + sum (s1 - s2)^2."""
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 3.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, -2.0, 0.0])
    got = metrics.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    np.testing.assert_allclose(got, 5.0 + np.sum((s1 - s2) ** 2), rtol=1e-12)


def test_frechet_distance_of_samples_identical_sets_and_shift():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 8))
    stats = metrics.feature_stats(x)
    assert abs(metrics.frechet_distance_of(stats, stats)) < 1e-8
    shifted = metrics.feature_stats(x + 0.5)  # same covariance, mean moved by 0.5 per dim
    np.testing.assert_allclose(metrics.frechet_distance_of(stats, shifted), 8 * 0.25, rtol=1e-9)


def test_frechet_distance_survives_singular_covariances():
    """Fewer samples than dimensions: singular covariances; the eps offset keeps it finite, and it
    equals the direct value on the regularised matrices."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 10)), rng.standard_normal((5, 10)) + 1.0
    sa, sb = metrics.feature_stats(a), metrics.feature_stats(b)
    got = metrics.frechet_distance_of(sa, sb)
    eye = 1e-6 * np.eye(10)
    root = linalg.sqrtm((sa.cov + eye) @ (sb.cov + eye)).real
    direct = np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.cov + sb.cov) - 2 * np.trace(root)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_round_trip(tmp_path):
    stats = metrics.feature_stats(np.random.default_rng(3).standard_normal((20, 4)))
    path = str(tmp_path / "sub" / "stats.npz")
    metrics.save_stats(path, stats)
    loaded = metrics.load_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.count == 20
    assert metrics.load_stats_key(path) is None  # saved without a key


def test_stats_key_round_trip(tmp_path):
    stats = metrics.feature_stats(np.random.default_rng(3).standard_normal((20, 4)))
    path = str(tmp_path / "stats.npz")
    key = {"network": "ab" * 32, "image_size": 28, "data_dir": None, "random_flip": False}
    metrics.save_stats(path, stats, key)
    assert metrics.load_stats_key(path) == key
    np.testing.assert_array_equal(metrics.load_stats(path).mu, stats.mu)


def test_tree_digest_identifies_the_parameters():
    """Equal for equal trees however their dicts were built; different after one element,
    a dtype or a leaf's name changes."""
    rng = np.random.default_rng(5)
    tree = {"conv": {"kernel": rng.standard_normal((3, 3, 1, 4)), "bias": np.zeros(4)}}
    reordered = {"conv": {"bias": np.zeros(4), "kernel": tree["conv"]["kernel"].copy()}}
    digest = metrics.tree_digest(tree)
    assert len(digest) == 64 and metrics.tree_digest(reordered) == digest
    perturbed = {"conv": {**tree["conv"], "kernel": tree["conv"]["kernel"].copy()}}
    perturbed["conv"]["kernel"][2, 1, 0, 3] += 1e-6
    as_float32 = {"conv": {k: v.astype(np.float32) for k, v in tree["conv"].items()}}
    renamed = {"conv": {"kernel": tree["conv"]["kernel"], "scale": np.zeros(4)}}
    others = {metrics.tree_digest(t) for t in (perturbed, as_float32, renamed)}
    assert len(others) == 3 and digest not in others


def test_precision_recall_of_disjoint_and_identical_sets():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((400, 2))
    same = metrics.precision_recall(real, rng.standard_normal((400, 2)))
    assert same["precision"] > 0.9 and same["recall"] > 0.9
    far = metrics.precision_recall(real, rng.standard_normal((400, 2)) + 20.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # Samples that cover only half of the real data: high precision, recall about one half.
    half = real[real[:, 0] > 0] + 0.01
    scores = metrics.precision_recall(real, half)
    assert scores["precision"] > 0.9 and 0.35 < scores["recall"] < 0.65


def test_classifier_scores():
    k = 10
    one_hot = np.eye(k)[np.arange(100) % k]
    scores = metrics.classifier_scores(one_hot, np.arange(100) % k)
    np.testing.assert_allclose(scores["inception_score"], k, rtol=1e-9)  # confident and diverse
    assert scores["accuracy"] == 1.0 and scores["confidence"] == 1.0
    uniform = metrics.classifier_scores(np.full((50, k), 1 / k), np.zeros(50, int))
    np.testing.assert_allclose(uniform["inception_score"], 1.0)
    np.testing.assert_allclose(uniform["confidence"], 0.1)
