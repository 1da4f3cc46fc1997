"""census-income (KDD) and Ali-CCP loaders on the small synthetic fixture files of tests/data/fixtures (same formats
as the published files): features and labels against an independent parse, splits, vocabularies, the cache, and
fail-fast errors for missing files."""

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from corrjax.data import DatasetNotPreparedError, check_feature_batch, load
from corrjax.data.tabular import (
    ALI_CCP_FIELDS,
    ALI_CCP_MULTI_HOT,
    CENSUS_CATEGORICAL,
    CENSUS_COLUMNS,
    CENSUS_NUMERIC,
    COLLEGE_OR_ABOVE,
    ali_ccp,
    census_income,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CENSUS = FIXTURES / "census_income"


def _census_rows(name):
    with (CENSUS / name).open() as f:
        return [dict(zip(CENSUS_COLUMNS, (v.strip() for v in r), strict=True)) for r in csv.reader(f) if r]


def test_census_income_features_labels_and_splits():
    train_rows, test_rows = _census_rows("census-income.data"), _census_rows("census-income.test")
    train = load("census_income", "train", data_dir=str(CENSUS))
    assert len(train) == 40 and [t.name for t in train.tasks] == ["income", "never_married"]
    assert [f.name for f in train.features] == list(CENSUS_NUMERIC) + list(CENSUS_CATEGORICAL)
    assert len(CENSUS_NUMERIC) == 7 and len(CENSUS_CATEGORICAL) == 31  # education, marital stat: labels, not inputs
    assert train.user_feature is None
    x = train.arrays["x"]
    check_feature_batch(train.features, x)
    np.testing.assert_array_equal(train.arrays["income"], [r["income"] == "50000+." for r in train_rows])
    np.testing.assert_array_equal(
        train.arrays["never_married"], [r["marital_stat"] == "Never married" for r in train_rows]
    )
    age = np.asarray([float(r["age"]) for r in train_rows])
    np.testing.assert_allclose(x["age"], (age - age.mean()) / age.std(), rtol=1e-5)
    for c in ("sex", "state_of_previous_residence", "year"):
        values = sorted({r[c] for r in train_rows})
        np.testing.assert_array_equal(x[c], [values.index(r[c]) + 1 for r in train_rows])
        assert {f.name: f for f in train.features}[c].vocab_size == len(values) + 1

    val = census_income("val", data_dir=CENSUS, task_pair="education_marital")
    test = census_income("test", data_dir=CENSUS, task_pair="education_marital")
    assert [t.name for t in test.tasks] == ["education", "never_married"] and len(val) + len(test) == 20
    # val and test partition the test file: every row (all its features) appears once in one of them
    key = lambda ds, i: tuple(float(v[i]) for v in ds.arrays["x"].values())
    want_edu = sorted(float(r["education"] in COLLEGE_OR_ABOVE) for r in test_rows)
    got_edu = sorted([*val.arrays["education"], *test.arrays["education"]])
    assert got_edu == want_edu and 0 < sum(want_edu) < 20
    rows = [key(val, i) for i in range(len(val))] + [key(test, i) for i in range(len(test))]
    assert len(set(rows)) == 20 and len(val) == 10
    # a value the training file lacks gets id 0; the statistics of the numeric columns are the training file's
    unseen = sum(r["country_of_birth_self"] not in {t["country_of_birth_self"] for t in train_rows} for r in test_rows)
    got_zero = sum(int((ds.arrays["x"]["country_of_birth_self"] == 0).sum()) for ds in (val, test))
    assert got_zero == unseen > 0
    test_age = np.sort([float(r["age"]) for r in test_rows])
    got_age = np.sort(np.concatenate([val.arrays["x"]["age"], test.arrays["x"]["age"]]) * age.std() + age.mean())
    np.testing.assert_allclose(got_age, test_age, rtol=1e-5, atol=1e-4)
    other = census_income("val", data_dir=CENSUS, split_seed=1)
    assert len(other) == 10 and not np.array_equal(other.arrays["x"]["age"], val.arrays["x"]["age"])


def test_census_income_fails_fast(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as e:
        census_income("train", data_dir=tmp_path)
    msg = str(e.value)
    assert "census-income.data" in msg and "archive.ics.uci.edu" in msg and str(tmp_path) in msg and "data_dir" in msg
    with pytest.raises(ValueError, match="data_dir"):
        census_income("train")
    with pytest.raises(ValueError, match="task_pair"):
        census_income("train", data_dir=CENSUS, task_pair="income")
    with pytest.raises(ValueError, match="split"):
        census_income("dev", data_dir=CENSUS)
    (tmp_path / "census-income.data").write_text("1, 2, 3\n")
    (tmp_path / "census-income.test").write_text("1, 2, 3\n")
    with pytest.raises(ValueError, match="42 comma-separated columns"):
        census_income("train", data_dir=tmp_path)


def _ali_reference(split):
    """Independent parse: per sample the click/conversion labels and {field: [feature ids]}."""
    common = {}
    for line in (FIXTURES / "ali_ccp" / f"common_features_{split}.csv").read_text().splitlines():
        k, _, feats = line.split(",", 2)
        common[k] = feats
    out = []
    for line in (FIXTURES / "ali_ccp" / f"sample_skeleton_{split}.csv").read_text().splitlines():
        _, click, conv, k, _, feats = line.split(",", 5)
        fields = {}
        for entry in (common[k] + "\x01" + feats).split("\x01"):
            f, rest = entry.split("\x02")
            fields.setdefault(f, []).append(int(rest.split("\x03")[0]))
        out.append((float(click), float(conv), fields))
    return out


@pytest.fixture
def ali_dir(tmp_path):
    shutil.copytree(FIXTURES / "ali_ccp", tmp_path / "ali_ccp")
    return tmp_path / "ali_ccp"


def test_ali_ccp_features_labels_vocab_and_cache(ali_dir):
    ref_train, ref_test = _ali_reference("train"), _ali_reference("test")
    train = load("ali_ccp", "train", data_dir=str(ali_dir), val_fraction=0.0, max_len=8)
    assert len(train) == 48 and [t.name for t in train.tasks] == ["click", "conversion"]
    assert train.user_feature == "f101" and [f.name for f in train.features] == [f"f{f}" for f in ALI_CCP_FIELDS]
    check_feature_batch(train.features, train.arrays["x"])
    np.testing.assert_array_equal(train.arrays["click"], [r[0] for r in ref_train])
    np.testing.assert_array_equal(train.arrays["conversion"], [r[1] for r in ref_train])
    assert np.all(train.arrays["conversion"] <= train.arrays["click"])
    x = train.arrays["x"]
    vocab = {f: sorted({v for r in ref_train for v in r[2].get(f, [])}) for f in ALI_CCP_FIELDS}
    specs = {f.name: f for f in train.features}
    for f in ALI_CCP_FIELDS:
        assert specs[f"f{f}"].vocab_size == len(vocab[f]) + 1
        for i, (_, _, fields) in enumerate(ref_train):
            ids = [vocab[f].index(v) + 1 for v in fields.get(f, [])]
            if f in ALI_CCP_MULTI_HOT:
                assert specs[f"f{f}"].kind == "multi_hot"
                row = x[f"f{f}"][i]
                np.testing.assert_array_equal(row, (ids[:8] + [-1] * 8)[:8])
            else:
                assert x[f"f{f}"][i] == (ids[0] if ids else 0)
    assert max(len(r[2].get("210", [])) for r in ref_train) > 8  # the fixture exercises truncation
    assert len(list((ali_dir / ".corrjax_cache").glob("*.npz"))) == 1

    test = ali_ccp("test", data_dir=ali_dir, max_len=8)
    np.testing.assert_array_equal(test.arrays["click"], [r[0] for r in ref_test])
    for f in ("205", "101"):  # ids unseen in training map to 0
        unseen = [i for i, r in enumerate(ref_test) if r[2].get(f) and r[2][f][0] not in vocab[f]]
        assert unseen and np.all(test.arrays["x"][f"f{f}"][unseen] == 0)
    # the cache is reused; cache=False writes none; another min_count writes a second one
    again = ali_ccp("test", data_dir=ali_dir, max_len=8)
    np.testing.assert_array_equal(again.arrays["x"]["f853"], test.arrays["x"]["f853"])
    short = ali_ccp("train", data_dir=ali_dir, max_len=2, max_samples=10, val_fraction=0.0, cache=False)
    assert len(short) == 10 and short.arrays["x"]["f210"].shape == (10, 2)
    assert len(list((ali_dir / ".corrjax_cache").glob("*.npz"))) == 1
    rare = ali_ccp("train", data_dir=ali_dir, min_count=9, val_fraction=0.0)
    for f in ("205", "101", "853"):
        counts = Counter(v for r in ref_train for v in r[2].get(f, []))
        kept = sorted(v for v, c in counts.items() if c >= 9)
        assert {s.name: s for s in rare.features}[f"f{f}"].vocab_size == len(kept) + 1
    assert {s.name: s for s in rare.features}["f205"].vocab_size < specs["f205"].vocab_size
    assert len(list((ali_dir / ".corrjax_cache").glob("*.npz"))) == 2
    val, rest = (ali_ccp(s, data_dir=ali_dir, val_fraction=0.25) for s in ("val", "train"))
    assert len(val) + len(rest) == 48 and 0 < len(val) < 48


def test_ali_ccp_fails_fast(tmp_path):
    (tmp_path / "sample_skeleton_train.csv").write_text("")
    with pytest.raises(DatasetNotPreparedError) as e:
        ali_ccp("train", data_dir=tmp_path)
    msg = str(e.value)
    assert "common_features_test.csv" in msg and "tianchi.aliyun.com" in msg and "data_dir" in msg
    with pytest.raises(ValueError, match="max_len"):
        ali_ccp("train", data_dir=tmp_path, max_len=0)
    with pytest.raises(ValueError, match="val_fraction"):
        ali_ccp("train", data_dir=tmp_path, val_fraction=1.0)
