"""Deterministic, sharded, resumable batches on grain, the same whatever the process count.

The example order is a pure function of (seed, epoch): epoch e visits the examples in the
order `epoch_order(seed, e, n)`, and the global stream is epoch 0's order, then epoch 1's, ...
Global batch k holds positions k*G .. k*G + G - 1 of it (G the global batch size), and process
p of P reads rows p*B .. p*B + B - 1 (B = G / P), the rows that `sharding.global_batch` places
on its devices. Global batch k is therefore a pure function of (seed, k), whatever P is: a run
checkpointed with 2 processes resumes with 1 or 4 and sees exactly the examples an
uninterrupted run would. A process's batch k is a pure function of k, so the pipeline is a
grain `MapDataset` over batch indices, read ahead by threads (and worker processes when
config.data.num_workers > 0), and an iterator's state is just the index of its next batch.
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


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples batch k of one process holds.

    Global positions k*G + p*B .. k*G + p*B + B - 1 (G = B * P) -> (epoch, slot) -> example
    `epoch_order(seed, epoch)[slot]`. total: global stream length (None = infinite).
    """

    n: int
    seed: int
    shuffle: bool
    batch_size: int
    process_index: int
    process_count: int
    total: int | None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count

    def num_batches(self, drop_remainder: bool) -> int:
        """This process's batches: with drop_remainder=False a final partial global batch
        counts for the processes whose rows it reaches."""
        if self.total is None:
            return sys.maxsize // self.global_batch_size
        whole, rest = divmod(self.total, self.global_batch_size)
        reaches = rest > self.process_index * self.batch_size
        return whole + (1 if reaches and not drop_remainder else 0)

    def examples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [b] int64, flips [b] bool) of batch k; b < B only for a final partial batch."""
        start = k * self.global_batch_size + self.process_index * self.batch_size
        stop = start + self.batch_size
        if self.total is not None:
            stop = min(stop, self.total)
        epochs, slots = np.divmod(np.arange(start, stop), self.n)
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

    Restoring (set_state) checks that the settings (everything that shapes the global stream:
    source kind, number of examples, seed, global batch size, ...) match, then continues with
    batch k. next_batch is the same on every process, so the state saved by process 0 restores
    all of them, and with any other process count; a moved dataset directory still restores.
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
        saved = {k: v for k, v in _current_format(state).items() if k != "next_batch"}
        current = self._settings
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


def _current_format(state: dict[str, Any]) -> dict[str, Any]:
    """A state saved before the stream was the same for every process count (it named the
    per-process batch size and the process count): one process's stream was today's, so
    such a state reads as today's; one of several processes keeps its process_count, which
    no current state has, and is refused as other settings."""
    if state.get("process_count") != 1:
        return state
    renamed = {k: v for k, v in state.items() if k not in ("process_index", "process_count")}
    renamed["global_batch_size"] = renamed.pop("batch_size")
    return renamed


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
    """Process `process_index`'s rows of the global batches of split "train" / "test".

    batch_size is per process (the global batch is batch_size * process_count). Yields
    {"image": float32 [batch_size, S, S, C] in [-1, 1], "label": int32 [batch_size]} (labels 0
    for an unconditional source), S = config.data.image_size, C = config.data.channels;
    num_epochs None repeats forever. A finite stream ends after num_epochs * n examples: with
    drop_remainder=True at the last whole global batch, otherwise with a partial one whose rows
    this process may get fewer of, or none (then it has one batch less). The global batches
    depend only on the global batch size, seed, shuffle and config.data (not on the process
    count or num_workers). Random flips (config.data.random_flip) are drawn per (seed, epoch,
    slot).
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
    total = None if num_epochs is None else n * num_epochs
    plan = BatchPlan(n, seed, shuffle, batch_size, process_index, process_count, total)
    num_batches = plan.num_batches(drop_remainder)
    if num_batches == 0:
        raise ValueError(
            f"batch_size={batch_size} (a global batch of {plan.global_batch_size} over "
            f"{process_count} process(es)) leaves process {process_index} no batch of the "
            f"{total} examples of {num_epochs} epoch(s) of {data.source} split {split!r}"
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
        "global_batch_size": plan.global_batch_size,
    }
    worker_options = grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)
    )
    return DataIterator(batches, settings, read_options, worker_options)
