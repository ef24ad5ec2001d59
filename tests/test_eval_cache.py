"""The reference-statistics cache of `evaluate.reference_stats`: reused only for the same
feature network parameters and the same data, recomputed otherwise.

Tiny random feature functions over tiny random images (`classifier.load_split` replaced by a
fake whose images depend on the data identity); nothing is trained.
"""

import functools
import json
import os
import zlib

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddpm import classifier, evaluate, metrics

NUM_IMAGES, NUM_SAMPLES = 40, 12


def _config(source: str = "mnist5k", image_size: int = 16) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "data": {
                "source": source,
                "image_size": image_size,
                "channels": 1,
                "length": None,
                "data_dir": None,
                "train_split": "train",
                "eval_split": "test",
                "image_key": "image",
                "label_key": "label",
                "random_flip": False,
                "skip_corrupt": False,
            },
            "eval": {"reference_split": "train", "num_samples": NUM_SAMPLES},
        }
    )


def _images(config, split, limit=None):
    """Random images [40, S, S, C] in [-1, 1] seeded by `classifier.split_identity`."""
    seed = zlib.crc32(json.dumps(classifier.split_identity(config, split)).encode())
    size, channels = config.data.image_size, config.data.channels
    images = np.random.default_rng(seed).uniform(-1, 1, (NUM_IMAGES, size, size, channels))
    images = images.astype(np.float32)[:limit]
    return images, np.zeros(len(images), np.int32)


@pytest.fixture
def reads(monkeypatch):
    """Replaces classifier.load_split by `_images`; returns the list of the `limit`s it was
    called with (None: the whole split, read to compute statistics)."""
    calls = []

    def fake_load_split(config, split, limit=None):
        calls.append(limit)
        return _images(config, split, limit)

    monkeypatch.setattr(classifier, "load_split", fake_load_split)
    return calls


def _params(seed: int) -> dict:
    kernel = jax.random.normal(jax.random.key(seed), (16, 6))
    return {"dense": {"kernel": kernel, "bias": jnp.zeros(6)}}


@jax.jit
def _apply(params, images):
    small = jax.image.resize(images, (images.shape[0], 4, 4, images.shape[-1]), "linear")
    flat = small.reshape(images.shape[0], -1)
    return (flat @ params["dense"]["kernel"] + params["dense"]["bias"],)


def _features_fn(params):
    """Images [B, S, S, 1] -> (features [B, 6],): a random linear map of a 4x4 resize."""
    return functools.partial(_apply, params)


def _stats(config, workdir, params):
    fn = _features_fn(params)
    return evaluate.reference_stats(config, workdir, "classifier", fn, metrics.tree_digest(params))


def _fresh_mean(config, params) -> np.ndarray:
    """The mean of the features of the whole reference split, computed without any cache."""
    images, _ = _images(config, config.eval.reference_split)
    (feats,) = classifier.apply_in_batches(_features_fn(params), images)
    return metrics.feature_stats(feats).mu


def _path(workdir: str) -> str:
    return os.path.join(workdir, "eval", "stats", "classifier_train.npz")


def test_reused_when_nothing_changed(tmp_path, reads):
    config, workdir, params = _config(), str(tmp_path), _params(0)
    first, rows = _stats(config, workdir, params)
    mtime = os.stat(_path(workdir)).st_mtime_ns
    again, rows_again = _stats(config, workdir, params)
    assert reads == [None, NUM_SAMPLES]  # the second call reads only the rows for pr
    assert os.stat(_path(workdir)).st_mtime_ns == mtime
    np.testing.assert_array_equal(again.mu, first.mu)
    # The same images, recomputed in other batches (all of the split, then its first rows):
    # XLA's matmul may round differently per batch size (1 ulp, seen on an AVX2-only EPYC).
    np.testing.assert_allclose(rows_again, rows, rtol=1e-5, atol=1e-6)
    assert rows.shape == (NUM_SAMPLES, 6)
    # What comes back is the file's content: planted statistics under the same key.
    planted = metrics.FeatureStats(first.mu + 5.0, first.cov, first.count)
    metrics.save_stats(_path(workdir), planted, metrics.load_stats_key(_path(workdir)))
    np.testing.assert_array_equal(_stats(config, workdir, _params(0))[0].mu, planted.mu)


