"""`sines`: an embedded 1-D dataset, sums of random sinusoids labelled by frequency band.

Example i of a split is a pure function of (split, i): no files, the same on every machine.
It has M ~ U{1, 2, 3} components with one frequency band k (the label) shared by all of them:
    x[n, c] = 0.9 * sum_m a_m sin(2 pi f_m n / L + phi_{m,c}) / sum_m a_m,   n = 0..L-1,
f_m log-uniform in [1, 2) * 2^k * L / 64 cycles per window (k = 0..3, up to a quarter of the
Nyquist rate), a_m ~ U(0.3, 1), phases ~ U(0, 2 pi) per channel c; so |x| <= 0.9.
"""

import dataclasses

import numpy as np

NUM_BANDS = 4
CLASS_NAMES = [f"band{k}" for k in range(NUM_BANDS)]
SPLIT_SIZES = {"train": 8192, "test": 1024}
_SPLIT_SEEDS = {"train": 0, "test": 1}


def band_edges(length: int, band: int) -> tuple[float, float]:
    """[low, high) frequency in cycles per window of band k for signals of `length` samples."""
    low = 2.0**band * length / 64
    return low, 2 * low


def make_example(split: str, index: int, length: int, channels: int) -> tuple[np.ndarray, int]:
    """(signal [length, channels] float32 in [-0.9, 0.9], band label) of example `index`."""
    rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
    band = int(rng.integers(NUM_BANDS))
    m = int(rng.integers(1, 4))
    low, high = band_edges(length, band)
    freqs = np.exp(rng.uniform(np.log(low), np.log(high), m))
    amps = rng.uniform(0.3, 1.0, m)
    phases = rng.uniform(0.0, 2 * np.pi, (m, channels))
    n = np.arange(length)[:, None, None]  # [L, 1, 1]
    waves = amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * n / length + phases)  # [L, M, C]
    return (0.9 * waves.sum(1) / amps.sum()).astype(np.float32), band


@dataclasses.dataclass(frozen=True)
class SinesSource:
    """Random access to one split: `load(ids)` -> (signals [B, L, C] float32, labels [B] int32)."""

    split: str
    length: int
    channels: int

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def load(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [make_example(self.split, int(i), self.length, self.channels) for i in ids]
        return np.stack([x for x, _ in pairs]), np.array([y for _, y in pairs], np.int32)
