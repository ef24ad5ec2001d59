"""Sample-quality metrics on feature vectors: Fréchet distance, precision/recall, confidence.

Host-side NumPy/SciPy in float64: features are computed on the device, the statistics here.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import linalg


class FeatureStats(NamedTuple):
    """Mean [D] and covariance [D, D] (float64) of N feature vectors."""

    mu: np.ndarray
    cov: np.ndarray
    count: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """features: [N, D], N >= 2 -> their mean and unbiased covariance."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between N(mu1, C1) and N(mu2, C2).

    As the standard FID code (Heusel et al.; pytorch-fid): if the matrix square root is not
    finite (singular product), `eps` is added to both diagonals; an imaginary part left by
    rounding is dropped, and one larger than 1e-3 is an error.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    cov1, cov2 = (
        np.atleast_2d(np.asarray(cov1, np.float64)),
        np.atleast_2d(np.asarray(cov2, np.float64)),
    )
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * eps
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(C1 C2) has an imaginary component {imaginary:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def frechet_distance_of(stats1: FeatureStats, stats2: FeatureStats) -> float:
    return frechet_distance(stats1.mu, stats1.cov, stats2.mu, stats2.cov)


def save_stats(path: str, stats: FeatureStats, key: Mapping[str, Any] | None = None) -> None:
    """Writes the statistics as `.npz` (mu, cov, count, and `key` as a JSON string) atomically.

    key: what the statistics are of (JSON-serialisable), read back by `load_stats_key`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    extra = {} if key is None else {"key": np.array(json.dumps(dict(key), sort_keys=True))}
    np.savez(tmp, mu=stats.mu, cov=stats.cov, count=stats.count, **extra)
    os.replace(tmp, path)


def load_stats(path: str) -> FeatureStats:
    with np.load(path) as f:
        return FeatureStats(f["mu"], f["cov"], int(f["count"]))


def load_stats_key(path: str) -> dict[str, Any] | None:
    """The key saved with the statistics at `path`; None when the file has none."""
    with np.load(path) as f:
        return json.loads(str(f["key"])) if "key" in f.files else None


def tree_digest(tree: Any) -> str:
    """SHA-256 (hex) of a pytree of arrays: every leaf's path, dtype, shape and bytes, in
    jax's tree order (dict keys sorted), so equal parameters give equal digests however the
    dicts were built. Identifies a feature network's parameters for the statistics cache."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def _kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row.  [N, D] -> [N]."""
    d = _pairwise_distances(features, features)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

    precision: fraction of fake rows inside the real manifold (within the k-th neighbour
    radius of some real row); recall: fraction of real rows inside the fake manifold.
    real: [N, D], fake: [M, D]; N, M > k. O(N M) memory: meant for a few thousand rows.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} rows, got {len(real)} real / {len(fake)} fake")
    real_radii, fake_radii = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    d = _pairwise_distances(fake, real)  # [M, N]
    precision = np.mean(np.any(d <= real_radii[None, :], axis=1))
    recall = np.mean(np.any(fake_radii[None, :] >= d.T, axis=1))
    return {"precision": float(precision), "recall": float(recall)}


def classifier_scores(probs: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Scores of a classifier's class probabilities [N, K] on generated samples.

    inception_score: exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016) with p(y) the mean
    prediction; confidence: mean max probability; accuracy (with the intended labels [N]):
    the fraction classified as the class they were generated for.
    """
    probs = np.asarray(probs, np.float64)
    marginal = probs.mean(axis=0, keepdims=True)
    log_ratio = np.log(np.maximum(probs, 1e-30)) - np.log(np.maximum(marginal, 1e-30))
    scores = {
        "inception_score": float(np.exp(np.mean(np.sum(probs * log_ratio, axis=1)))),
        "confidence": float(np.mean(np.max(probs, axis=1))),
    }
    if labels is not None:
        scores["accuracy"] = float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))
    return scores
