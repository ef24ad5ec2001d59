"""The conditioning pytree of a run: what the denoiser gets besides x_t and t.

Class-conditional models take labels [B] int32; text models (`config.text.source`) a dict,
{"tokens": [B, L] int32} (built-in encoder) or {"context": [B, L, D] float32,
"context_mask": [B, L] bool} (precomputed embeddings); unconditional models None. The model
family supplies the null condition (`ddpm.models.null_label`): fill values, one per leaf, so
label dropout and guidance handle every kind alike with `jax.tree.map`.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm import models, text
from ddpm.errors import UserError

Cond = jax.Array | dict[str, jax.Array] | None


@functools.cache
def _npz(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    return text.load_embeddings(path)


def encode(config: ml_collections.ConfigDict, texts: list[str]) -> dict[str, np.ndarray]:
    """The conditioning dict of `texts` for `config.text.source`: tokens [N, L] int32, the
    rows of the precomputed embeddings (every text must be one of the .npz's captions), or
    the CLIP encoder's hidden states [N, 77, D] ("clip:<pipeline dir>")."""
    t = config.text
    if t.source == "captions":
        return {"tokens": text.tokenize(texts, t.max_length)}
    if t.source.startswith("clip:"):  # a Stable Diffusion pipeline's frozen CLIP encoder
        from ddpm.pretrained import clip_text

        context = clip_text.encode_prompts(t.source.removeprefix("clip:"), texts)
        return {"context": context, "context_mask": np.ones(context.shape[:2], bool)}
    path = t.source.removeprefix("npz:")
    captions, embeddings, mask = _npz(path)
    if embeddings.shape[1:] != (t.max_length, t.width):
        raise UserError(
            f"{path} has embeddings [N, L, D] = {embeddings.shape}: set config.text.max_length="
            f"{embeddings.shape[1]} and config.text.width={embeddings.shape[2]}"
        )
    rows = text.lookup(captions, texts, path)
    return {"context": embeddings[rows], "context_mask": mask[rows]}


CAPTION_KEYS = ("tokens", "context", "context_mask")


def check_captions(config: ml_collections.ConfigDict, info) -> None:
    """Training a text model whose encoder sits outside the network ("clip:") needs captioned
    data (`info`, a `ddpm.data.DatasetInfo`): UserError otherwise. Cheap: reads nothing."""
    source = config.text.source
    if source is not None and source.startswith("clip:") and info.captions is None:
        raise UserError(
            f"config.text.source={source!r} trains on captioned images: config.data.source="
            f"{config.data.source!r} has no captions (a folder with captions.jsonl or a .txt "
            "per image, see ddpm/data/folder.py)"
        )


def caption_table(config: ml_collections.ConfigDict, info) -> dict[str, np.ndarray] | None:
    """The conditioning rows of a captioned dataset's captions (`info.captions`, a
    `ddpm.data.DatasetInfo`'s) for `config.text.source`, encoded once on the host: label i of
    a batch is caption i. None for a run without text, or whose data has no captions (the
    digit captions of `text.caption_ids` then)."""
    if config.text.source is None or info.captions is None:
        return None
    return encode(config, info.captions)


def attach_captions(batch: dict, table: dict[str, np.ndarray] | None) -> dict:
    """A host batch {"image", "label"} with its captions' rows of `table` (`caption_table`)
    added under their conditioning keys; unchanged without a table."""
    if table is None:
        return batch
    return {**batch, **{key: rows[batch["label"]] for key, rows in table.items()}}


def batch_cond(config: ml_collections.ConfigDict, batch: dict[str, jax.Array]) -> Cond:
    """The condition of a training batch (traceable): its captions' rows (`attach_captions`),
    the caption of each digit (`text.caption_ids`) encoded, or the labels; None for
    unconditional models."""
    if config.text.source is not None:
        if any(key in batch for key in CAPTION_KEYS):
            return {key: batch[key] for key in CAPTION_KEYS if key in batch}
        table = encode(config, text.caption_table())
        ids = text.caption_ids(batch["image"], batch["label"])
        return jax.tree.map(lambda rows: jnp.asarray(rows)[ids], table)
    if config.model.num_classes is not None:
        return batch["label"]
    return None


def drop(config: ml_collections.ConfigDict, cond: Cond, rng: jax.Array, rate: float) -> Cond:
    """Classifier-free guidance training: each example's condition becomes the null one with
    probability `rate`."""
    if cond is None:
        return None
    batch = jax.tree.leaves(cond)[0].shape[0]
    dropped = jax.random.bernoulli(rng, rate, (batch,))

    def where(leaf: jax.Array, null) -> jax.Array:
        return jnp.where(dropped.reshape((batch,) + (1,) * (leaf.ndim - 1)), null, leaf)

    return jax.tree.map(where, cond, models.null_label(config))


def with_guidance(cond: Cond, scale: jax.Array) -> dict[str, jax.Array]:
    """The condition of a guidance-embedding network (`model.guidance_embed`): `cond` with the
    guidance scale of each example, scale: [B] float32 (or a scalar, for every example)."""
    if cond is None:
        raise ValueError("a guidance-embedding network needs a condition to guide")
    cond = dict(cond) if isinstance(cond, dict) else {"labels": cond}
    batch = jax.tree.leaves(cond)[0].shape[0]
    return {**cond, "guidance": jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch,))}


def grid_cond(config: ml_collections.ConfigDict) -> tuple[Cond, int, list[str] | None]:
    """(condition [num_samples] of a sample grid, its column count, the prompts or None).

    Class-conditional: one row per class (or `config.sample.labels` everywhere); text: the
    prompt `config.sample.prompt` everywhere, or one row per digit, "a handwritten <digit>".
    """
    num = config.sample.num_samples
    square = int(np.ceil(np.sqrt(num)))
    if config.text.source is not None:
        if config.sample.prompt is not None:
            prompts, cols = [config.sample.prompt] * num, square
        else:
            cols = -(-num // len(text.DIGITS))
            prompts = [f"a handwritten {d}" for d in text.DIGITS for _ in range(cols)][:num]
        return encode(config, prompts), cols, prompts
    num_classes = config.model.num_classes
    if num_classes is None:
        return None, square, None
    if config.sample.labels is not None:
        return np.full((num,), config.sample.labels, np.int32), square, None
    cols = -(-num // num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int32), cols)[:num], cols, None


def take(cond: Cond, start: int, size: int) -> Cond:
    """Examples [start, start + size) of a host condition, wrapping around to fill `size`."""
    if cond is None:
        return None
    return jax.tree.map(
        lambda leaf: jnp.asarray(
            np.take(leaf, np.arange(start, start + size), axis=0, mode="wrap")
        ),
        cond,
    )


def with_negative_prompt(config: ml_collections.ConfigDict, params: Any) -> Any:
    """`params` of a text model with the null context (the unconditional input of
    classifier-free guidance) replaced by `config.sample.negative_prompt`'s encoding, as
    Stable Diffusion's pipelines guide away from it; unchanged without one."""
    negative = config.sample.negative_prompt
    if negative is None:
        return params
    encoded = encode(config, [negative])
    if "context" not in encoded:
        raise UserError(
            f"config.sample.negative_prompt={negative!r} needs a text encoder outside the "
            f"network (config.text.source='clip:<dir>' or 'npz:<path>', not "
            f"{config.text.source!r})"
        )
    old = params["context"]["null_context"]
    new = jax.device_put(jnp.asarray(encoded["context"][0], old.dtype), old.sharding)
    return {**params, "context": {**params["context"], "null_context": new}}
