"""One batch iterator for every corrjax data source: seeded shuffling, epochs, per-process reads, global batches.

The order of examples is a pure function of ``(seed, epoch)``: epoch ``e`` visits
``np.random.default_rng([seed, e]).permutation(len(source))`` in consecutive global batches of ``batch_size``.
With a ``sharding`` (or a ``mesh`` and its data axis) each process reads only the rows of the global batch that
its own devices hold, and the batch is assembled with ``jax.make_array_from_process_local_data`` (one
``jax.device_put`` of the whole batch when a single process owns every device), so the global batch is the same
whatever the number of processes. Without one, each process gets a contiguous
``batch_size / process_count`` block as NumPy arrays.

The position ``{"epoch": e, "step": s}`` (``s`` batches of epoch ``e`` consumed) is all the state there is:
``get_state()`` after consuming a batch and ``set_state()`` on a fresh iterator yield the same next batches, which
is what a restored training run needs. Batches are read, decoded and transformed by a ``grain.DataLoader`` in
``workers`` worker processes (0: in-process; :mod:`corrjax.data.loader`), whole batch by whole batch, so the batches
are the same whatever the number of workers; a background thread keeps ``prefetch`` batches ready (taking them from
the loader and transferring them to the devices). The position reported is that of the batches handed out, not
prefetched; :meth:`BatchIterator.set_state` rebuilds the loader there.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from corrjax.data import loader as grain_loader
from corrjax.data.source import Batch, DataSource

logger = logging.getLogger(__name__)

_DONE = object()


MAX_SEED = 2**31


def check_seed(seed: Any, name: str = "seed") -> int:
    """Returns ``seed`` as an int after checking it is an int in ``[0, 2**31)``, else raises ``ValueError`` naming it.

    corrjax seeds feed NumPy's ``default_rng([seed, ...])`` (batch orders, multidigits), which takes no negative
    entropy, and ``jax.random.key(seed)``, whose 32-bit keys (without x64) would give ``2**32 + s`` the key of ``s``;
    the seed ensemble stacks them as int32. One range serves them all.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"`{name}` must be an int in [0, 2**31), got {seed!r}")
    return int(seed)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a seeded permutation (or ``arange`` without shuffling).

    ``seed`` is an int in ``[0, 2**31)`` (see :func:`check_seed`); ``ValueError`` otherwise."""
    return grain_loader.epoch_order(num_examples, check_seed(seed), epoch, shuffle)


def _local_rows(sharding: jax.sharding.Sharding, global_batch: int) -> slice:
    """The contiguous rows of a global batch whose shards live on this process's devices."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts, stops = [], []
    for idx in index_map.values():
        s = idx[0] if idx else slice(None)
        start, stop, _ = s.indices(global_batch)
        starts.append(start)
        stops.append(stop)
    start, stop = min(starts), max(stops)
    covered = np.zeros(global_batch, bool)
    for a, b in zip(starts, stops, strict=True):
        covered[a:b] = True
    if not covered[start:stop].all():
        raise ValueError(
            "the batch sharding gives this process non-contiguous rows; use a mesh whose data axis is "
            "ordered by process (jax.make_mesh does this)"
        )
    return slice(start, stop)


