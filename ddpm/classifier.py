"""A small CNN classifier of the run's dataset: features for Fréchet distance, and a judge of
class-conditional samples.

`python main.py --mode=train_classifier --config=... --workdir=...` trains it on the training
split and caches it in `workdir/classifier/` (params.msgpack + classifier.json with its test
accuracy); `--mode=eval` loads it from there, or trains it first. Its penultimate activations
(`feature_dim` wide) play the role of Inception's pool features for small grayscale datasets
such as MNIST, where an ImageNet network says little.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from ddpm import data, metrics
from ddpm.data import arrays, folder, info
from ddpm.errors import UserError

FEATURE_DIM = 128
BATCH_SIZE = 128


class Classifier(nn.Module):
    """LeNet-style: 3x3 conv (32) -> 2x2 max pool -> 3x3 conv (64) -> 2x2 max pool -> dense.

    __call__(x: [B, H, W, C] float32 in [-1, 1]) -> (logits [B, K], features [B, FEATURE_DIM]).
    One conv per resolution keeps a training step at ~1 GFLOP for batch 128 at 28x28.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(features), features


def _shift(images: jax.Array, rng: jax.Array, max_shift: int = 2) -> jax.Array:
    """Translates each image [B, H, W, C] by up to `max_shift` pixels, filling with -1 (black)."""
    batch, h, w, _ = images.shape
    shifts = jax.random.randint(rng, (batch, 2), -max_shift, max_shift + 1)
    padded = jnp.pad(
        images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1
    )

    def crop(image, shift):
        return jax.lax.dynamic_slice(
            image, (max_shift + shift[0], max_shift + shift[1], 0), (h, w, image.shape[-1])
        )

    return jax.vmap(crop)(padded, shifts)


def _num_classes(config: ml_collections.ConfigDict) -> int:
    info = data.dataset_info(config)
    if info.num_classes is None:
        raise UserError(
            f"config.data.source={config.data.source!r} has no labels: the classifier metrics "
            "(fd, accuracy, pr) need a labelled dataset; use config.eval.metrics=bpd or fid"
        )
    return info.num_classes


def _directory(workdir: str) -> str:
    return os.path.join(workdir, "classifier")


