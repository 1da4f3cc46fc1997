"""corrjax.data: built-in offline datasets, TFDS-backed datasets and the sharded batch iterator.

Every dataset is a random-access source with ``tasks: tuple[TaskSpec, ...]``; batches are dicts
``{"x": float32 array, task_name: labels}``. :class:`BatchIterator` turns any source into seeded, resumable,
per-process-sharded global batches.
"""

from corrjax.data.iterator import BatchIterator, epoch_order
from corrjax.data.multidigits import multidigits
from corrjax.data.source import ArrayDataset, DataSource, RecordDataset
from corrjax.data.spec import TaskSpec
from corrjax.data.synthetic import synthetic

__all__ = [
    "ArrayDataset",
    "BatchIterator",
    "DataSource",
    "RecordDataset",
    "TaskSpec",
    "epoch_order",
    "multidigits",
    "synthetic",
]
