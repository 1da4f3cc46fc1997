"""grain's DataLoader under :class:`~corrjax.data.BatchIterator`: reading, decoding and transforms in worker processes.

One grain record is one *process-local batch*: record ``k`` is global batch ``k`` of the stream (epoch
``k // steps_per_epoch``, step ``k % steps_per_epoch``), restricted to the rows this process holds. A
:class:`BatchSampler` hands out the positions ``start, start + 1, ...``; :class:`BatchReads` (the grain data
source) reads the raw records of a position's rows; the grain transforms :class:`DecodeBatch` (decoding, cropping,
resizing, composing: the source's ``decode_batch``) and :class:`TransformBatch` (a user transform such as
augmentation) turn them into a NumPy batch. ``grain.DataLoader`` runs all of that in ``workers`` worker processes
(0: in the calling thread); each worker builds whole batches and the loader hands them out round-robin in position
order, so the stream is the same whatever the number of workers, and each batch carries its position (``"_position"``)
so the consumer can check it.

Why whole batches and not grain's per-record ``Batch`` transform: with worker processes grain batches within each
worker, so batch contents would change with ``workers``. Why not grain's ``ShardByJaxProcess``: it gives each process
its own records (and so its own whole batches), so the global batch would change with the process count; here every
process reads only its rows of the one global batch, which is the per-process sharding the mesh needs. Why the
position and not grain's iterator state is what a checkpoint stores: grain's ``DataLoaderIterator`` state records
the worker count and the sampler and refuses a loader that differs, while a position lets a resumed run change
``workers``; the loader is rebuilt at the position (its sampler starts there).

Sources may split ``get_batch`` into ``read_batch(indices) -> raw`` (I/O, in the grain data source) and
``decode_batch(raw) -> batch`` (CPU work, the :class:`DecodeBatch` transform); sources without the split are read
whole by ``get_batch`` and not decoded further. Everything handed to worker processes is pickled (cloudpickle), so
sources and transforms must be picklable.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from corrjax.data.source import Batch

POSITION_KEY = "_position"


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch (see :func:`corrjax.data.iterator.epoch_order`, which checks ``seed``)."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def read_batch(source: Any, indices: np.ndarray) -> Any:
    """The raw form of the examples at ``indices``: ``source.read_batch`` if it has one, else ``get_batch``."""
    read = getattr(source, "read_batch", None)
    return read(indices) if read is not None else source.get_batch(indices)


def decode_batch(source: Any, raw: Any) -> Batch:
    """A batch from :func:`read_batch`'s output: ``source.decode_batch`` if it has one, else ``raw`` itself."""
    decode = getattr(source, "decode_batch", None)
    return decode(raw) if decode is not None else raw