def train_classifier(
    config: ml_collections.ConfigDict, workdir: str, *, num_steps: int | None = None
) -> dict[str, Any]:
    """Trains the classifier on config.data's training split; saves it in workdir/classifier.

    Adam 1e-3 with cosine decay, batch 128, random 2-pixel shifts, `config.eval.classifier_steps`
    steps (or `num_steps`). Returns its metadata, including the test-split accuracy.
    """
    num_classes = _num_classes(config)
    num_steps = config.eval.classifier_steps if num_steps is None else num_steps
    model = Classifier(num_classes)
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, num_steps))
    size, channels = config.data.image_size, config.data.channels
    params = model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels, rng):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, _shift(images, rng))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = data.create_dataset(config, "train", batch_size=BATCH_SIZE, seed=config.seed)
    rng = jax.random.key(config.seed)
    for i in tqdm.trange(num_steps, desc="classifier", disable=None):
        batch = next(batches)
        params, opt_state, loss = step(
            params, opt_state, batch["image"], batch["label"], jax.random.fold_in(rng, i)
        )
    batches.close()
    test_images, test_labels = load_split(config, "test")
    probs, _ = apply_in_batches(make_apply_fn(model, params), test_images)
    meta = {
        "source": config.data.source,
        "image_size": size,
        "channels": channels,
        "num_classes": num_classes,
        "num_steps": num_steps,
        "final_loss": float(loss),
        "test_accuracy": float(np.mean(np.argmax(probs, axis=1) == test_labels)),
    }
    directory = _directory(workdir)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    with open(os.path.join(directory, "classifier.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"Classifier test accuracy {meta['test_accuracy']:.4f}; saved in {directory}", flush=True)
    return meta


def load_classifier(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[Callable[[np.ndarray], tuple[jax.Array, jax.Array]], dict[str, Any]]:
    """(jitted images -> (probs [B, K], features [B, FEATURE_DIM]), metadata) of the cached
    classifier; trains it first when workdir/classifier has none. The metadata holds the
    classifier.json fields and "params_sha256", `metrics.tree_digest` of the parameters."""
    directory = _directory(workdir)
    meta_path = os.path.join(directory, "classifier.json")
    if not os.path.exists(meta_path):
        train_classifier(config, workdir)
    with open(meta_path) as f:
        meta = json.load(f)
    expected = (config.data.source, config.data.image_size, config.data.channels)
    if (meta["source"], meta["image_size"], meta["channels"]) != expected:
        raise UserError(
            f"{directory} holds a classifier of {meta['source']} at {meta['image_size']}px x "
            f"{meta['channels']} channels, not of config.data {expected}; delete it to retrain"
        )
    model = Classifier(meta["num_classes"])
    size, channels = meta["image_size"], meta["channels"]
    template = model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"]
    with open(os.path.join(directory, "params.msgpack"), "rb") as f:
        params = flax.serialization.from_bytes(template, f.read())
    meta["params_sha256"] = metrics.tree_digest(params)
    return make_apply_fn(model, params), meta


def make_apply_fn(model: Classifier, params) -> Callable[[np.ndarray], tuple[jax.Array, jax.Array]]:
    @jax.jit
    def apply(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, features = model.apply({"params": params}, images)
        return jax.nn.softmax(logits), features

    return apply


def fixed_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[jax.Array, int]]:
    """Batches of x [N, ...] of exactly `batch_size` rows (the last one completed by wrapping
    around, so a jitted consumer compiles once), each with its number of real rows."""
    for start in range(0, len(x), batch_size):
        rows = np.arange(start, start + batch_size) % len(x)
        yield jnp.asarray(x[rows]), min(batch_size, len(x) - start)


def apply_in_batches(
    fn: Callable, images: np.ndarray, batch_size: int = 250
) -> tuple[np.ndarray, ...]:
    """Runs `fn` (images -> tuple of arrays) over images [N, ...] in `fixed_batches` of at
    most `batch_size` (fewer images: one batch of them) and concatenates its outputs (the
    padding rows dropped) -> tuple of [N, ...] numpy arrays."""
    batch_size = min(batch_size, len(images))
    outputs = [
        [np.asarray(o)[:n] for o in fn(batch)] for batch, n in fixed_batches(images, batch_size)
    ]
    return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))


def load_split(
    config: ml_collections.ConfigDict, split: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A split, in order: (images [N, H, W, C] float32 in [-1, 1], labels [N] int32); all of
    it, or its first `limit` examples (reading stops there)."""
    batches = data.create_dataset(
        config,
        split,
        batch_size=BATCH_SIZE,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    parts, count = [], 0
    for batch in batches:
        parts.append(batch)
        count += len(batch["label"])
        if limit is not None and count >= limit:
            break
    batches.close()
    return (
        np.concatenate([p["image"] for p in parts])[:limit],
        np.concatenate([p["label"] for p in parts])[:limit],
    )


def split_identity(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
    """What decides the images `load_split(config, split)` reads (JSON-serialisable): the
    config.data fields that select and shape them, and for a file source (mnist5k, npz:,
    folder:) a SHA-256 of its files' names, sizes and modification times, so that rewritten
    data counts as other data. A tfds: source is identified by its name and data_dir."""
    d = config.data
    kind, arg = info.parse_source(d.source)
    files = None
    if kind in ("mnist5k", "npz", "folder"):
        root = (arrays.MNIST5K_PATH if kind == "mnist5k" else Path(arg).expanduser()).resolve()
        listing = folder.list_images(root) if kind == "folder" else [root] * root.is_file()
        h = hashlib.sha256()
        for p in listing:
            st = p.stat()
            name = p.relative_to(root) if kind == "folder" else p
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        files = h.hexdigest()
    return {
        "source": d.source,
        "split": split,
        "split_name": info.split_name(d, split),
        "image_size": d.image_size,
        "channels": d.channels,
        "length": d.length,
        "data_dir": d.data_dir,
        "image_key": d.image_key,
        "label_key": d.label_key,
        "random_flip": d.random_flip,
        "skip_corrupt": d.skip_corrupt,
        "files": files,
    }
