"""`folder:<path>`: a directory of png / jpg / jpeg / webp files, searched recursively.

Layout: if the images live in sub-folders of the root, each top-level sub-folder is a class
(sorted names -> ids 0..K-1); if they all sit directly in the root, the set is unconditional
(labels 0, no classes). Mixing both is an error. Names starting with "." are ignored.
The folder is indexed once (file list plus a header read of each file: format, size), then
decoded lazily in the pipeline: centre-crop to a square, resize to image_size (bicubic),
convert to the configured channels. A file that cannot be read is a ValueError naming it,
or, with config.data.skip_corrupt, left out with a warning (found at indexing) or replaced
by the next example (found at decoding). A file whose shorter side is below image_size is
always an error. One split: "train" and "test" both read the whole folder.
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.data import transforms
from ddpm.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """Files of an image folder.  paths: [N] str, labels: [N] int32, skipped: unreadable files."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str] | None
    skipped: list[str]


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursive, sorted, hidden names excluded)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; raises on unreadable files."""
    with Image.open(path) as image:
        return image.size


def index_folder(root: Path, size: int, *, skip_corrupt: bool) -> FolderIndex:
    """List the images of `root`, read their headers and assign labels (see module docstring)."""
    if not root.is_dir():
        raise UserError(f"config.data.source='folder:{root}': no such directory")
    files = list_images(root)
    if not files:
        raise UserError(
            f"config.data.source='folder:{root}': no image files ({', '.join(EXTENSIONS)}) found"
        )
    top = [p.relative_to(root).parts for p in files]
    nested = sum(len(parts) > 1 for parts in top)
    if 0 < nested < len(files):
        loose = [str(root.joinpath(*parts)) for parts in top if len(parts) == 1][:3]
        raise UserError(
            f"config.data.source='folder:{root}': images both in class sub-folders and directly "
            f"in the root (e.g. {loose}); move them into sub-folders or flatten the folder"
        )
    class_names = sorted({parts[0] for parts in top}) if nested else None
    class_ids = {name: i for i, name in enumerate(class_names or [])}
    paths, labels, skipped = [], [], []
    for path, parts in zip(files, top, strict=True):
        try:
            width, height = _header_size(path)
        except _READ_ERRORS as e:
            if not skip_corrupt:
                raise UserError(
                    f"unreadable image file {path}: {e} (set config.data.skip_corrupt=True "
                    "to skip such files)"
                ) from e
            skipped.append(str(path))
            continue
        if min(width, height) < size:
            raise UserError(
                f"image file {path} is {width}x{height} pixels, smaller than "
                f"config.data.image_size={size}"
            )
        paths.append(str(path))
        labels.append(class_ids.get(parts[0], 0))
    if skipped:
        logging.warning("folder %s: skipped %d unreadable file(s): %s", root, len(skipped), skipped)
    if not paths:
        raise UserError(f"config.data.source='folder:{root}': no readable image files")
    return FolderIndex(paths, np.asarray(labels, np.int32), class_names, skipped)


def decode(path: str, size: int, channels: int) -> np.ndarray:
    """Decode one file -> [size, size, channels] uint8 (centre crop, bicubic resize)."""
    mode = transforms.pil_mode(channels)
    with Image.open(path) as image:
        image.draft(mode, (size, size))  # JPEG: decode at a reduced scale still >= size
        image = transforms.crop_resize(image.convert(mode), size)
        array = np.asarray(image)
    return array[..., None] if channels == 1 else array


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Lazily decoded image folder."""

    index: FolderIndex
    size: int
    channels: int
    skip_corrupt: bool

    def __len__(self) -> int:
        return len(self.index.paths)

    def _decode_or_next(self, i: int) -> tuple[np.ndarray, int]:
        """Decode example i; with skip_corrupt, a failure falls through to i + 1, i + 2, ..."""
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            path = self.index.paths[j]
            try:
                return decode(path, self.size, self.channels), j
            except _READ_ERRORS as e:
                if not self.skip_corrupt:
                    raise UserError(
                        f"corrupt image file {path}: {e} (set config.data.skip_corrupt=True "
                        "to skip such files)"
                    ) from e
                logging.warning("corrupt image file %s skipped: %s", path, e)
        raise UserError(f"no image of the folder could be decoded (e.g. {self.index.paths[i]})")

    def load(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids: [B] int -> (images [B, size, size, channels] uint8, labels [B] int32)."""
        decoded = [self._decode_or_next(int(i)) for i in ids]
        images = np.stack([image for image, _ in decoded])
        return images, self.index.labels[[j for _, j in decoded]]
