"""config.data -> source: parsing, validation, metadata (`DatasetInfo`) and opening a split."""

import dataclasses
from pathlib import Path
from typing import Protocol

import ml_collections
import numpy as np

from ddpm.data import arrays, folder, sines, tfds_source
from ddpm.errors import UserError

SOURCES = "mnist5k, tfds:<name>, folder:<path>, npz:<path>, sines"
CHANNELS = (1, 3, 4)
SPLITS = ("train", "test")


class Source(Protocol):
    """Random access to the examples of one split, already fitted to the configured shape."""

    def __len__(self) -> int: ...

    def load(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids: [B] int -> (images [B, S, S, C] uint8, labels [B] int32); a signal source
        (sines) gives float32 signals [B, L, C] in [-1, 1] instead of images."""
        ...


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Metadata of the configured dataset.

    split_sizes: examples per split, keyed "train" / "test" (whole split, all processes).
    num_classes / class_names: None for an unconditional source (labels are then all 0).
    skipped_files: unreadable files left out (folder source with config.data.skip_corrupt).
    captions: a captioned folder's distinct captions, which its labels index (None: none).
    """

    source: str
    image_shape: tuple[int, ...]  # (S, S, C), or (L, C) for a signal source
    split_sizes: dict[str, int]
    num_classes: int | None
    class_names: list[str] | None
    skipped_files: list[str] = dataclasses.field(default_factory=list)
    captions: list[str] | None = None

    def num_examples(self, split: str) -> int:
        """Number of examples of split "train" or "test" (before sharding over processes)."""
        return self.split_sizes[check_split(split)]


def parse_source(source: str) -> tuple[str, str]:
    """'folder:/data/x' -> ('folder', '/data/x'); 'mnist5k' -> ('mnist5k', '')."""
    kind, _, arg = str(source).partition(":")
    if (kind in ("mnist5k", "sines") and not arg) or (kind in ("tfds", "folder", "npz") and arg):
        return kind, arg
    raise UserError(f"config.data.source={source!r} is not one of {SOURCES}")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    return split


def split_name(data: ml_collections.ConfigDict, split: str) -> str:
    """ "train" -> config.data.train_split, "test" -> config.data.eval_split."""
    return data.train_split if check_split(split) == "train" else data.eval_split


def check_fields(data: ml_collections.ConfigDict) -> None:
    """The scalar fields of config.data (no file access): a UserError naming the first bad one."""
    kind, _ = parse_source(data.source)
    if kind == "sines":
        if not isinstance(data.length, int) or data.length < 8:
            raise UserError(
                f"config.data.length={data.length!r} must be an int >= 8 for "
                "config.data.source='sines' (the signal length L)"
            )
        if not isinstance(data.channels, int) or data.channels < 1:
            raise UserError(f"config.data.channels={data.channels!r} must be a positive int")
    elif data.length is not None:
        raise UserError(
            f"config.data.length={data.length!r} is for 1-D signal sources (sines); "
            f"config.data.source={data.source!r} holds images: leave it None"
        )
    if not isinstance(data.image_size, int) or data.image_size <= 0:
        raise UserError(f"config.data.image_size={data.image_size!r} must be a positive int")
    if kind != "sines" and data.channels not in CHANNELS:
        raise UserError(f"config.data.channels={data.channels!r} is not one of 1, 3, 4")
    for field in ("num_workers", "prefetch"):
        value = data[field]
        if not isinstance(value, int) or value < 0:
            raise UserError(f"config.data.{field}={value!r} must be an int >= 0")
    for field in ("random_flip", "skip_corrupt"):
        if not isinstance(data[field], bool):
            raise UserError(f"config.data.{field}={data[field]!r} must be True or False")


def _existing_file(arg: str) -> Path:
    path = Path(arg).expanduser()
    if not path.is_file():
        raise UserError(f"config.data.source='npz:{arg}': no such file")
    return path


def _tfds_info(data: ml_collections.ConfigDict, name: str) -> DatasetInfo:
    builder = tfds_source.load_builder(name, data.data_dir)
    tfds_source.check_features(builder, name, data.image_key, data.label_key, data.image_size)
    names = tfds_source.class_names(builder, data.label_key)
    sizes = {
        s: tfds_source.split_size(builder, name, split_name(data, s), f)
        for s, f in (("train", "train_split"), ("test", "eval_split"))
    }
    return DatasetInfo(data.source, _shape(data), sizes, len(names) if names else None, names)


def _shape(data: ml_collections.ConfigDict) -> tuple[int, int, int]:
    return data.image_size, data.image_size, data.channels


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Metadata of config.data's source; validates it (a clear ValueError on bad input).

    Cheap: reads array headers, TFDS metadata, or the folder index (file list + headers).
    """
    data = config.data
    check_fields(data)
    kind, arg = parse_source(data.source)
    if kind == "tfds":
        return _tfds_info(data, arg)
    if kind == "sines":
        shape = (data.length, data.channels)
        return DatasetInfo(
            data.source, shape, dict(sines.SPLIT_SIZES), sines.NUM_BANDS, sines.CLASS_NAMES
        )
    if kind == "folder":
        index = folder.index_folder(
            Path(arg).expanduser(), data.image_size, skip_corrupt=data.skip_corrupt
        )
        names = index.class_names
        n = len(index.paths)
        return DatasetInfo(
            data.source,
            _shape(data),
            {"train": n, "test": n},
            len(names) if names else None,
            names,
            index.skipped,
            index.captions,
        )
    if kind == "mnist5k":
        for field in ("train_split", "eval_split"):
            if data[field] not in arrays.MNIST5K_SPLITS:
                raise UserError(f"config.data.{field}={data[field]!r} is not one of train, test")
    path = arrays.MNIST5K_PATH if kind == "mnist5k" else _existing_file(arg)
    sizes = {s: arrays.check_npz(path, split_name(data, s), data.image_size) for s in SPLITS}
    if kind == "mnist5k":
        return DatasetInfo(data.source, _shape(data), sizes, 10, arrays.MNIST5K_CLASS_NAMES)
    num_classes = arrays.npz_num_classes(path, (data.train_split, data.eval_split))
    return DatasetInfo(data.source, _shape(data), sizes, num_classes, None)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the config.data field (or file) that cannot work."""
    dataset_info(config)


def open_source(config: ml_collections.ConfigDict, split: str) -> Source:
    """Open split "train" or "test" of config.data's source for random access."""
    data = config.data
    check_fields(data)
    kind, arg = parse_source(data.source)
    name = split_name(data, split)
    size, channels = data.image_size, data.channels
    if kind == "tfds":
        return tfds_source.open_split(
            arg, data.data_dir, name, data.image_key, data.label_key, size, channels
        )
    if kind == "sines":
        return sines.SinesSource(check_split(split), data.length, channels)
    if kind == "folder":
        index = folder.index_folder(Path(arg).expanduser(), size, skip_corrupt=data.skip_corrupt)
        return folder.FolderSource(index, size, channels, data.skip_corrupt)
    if kind == "mnist5k" and name not in arrays.MNIST5K_SPLITS:
        raise UserError(f"config.data split {name!r} is not one of train, test")
    path = arrays.MNIST5K_PATH if kind == "mnist5k" else _existing_file(arg)
    arrays.check_npz(path, name, size)
    return arrays.load_npz(path, name, size, channels)
