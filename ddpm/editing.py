"""`main.py --mode=inpaint` and `--mode=img2img`: edit one input with a trained workdir.

Both run the sampler of `config.sample` (any method, with guidance) through the editing
options of `ddpm.samplers.sample`: inpainting replaces the kept region at every step (with
optional RePaint resampling, `config.edit.jump_length` / `resample`); img2img (SDEdit) starts
from the input noised to `config.edit.strength`. The input is a PNG or a test-set example
(`config.edit.input`); the mask a PNG or a named region to generate (`config.edit.mask`).
Writes `samples/<mode>_<method>_<steps>.png`: one row, input | mask | results (img2img: input
| results), and the `.npz` (and, for 1-D signals, `.wav`) of that row.
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ddpm import conditioning, data, generate, models, sharding
from ddpm.config import validation
from ddpm.data import transforms
from ddpm.errors import UserError


def named_mask(name: str, spatial: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Mask [*spatial, 1] float32, 1 = keep, 0 = generate, for a named region to generate:
    center (the middle half of every axis), left_half (the first half of the last spatial
    axis: left for images, start for signals), random_boxes (3 boxes, sides 1/8 - 3/8)."""
    if name not in validation.EDIT_MASKS:
        raise UserError(
            f"config.edit.mask={name!r} is not one of {', '.join(validation.EDIT_MASKS)}"
        )
    mask = np.ones((*spatial, 1), np.float32)
    if name == "center":
        mask[tuple(slice(n // 4, n - n // 4) for n in spatial)] = 0
    elif name == "left_half":
        mask[(slice(None),) * (len(spatial) - 1) + (slice(0, spatial[-1] // 2),)] = 0
    else:
        for _ in range(3):
            sides = [int(rng.integers(max(n // 8, 1), max(3 * n // 8, 2))) for n in spatial]
            starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(spatial, sides, strict=True)]
            mask[tuple(slice(a, a + s) for a, s in zip(starts, sides, strict=True))] = 0
    return mask


def _open_png(path: str, field: str) -> Image.Image:
    """The image file `path` named by config `field`, or a UserError when it cannot be read."""
    try:
        image = Image.open(Path(path).expanduser())
        image.load()
    except (OSError, SyntaxError) as e:
        raise UserError(f"{field}={path!r} is not a readable image ({e})") from e
    return image


def load_mask(spec: str, spatial: tuple[int, ...], seed: int) -> np.ndarray:
    """config.edit.mask -> [*spatial, 1] float32 (1 = keep): a named mask, or a PNG resized
    (nearest) to the data's size whose white (>= 128 gray) pixels are kept."""
    if spec in validation.EDIT_MASKS:
        return named_mask(spec, spatial, np.random.default_rng(seed))
    gray = _open_png(spec, "config.edit.mask").convert("L")
    gray = gray.resize(spatial[::-1], Image.Resampling.NEAREST)
    return (np.asarray(gray) >= 128).astype(np.float32)[..., None]


def load_input(config: ml_collections.ConfigDict) -> tuple[np.ndarray, int | None]:
    """config.edit.input -> (x: the example's shape float32 in [-1, 1], label or None): test
    example i of config.data's source, or a PNG fitted to the data's size and channels."""
    spec = config.edit.input
    index = validation.edit_input_index(spec)
    if index is not None:
        source = data.info.open_source(config, "test")
        if index >= len(source):
            raise UserError(f"config.edit.input={spec!r}: the test split has {len(source)}")
        x, label = source.load(np.array([index]))
        x = transforms.to_float(x) if x.dtype == np.uint8 else x
        return x[0], int(label[0])
    image = np.asarray(_open_png(spec, "config.edit.input"))
    image = image[..., None] if image.ndim == 2 else image
    image = transforms.convert_channels(image, config.data.channels)
    image = transforms.fit_image(image, config.data.image_size, pad_small=True)
    return transforms.to_float(image), None


def _condition(config: ml_collections.ConfigDict, input_label: int | None, n: int):
    """The condition of n results: a text model's config.sample.prompt encoded (UserError
    without one); else [n] int32 class ids: config.sample.labels, else the test example's
    label, else the null label (unconditional); None for an unconditional model."""
    if config.text.source is not None:
        if config.sample.prompt is None:
            raise UserError(
                "editing with a text model needs config.sample.prompt (the text the results "
                'follow; "" for none)'
            )
        return jax.tree.map(jnp.asarray, conditioning.encode(config, [config.sample.prompt] * n))
    if config.model.num_classes is None:
        return None
    label = config.sample.labels
    if label is None:
        label = input_label if input_label is not None else models.null_label(config)
    return jnp.full((n,), label, jnp.int32)


def edit_from_workdir(config: ml_collections.ConfigDict, workdir: str, mode: str) -> str:
    """Runs `mode` (inpaint | img2img) on config.edit.input with the EMA parameters of
    `workdir`; writes the grid input | mask | results and returns its path."""
    validation.validate_edit_section(config, mode)
    objective, mesh = generate.prepare(config, workdir)
    e, s = config.edit, config.sample
    x, input_label = load_input(config)
    n = e.num_samples
    if mode == "inpaint":
        mask = load_mask(e.mask, x.shape[:-1], config.seed)
        options = dict(jump_length=e.jump_length, resample=e.resample)
        arrays = {"known": jnp.asarray(x)[None], "mask": jnp.asarray(mask)[None]}
        shown = [x, np.broadcast_to(2 * mask - 1, x.shape)]
    else:
        options, arrays = dict(strength=e.strength), {"init": jnp.asarray(x)[None]}
        shown = [x]
    cond = _condition(config, input_label, n)
    sampler = objective.sampler(n, **options)
    params, step = generate.restore(objective, workdir, mesh)
    print(
        f"{mode}: {n} results with {s.method}, {s.num_steps} steps, guidance "
        f"{s.guidance_scale}, from the EMA parameters of step {step}",
        flush=True,
    )
    rng = jax.random.fold_in(jax.random.key(config.seed), 3)
    results = sharding.to_host(sampler(params, rng, cond, **arrays), mesh)
    row = np.concatenate([np.stack(shown), results])
    label = int(cond[0]) if isinstance(cond, jax.Array) else -1
    row_labels = np.full(len(row), label, np.int32)
    stem = os.path.join(workdir, "samples", f"{mode}_{s.method}_{s.num_steps}")
    return generate.save_samples(stem, row, row_labels, len(row))
