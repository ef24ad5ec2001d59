"""Text for conditioning: a word-level tokenizer, MNIST captions, precomputed embeddings.

The tokenizer's vocabulary is fixed here (no file to download): lower-cased words split on
anything not a letter or digit; unknown words map to <unk>, and 0 is the padding token (a
row of padding means "no text": the model then uses its learned null context).

Captions for digits are measured, not stored: `caption_ids(images, labels)` (jit-able) picks
one of the `caption_table()` sentences from the label, the stroke thickness (fraction of ink
pixels) and the slant (from the image's second moments), e.g. "a thin handwritten three" or
"a thick handwritten seven slanted right". The train step captions every batch this way.

Precomputed embeddings (CLIP, T5, ...) come as an .npz with `captions` [N] str, `embeddings`
[N, L, D] float and `mask` [N, L] bool; every string of `caption_table()` (and every prompt)
must be one of its captions.
"""

import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.errors import UserError

Array = jax.Array

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "", "thick")  # ink fraction below, between, above INK_BOUNDS
SLANT = ("slanted left", "", "slanted right")  # slant below, between, above SLANT_BOUNDS
# Measured on MNIST-5k's training digits (28x28; resizing to 16x16 moves them < 0.005):
# ink = fraction of pixels > 0 in [-1, 1], bounds at its terciles; slant = -mu11 / mu02
# (columns per row upwards, > 0 leans right), bounds at its 20 % and 72 % quantiles so that
# upright strokes (slant 0) are "upright".
INK_BOUNDS = (0.111, 0.148)
SLANT_BOUNDS = (-0.08, 0.3)

PAD, UNK = 0, 1
VOCAB = (
    ("<pad>", "<unk>", "a", "an", "the", "handwritten", "digit", "number", "of", "with")
    + DIGITS
    + tuple(str(i) for i in range(10))
    + ("thin", "thick", "bold", "light", "stroke", "strokes", "slanted", "slanting", "leaning")
    + ("left", "right", "upright", "straight", "to", "and", "written", "drawn", "small", "large")
)
_INDEX = {word: i for i, word in enumerate(VOCAB)}


def tokenize(texts: list[str], max_length: int) -> np.ndarray:
    """Word-level token ids, truncated or padded (PAD = 0) to `max_length`.  -> [N, L] int32."""
    out = np.full((len(texts), max_length), PAD, np.int32)
    for row, text in enumerate(texts):
        ids = [_INDEX.get(w, UNK) for w in re.findall(r"[a-z0-9]+", text.lower())][:max_length]
        out[row, : len(ids)] = ids
    return out


def caption_table() -> list[str]:
    """All digit captions; caption (label, thickness bin, slant bin) is at 9 label + 3 k + s."""
    return [
        " ".join(w for w in ("a", thick, "handwritten", digit, slant) if w)
        for digit in DIGITS
        for thick in THICKNESS
        for slant in SLANT
    ]


def ink_and_slant(images: Array) -> tuple[Array, Array]:
    """Stroke measurements of grayscale digits in [-1, 1] (white ink on black).

    ink = fraction of pixels > 0; slant = -mu11 / mu02 over the ink weights w = (x + 1) / 2
    (column shift per row upwards: > 0 leans right).  images: [B, H, W, 1] -> ([B], [B]).
    """
    w = (jnp.asarray(images, jnp.float32)[..., 0] + 1.0) / 2.0
    ink = jnp.mean(w > 0.5, axis=(1, 2))
    rows, cols = jnp.meshgrid(
        jnp.arange(w.shape[1], dtype=jnp.float32),
        jnp.arange(w.shape[2], dtype=jnp.float32),
        indexing="ij",
    )
    mass = jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-6)
    mean = lambda f: jnp.sum(w * f, axis=(1, 2)) / mass
    cy, cx = mean(rows), mean(cols)
    dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
    mu11, mu02 = mean(dx * dy), mean(dy * dy)
    return ink, -mu11 / jnp.maximum(mu02, 1e-6)


def caption_ids(images: Array, labels: Array) -> Array:
    """Index into `caption_table()` of each digit.  images: [B, H, W, 1], labels: [B] -> [B]."""
    ink, slant = ink_and_slant(images)
    thick = jnp.digitize(ink, jnp.asarray(INK_BOUNDS))
    lean = jnp.digitize(slant, jnp.asarray(SLANT_BOUNDS))
    return (9 * jnp.asarray(labels, jnp.int32) + 3 * thick + lean).astype(jnp.int32)


def load_embeddings(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(captions [N], embeddings [N, L, D] float32, mask [N, L] bool) of an embeddings .npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"captions", "embeddings", "mask"} - set(f.files)
            if missing:
                raise UserError(f"{path}: missing array(s) {', '.join(sorted(missing))}")
            captions = [str(c) for c in f["captions"]]
            embeddings = f["embeddings"].astype(np.float32)
            mask = f["mask"].astype(bool)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"config.text.source='npz:{path}' is not a readable .npz ({e})") from e
    if embeddings.ndim != 3 or mask.shape != embeddings.shape[:2]:
        raise UserError(
            f"{path}: embeddings {embeddings.shape} must be [N, L, D] and mask {mask.shape} [N, L]"
        )
    return captions, embeddings, mask


def lookup(captions: list[str], texts: list[str], where: str) -> np.ndarray:
    """Row of each of `texts` in `captions` (exact match).  -> [len(texts)] int."""
    index = {c: i for i, c in enumerate(captions)}
    missing = [t for t in texts if t not in index]
    if missing:
        raise UserError(
            f"{where}: no precomputed embedding for {missing[0]!r}; it has {len(captions)} "
            f"captions, e.g. {captions[:3]}"
        )
    return np.array([index[t] for t in texts])
