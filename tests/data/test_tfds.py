"""TFDS-backed sources through tfds.testing.mock_data (no TensorFlow, no files), and the fast missing-data error."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from corrjax.data import BatchIterator
from corrjax.data.multidigits import compose
from corrjax.data.tfds_sources import (
    VERSIONS,
    DatasetNotPreparedError,
    area_resize,
    celeba,
    check_prepared,
    cifar10,
    multimnist,
)


def test_multimnist_from_mocked_mnist(mocked):
    ds = multimnist("train", data_dir=mocked, num_examples=40, seed=1)
    assert len(ds) == 40 and [t.name for t in ds.tasks] == ["left", "right"]
    idx = np.array([3, 0, 39, 3, 17])
    batch = ds.get_batch(idx)
    assert batch["x"].shape == (5, 36, 36, 1) and batch["x"].dtype == np.float32
    for j, i in enumerate(idx):  # brute force from the raw source records
        left, right = (ds.reader.records[int(k)] for k in ds.pairs[i])
        assert batch["left"][j] == int(left["label"]) and batch["right"][j] == int(right["label"])
        ref = compose(
            left["image"][None, ..., 0] / 255.0, right["image"][None, ..., 0] / 255.0, ds.offsets[i : i + 1], 36
        )[0]
        np.testing.assert_allclose(batch["x"][j, ..., 0], ref, rtol=1e-6)
    one = ds[17]
    np.testing.assert_array_equal(one["x"], batch["x"][4])
    again = multimnist("train", data_dir=mocked, num_examples=40, seed=1)
    np.testing.assert_array_equal(again.pairs, ds.pairs)
    it = BatchIterator(ds, 8, seed=0, num_epochs=1)
    assert sum(1 for _ in it) == 5


def test_multimnist_bad_seed_names_it(mocked):
    with pytest.raises(ValueError, match=r"`seed`.*\[0, 2\*\*31\)"):
        multimnist("train", data_dir=mocked, num_examples=4, seed=-3)


def test_celeba_and_cifar10_from_mocked_records(mocked):
    ds = celeba("val", data_dir=mocked, image_size=16)
    assert len(ds.tasks) == 40 and all(t.kind == "binary" for t in ds.tasks)
    b = ds.get_batch(np.arange(20))  # large enough to use the reader threads
    assert b["x"].shape == (20, 16, 16, 3) and b["x"].dtype == np.float32
    assert b["x"].min() >= 0.0 and b["x"].max() <= 1.0
    rec = ds.records[5]
    for a in ("Male", "Smiling", "5_o_Clock_Shadow"):
        assert b[a][5] == float(rec["attributes"][a])
    sub = celeba("test", data_dir=mocked, attributes=["Smiling", "Male"])
    assert [t.name for t in sub.tasks] == ["Smiling", "Male"] and sub[0]["x"].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="attributes"):
        celeba("train", data_dir=mocked, attributes=["Wings"])

    c = cifar10("test", data_dir=mocked)
    b = c.get_batch(np.arange(24))
    assert b["x"].shape == (24, 32, 32, 3)
    labels = np.array([int(c.records[i]["label"]) for i in range(24)])
    np.testing.assert_array_equal(b["label"], labels)
    np.testing.assert_array_equal(b["animal"], np.isin(labels, [2, 3, 4, 5, 6, 7]).astype(np.float32))
    with pytest.raises(ValueError, match="split"):
        cifar10("dev", data_dir=mocked)


@pytest.mark.parametrize("fn,name", [(multimnist, "mnist"), (celeba, "celeb_a"), (cifar10, "cifar10")])
def test_missing_data_fails_fast_and_says_how_to_prepare(tmp_path, fn, name):
    t0 = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError) as err:
        fn("train", data_dir=tmp_path)
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    assert str(tmp_path / name / VERSIONS[name]) in msg
    assert "pip install 'corrjax[tfds-prepare]'" in msg
    # tfds.data_source reads only random-access files; `tfds build` writes tfrecord unless told otherwise.
    assert f"tfds build {name} --data_dir {tmp_path} --file_format=array_record" in msg
    if name == "celeb_a":
        assert str(tmp_path / "downloads" / "manual") in msg and "img_align_celeba.zip" in msg
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("info", [{"name": "mnist"}, {"name": "mnist", "fileFormat": "tfrecord"}])
def test_tfrecord_only_data_fails_fast_and_says_how_to_rebuild(tmp_path, info):
    """A dataset prepared by a plain `tfds build` (tfrecord, TFDS's default; also what an absent fileFormat means)
    cannot be read by tfds.data_source: refused before TFDS is touched, with the command that writes array_record."""
    d = tmp_path / "mnist" / VERSIONS["mnist"]
    d.mkdir(parents=True)
    (d / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetNotPreparedError) as err:
        multimnist("train", data_dir=tmp_path)
    msg = str(err.value)
    assert "tfrecord" in msg and f"tfds build mnist --data_dir {tmp_path} --file_format=array_record" in msg
    for fmt, alternatives in [("array_record", []), ("tfrecord", ["array_record"]), ("parquet", [])]:
        (d / "dataset_info.json").write_text(
            json.dumps({"name": "mnist", "fileFormat": fmt, "alternativeFileFormats": alternatives})
        )
        assert check_prepared("mnist", tmp_path) == d


def test_check_prepared_reports_other_versions(tmp_path):
    (tmp_path / "mnist" / "1.0.0").mkdir(parents=True)
    with pytest.raises(DatasetNotPreparedError, match=r"found versions: 1\.0\.0"):
        check_prepared("mnist", tmp_path)


def test_area_resize_against_block_mean():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(12, 12, 3)).astype(np.uint8)
    ref = img.astype(np.float64).reshape(4, 3, 4, 3, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(area_resize(img, 4), ref, rtol=1e-5)
    np.testing.assert_allclose(area_resize(img, 12), img, rtol=1e-6)
    const = np.full((218, 178, 3), 7, np.uint8)
    np.testing.assert_allclose(area_resize(const, 64), 7.0, rtol=1e-5)


@pytest.mark.parametrize("fn,kw", [(cifar10, {}), (multimnist, {"num_examples": 8})])
def test_validation_is_held_out_from_train_seeded_and_disjoint(mocked, fn, kw):
    """MNIST and CIFAR-10 have no validation split: val is a seeded part of TFDS train, disjoint from our train."""
    from corrjax.data.tfds_sources import Subset

    records = lambda ds: ds.reader.records if hasattr(ds, "reader") else ds.records
    train, val = (records(fn(s, data_dir=mocked, val_fraction=0.25, split_seed=3, **kw)) for s in ("train", "val"))
    assert isinstance(train, Subset) and isinstance(val, Subset) and train.records is not None
    assert len(val) == 6 and len(train) == 18  # 25 % of the 24 mocked train records
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(24))
    again = records(fn("val", data_dir=mocked, val_fraction=0.25, split_seed=3, **kw))
    other = records(fn("val", data_dir=mocked, val_fraction=0.25, split_seed=4, **kw))
    np.testing.assert_array_equal(again.indices, val.indices)
    assert not np.array_equal(other.indices, val.indices)
    assert int(val[0]["label"]) == int(train.records[int(val.indices[0])]["label"])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=rf"`val_fraction`={bad} must be in \(0, 1\)"):
            fn("val", data_dir=mocked, val_fraction=bad, **kw)


def test_a_source_with_its_own_validation_split_uses_it(mocked):
    """CelebA's val is its validation split; any TFDS dataset whose dataset_info.json lists a validation split too."""
    from corrjax.data.tfds_sources import Subset, open_split

    assert not isinstance(celeba("val", data_dir=mocked).records, Subset)
    info = mocked / "mnist" / VERSIONS["mnist"] / "dataset_info.json"
    assert isinstance(open_split("mnist", "val", mocked), Subset)
    splits = [{"name": n} for n in ("train", "validation", "test")]
    info.write_text(json.dumps({"name": "mnist", "fileFormat": "array_record", "splits": splits}))
    val, train = open_split("mnist", "val", mocked), open_split("mnist", "train", mocked)
    assert not isinstance(val, Subset) and not isinstance(train, Subset) and len(val) == len(train) == 24
