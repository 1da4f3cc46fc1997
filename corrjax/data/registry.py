"""Datasets by name, for configuration files: ``load("multidigits", "train", seed=0)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corrjax.data.funnel import funnel
from corrjax.data.multidigits import multidigits
from corrjax.data.synthetic import synthetic
from corrjax.data.tabular import ali_ccp, census_income
from corrjax.data.tfds_sources import celeba, cifar10, multimnist

DATASETS: dict[str, Callable[..., Any]] = {
    "synthetic": synthetic,
    "funnel": funnel,
    "multidigits": multidigits,
    "multimnist": multimnist,
    "celeba": celeba,
    "cifar10": cifar10,
    "census_income": census_income,
    "ali_ccp": ali_ccp,
}


def load(name: str, split: str = "train", **kwargs: Any) -> Any:
    """The ``split`` of dataset ``name`` (one of :data:`DATASETS`), built with ``kwargs``.

    Built-in datasets (``synthetic``, ``multidigits``) need nothing on disk; TFDS-backed ones take ``data_dir`` and
    raise :class:`~corrjax.data.tfds_sources.DatasetNotPreparedError` at once when it lacks the prepared data, as do
    the tabular benchmarks (``census_income``, ``ali_ccp``) when ``data_dir`` lacks the downloaded files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset `name`={name!r}; expected one of {', '.join(map(repr, DATASETS))}")
    return DATASETS[name](split, **kwargs)