def test_recomputed_after_the_parameters_change(tmp_path, reads, capsys):
    config, workdir = _config(), str(tmp_path)
    old_params = _params(0)
    old, _ = _stats(config, workdir, old_params)
    new_params = jax.tree_util.tree_map(lambda x: x, old_params)
    new_params["dense"]["bias"] = old_params["dense"]["bias"].at[2].add(1.0)
    new, rows = _stats(config, workdir, new_params)
    assert reads == [None, None]
    expected = _fresh_mean(config, new_params)
    np.testing.assert_allclose(new.mu, expected, rtol=1e-6, atol=1e-7)
    # The bias moved feature 2's mean by exactly 1 (a kernel entry would move it by a pixel
    # mean of `_images`' noise, whose seed follows the data file's path and mtime: sometimes
    # under 1e-3 in a fresh clone).
    np.testing.assert_allclose(new.mu - old.mu, np.eye(6)[2], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(metrics.load_stats(_path(workdir)).mu, new.mu)
    assert metrics.load_stats_key(_path(workdir))["network"] == metrics.tree_digest(new_params)
    assert "cached for another network" in capsys.readouterr().out
    # And the new statistics are reused in turn.
    _stats(config, workdir, new_params)
    assert reads == [None, None, NUM_SAMPLES]


def _write_npz(path, seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8))


def _write_png(path, value: int) -> None:
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


@pytest.mark.parametrize(
    "change",
    ["image_size", "train_split", "random_flip", "source", "npz_rewritten", "folder_file_added"],
)
def test_recomputed_when_the_data_change(tmp_path, reads, capsys, change):
    workdir, params = str(tmp_path / "run"), _params(0)
    npz, images = tmp_path / "data.npz", tmp_path / "images"
    _write_npz(npz, 0, 20)
    images.mkdir()
    for i in range(3):
        _write_png(images / f"{i}.png", 10 * i)
    source = {"npz_rewritten": f"npz:{npz}", "folder_file_added": f"folder:{images}"}
    config = _config(source.get(change, "mnist5k"))
    old, _ = _stats(config, workdir, params)
    if change == "image_size":
        config.data.image_size = 12
    elif change == "train_split":
        config.data.train_split = "test"
    elif change == "random_flip":
        config.data.random_flip = True
    elif change == "source":
        config.data.source = f"npz:{npz}"
    elif change == "npz_rewritten":
        _write_npz(npz, 1, 21)
    else:
        _write_png(images / "3.png", 200)
    new, _ = _stats(config, workdir, params)
    assert reads == [None, None]
    np.testing.assert_allclose(new.mu, _fresh_mean(config, params), rtol=1e-6, atol=1e-7)
    assert np.abs(new.mu - old.mu).max() > 1e-3
    expected_field = {
        "train_split": "split_name",
        "npz_rewritten": "files",
        "folder_file_added": "files",
    }.get(change, change)
    out = capsys.readouterr().out
    assert "cached for another" in out and expected_field in out.splitlines()[-1]


def test_statistics_without_a_key_are_recomputed(tmp_path, reads, capsys):
    config, workdir, params = _config(), str(tmp_path), _params(0)
    stale = metrics.FeatureStats(np.full(6, 7.0), np.eye(6), NUM_IMAGES)
    metrics.save_stats(_path(workdir), stale)  # as written before keys were stored
    stats, _ = _stats(config, workdir, params)
    assert reads == [None]
    np.testing.assert_allclose(stats.mu, _fresh_mean(config, params), rtol=1e-6, atol=1e-7)
    assert "no cache key" in capsys.readouterr().out
    assert metrics.load_stats_key(_path(workdir))["network"] == metrics.tree_digest(params)


def test_load_classifier_reports_the_digest_of_the_saved_parameters(tmp_path):
    """What sample_metrics keys the classifier's statistics with: the digest of the
    parameters in workdir/classifier, which changes when they are replaced (retraining)."""
    config, workdir = _config(), str(tmp_path)
    directory = tmp_path / "classifier"
    directory.mkdir()
    meta = {"source": "mnist5k", "image_size": 16, "channels": 1, "num_classes": 10}
    (directory / "classifier.json").write_text(json.dumps(meta))
    model = classifier.Classifier(10)
    digests = []
    for seed in (1, 2):
        params = model.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 1)))["params"]
        (directory / "params.msgpack").write_bytes(flax.serialization.to_bytes(params))
        _, loaded = classifier.load_classifier(config, workdir)
        assert loaded["params_sha256"] == metrics.tree_digest(params)
        digests.append(loaded["params_sha256"])
    assert digests[0] != digests[1]
