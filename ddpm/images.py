"""Images at the edges of the program: [-1, 1] floats <-> uint8, grids and PNG files."""

import math
import os

import numpy as np
from PIL import Image

from ddpm import signals


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., H, W, C] float in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, num_cols: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one uint8 image, row-major, with white padding.

    num_cols defaults to ceil(sqrt(N)); missing cells of the last row stay white.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    num_cols = num_cols or math.ceil(math.sqrt(n))
    num_rows = math.ceil(n / num_cols)
    grid = np.full(
        (num_rows * (h + padding) + padding, num_cols * (w + padding) + padding, c),
        255,
        np.uint8,
    )
    for i, image in enumerate(images):
        row, col = divmod(i, num_cols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def sample_grid(samples: np.ndarray, num_cols: int | None = None) -> np.ndarray:
    """A uint8 grid image [H', W', C'] of samples in [-1, 1]: images [N, H, W, C] tiled by
    `make_grid`, or 1-D signals [N, L, C] plotted by `signals.plot_signals`."""
    if samples.ndim == 3:
        return signals.plot_signals(samples, num_cols)
    return make_grid(to_uint8(samples), num_cols)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] image (C = 1, 3 or 4) as PNG, creating parent folders."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if image.shape[-1] == 1:
        image = image[..., 0]
    Image.fromarray(image).save(path)
