"""Pure image transforms shared by every source: channels, size, flip, scaling to [-1, 1].

Images are uint8 NHWC (or HWC) until `to_float`; all functions return new arrays.
"""

import numpy as np
from PIL import Image

from ddpm.errors import UserError

_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def pil_mode(channels: int) -> str:
    """The PIL mode holding `channels` uint8 channels: 1 -> "L", 3 -> "RGB", 4 -> "RGBA"."""
    return _PIL_MODES[channels]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, bit-exact with PIL's convert("L").  rgb: [..., 3] uint8 -> [...] uint8.

    L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. round(0.299 R + 0.587 G + 0.114 B).
    """
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert the last axis to `channels` the way PIL converts L / RGB / RGBA.

    images: [..., C] uint8 with C in {1, 3, 4} -> [..., channels] uint8. Gray is replicated to
    RGB; RGB(A) -> gray is `luminance`; alpha is dropped (RGBA -> RGB) or set opaque (-> RGBA).
    """
    c = images.shape[-1]
    if c == channels:
        return images
    if c not in _PIL_MODES:
        raise UserError(f"images with {c} channels are not supported (accepted: 1, 3, 4)")
    rgb = np.repeat(images, 3, axis=-1) if c == 1 else images[..., :3]
    if channels == 1:
        return luminance(rgb)[..., None]
    if channels == 3:
        return rgb
    alpha = np.full(rgb.shape[:-1] + (1,), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=-1)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square inside a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop a PIL image to a square and resize it to size x size (bicubic, antialiased)."""
    box = center_crop_box(*image.size)
    if box == (0, 0, size, size):
        return image
    return image.crop(box).resize((size, size), Image.Resampling.BICUBIC)


def fit_image(image: np.ndarray, size: int, *, pad_small: bool) -> np.ndarray:
    """Bring one image to size x size.  image: [H, W, C] uint8 -> [size, size, C] uint8.

    If `pad_small` and the image fits inside the target (H, W <= size), it is centred on a zero
    (black) background: the MNIST convention, 28x28 -> 32x32 with a 2-pixel border. Otherwise
    it is centre-cropped to a square and resized; a shorter side below `size` is a ValueError.
    """
    h, w, c = image.shape
    if h == w == size:
        return image
    if pad_small and h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((size, size, c), np.uint8)
        out[top : top + h, left : left + w] = image
        return out
    if min(h, w) < size:
        raise UserError(f"image of {h}x{w} pixels is smaller than config.data.image_size={size}")
    pil = Image.fromarray(image[..., 0] if c == 1 else image, pil_mode(c))
    out = np.asarray(crop_resize(pil, size))
    return out[..., None] if c == 1 else out


def flip_left_right(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Mirror the images (reverse the signals) where `flip` is True: the last spatial axis.
    images: [B, H, W, C] or [B, L, C], flip: [B] bool."""
    where = flip.reshape((-1,) + (1,) * (images.ndim - 1))
    return np.where(where, np.flip(images, axis=-2), images)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]:  x / 127.5 - 1."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