class BatchIterator(Iterator[dict[str, Any]]):
    """Iterates over global batches ``{"x": (B, ...), task: (B, ...)}`` of a data source (``"x"`` may be a pytree of
    arrays, e.g. a tabular dataset's ``{feature name: (B, ...)}``; every leaf is split along its leading axis).

    Args:
      source: a :class:`~corrjax.data.source.DataSource` (``len``, ``get_batch(indices)``, ``tasks``).
      batch_size: the global batch size ``B`` (over all processes).
      seed: shuffling seed, an int in ``[0, 2**31)``; the order of epoch ``e`` depends only on ``(seed, e)``.
      shuffle: reshuffle every epoch (False: source order).
      num_epochs: stop after this many epochs (None: forever).
      drop_remainder: drop the last incomplete batch of each epoch. If False the last batch is padded to ``B``
        (repeating examples) and every batch carries a boolean ``"mask"`` (False on padding), so shapes never change.
      sharding: where global batches go; every leaf is placed with it (its leading axis is the batch).
      mesh, data_axis: shorthand for ``NamedSharding(mesh, PartitionSpec(data_axis))``.
      prefetch: batches kept ready by a background thread (0: none, batches are made on ``next``); also the number
        of batches each worker process prepares ahead.
      workers: grain DataLoader worker processes that read, decode and transform batches (0: in-process). Sources
        and ``transform`` must then be picklable; the batches do not depend on it.
      transform: optional host-side function applied to each process-local NumPy batch (e.g. augmentation), as a
        grain transform in the workers.
      process_index, process_count: override ``jax.process_index()/process_count()`` (tests, custom launchers).
    """

    def __init__(
        self,
        source: DataSource,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        sharding: jax.sharding.Sharding | None = None,
        mesh: jax.sharding.Mesh | None = None,
        data_axis: str | tuple[str, ...] = "data",
        prefetch: int = 2,
        workers: int = 0,
        transform: Callable[[Batch], Batch] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"`num_epochs` must be None or >= 1, got {num_epochs}")
        if prefetch < 0:
            raise ValueError(f"`prefetch` must be >= 0, got {prefetch}")
        if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 0:
            raise ValueError(f"`workers` must be an int >= 0, got {workers!r}")
        if sharding is not None and mesh is not None:
            raise ValueError("pass either `sharding` or `mesh`, not both")
        if mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec(data_axis))
        self.source = source
        self.tasks = tuple(getattr(source, "tasks", ()))
        self.num_examples = len(source)
        self.batch_size = int(batch_size)
        self.seed = check_seed(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.drop_remainder = bool(drop_remainder)
        self.sharding = sharding
        self.prefetch = int(prefetch)
        self.workers = int(workers)
        self.transform = transform
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if self.batch_size % self.process_count:
            raise ValueError(f"`batch_size`={batch_size} must be divisible by the process count {self.process_count}")
        # With one process owning every device a batch is placed with one `device_put`; otherwise each process hands
        # its rows to `make_array_from_process_local_data`.
        self._single_transfer = sharding is not None and sharding.is_fully_addressable
        if sharding is not None:
            try:
                sharding.shard_shape((self.batch_size,))
            except ValueError as e:  # jax's IndivisibleError
                raise ValueError(
                    f"`batch_size`={batch_size} does not split evenly over the batch axis of the sharding "
                    f"({sharding.num_devices} devices): {e}"
                ) from e
            self._rows = _local_rows(sharding, self.batch_size)
        else:
            local = self.batch_size // self.process_count
            self._rows = slice(self.process_index * local, (self.process_index + 1) * local)
        self._geometry = grain_loader.BatchGeometry(
            self.num_examples, self.batch_size, self.seed, self.shuffle, self.drop_remainder, self._rows
        )
        self.steps_per_epoch = self._geometry.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"`batch_size`={batch_size} exceeds the {self.num_examples} examples of the source with "
                "drop_remainder=True: no complete batch"
            )
        self._epoch, self._step = 0, 0
        self._loader: Any = None  # the grain DataLoader iterator, from the position it was built at
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    # ----------------------------------------------------------------------------------------------- position
    def get_state(self) -> dict[str, int]:
        """The position after the last batch handed out: ``{"epoch": e, "step": s}`` (JSON-serialisable)."""
        return {"epoch": self._epoch, "step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position from :meth:`get_state`; the next batch is the one that followed it originally."""
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"`state` must be a mapping with int 'epoch' and 'step', got {state!r}") from e
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"`state`={state!r} out of range (steps_per_epoch={self.steps_per_epoch})")
        self._shutdown()
        self._epoch, self._step = epoch, step

    # ----------------------------------------------------------------------------------------------- batches
    def _normalise(self, epoch: int, step: int) -> tuple[int, int]:
        if step >= self.steps_per_epoch:
            return epoch + 1, 0
        return epoch, step

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Source indices of global batch ``step`` of ``epoch`` (padded cyclically when incomplete)."""
        return self._geometry.global_indices(epoch, step)

    def _place(self, batch: Batch) -> dict[str, Any]:
        """A process-local NumPy batch -> global arrays with the sharding (unchanged without one)."""
        if self.sharding is None:
            return batch
        if self._single_transfer:  # one process holds the whole batch: a single pytree transfer
            return jax.device_put(batch, self.sharding)
        return jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(self.sharding, v, (self.batch_size, *v.shape[1:])), batch
        )

    def _open_loader(self, epoch: int, step: int) -> Any:
        epoch, step = self._normalise(epoch, step)
        loader = grain_loader.make_data_loader(
            self.source,
            self._geometry,
            start=epoch * self.steps_per_epoch + step,
            num_epochs=self.num_epochs,
            workers=self.workers,
            worker_buffer_size=max(1, self.prefetch),
            transform=self.transform,
        )
        return iter(loader)

    def _next_item(self, loader: Any) -> tuple[int, int, dict[str, Any]]:
        """``(epoch, step + 1, placed batch)`` of the loader's next batch; StopIteration at the end."""
        batch = grain_loader.unwrap(next(loader))
        epoch, step = divmod(int(batch.pop(grain_loader.POSITION_KEY)), self.steps_per_epoch)
        return epoch, step + 1, self._place(batch)

    def _produce(self, loader: Any, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = self._next_item(loader)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            return
        except StopIteration:
            item = _DONE
        except BaseException as err:  # handed to the consumer
            item = err
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None
        if self._loader is not None:
            grain_loader.close_loader_iterator(self._loader)
        self._loader = None

    def __next__(self) -> dict[str, Any]:
        if self._loader is None:
            self._loader = self._open_loader(self._epoch, self._step)
        if self.prefetch == 0:
            self._epoch, self._step, batch = self._next_item(self._loader)
            return batch
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
            self._thread = threading.Thread(
                target=self._produce,
                args=(self._loader, self._queue, self._stop),
                name="corrjax-prefetch",
                daemon=True,
            )
            self._thread.start()
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        self._epoch, self._step, batch = item
        return batch

    def __iter__(self) -> BatchIterator:
        return self

    def close(self) -> None:
        """Stops the prefetch thread and the loader's worker processes (the position is kept; iterating again
        restarts them)."""
        self._shutdown()

    def __del__(self) -> None:
        # No `contextlib.suppress` here: at interpreter exit module globals may already be None.
        try:  # noqa: SIM105
            self._shutdown()
        except Exception:
            pass
