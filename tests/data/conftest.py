"""Fixtures of the data tests: TFDS mocked records (``tfds.testing.mock_data``) behind fake prepared directories."""

import json
from unittest import mock

import pytest

from corrjax.data.tfds_sources import VERSIONS


def _getitems(record_keys, generator, serialized=False):
    # tfds 4.9.10's mock installs `__getitems__` as a plain attribute, so it is called without `self`; this
    # replacement takes the same arguments minus `self` and returns the same fake records as `__getitem__`.
    assert not serialized
    return [generator[k] for k in record_keys]


@pytest.fixture
def mocked(tmp_path):
    """Fake prepared directories (so the presence check passes) and TFDS mocked with random records."""
    tfds = pytest.importorskip("tensorflow_datasets")
    mocking = pytest.importorskip("tensorflow_datasets.testing.mocking")
    for name, version in VERSIONS.items():
        d = tmp_path / name / version
        d.mkdir(parents=True)
        (d / "dataset_info.json").write_text(json.dumps({"name": name, "fileFormat": "array_record"}))
    with (
        mock.patch.object(mocking, "_getitems", _getitems),
        tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE),
    ):
        yield tmp_path
