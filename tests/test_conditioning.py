"""Label dropout for classifier-free guidance (`conditioning.drop`): the rate of null
conditions for class labels and both text conditionings, kept rows untouched, and the real
diffusion objective training on the null condition when config.training.label_dropout says so.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import conditioning, objectives, sharding, text
from ddpm.config import validation
from tests.tiny import tiny_config

N = 20_000  # examples per draw: the binomial sd of the fraction is <= 0.0036
SIGMAS = 5.0
LENGTH, WIDTH = 6, 16


def _text_config(source: str):
    config = tiny_config()
    config.model.num_classes = None
    config.text.update(dict(source=source, max_length=LENGTH, width=WIDTH, depth=1, num_heads=2))
    return config


def _assert_rate(dropped: np.ndarray, rate: float) -> None:
    """The fraction of dropped rows is `rate` within SIGMAS binomial standard deviations."""
    sd = np.sqrt(rate * (1 - rate) / dropped.size)
    assert abs(dropped.mean() - rate) < SIGMAS * sd, (dropped.mean(), rate, sd)


def _labels(n: int = N) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.int32)


def _tokens(n: int = N, seed: int = 0) -> dict:
    """Token rows with at least one real (non-PAD) token each: none is null already."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, len(text.VOCAB), (n, LENGTH)).astype(np.int32)
    tokens[:, 3:] *= rng.random((n, LENGTH - 3)) < 0.5  # some trailing PAD, not all
    return {"tokens": tokens}


def _context(n: int = N, seed: int = 0) -> dict:
    """Precomputed context rows with at least one unmasked position each."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, LENGTH)) < 0.6
    mask[:, 0] = True
    return {
        "context": rng.standard_normal((n, LENGTH, WIDTH)).astype(np.float32),
        "context_mask": mask,
    }


def _dropped_labels(config, cond, out) -> np.ndarray:
    """Which rows of a label batch `drop` turned null (checking the others are unchanged)."""
    out = np.asarray(out)
    null = out == config.model.num_classes
    np.testing.assert_array_equal(out[~null], cond[~null])
    return null


def _dropped_text(cond, out) -> np.ndarray:
    """Which rows of a text dict `drop` turned null: every leaf of such a row is its fill value
    (PAD tokens, or zero context with an all-False mask), the other rows are unchanged."""
    out = {k: np.asarray(v) for k, v in out.items()}
    assert out.keys() == cond.keys()
    if "tokens" in cond:
        null = np.all(out["tokens"] == 0, axis=1)
        leaves = ["tokens"]
    else:
        null = ~np.any(out["context_mask"], axis=1)
        # A null row is null in every leaf: the context is zeroed in the same rows.
        np.testing.assert_array_equal(out["context"][null], 0.0)
        leaves = ["context", "context_mask"]
    for k in leaves:
        np.testing.assert_array_equal(out[k][~null], cond[k][~null])
        assert out[k].dtype == cond[k].dtype, k
    return null


KINDS = {
    "labels": (tiny_config, _labels, _dropped_labels),
    "tokens": (lambda: _text_config("captions"), _tokens, lambda c, x, y: _dropped_text(x, y)),
    "context": (
        lambda: _text_config("npz:unused.npz"),  # null_label reads no file
        _context,
        lambda c, x, y: _dropped_text(x, y),
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_rate_matches_within_binomial_tolerance_and_keeps_other_rows(kind, rate):
    make_config, make_cond, dropped_rows = KINDS[kind]
    config = make_config()
    cond = make_cond()
    out = conditioning.drop(config, cond, jax.random.key(7), rate)
    _assert_rate(dropped_rows(config, cond, out), rate)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rate_zero_drops_none_rate_one_drops_all(kind):
    make_config, make_cond, dropped_rows = KINDS[kind]
    config = make_config()
    cond = make_cond(n=500)
    none, every = (conditioning.drop(config, cond, jax.random.key(1), r) for r in (0.0, 1.0))
    assert not dropped_rows(config, cond, none).any()
    assert dropped_rows(config, cond, every).all()
    assert conditioning.drop(config, None, jax.random.key(1), 0.5) is None


def test_keys_give_independent_draws_and_a_key_repeats_its_draw():
    """Two keys' masks agree on a fraction p^2 + (1-p)^2 = 0.5 of rows (independent draws),
    not on all of them; the same key gives the same mask."""
    config, labels = tiny_config(), _labels()
    null = [
        _dropped_labels(config, labels, conditioning.drop(config, labels, jax.random.key(s), 0.5))
        for s in (3, 4, 3)
    ]
    np.testing.assert_array_equal(null[0], null[2])
    _assert_rate(null[0] == null[1], 0.5)


def _noisy(params, seed=5):
    """Parameters plus N(0, 0.1^2) noise (NumPy's: a threefry draw per leaf compiles slowly):
    the zero-initialised output conv made the fresh model's output 0 whatever the label."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p + np.float32(0.1) * rng.standard_normal(p.shape).astype(np.float32), params
    )


def test_diffusion_objective_trains_on_the_null_label_at_dropout_one():
    """Diffusion.loss with label_dropout=1 equals its loss on null labels with dropout 0 (same
    rng), and differs from the loss on the true labels: dropout reaches the model."""

    def objective(label_dropout):
        config = tiny_config(label_dropout=0.0)
        config.model.ch_mult = (1,)  # one level: a quick compile
        validation.validate(config)  # which allows rates < 1; the objective applies any rate
        config.training.label_dropout = label_dropout
        return objectives.create(config, workdir=None, mesh=sharding.create_mesh())

    dropping, plain = objective(1.0), objective(0.0)
    params = _noisy(jax.jit(dropping.init_params)(jax.random.key(0)))
    num_classes = dropping.config.model.num_classes
    batch = {
        "image": jax.random.uniform(jax.random.key(1), (8, 16, 16, 1), minval=-1, maxval=1),
        "label": jnp.arange(8, dtype=jnp.int32),
    }
    null_batch = {**batch, "label": jnp.full((8,), num_classes, jnp.int32)}
    rng = jax.random.key(2)

    @jax.jit  # one compile for the three losses
    def losses(params):
        return (
            dropping.loss(params, None, batch, rng)[0],
            plain.loss(params, None, null_batch, rng)[0],
            plain.loss(params, None, batch, rng)[0],
        )

    dropped, null, true = map(float, losses(params))
    np.testing.assert_allclose(dropped, null, rtol=1e-6)
    # The labels move the loss by far more than float32 rounding (measured ~1e-2 relative).
    assert abs(true - null) > 1e-3 * abs(null), (true, null)
