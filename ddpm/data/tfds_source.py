"""`tfds:<name>`: a TensorFlow Datasets image dataset read through `as_data_source`.

Reading needs the dataset already prepared in the `array_record` format under
config.data.data_dir (None = the TFDS default, ~/tensorflow_datasets); TensorFlow is not
needed to read. Nothing here downloads: an unknown name or unprepared data is a ValueError
within a second, with the command that prepares it. `<name>` may carry a config and version
as TFDS spells them (`celeb_a`, `mnist:3.*.*`, `imagenet_resized/32x32`). Images pass through
`fit_image` with padding allowed, like the npz source; label_key = "" means unconditional.
"""

import dataclasses
from typing import Any

import numpy as np

from ddpm.data import transforms
from ddpm.errors import UserError

_PREPARE_HELP = (
    "Prepare it where there is network access (Image features need tensorflow-cpu to encode): "
    "`pip install tensorflow-cpu tensorflow-datasets && tfds build {name} "
    "--file_format=array_record --data_dir=DIR`, copy DIR here and set "
    "config.data.data_dir=DIR."
)


def load_builder(name: str, data_dir: str | None) -> Any:
    """The prepared `tfds.core.DatasetBuilder` of `name`; never downloads anything."""
    import tensorflow_datasets as tfds  # heavy import, only for this source

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"config.data.source='tfds:{name}': TFDS knows no dataset {name!r} and none is "
            f"prepared under config.data.data_dir={data_dir!r} (names: `tfds.list_builders()`)"
        ) from None
    if not builder.is_prepared():
        raise UserError(
            f"config.data.source='tfds:{name}': not prepared under {builder.data_dir} "
            f"(config.data.data_dir={data_dir!r}); nothing is downloaded at training time. "
            + _PREPARE_HELP.format(name=name)
        )
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise UserError(
            f"config.data.source='tfds:{name}': prepared as {file_format}, but random access "
            "needs array_record. " + _PREPARE_HELP.format(name=name)
        )
    return builder


def check_features(builder: Any, name: str, image_key: str, label_key: str, size: int) -> None:
    """ValueError naming config.data.image_key / label_key / image_size if they do not fit."""
    features = builder.info.features
    keys = sorted(features.keys())
    if image_key not in features:
        raise UserError(f"config.data.image_key={image_key!r} is not a feature of {name}: {keys}")
    shape = features[image_key].shape
    if len(shape) != 3 or shape[-1] not in (1, 3, 4) or features[image_key].np_dtype != np.uint8:
        raise UserError(
            f"config.data.image_key={image_key!r} of {name} is not a uint8 [H, W, 1|3|4] image "
            f"(shape {shape})"
        )
    h, w = shape[:2]
    if h and w and not (h <= size and w <= size) and min(h, w) < size:
        raise UserError(
            f"{name} images of {h}x{w} pixels neither fit inside nor cover "
            f"config.data.image_size={size}"
        )
    if label_key and label_key not in features:
        raise UserError(
            f"config.data.label_key={label_key!r} is not a feature of {name}: {keys} "
            "(set config.data.label_key='' for an unconditional dataset)"
        )


def split_size(builder: Any, name: str, split: str, field: str) -> int:
    """Number of examples in `split` (TFDS split syntax, e.g. 'train[:90%]')."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise UserError(
            f"config.data.{field}={split!r} is not a split of {name}: "
            f"{sorted(builder.info.splits.keys())} ({e})"
        ) from None


def class_names(builder: Any, label_key: str) -> list[str] | None:
    """Names of a ClassLabel feature, else None."""
    feature = builder.info.features[label_key] if label_key else None
    return list(feature.names) if hasattr(feature, "names") else None


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Random access to one split of a prepared TFDS dataset (array_record)."""

    data_source: Any
    name: str
    image_key: str
    label_key: str
    size: int
    channels: int

    def __len__(self) -> int:
        return len(self.data_source)

    def _image(self, example: dict, index: int) -> np.ndarray:
        try:
            image = transforms.convert_channels(example[self.image_key], self.channels)
            return transforms.fit_image(image, self.size, pad_small=True)
        except ValueError as e:
            raise UserError(f"tfds:{self.name} example {index}: {e}") from e

    def load(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids: [B] int -> (images [B, size, size, channels] uint8, labels [B] int32)."""
        examples = self.data_source.__getitems__([int(i) for i in ids])
        images = np.stack([self._image(ex, int(i)) for ex, i in zip(examples, ids, strict=True)])
        if not self.label_key:
            return images, np.zeros(len(ids), np.int32)
        return images, np.asarray([ex[self.label_key] for ex in examples], np.int32)


def open_split(
    name: str,
    data_dir: str | None,
    split: str,
    image_key: str,
    label_key: str,
    size: int,
    channels: int,
) -> TfdsSource:
    """Check and open `split` of `name` for reading."""
    builder = load_builder(name, data_dir)
    check_features(builder, name, image_key, label_key, size)
    return TfdsSource(
        builder.as_data_source(split=split), name, image_key, label_key, size, channels
    )