class BatchGeometry:
    """Which source rows form process-local batch ``k``: the order of each epoch and the padding of the last batch.

    Args:
      num_examples, batch_size, seed, shuffle, drop_remainder: as :class:`~corrjax.data.BatchIterator`'s.
      rows: the rows of each global batch that this process holds.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, shuffle: bool, drop_remainder: bool, rows: slice
    ) -> None:
        self.num_examples, self.batch_size, self.seed = int(num_examples), int(batch_size), int(seed)
        self.shuffle, self.drop_remainder, self.rows = bool(shuffle), bool(drop_remainder), rows
        if self.drop_remainder:
            self.steps_per_epoch = self.num_examples // self.batch_size
        else:
            self.steps_per_epoch = math.ceil(self.num_examples / self.batch_size)
        self._cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cache=None, _lock=threading.Lock())

    def order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if self._cache is None or self._cache[0] != epoch:
                self._cache = (epoch, epoch_order(self.num_examples, self.seed, epoch, self.shuffle))
            return self._cache[1]

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Source indices of global batch ``step`` of ``epoch`` (padded cyclically when incomplete)."""
        idx = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        return np.resize(idx, self.batch_size) if idx.size < self.batch_size else idx

    def local(self, position: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(indices, mask)`` of this process's rows of global batch ``position`` (``mask`` None with
        ``drop_remainder``; else False on the padded rows)."""
        epoch, step = divmod(int(position), self.steps_per_epoch)
        idx = self.global_indices(epoch, step)[self.rows]
        if self.drop_remainder:
            return idx, None
        first = step * self.batch_size + self.rows.start
        return idx, np.arange(first, first + idx.size) < self.num_examples

    def __repr__(self) -> str:
        return (
            f"BatchGeometry(n={self.num_examples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, drop_remainder={self.drop_remainder}, rows={self.rows})"
        )


class BatchReads:
    """grain data source: record ``k`` is the raw form of this process's rows of global batch ``k``.

    ``len`` is the number of batches of ``num_epochs`` epochs (a very large number for an endless stream)."""

    def __init__(self, source: Any, geometry: BatchGeometry, num_epochs: int | None) -> None:
        self.source, self.geometry = source, geometry
        self.length = geometry.steps_per_epoch * num_epochs if num_epochs is not None else 2**62

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> dict[str, Any]:
        idx, mask = self.geometry.local(position)
        record = {"raw": read_batch(self.source, idx), POSITION_KEY: np.int64(position)}
        if mask is not None:
            record["mask"] = mask
        return record

    def __repr__(self) -> str:  # grain compares reprs of sources in its own iterator state
        return f"BatchReads({getattr(self.source, 'name', type(self.source).__name__)!r}, {self.geometry!r})"


class BatchSampler:
    """grain sampler over batch positions ``start <= k < stop``: index ``i`` is position ``start + i``."""

    def __init__(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
        self.start, self.stop = int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self.stop - self.start:
            raise IndexError(index)
        return grain.RecordMetadata(index=self.start + index, record_key=self.start + index)

    def __repr__(self) -> str:
        return f"BatchSampler({self.start}, {self.stop})"


class DecodeBatch(grain.transforms.Map):
    """grain transform: the raw record of a batch -> ``{"x": ..., task: ...}`` (the source's ``decode_batch``), the
    mask and position kept."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        batch = dict(decode_batch(self.source, record.pop("raw")))
        batch.update(record)
        return batch


class TransformBatch(grain.transforms.Map):
    """grain transform: a user function of the process-local NumPy batch (position and mask kept aside)."""

    def __init__(self, fn: Callable[[Batch], Batch]) -> None:
        self.fn = fn

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        position = batch.pop(POSITION_KEY)
        out = dict(self.fn(batch))
        out[POSITION_KEY] = position
        return out


class Inline:
    """A small array handed from a worker process inside the pickled element, not in a shared-memory segment of its
    own (grain puts every NumPy array of an element in one; a CelebA batch has 40 label arrays)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class InlineSmallArrays(grain.transforms.Map):
    """grain transform (last, with worker processes): arrays under ``min_bytes`` wrapped in :class:`Inline`."""

    def __init__(self, min_bytes: int = 1 << 16) -> None:
        self.min_bytes = int(min_bytes)

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        small = lambda v: isinstance(v, np.ndarray) and v.nbytes < self.min_bytes
        return {k: Inline(v) if small(v) else v for k, v in batch.items()}


def unwrap(batch: dict[str, Any]) -> dict[str, Any]:
    """Undoes :class:`InlineSmallArrays`."""
    return {k: v.array if isinstance(v, Inline) else v for k, v in batch.items()}


def _allow_unparsed_absl_flags() -> None:
    """grain's worker processes read absl flags; outside an absl app nothing parses them, so mark them parsed (their
    defaults) once, as an absl app would."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def default_workers(source: Any) -> int:
    """``data.workers: null``: 0 (in-process) on the CPU backend or for in-memory sources (a gather from host memory
    is cheaper than shipping the batch from a worker), else ``min(8, cpu_count // 2)`` worker processes."""
    import jax

    if jax.default_backend() == "cpu" or not hasattr(source, "read_batch"):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def make_data_loader(
    source: Any,
    geometry: BatchGeometry,
    *,
    start: int,
    num_epochs: int | None,
    workers: int = 0,
    worker_buffer_size: int = 2,
    transform: Callable[[Batch], Batch] | None = None,
) -> grain.DataLoader:
    """A ``grain.DataLoader`` yielding the process-local NumPy batches at positions ``start, start + 1, ...``
    (each with its ``"_position"``), decoded and transformed in ``workers`` worker processes (0: in-process; then
    small arrays come wrapped, see :func:`unwrap`)."""
    reads = BatchReads(source, geometry, num_epochs)
    operations: list[grain.transforms.Map] = [DecodeBatch(source)]
    if transform is not None:
        operations.append(TransformBatch(transform))
    if workers > 0:
        operations.append(InlineSmallArrays())
        _allow_unparsed_absl_flags()
    return grain.DataLoader(
        data_source=reads,
        sampler=BatchSampler(start, max(start, len(reads))),
        operations=operations,
        worker_count=int(workers),
        worker_buffer_size=int(worker_buffer_size),
        shard_options=grain.sharding.NoSharding(),  # per-process rows are chosen by `geometry` (module docstring)
        # Whole batches are the records: no read-ahead threads or buffer in front of the transforms (the workers,
        # and BatchIterator's prefetch thread, are where batches are prepared ahead).
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
    )


def close_loader_iterator(iterator: Any) -> None:
    """Stops a ``grain.DataLoader`` iterator's worker processes now (grain otherwise waits for garbage collection)."""
    inner = getattr(iterator, "_iterator", None)
    close = getattr(inner, "close", None)
    if close is not None:
        close()
