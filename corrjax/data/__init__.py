"""corrjax.data: built-in offline datasets, TFDS-backed datasets and the sharded batch iterator.

Every dataset is a random-access source with ``tasks: tuple[TaskSpec, ...]``; batches are dicts
``{"x": float32 array, task_name: labels}``. Tabular datasets also expose ``features: tuple[FeatureSpec, ...]`` and
their ``"x"`` is a dict ``{feature name: array}`` (see :mod:`corrjax.data.features`).
:class:`BatchIterator` turns any source into seeded, resumable, per-process-sharded global
batches. ``load(name, split, **kwargs)`` builds a dataset by name.
"""

from corrjax.data.features import FeatureSpec, check_feature_batch, check_features
from corrjax.data.funnel import funnel
from corrjax.data.iterator import BatchIterator, epoch_order
from corrjax.data.multidigits import multidigits
from corrjax.data.registry import DATASETS, load
from corrjax.data.source import ArrayDataset, DataSource, RecordDataset, TabularDataset
from corrjax.data.spec import TaskSpec
from corrjax.data.synthetic import synthetic
from corrjax.data.tabular import ali_ccp, census_income
from corrjax.data.tfds_sources import DatasetNotPreparedError, celeba, cifar10, default_data_dir, multimnist

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "BatchIterator",
    "DataSource",
    "DatasetNotPreparedError",
    "FeatureSpec",
    "RecordDataset",
    "TabularDataset",
    "TaskSpec",
    "ali_ccp",
    "celeba",
    "census_income",
    "check_feature_batch",
    "check_features",
    "cifar10",
    "default_data_dir",
    "epoch_order",
    "funnel",
    "load",
    "multidigits",
    "multimnist",
    "synthetic",
]
