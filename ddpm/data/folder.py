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

Captions (text-to-image fine-tuning): a `captions.jsonl` in the root, one line
{"file_name": "<path relative to the root>", "text": "<caption>"} per image (the Hugging Face
image-folder metadata keys), or a `<name>.txt` beside each image. Then every image needs one,
the labels are caption ids (into `FolderIndex.captions`, distinct captions in file order) and
sub-folders are not classes.
"""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.data import transforms
from ddpm.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
CAPTIONS_FILE = "captions.jsonl"


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """Files of an image folder.  paths: [N] str, labels: [N] int32, skipped: unreadable
    files; captions: the distinct captions (labels index them), None for an uncaptioned
    folder."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str] | None
    skipped: list[str]
    captions: list[str] | None = None


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


def read_captions(root: Path, files: list[Path]) -> dict[Path, str] | None:
    """{image: caption} of a captioned folder (`captions.jsonl`, else `.txt` files beside the
    images), None if it has neither. UserError for a malformed line, a caption of no image,
    or an image without a caption."""
    jsonl = root / CAPTIONS_FILE
    captions: dict[Path, str] = {}
    if jsonl.is_file():
        known = set(files)
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                path, caption = root / entry["file_name"], entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f'{jsonl} line {number}: not a JSON object with "file_name" and "text" ({e})'
                ) from e
            if path not in known:
                raise UserError(f"{jsonl} line {number}: no image file {path}")
            captions[path] = str(caption)
    else:
        for path in files:
            text = path.with_suffix(".txt")
            if text.is_file():
                captions[path] = text.read_text(encoding="utf-8").strip()
        if not captions:
            return None
    missing = [str(p) for p in files if p not in captions]
    if missing:
        where = CAPTIONS_FILE if jsonl.is_file() else "a .txt file of the same name"
        raise UserError(
            f"image file {missing[0]} has no caption ({len(missing)} without one); a captioned "
            f"folder needs one for every image, in {where}"
        )
    return captions


def index_folder(root: Path, size: int, *, skip_corrupt: bool) -> FolderIndex:
    """List the images of `root`, read their headers and assign labels (see module docstring)."""
    if not root.is_dir():
        raise UserError(f"config.data.source='folder:{root}': no such directory")
    files = list_images(root)
    if not files:
        raise UserError(
            f"config.data.source='folder:{root}': no image files ({', '.join(EXTENSIONS)}) found"
        )
    captions = read_captions(root, files)
    top = [p.relative_to(root).parts for p in files]
    nested = sum(len(parts) > 1 for parts in top) if captions is None else 0
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
    table = None
    if captions is not None:
        texts = [captions[Path(p)] for p in paths]
        table = list(dict.fromkeys(texts))
        ids = {caption: i for i, caption in enumerate(table)}
        labels = [ids[caption] for caption in texts]
    return FolderIndex(paths, np.asarray(labels, np.int32), class_names, skipped, table)


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
