"""Input pipelines: embedded MNIST-5k, npz, image folders, TFDS; order, sharding, resumption."""

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm import data
from ddpm.config.schema import get_config
from ddpm.data import arrays, folder, pipeline, transforms
from ddpm.errors import UserError


def _config(source="mnist5k", **fields):
    config = get_config()
    config.data.source = source
    config.data.update(fields)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _all_batches(config, split="train", **kw):
    """Concatenated labels and images of a finite stream."""
    batches = list(data.create_dataset(config, split, **kw))
    return (
        np.concatenate([b["label"] for b in batches]),
        np.concatenate([b["image"] for b in batches]),
    )


@pytest.fixture(scope="module")
def mnist_raw():
    with np.load(arrays.MNIST5K_PATH) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def id_npz(tmp_path):
    """An npz of 101 RGB 8x8 images whose label is their index (so batches reveal ids)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (101, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ids.npz"
    np.savez(path, images=images, labels=np.arange(101))
    return path, images


# ---------------------------------------------------------------- embedded MNIST-5k


def test_mnist5k_file_counts_and_histogram(mnist_raw):
    assert arrays.MNIST5K_PATH.stat().st_size < 2_000_000
    assert mnist_raw["train_images"].shape == (4500, 28, 28)
    assert mnist_raw["test_images"].shape == (500, 28, 28)
    assert mnist_raw["train_images"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(mnist_raw["train_labels"]), [450] * 10)
    np.testing.assert_array_equal(np.bincount(mnist_raw["test_labels"]), [50] * 10)
    # Real digits: mostly black background, ink reaching 255.
    assert mnist_raw["train_images"].max() == 255
    assert 0.7 < np.mean(mnist_raw["train_images"] == 0) < 0.9


def test_mnist5k_info_is_cheap_and_right():
    start = time.perf_counter()
    info = data.dataset_info(get_config())
    elapsed = time.perf_counter() - start
    assert (info.num_examples("train"), info.num_examples("test")) == (4500, 500)
    assert info.num_classes == 10 and info.class_names == [str(d) for d in range(10)]
    assert info.image_shape == (32, 32, 1)
    print(f"dataset_info(mnist5k) took {elapsed * 1e3:.1f} ms")


def test_mnist5k_padded_to_32_in_order(mnist_raw):
    labels, images = _all_batches(
        _config(), "test", batch_size=100, seed=0, shuffle=False, num_epochs=1
    )
    assert images.shape == (500, 32, 32, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32
    expected = np.pad(mnist_raw["test_images"], ((0, 0), (2, 2), (2, 2))) / 127.5 - 1
    np.testing.assert_allclose(images[..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(labels, mnist_raw["test_labels"])
    assert images.min() == -1.0 and images.max() == 1.0
    assert np.all(images[:, :2] == -1) and np.all(images[:, :, -2:] == -1)  # background border


def test_mnist5k_other_sizes_and_channels(mnist_raw):
    batch = next(data.create_dataset(_config(image_size=28), "train", batch_size=4, seed=0))
    assert batch["image"].shape == (4, 28, 28, 1)
    config = _config(image_size=16, channels=3)
    batch = next(data.create_dataset(config, "train", batch_size=4, seed=0, shuffle=False))
    assert batch["image"].shape == (4, 16, 16, 3)
    gray = Image.fromarray(mnist_raw["train_images"][0]).resize((16, 16), Image.Resampling.BICUBIC)
    expected = np.asarray(gray) / 127.5 - 1
    for c in range(3):
        np.testing.assert_allclose(batch["image"][0, ..., c], expected, atol=1e-6)


# ---------------------------------------------------------------- order, state, sharding


def test_same_seed_same_batches_other_seed_differs():
    config = _config()
    a = _take(data.create_dataset(config, "train", batch_size=32, seed=3), 5)
    b = _take(data.create_dataset(config, "train", batch_size=32, seed=3), 5)
    c = _take(data.create_dataset(config, "train", batch_size=32, seed=4), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_restored_state_continues_with_the_next_batch():
    config = _config()
    uninterrupted = _take(data.create_dataset(config, "train", batch_size=64, seed=1), 80)
    first = data.create_dataset(config, "train", batch_size=64, seed=1)
    _take(first, 77)  # crosses the epoch boundary (70.3 batches per epoch) after restore
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_batch"] == 77
    resumed = data.create_dataset(config, "train", batch_size=64, seed=1)
    resumed.set_state(state)
    for expected, got in zip(uninterrupted[77:], _take(resumed, 3), strict=True):
        np.testing.assert_array_equal(expected["image"], got["image"])
        np.testing.assert_array_equal(expected["label"], got["label"])


def test_state_for_other_settings_is_refused():
    state = data.create_dataset(_config(), "train", batch_size=8, seed=0).get_state()
    other = data.create_dataset(_config(), "train", batch_size=16, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        other.set_state(state)


def test_global_batches_do_not_depend_on_the_process_count(id_npz):
    """Global batch k (the processes' rows, stacked in process order) is the one-process
    batch k for P = 1, 2, 4, across epoch boundaries (101 examples, 24 per batch), and a
    state saved by 2 processes resumes 4 at the next global batch."""
    path, _ = id_npz
    config = _config(f"npz:{path}")

    def global_labels(process_count, count, state=None):
        parts = []
        for p in range(process_count):
            it = data.create_dataset(
                config,
                "train",
                batch_size=24 // process_count,
                seed=5,
                process_index=p,
                process_count=process_count,
            )
            if state is not None:
                it.set_state(state)
            parts.append(np.stack([b["label"] for b in _take(it, count)]))
        return np.concatenate(parts, axis=1), it.get_state()

    one, _ = global_labels(1, 9)
    expected = np.concatenate([pipeline.epoch_order(5, e, 101, True)[0] for e in range(3)])
    np.testing.assert_array_equal(one.ravel(), expected[: 9 * 24])
    for process_count in (2, 4):
        np.testing.assert_array_equal(global_labels(process_count, 9)[0], one)
    _, state = global_labels(2, 4)
    resumed, _ = global_labels(4, 5, json.loads(json.dumps(state)))
    np.testing.assert_array_equal(resumed, one[4:])


def test_state_saved_before_the_elastic_stream():
    """A one-process state of the per-process format (batch_size, process_count 1) is the
    same stream and restores; a two-process one was another stream and is refused."""
    old = {
        **data.create_dataset(_config(), "train", batch_size=8, seed=0).get_state(),
        "next_batch": 3,
    }
    old["batch_size"] = old.pop("global_batch_size")
    iterator = data.create_dataset(_config(), "train", batch_size=8, seed=0)
    iterator.set_state({**old, "process_index": 0, "process_count": 1})
    assert iterator.get_state()["next_batch"] == 3
    with pytest.raises(ValueError, match="process_count"):
        iterator.set_state({**old, "batch_size": 4, "process_index": 0, "process_count": 2})


def test_epochs_are_reshuffled_permutations(id_npz):
    path, _ = id_npz
    config = _config(f"npz:{path}")
    labels, _ = _all_batches(config, batch_size=10, seed=0, num_epochs=2, drop_remainder=False)
    assert len(labels) == 202
    first, second = labels[:101], labels[101:]
    np.testing.assert_array_equal(np.sort(first), np.arange(101))
    np.testing.assert_array_equal(np.sort(second), np.arange(101))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(101))
    expected = np.concatenate([pipeline.epoch_order(0, e, 101, True)[0] for e in (0, 1)])
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_two_process_shards_are_disjoint_and_cover_the_epoch(id_npz, drop_remainder):
    path, _ = id_npz
    config = _config(f"npz:{path}")
    shards = [
        _all_batches(
            config,
            batch_size=5,
            seed=7,
            num_epochs=1,
            drop_remainder=drop_remainder,
            process_index=p,
            process_count=2,
        )[0]
        for p in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    union = np.sort(np.concatenate(shards))
    if drop_remainder:  # 101 = 2 * 50 + 1: both get 50, the last slot of the epoch is left out
        assert len(shards[0]) == len(shards[1]) == 50
        order = pipeline.epoch_order(7, 0, 101, True)[0]
        np.testing.assert_array_equal(union, np.sort(order[:100]))
    else:
        assert (len(shards[0]), len(shards[1])) == (51, 50)
        np.testing.assert_array_equal(union, np.arange(101))


def test_mnist5k_shards_cover_train_split(mnist_raw):
    config = _config()
    per_process = [
        _all_batches(config, batch_size=50, seed=0, num_epochs=1, process_index=p, process_count=2)[
            1
        ]
        for p in range(2)
    ]
    assert per_process[0].shape == per_process[1].shape == (2250, 32, 32, 1)
    raw = np.round((np.concatenate(per_process)[:, 2:30, 2:30, 0] + 1) * 127.5).astype(np.uint8)
    key = lambda x: x.reshape(len(x), -1)  # noqa: E731
    got = np.unique(key(raw), axis=0)
    np.testing.assert_array_equal(got, np.unique(key(mnist_raw["train_images"]), axis=0))


def test_random_flip_mirrors_about_half(id_npz):
    path, images = id_npz
    config = _config(f"npz:{path}", image_size=8, channels=3, random_flip=True)
    labels, got = _all_batches(config, batch_size=101, seed=0, num_epochs=1)
    raw = images[labels] / 127.5 - 1
    flipped = np.all(np.isclose(got, raw[:, :, ::-1], atol=1e-6), axis=(1, 2, 3))
    kept = np.all(np.isclose(got, raw, atol=1e-6), axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert 30 < flipped.sum() < 70
    np.testing.assert_array_equal(flipped, pipeline.epoch_order(0, 0, 101, True)[1][:101])


def test_workers_give_the_same_stream():
    config = _config(num_workers=2)
    expected = _take(data.create_dataset(_config(), "train", batch_size=16, seed=0), 4)
    iterator = data.create_dataset(config, "train", batch_size=16, seed=0)
    got = _take(iterator, 4)
    iterator.close()
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


# ---------------------------------------------------------------- npz and transforms


def test_npz_channels_follow_pil(id_npz):
    path, images = id_npz
    config = _config(f"npz:{path}", image_size=8, channels=1)
    labels, got = _all_batches(config, batch_size=101, seed=0, shuffle=False, num_epochs=1)
    np.testing.assert_array_equal(labels, np.arange(101))
    pil_gray = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in images])
    np.testing.assert_allclose(got[..., 0], pil_gray / 127.5 - 1, atol=1e-6)
    info = data.dataset_info(config)
    assert info.num_classes == 101 and info.class_names is None


def test_npz_without_labels_is_unconditional(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((6, 4, 4, 1), np.uint8))
    config = _config(f"npz:{path}", image_size=4)
    assert data.dataset_info(config).num_classes is None
    batch = next(data.create_dataset(config, "test", batch_size=6, seed=0))
    np.testing.assert_array_equal(batch["label"], np.zeros(6, np.int32))


def test_fit_image_crops_centre_and_resizes():
    image = np.zeros((40, 64, 3), np.uint8)
    image[:, 12:52] = (10, 200, 30)  # the centred 40x40 square
    out = transforms.fit_image(image, 32, pad_small=False)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, np.broadcast_to([10, 200, 30], (32, 32, 3)))
    assert transforms.center_crop_box(64, 40) == (12, 0, 52, 40)
    with pytest.raises(ValueError, match="smaller than config.data.image_size=48"):
        transforms.fit_image(image, 48, pad_small=False)


def test_convert_channels_matches_pil():
    rgba = np.random.default_rng(1).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    pil = Image.fromarray(rgba, "RGBA")
    for channels, mode in ((1, "L"), (3, "RGB")):
        expected = np.asarray(pil.convert(mode)).reshape(5, 7, channels)
        np.testing.assert_array_equal(transforms.convert_channels(rgba, channels), expected)
    gray = rgba[..., :1]
    expected = np.asarray(Image.fromarray(gray[..., 0], "L").convert("RGBA"))
    np.testing.assert_array_equal(transforms.convert_channels(gray, 4), expected)


# ---------------------------------------------------------------- image folders


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _class_folder(root: Path) -> dict[str, int]:
    """3 classes x 4 images; each image is a flat gray whose value encodes (class, index)."""
    values = {}
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            value = 40 * c + 5 * i + 10
            _png(root / name / f"sub{i % 2}" / f"{i}.png", np.full((36, 48), value, np.uint8))
            values[f"{name}/{i}"] = value
    return values


def test_folder_classes_round_trip(tmp_path):
    _class_folder(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    config = _config(f"folder:{tmp_path}", image_size=32, channels=3)
    info = data.dataset_info(config)
    assert info.class_names == ["cat", "dog", "emu"] and info.num_classes == 3
    assert info.num_examples("train") == 12
    labels, images = _all_batches(config, batch_size=4, seed=0, num_epochs=1)
    assert images.shape == (12, 32, 32, 3)
    values = np.round((images + 1) * 127.5)
    assert np.all(values == values[:, :1, :1, :1])  # flat images stay flat
    value = values[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(labels, (value - 10) // 40)
    assert sorted(value) == sorted(40 * c + 5 * i + 10 for c in range(3) for i in range(4))


def test_flat_folder_is_unconditional(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", np.full((32, 32, 4), 100, np.uint8))
    config = _config(f"folder:{tmp_path}", channels=1)
    info = data.dataset_info(config)
    assert info.num_classes is None and info.class_names is None
    batch = next(data.create_dataset(config, "train", batch_size=3, seed=0))
    np.testing.assert_array_equal(batch["label"], [0, 0, 0])
    assert batch["image"].shape == (3, 32, 32, 1)


def test_folder_corrupt_file_errors_or_is_skipped(tmp_path):
    _class_folder(tmp_path)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    config = _config(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="broken.png"):
        data.validate_data_config(config)
    with pytest.raises(ValueError, match="broken.png"):
        data.create_dataset(config, "train", batch_size=4, seed=0)
    config.data.skip_corrupt = True
    info = data.dataset_info(config)
    assert info.skipped_files == [str(bad)] and info.num_examples("train") == 12
    labels, _ = _all_batches(config, batch_size=4, seed=0, num_epochs=1)
    np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])


def test_folder_truncated_file_fails_when_decoded(tmp_path):
    _class_folder(tmp_path)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
        buffer, format="PNG"
    )
    bad = tmp_path / "emu" / "truncated.png"
    bad.write_bytes(buffer.getvalue()[:200])  # the header reads, the pixels do not
    config = _config(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="truncated.png"):
        _all_batches(config, batch_size=13, seed=0, num_epochs=1)
    config.data.skip_corrupt = True  # replaced by the next example of the folder
    labels, _ = _all_batches(config, batch_size=13, seed=0, num_epochs=1)
    assert len(labels) == 13


def test_captioned_folders(tmp_path):
    """captions.jsonl (nested paths too) or a .txt per image: labels index the distinct
    captions, which the batches carry in file order; a missing caption, a caption of no
    image or a malformed line names the file."""
    texts = ["a gray square", "a dark square", "a gray square"]
    for i in range(3):
        _png(tmp_path / "jsonl" / "sub" / f"{i}.png", np.full((32, 32), 40 * i, np.uint8))
        _png(tmp_path / "txt" / f"{i}.png", np.full((32, 32), 40 * i, np.uint8))
        (tmp_path / "txt" / f"{i}.txt").write_text(texts[i] + "\n")
    lines = [json.dumps({"file_name": f"sub/{i}.png", "text": t}) for i, t in enumerate(texts)]
    (tmp_path / "jsonl" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("jsonl", "txt"):
        config = _config(f"folder:{tmp_path / name}")
        info = data.dataset_info(config)
        assert info.captions == ["a gray square", "a dark square"], name
        assert info.num_classes is None and info.class_names is None
        labels, images = _all_batches(config, batch_size=3, seed=0, num_epochs=1)
        value = np.round((images[:, 0, 0, 0] + 1) * 127.5).astype(int)
        np.testing.assert_array_equal(labels, [[0, 1, 0][v // 40] for v in value])

    (tmp_path / "txt" / "1.txt").unlink()
    with pytest.raises(UserError, match=r"1.png has no caption \(1 without one\).*\.txt"):
        data.validate_data_config(_config(f"folder:{tmp_path / 'txt'}"))
    jsonl = tmp_path / "jsonl" / "captions.jsonl"
    jsonl.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(UserError, match="2.png has no caption.*captions.jsonl"):
        data.validate_data_config(_config(f"folder:{tmp_path / 'jsonl'}"))
    jsonl.write_text("\n".join(lines) + '\n{"file_name": "sub/9.png", "text": "x"}\n')
    with pytest.raises(UserError, match="line 4: no image file .*9.png"):
        data.validate_data_config(_config(f"folder:{tmp_path / 'jsonl'}"))
    jsonl.write_text('{"file": "sub/0.png"}\n')
    with pytest.raises(UserError, match='line 1: not a JSON object with "file_name"'):
        data.validate_data_config(_config(f"folder:{tmp_path / 'jsonl'}"))


def test_folder_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        data.validate_data_config(_config(f"folder:{tmp_path / 'missing'}"))
    with pytest.raises(ValueError, match="no image files"):
        data.validate_data_config(_config(f"folder:{tmp_path}"))
    _png(tmp_path / "a" / "x.png", np.zeros((32, 32), np.uint8))
    _png(tmp_path / "y.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="both in class sub-folders and directly"):
        data.validate_data_config(_config(f"folder:{tmp_path}"))
    (tmp_path / "y.png").unlink()
    _png(tmp_path / "a" / "small.png", np.zeros((20, 40), np.uint8))
    with pytest.raises(ValueError, match="small.png is 40x20 pixels, smaller than"):
        data.validate_data_config(_config(f"folder:{tmp_path}"))


def test_folder_jpeg_and_webp_decode(tmp_path):
    rgb = np.full((64, 80, 3), (200, 40, 90), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "b.webp", lossless=True)
    assert [p.name for p in folder.list_images(tmp_path)] == ["a.jpg", "b.webp"]
    config = _config(f"folder:{tmp_path}", channels=3)
    _, images = _all_batches(config, batch_size=2, seed=0, shuffle=False, num_epochs=1)
    np.testing.assert_allclose(
        (images + 1) * 127.5, np.broadcast_to(rgb[:32, :32], images.shape), atol=4
    )


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"source": "mnist"}, "config.data.source='mnist' is not one of mnist5k, tfds"),
        ({"source": "folder:"}, "config.data.source"),
        ({"channels": 2}, r"config.data.channels=2 is not one of 1, 3, 4"),
        ({"image_size": 0}, "config.data.image_size=0"),
        ({"num_workers": -1}, "config.data.num_workers"),
        ({"eval_split": "validation"}, "config.data.eval_split='validation' is not one of"),
        ({"source": "npz:/nonexistent/x.npz"}, "no such file"),
    ],
)
def test_bad_config_is_a_clear_error(fields, match):
    config = get_config()
    config.data.update(fields)
    with pytest.raises(ValueError, match=match):
        data.validate_data_config(config)


def test_bad_create_arguments():
    with pytest.raises(ValueError, match="split='valid'"):
        data.create_dataset(get_config(), "valid", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="process_index=2"):
        data.create_dataset(get_config(), "train", batch_size=4, seed=0, process_index=2)
    with pytest.raises(
        ValueError,
        match=r"batch_size=600 \(a global batch of 600 over 1 process\(es\)\) leaves process 0 no",
    ):
        data.create_dataset(get_config(), "test", batch_size=600, seed=0, num_epochs=1)


# ---------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A 3-class TFDS dataset (12 train / 5 test RGB 8x8 images) prepared without TensorFlow.

    PNG bytes are handed to the Image feature, which then needs no TF to encode.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    images = {
        "train": np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        "test": np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
    }

    class DdpmTinyTestImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in images}

        def _generate_examples(self, split):
            for i, image in enumerate(images[split]):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                yield i, {"image": buffer.getvalue(), "label": i % 3}

    DdpmTinyTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "ddpm_tiny_test_images", str(data_dir), images


def test_tfds_dataset_flows_through_the_pipeline(tiny_tfds):
    name, data_dir, images = tiny_tfds
    config = _config(f"tfds:{name}", data_dir=data_dir, image_size=8, channels=3)
    info = data.dataset_info(config)
    assert (info.num_examples("train"), info.num_examples("test")) == (12, 5)
    assert info.class_names == ["a", "b", "c"]
    labels, got = _all_batches(
        config, "test", batch_size=2, seed=0, shuffle=False, num_epochs=1, drop_remainder=False
    )
    # TFDS shuffles examples when preparing: find each image among the generated ones.
    raw = np.round((got + 1) * 127.5).astype(np.uint8).reshape(5, 1, -1)
    matches = np.all(raw == images["test"].reshape(1, 5, -1), axis=-1)
    assert np.all(matches.sum(axis=1) == 1)
    index = matches.argmax(axis=1)
    np.testing.assert_array_equal(np.sort(index), np.arange(5))
    np.testing.assert_array_equal(labels, index % 3)
    config.data.image_size = 12  # padded like MNIST
    batch = next(data.create_dataset(config, "train", batch_size=12, seed=0))
    assert batch["image"].shape == (12, 12, 12, 3) and np.all(batch["image"][:, :2] == -1)


def test_tfds_missing_keys(tiny_tfds):
    name, data_dir, _ = tiny_tfds
    config = _config(f"tfds:{name}", data_dir=data_dir, label_key="digit")
    with pytest.raises(ValueError, match="config.data.label_key='digit' is not a feature"):
        data.validate_data_config(config)
    config = _config(f"tfds:{name}", data_dir=data_dir, image_key="img")
    with pytest.raises(ValueError, match="config.data.image_key='img'"):
        data.validate_data_config(config)
    config = _config(f"tfds:{name}", data_dir=data_dir, eval_split="validation")
    with pytest.raises(ValueError, match="config.data.eval_split='validation' is not a split"):
        data.validate_data_config(config)


def test_tfds_offline_without_data_fails_fast(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_download(*args, **kwargs):
        raise AssertionError("the pipeline must never download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    config = _config("tfds:cifar10", data_dir=str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not prepared.*tfds build cifar10"):
        data.validate_data_config(config)
    with pytest.raises(ValueError, match="not prepared"):
        data.create_dataset(config, "train", batch_size=4, seed=0)
    print(f"offline TFDS failure after {time.perf_counter() - start:.2f} s")
    with pytest.raises(ValueError, match="knows no dataset 'no_such_dataset_xyz'"):
        data.validate_data_config(_config("tfds:no_such_dataset_xyz", data_dir=str(tmp_path)))
