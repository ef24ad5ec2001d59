"""In-memory sources: the embedded MNIST-5k set and `npz:<path>` files.

An npz file holds either `images` (and optional `labels`), used for every split, or per-split
arrays `<split>_images` / `<split>_labels` (the embedded file uses `train_*` and `test_*`).
`images` is uint8 [N, H, W, C] with C in {1, 3, 4}, or [N, H, W] for grayscale; `labels` is
integer [N] with values >= 0. Images that fit inside image_size are centred on a black
border (28x28 -> 32x32); larger ones are centre-cropped and resized (see `fit_image`).
"""

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from ddpm.data import transforms
from ddpm.errors import UserError

MNIST5K_PATH = Path(__file__).with_name("assets") / "mnist5k.npz"
MNIST5K_SPLITS = ("train", "test")
MNIST5K_CLASS_NAMES = [str(d) for d in range(10)]


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Random access to images held in memory, fitted to size x size x channels on read.

    images: [N, H, W, C0] uint8; labels: [N] int32 (zeros when the source has no labels).
    """

    images: np.ndarray
    labels: np.ndarray
    size: int
    channels: int

    def __len__(self) -> int:
        return len(self.images)

    def load(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids: [B] int -> (images [B, size, size, channels] uint8, labels [B] int32)."""
        images = transforms.convert_channels(self.images[ids], self.channels)
        if images.shape[1:3] != (self.size, self.size):
            images = np.stack([transforms.fit_image(x, self.size, pad_small=True) for x in images])
        return images, self.labels[ids]


def _members(path: Path) -> list[str]:
    """Member names of the npz (zip) file at `path`; a UserError when it is not one."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz file ({e})") from e


def npz_keys(path: Path, split: str) -> tuple[str, str]:
    """The (images, labels) member names that hold `split` in the npz file at `path`."""
    names = {n.removesuffix(".npy") for n in _members(path)}
    if "images" in names:
        return "images", "labels"
    if f"{split}_images" in names:
        return f"{split}_images", f"{split}_labels"
    splits = sorted(n.removesuffix("_images") for n in names if n.endswith("_images"))
    raise UserError(
        f"{path} has no array 'images' nor '{split}_images' (arrays: {sorted(names)}); "
        f"set config.data.train_split / eval_split to one of {splits}"
        if splits
        else f"{path} has no array 'images' (arrays: {sorted(names)})"
    )


def npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of member `key` of an npz file without reading its data; None if absent."""
    if f"{key}.npy" not in _members(path):
        return None
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    return shape, dtype


def check_npz(path: Path, split: str, size: int) -> int:
    """Validate the arrays of `split` (shapes and dtypes only); returns the number of images."""
    images_key, labels_key = npz_keys(path, split)
    shape, dtype = npz_header(path, images_key)
    if (
        dtype != np.uint8
        or len(shape) not in (3, 4)
        or (len(shape) == 4 and shape[3] not in (1, 3, 4))
    ):
        raise UserError(
            f"{path}: '{images_key}' must be uint8 [N, H, W, C] with C in 1, 3, 4 "
            f"(or [N, H, W]); got {dtype} {shape}"
        )
    h, w = shape[1:3]
    if not (h <= size and w <= size) and min(h, w) < size:
        raise UserError(
            f"{path}: images of {h}x{w} pixels neither fit inside nor cover "
            f"config.data.image_size={size}"
        )
    labels = npz_header(path, labels_key)
    if labels is not None and (labels[0] != shape[:1] or labels[1].kind not in "iu"):
        raise UserError(f"{path}: '{labels_key}' must be integer [{shape[0]}]; got {labels}")
    return shape[0]


def load_npz(path: Path, split: str, size: int, channels: int) -> ArraySource:
    """Read the arrays of `split` from an npz file into an ArraySource."""
    images_key, labels_key = npz_keys(path, split)
    with np.load(path) as data:
        images = data[images_key]
        labels = data[labels_key] if labels_key in data else np.zeros(len(images), np.int32)
    if images.ndim == 3:
        images = images[..., None]
    if labels.size and labels.min() < 0:
        raise UserError(f"{path}: '{labels_key}' has negative labels")
    return ArraySource(images, labels.astype(np.int32), size, channels)


def npz_num_classes(path: Path, splits: tuple[str, ...]) -> int | None:
    """1 + the largest label over `splits`, or None when the file has no labels."""
    top = None
    with np.load(path) as data:
        for split in splits:
            _, labels_key = npz_keys(path, split)
            if labels_key in data:
                top = max(top or 0, int(data[labels_key].max(initial=0)) + 1)
    return top
