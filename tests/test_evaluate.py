"""`--mode=eval` end to end on a tiny run, config errors, and the classifier's accuracy."""

import json
import os

import numpy as np
import pytest

from ddpm import classifier, evaluate, train
from tests.tiny import tiny_config


def _eval_config(**eval_fields):
    config = tiny_config(num_steps=10, checkpoint_every=10)
    e = config.eval
    e.metrics = ("bpd", "fd", "accuracy", "pr")
    e.num_samples, e.batch_size = 20, 10
    e.bpd_examples, e.bpd_importance_examples, e.bpd_importance_draws = 10, 10, 8
    e.classifier_steps = 60
    e.guidance_scales = (0.0, 2.0)
    e.update(eval_fields)
    return config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    train.train_and_evaluate(_eval_config(), workdir)
    return workdir


def test_eval_mode_writes_json_table_plot_and_grids(trained_workdir):
    results = evaluate.evaluate(_eval_config(), trained_workdir)
    step = results["step"]
    assert step == 10
    with open(os.path.join(trained_workdir, "eval", f"{step}.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    # A barely trained model on 16x16 digits: a bound far above the 8-bit data's ~1-2 bits/dim
    # of a good model, but finite, and the two estimators agree within their errors.
    assert 1.0 < results["bpd"] < 16.0
    both = np.hypot(results["bpd_stderr"], results["bpd_importance_stderr"])
    assert abs(results["bpd"] - results["bpd_importance"]) < 4 * both
    rows = results["guidance"]
    assert [row["guidance_scale"] for row in rows] == [0.0, 2.0]
    for row in rows:
        assert row["fd"] > 0 and row["fd_real_test"] >= 0
        assert 0 <= row["accuracy"] <= 1 and 1 <= row["inception_score"] <= 10
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
        evaluate.validate(config)


@pytest.mark.slow
def test_classifier_reaches_95_percent_on_mnist5k(tmp_path):
    """The default classifier (eval.classifier_steps of config/mnist.py) on the 500 test digits;
    measured 0.98 in the closing note."""
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
