"""Random-access data sources: the one protocol every corrjax dataset follows.

A source has ``tasks: tuple[TaskSpec, ...]``, ``len(source)``, ``source[i] -> {"x": ..., task: label}`` (the grain
``RandomAccessDataSource`` protocol, so any source also feeds ``grain.MapDataset.source``) and
``source.get_batch(indices) -> {"x": (b, ...), task: (b, ...)}``, which the batch iterator uses to gather a whole
batch at once. ``"x"`` may be a pytree of arrays sharing the leading example axis, such as a tabular dataset's
``{feature name: array}`` (:mod:`corrjax.data.features`). Sources whose examples need decoding split ``get_batch``
into ``read_batch(indices) -> raw`` (I/O) and ``decode_batch(raw) -> batch`` (decoding, cropping, resizing), which
the batch iterator's grain DataLoader runs as its data source and as a grain transform, in worker processes
(:mod:`corrjax.data.loader`); such sources pickle.
:class:`ArrayDataset` holds arrays in host memory (built-in datasets); :class:`RecordDataset` wraps a record source
such as ``tfds.data_source`` and converts each record with a function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from corrjax.data.spec import TaskSpec, check_tasks

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@runtime_checkable
class DataSource(Protocol):
    """What the batch iterator needs from a dataset."""

    tasks: tuple[TaskSpec, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Batch: ...

    def get_batch(self, indices: np.ndarray) -> Batch: ...


def _path_name(path: tuple) -> str:
    """``x/age`` for the pytree path ``['x']['age']``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_indices(indices: Any, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"`indices` must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"`indices` out of range for a source of length {n}")
    return idx


class ArrayDataset:
    """A dataset held as NumPy arrays with a shared leading example axis.

    Args:
      arrays: ``{"x": (n, ...), task_name: (n, ...)}``; every task in ``tasks`` must have an entry. Any entry may be
        a pytree (a dict ``{feature name: (n, ...)}`` for ``"x"`` of a tabular dataset) whose leaves share ``n``.
      tasks: the task specs, in model-output order.
      name: a label for logs and benchmarks.
      info: extra metadata (generator parameters, source indices, ...), not part of batches.
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        tasks: Sequence[TaskSpec],
        *,
        name: str = "arrays",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks = check_tasks(tasks)
        if "x" not in arrays:
            raise ValueError(f"`arrays` needs an 'x' entry, got keys {sorted(arrays)}")
        missing = [t.name for t in self.tasks if t.name not in arrays]
        if missing:
            raise ValueError(f"`arrays` lacks labels for tasks {missing}; keys are {sorted(arrays)}")
        self.arrays = {k: jax.tree.map(np.asarray, v) for k, v in arrays.items()}
        leaves = jax.tree_util.tree_leaves_with_path(self.arrays)
        lengths = {_path_name(p): v.shape[0] if v.ndim else None for p, v in leaves}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"all `arrays` must share the leading example axis, got lengths {lengths}")
        self._length = int(next(iter(lengths.values())))
        self.name = name
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Batch:
        return jax.tree.map(lambda v: v[index], self.arrays)

    def get_batch(self, indices: np.ndarray) -> Batch:
        idx = _check_indices(indices, len(self))
        return jax.tree.map(lambda v: np.take(v, idx, axis=0), self.arrays)

    def __repr__(self) -> str:
        leaves = jax.tree_util.tree_leaves_with_path(self.arrays)
        shapes = ", ".join(f"{_path_name(p)}: {v.shape} {v.dtype}" for p, v in leaves)
        return f"ArrayDataset({self.name!r}, n={len(self)}, {shapes})"


class TabularDataset(ArrayDataset):
    """An :class:`ArrayDataset` of tabular inputs: ``arrays["x"]`` is ``{feature name: (n, ...)}`` following
    ``features`` (checked with :func:`corrjax.data.features.check_feature_batch`).

    Args:
      arrays, tasks, name, info: as for :class:`ArrayDataset`.
      features: the :class:`~corrjax.data.FeatureSpec` of every input column (``.features``).
      user_feature: the name of a categorical feature holding user ids (``.user_feature``); evaluation then
        reports each binary task's GAUC (per-user AUC, :func:`corrjax.stats.gauc`). None: no user ids.
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        tasks: Sequence[TaskSpec],
        features: Sequence[Any],
        *,
        user_feature: str | None = None,
        name: str = "tabular",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        from corrjax.data.features import check_feature_batch, check_features

        super().__init__(arrays, tasks, name=name, info=info)
        self.features = check_features(features)
        check_feature_batch(self.features, self.arrays["x"], name='arrays["x"]')
        if user_feature is not None:
            spec = {f.name: f for f in self.features}.get(user_feature)
            if spec is None or spec.kind != "categorical":
                raise ValueError(f"`user_feature`={user_feature!r} must name a categorical feature")
        self.user_feature = user_feature


class RecordDataset:
    """A dataset over a random-access record source (e.g. ``tfds.data_source``), converted per record.

    Args:
      records: any object with ``len()`` and ``[i]`` (and optionally ``__getitems__``), yielding raw records.
      tasks: the task specs.
      convert: maps one raw record to ``{"x": ..., task_name: label}`` (NumPy values).
      name: a label for logs and benchmarks.
      num_threads: threads used to read the records of one batch (array_record reads release the GIL).

    ``get_batch(indices)`` is ``decode_batch(read_batch(indices))``: the raw records, then each converted and the
    results stacked. The thread pool is not pickled (a worker process starts its own).
    """

    def __init__(
        self,
        records: Any,
        tasks: Sequence[TaskSpec],
        convert: Callable[[Any], Batch],
        *,
        name: str = "records",
        num_threads: int = 4,
    ) -> None:
        self.records = records
        self.tasks = check_tasks(tasks)
        self.convert = convert
        self.name = name
        self.num_threads = int(num_threads)
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Batch:
        return self.convert(self.records[int(index)])

    def _read(self, idx: np.ndarray) -> list[Any]:
        getitems = getattr(self.records, "__getitems__", None)
        if getitems is not None:
            return list(getitems([int(i) for i in idx]))
        return [self.records[int(i)] for i in idx]

    def read_records(self, indices: np.ndarray) -> list[Any]:
        """The raw records at ``indices``, read in ``num_threads`` parallel chunks for large requests."""
        idx = _check_indices(indices, len(self))
        if self.num_threads > 1 and idx.size >= 4 * self.num_threads:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix=f"corrjax-{self.name}")
            chunks = np.array_split(idx, self.num_threads)
            return [r for part in self._pool.map(self._read, chunks) for r in part]
        return self._read(idx)

    def read_batch(self, indices: np.ndarray) -> list[Any]:
        """The raw records of a batch (:meth:`read_records`)."""
        return self.read_records(indices)

    def decode_batch(self, records: Sequence[Any]) -> Batch:
        """Converts raw records with ``convert`` and stacks them into a batch."""
        examples = [self.convert(r) for r in records]
        return jax.tree.map(lambda *vs: np.stack(vs), *examples) if examples else {}

    def get_batch(self, indices: np.ndarray) -> Batch:
        return self.decode_batch(self.read_batch(indices))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}

    def __repr__(self) -> str:
        return f"RecordDataset({self.name!r}, n={len(self)}, tasks={[t.name for t in self.tasks]})"
