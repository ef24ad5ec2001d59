"""Deterministic, sharded, resumable batches on grain.

The example order is a pure function of (seed, epoch): epoch e visits the examples in the
order `epoch_order(seed, e, n)`, and a process with index p of P takes every P-th slot of it
(slots p, p + P, ...). The processes' shards are therefore disjoint and together cover the
epoch; with drop_remainder the last n % P slots of each epoch are left out so that every
process sees the same number of examples. Process p's stream of slots is cut into batches;
batch k is a pure function of k, so the pipeline is a grain `MapDataset` over batch indices,
read ahead by threads (and worker processes when config.data.num_workers > 0), and an
iterator's state is just the index of its next batch.
"""

import dataclasses
import sys
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from ddpm.data import info, transforms
from ddpm.errors import UserError


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(example ids [n] int64, flip bits [n] bool) of one epoch; a pure function of the args."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    return order, rng.random(n) < 0.5


def shard_length(n: int, process_index: int, process_count: int, drop_remainder: bool) -> int:
    """Examples per epoch of process `process_index`: slots p, p + P, ... below n (or n - n % P)."""
    if drop_remainder:
        return n // process_count
    return len(range(process_index, n, process_count))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples batch k of one process holds.

    positions k*B .. k*B + B - 1 of the process's stream -> (epoch, j) -> slot j*P + p of
    `epoch_order(seed, epoch)`. total: stream length (None = infinite).
    """

    n: int
    seed: int
    shuffle: bool
    batch_size: int
    process_index: int
    process_count: int
    per_epoch: int
    total: int | None

    def num_batches(self, drop_remainder: bool) -> int:
        if self.total is None:
            return sys.maxsize // self.batch_size
        whole, rest = divmod(self.total, self.batch_size)
        return whole + (1 if rest and not drop_remainder else 0)

    def examples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [b] int64, flips [b] bool) of batch k; b < B only for a final partial batch."""
        stop = (k + 1) * self.batch_size
        if self.total is not None:
            stop = min(stop, self.total)
        epochs, j = np.divmod(np.arange(k * self.batch_size, stop), self.per_epoch)
        slots = j * self.process_count + self.process_index
        ids = np.empty(len(slots), np.int64)
        flips = np.empty(len(slots), bool)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            order, flip = epoch_order(self.seed, int(epoch), self.n, self.shuffle)
            ids[at], flips[at] = order[slots[at]], flip[slots[at]]
        return ids, flips


@dataclasses.dataclass(frozen=True)
class ReadBatch:
    """Batch index -> {"image": float32 [b, S, S, C] (signals: [b, L, C]) in [-1, 1],
    "label": int32 [b]}."""

    source: info.Source
    plan: BatchPlan
    random_flip: bool

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        ids, flips = self.plan.examples(k)
        images, labels = self.source.load(ids)
        if self.random_flip:
            images = transforms.flip_left_right(images, flips)
        if images.dtype == np.uint8:
            images = transforms.to_float(images)
        return {"image": images, "label": labels.astype(np.int32)}


class DataIterator:
    """Iterator over numpy batches with a JSON state: {"next_batch": k, ...settings}.

    Restoring (set_state) checks that the settings (everything that shapes the stream except
    process_index: source kind, number of examples, seed, batch size, ...) match, then
    continues with batch k. next_batch is the same on every process, so the state saved by
    process 0 restores all of them; a moved dataset directory still restores.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        settings: dict[str, Any],
        read_options: grain.ReadOptions,
        worker_options: grain.MultiprocessingOptions,
    ):
        self._batches = batches
        self._settings = settings
        self._read_options = read_options
        self._worker_options = worker_options
        self._next_batch = 0
        self._iterator = None

    def _start(self) -> Any:
        ds = self._batches[self._next_batch :].to_iter_dataset(self._read_options)
        if self._worker_options.num_workers > 0:
            if not flags.FLAGS.is_parsed():
                # grain 0.2.18's mp_prefetch reads absl flags; outside an absl app (tests,
                # notebooks) nothing parsed them, so their defaults are taken as parsed.
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(self._worker_options)
        return iter(ds)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.close()
            raise
        self._next_batch += 1
        if self._worker_options.num_workers > 0:
            # Worker outputs live in shared memory; plain copies are safe to keep around.
            batch = {key: np.array(value) for key, value in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next_batch, **self._settings}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = {k: v for k, v in state.items() if k not in ("next_batch", "process_index")}
        current = {k: v for k, v in self._settings.items() if k != "process_index"}
        if saved != current:
            diff = {
                k: (saved.get(k), current.get(k))
                for k in saved.keys() | current.keys()
                if saved.get(k) != current.get(k)
            }
            raise UserError(f"data iterator state is for other settings (saved, now): {diff}")
        self.close()
        self._next_batch = int(state["next_batch"])

    def close(self) -> None:
        """Stop the reader threads / worker processes (a later next() restarts them)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def create_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> DataIterator:
    """Batches of split "train" / "test" for process `process_index` of `process_count`.

    batch_size is per process. Yields {"image": float32 [batch_size, S, S, C] in [-1, 1],
    "label": int32 [batch_size]} (labels 0 for an unconditional source), S =
    config.data.image_size, C = config.data.channels; num_epochs None repeats forever. With
    drop_remainder=False the final batch may be smaller and shards differ by at most one
    example per epoch. The sequence depends only on the arguments and config.data (not on
    num_workers). Random flips (config.data.random_flip) are drawn per (seed, epoch, slot).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs={num_epochs} must be positive or None")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    data = config.data
    source = info.open_source(config, split)
    n = len(source)
    per_epoch = shard_length(n, process_index, process_count, drop_remainder)
    if per_epoch == 0:
        raise ValueError(
            f"{data.source} split {split!r} has {n} examples, fewer than "
            f"process_count={process_count}"
        )
    total = None if num_epochs is None else per_epoch * num_epochs
    plan = BatchPlan(n, seed, shuffle, batch_size, process_index, process_count, per_epoch, total)
    num_batches = plan.num_batches(drop_remainder)
    if num_batches == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {total} examples of {num_epochs} epoch(s) "
            f"of this process's shard of {data.source} split {split!r}"
        )
    batches = grain.MapDataset.range(num_batches).map(ReadBatch(source, plan, data.random_flip))
    # `prefetch` batches are read ahead, each by its own thread (PIL decodes without the GIL).
    read_options = grain.ReadOptions(num_threads=data.prefetch, prefetch_buffer_size=data.prefetch)
    settings = {
        "source": info.parse_source(data.source)[0],
        "num_examples": n,
        "split": split,
        "image_size": data.image_size,
        "channels": data.channels,
        "random_flip": data.random_flip,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "drop_remainder": drop_remainder,
        "batch_size": batch_size,
        "process_index": process_index,
        "process_count": process_count,
    }
    worker_options = grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)
    )
    return DataIterator(batches, settings, read_options, worker_options)
