"""Public tabular multi-task benchmarks read from files the user has downloaded: UCI census-income (KDD) and Ali-CCP.

Both loaders return a :class:`~corrjax.data.TabularDataset` with ``features: tuple[FeatureSpec, ...]`` and batches
``{"x": {feature name: array}, task: float32 0/1}`` (:mod:`corrjax.data.features`). Nothing is ever downloaded: the
files must be in ``data_dir`` (the ``data_dir`` key of ``configs/data/census_income.yaml`` / ``ali_ccp.yaml``), and a
missing file raises :class:`~corrjax.data.DatasetNotPreparedError` at once, saying where to get it and where to put it.

**census-income (KDD)** (UCI, Lane & Kohavi; https://archive.ics.uci.edu/dataset/117/census+income+kdd):
``census-income.data`` (199,523 rows) and ``census-income.test`` (99,762 rows), 42 comma-separated columns: 40
attributes (7 continuous, 33 nominal, per ``census-income.names``), the instance weight (ignored, as the names file
asks) and the income label (``- 50000.`` / `` 50000+.``). The setup is that of MMoE (Ma et al., "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018, Section 5.2): train on
``census-income.data``; the test file is split at random 1:1 into validation and test (a permutation seeded by
``split_seed``); education and marital status are removed from the inputs because they are labels in one of the two
task pairs (``task_pair``):

- ``"income_marital"``: ``income`` (income > $50K) and ``never_married`` (marital status "Never married");
- ``"education_marital"``: ``education`` (education at least college: any of :data:`COLLEGE_OR_ABOVE`, the CPS
  attainment levels from "Some college but no degree" upwards) and ``never_married``.

Inputs (the common preprocessing of the public MMoE reproductions): the 7 continuous columns as numeric features,
standardised with the training file's mean and standard deviation; the other 31 nominal columns as categorical
features with ids from the training file's values in sorted order, id 0 kept for values that the training file lacks.

**Ali-CCP** (Alibaba Click and Conversion Prediction; Ma et al., "Entire Space Multi-Task Model", SIGIR 2018;
https://tianchi.aliyun.com/dataset/408): for each split (``train``/``test``) a ``sample_skeleton_<split>.csv`` with
lines ``sample_id,click,conversion,common_feature_index,num_features,feature_list`` and a
``common_features_<split>.csv`` with lines ``common_feature_index,num_features,feature_list``, where a feature list
is ``field\\x02feature_id\\x03value`` entries joined by ``\\x01``. User fields come from the common features (joined
on the index), item, context and combination fields from the skeleton. Each field of :data:`ALI_CCP_FIELDS` becomes a
feature ``f<field>``: categorical (its single feature id; 0 when absent) or, for the multi-valued fields of
:data:`ALI_CCP_MULTI_HOT`, multi-hot with up to ``max_len`` ids. Ids are renumbered per field from the training
split's ids seen at least ``min_count`` times (sorted), 0 being kept for the others. Tasks: ``click`` and
``conversion`` (a conversion implies a click: ESMM's pCTCVR target over all impressions); the user id field is
``f101`` (:attr:`user_feature`, for GAUC). ``val`` is a seeded ``val_fraction`` of the training file's rows
(``train`` is the rest). Parsing the full files takes minutes, so the parsed arrays are cached next to them
(``cache=True``) in ``.corrjax_cache/``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corrjax.data.features import FeatureSpec
from corrjax.data.iterator import check_seed
from corrjax.data.source import TabularDataset
from corrjax.data.spec import TaskSpec
from corrjax.data.tfds_sources import DatasetNotPreparedError

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ census-income
CENSUS_URL = "https://archive.ics.uci.edu/dataset/117/census+income+kdd"
CENSUS_FILES: dict[str, str] = {"train": "census-income.data", "test": "census-income.test"}
# The 42 columns of census-income.data/.test, in file order (names from census-income.names, snake_case).
CENSUS_COLUMNS: tuple[str, ...] = (
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income",
)
# The continuous attributes of census-income.names (the instance weight aside).
CENSUS_NUMERIC: tuple[str, ...] = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
)
CENSUS_IGNORED: tuple[str, ...] = ("instance_weight", "income", "education", "marital_stat")
CENSUS_CATEGORICAL: tuple[str, ...] = tuple(
    c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC and c not in CENSUS_IGNORED
)
# Education at least college: the CPS attainment levels from "Some college but no degree" upwards.
COLLEGE_OR_ABOVE: frozenset[str] = frozenset(
    {
        "Some college but no degree",
        "Associates degree-occup /vocational",
        "Associates degree-academic program",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Doctorate degree(PhD EdD)",
    }
)
CENSUS_TASK_PAIRS: dict[str, tuple[str, str]] = {
    "income_marital": ("income", "never_married"),
    "education_marital": ("education", "never_married"),
}
CENSUS_SPLITS = ("train", "val", "test")


def _missing(name: str, data_dir: Path, files: Sequence[str], url: str, key: str) -> DatasetNotPreparedError:
    absent = [f for f in files if not (data_dir / f).is_file()]
    return DatasetNotPreparedError(
        f"{name}: {', '.join(absent)} not found in {data_dir}. corrjax never downloads it: get the files from {url} "
        f"(uncompress them), put {', '.join(files)} into that directory, or point `{key}` (the data config's "
        "`data_dir`) at the directory that holds them."
    )


def _check_files(name: str, data_dir: Any, files: Sequence[str], url: str, key: str) -> Path:
    if data_dir is None:
        raise ValueError(f"`data_dir` must name the directory holding {', '.join(files)} ({name}, from {url})")
    root = Path(data_dir).expanduser()
    if not all((root / f).is_file() for f in files):
        raise _missing(name, root, files, url, key)
    return root


def _read_census(path: Path) -> list[list[str]]:
    rows = []
    with path.open(newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(CENSUS_COLUMNS):
                raise ValueError(
                    f"{path}:{i + 1}: expected {len(CENSUS_COLUMNS)} comma-separated columns, got {len(row)}"
                )
            rows.append([v.strip() for v in row])
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def census_income(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    task_pair: str = "income_marital",
    split_seed: int = 0,
) -> TabularDataset:
    """UCI census-income (KDD) with one of the MMoE paper's task pairs (see the module docstring).

    Args:
      split: ``"train"`` (census-income.data), ``"val"`` or ``"test"`` (the halves of census-income.test).
      data_dir: the directory holding ``census-income.data`` and ``census-income.test``.
      task_pair: ``"income_marital"`` or ``"education_marital"``.
      split_seed: seed of the permutation that splits the test file into validation and test halves.

    Returns:
      A :class:`TabularDataset` with ``features`` (7 numeric + 31 categorical), ``tasks`` (two binary) and ``info``.
    """
    if split not in CENSUS_SPLITS:
        raise ValueError(f"unknown `split`={split!r}; expected one of {', '.join(map(repr, CENSUS_SPLITS))}")
    if task_pair not in CENSUS_TASK_PAIRS:
        raise ValueError(
            f"unknown `task_pair`={task_pair!r}; expected one of {', '.join(map(repr, CENSUS_TASK_PAIRS))}"
        )
    split_seed = check_seed(split_seed, "split_seed")
    root = _check_files("census-income (KDD)", data_dir, list(CENSUS_FILES.values()), CENSUS_URL, "data.data_dir")
    train_rows = _read_census(root / CENSUS_FILES["train"])
    col = {c: i for i, c in enumerate(CENSUS_COLUMNS)}
    if split == "train":
        rows = train_rows
    else:
        test_rows = _read_census(root / CENSUS_FILES["test"])
        order = np.random.default_rng([split_seed, 0xCE]).permutation(len(test_rows))
        half = len(test_rows) // 2
        chosen = order[:half] if split == "val" else order[half:]
        rows = [test_rows[i] for i in np.sort(chosen)]

    def numeric(rs: list[list[str]], c: str) -> np.ndarray:
        return np.asarray([float(r[col[c]]) for r in rs], np.float64)

    x: dict[str, np.ndarray] = {}
    features: list[FeatureSpec] = []
    for c in CENSUS_NUMERIC:
        ref = numeric(train_rows, c)
        mean, std = ref.mean(), ref.std()
        x[c] = ((numeric(rows, c) - mean) / (std if std > 0 else 1.0)).astype(np.float32)
        features.append(FeatureSpec(c, "numeric"))
    for c in CENSUS_CATEGORICAL:
        vocab = {v: i + 1 for i, v in enumerate(sorted({r[col[c]] for r in train_rows}))}
        x[c] = np.asarray([vocab.get(r[col[c]], 0) for r in rows], np.int32)
        features.append(FeatureSpec(c, "categorical", vocab_size=len(vocab) + 1))
    labels = {
        "income": np.asarray([r[col["income"]].startswith("50000+") for r in rows], np.float32),
        "never_married": np.asarray([r[col["marital_stat"]] == "Never married" for r in rows], np.float32),
        "education": np.asarray([r[col["education"]] in COLLEGE_OR_ABOVE for r in rows], np.float32),
    }
    names = CENSUS_TASK_PAIRS[task_pair]
    tasks = [TaskSpec(t, "binary", 1) for t in names]
    return TabularDataset(
        {"x": x, **{t: labels[t] for t in names}},
        tasks,
        features,
        name=f"census_income/{task_pair}/{split}",
        info={"positive_rate": {t: float(labels[t].mean()) for t in names}, "task_pair": task_pair},
    )


# ------------------------------------------------------------------------------------------------------ Ali-CCP
ALI_CCP_URL = "https://tianchi.aliyun.com/dataset/408"
# Feature fields of Ali-CCP (ESMM paper, Table / data description): user fields (common features), then item,
# context and combination fields (sample skeleton).
ALI_CCP_FIELDS: tuple[str, ...] = (
    "101",
    "109_14",
    "110_14",
    "127_14",
    "150_14",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "205",
    "206",
    "207",
    "210",
    "216",
    "508",
    "509",
    "702",
    "853",
    "301",
)
# Fields that hold several ids per sample (users' category/shop/brand/intention histories, item intentions, ...).
ALI_CCP_MULTI_HOT: tuple[str, ...] = ("109_14", "110_14", "127_14", "150_14", "210", "853")
ALI_CCP_SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1


def _ali_files(split: str) -> list[str]:
    return [f"sample_skeleton_{split}.csv", f"common_features_{split}.csv"]


def _parse_features(text: str) -> Iterator[tuple[str, int]]:
    for entry in text.split("\x01"):
        if not entry:
            continue
        field, rest = entry.split("\x02", 1)
        yield field, int(rest.split("\x03", 1)[0])


def _read_ali_ccp(root: Path, split: str, max_samples: int | None) -> dict[str, Any]:
    """Raw ids per field (lists), click and conversion labels of one file pair."""
    skeleton, common_file = (root / f for f in _ali_files(split))
    samples: list[tuple[int, int, str, str]] = []
    needed: set[str] = set()
    with skeleton.open(newline="") as f:
        for i, line in enumerate(f):
            if max_samples is not None and len(samples) >= max_samples:
                break
            parts = line.rstrip("\r\n").split(",", 5)
            if len(parts) != 6:
                raise ValueError(f"{skeleton}:{i + 1}: expected 6 comma-separated columns, got {len(parts)}")
            _, click, conversion, index, _, feats = parts
            samples.append((int(click), int(conversion), index, feats))
            needed.add(index)
    common: dict[str, str] = {}
    with common_file.open(newline="") as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\r\n").split(",", 2)
            if len(parts) != 3:
                raise ValueError(f"{common_file}:{i + 1}: expected 3 comma-separated columns, got {len(parts)}")
            if parts[0] in needed:
                common[parts[0]] = parts[2]
    ids: dict[str, list[list[int]]] = {fld: [] for fld in ALI_CCP_FIELDS}
    known = set(ALI_CCP_FIELDS)
    for _, _, index, feats in samples:
        row: dict[str, list[int]] = {fld: [] for fld in ALI_CCP_FIELDS}
        for fld, fid in _parse_features(common.get(index, "")):
            if fld in known:
                row[fld].append(fid)
        for fld, fid in _parse_features(feats):
            if fld in known:
                row[fld].append(fid)
        for fld in ALI_CCP_FIELDS:
            ids[fld].append(row[fld])
    missing_common = len(needed - common.keys())
    if missing_common:
        logger.warning(
            "Ali-CCP %s: %d common_feature_index values have no line in %s", split, missing_common, common_file
        )
    return {
        "ids": ids,
        "click": np.asarray([s[0] for s in samples], np.float32),
        "conversion": np.asarray([s[1] for s in samples], np.float32),
    }


def _encode(raw: dict[str, Any], vocabs: dict[str, dict[int, int]], max_len: int) -> dict[str, np.ndarray]:
    x = {}
    for fld in ALI_CCP_FIELDS:
        vocab = vocabs[fld]
        if fld in ALI_CCP_MULTI_HOT:
            arr = np.full((len(raw["ids"][fld]), max_len), -1, np.int32)
            for i, row in enumerate(raw["ids"][fld]):
                ids = [vocab.get(v, 0) for v in row[:max_len]]
                arr[i, : len(ids)] = ids
        else:
            arr = np.asarray([vocab.get(row[0], 0) if row else 0 for row in raw["ids"][fld]], np.int32)
        x[f"f{fld}"] = arr
    return x


def ali_ccp(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    min_count: int = 1,
    max_len: int = 8,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    cache: bool = True,
) -> TabularDataset:
    """Ali-CCP in its published file format (see the module docstring).

    Args:
      split: ``"train"``, ``"val"`` (a seeded ``val_fraction`` of the training file's rows) or ``"test"``.
      data_dir: the directory holding ``sample_skeleton_{train,test}.csv`` and ``common_features_{train,test}.csv``.
      max_samples: read only the first ``max_samples`` rows of each skeleton file (None: all).
      min_count: training-split occurrences an id needs to get its own embedding row (rarer ids share id 0).
      max_len: ids kept per multi-hot feature (the first ``max_len``; padded with -1).
      val_fraction: share of the training file's rows held out as ``val``.
      split_seed: seed of that hold-out.
      cache: keep the parsed arrays in ``<data_dir>/.corrjax_cache/`` and reuse them.

    Returns:
      A :class:`TabularDataset` with ``features`` (``f<field>`` per field of :data:`ALI_CCP_FIELDS`), tasks
      ``click`` and ``conversion``, and ``user_feature = "f101"``.
    """
    if split not in ALI_CCP_SPLITS:
        raise ValueError(f"unknown `split`={split!r}; expected one of {', '.join(map(repr, ALI_CCP_SPLITS))}")
    for key, v in (("min_count", min_count), ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{key}` must be an int >= 1, got {v!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"`max_samples` must be None or an int >= 1, got {max_samples!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"`val_fraction` must lie in [0, 1), got {val_fraction!r}")
    split_seed = check_seed(split_seed, "split_seed")
    files = _ali_files("train") + _ali_files("test")
    root = _check_files("Ali-CCP", data_dir, files, ALI_CCP_URL, "data.data_dir")
    params = {"v": _CACHE_VERSION, "max_samples": max_samples, "min_count": min_count, "max_len": max_len}
    stamp = [(f, (root / f).stat().st_size, (root / f).stat().st_mtime_ns) for f in files]
    digest = hashlib.sha1(json.dumps([params, stamp]).encode()).hexdigest()[:16]
    cache_file = root / ".corrjax_cache" / f"ali_ccp_{digest}.npz"
    if cache and cache_file.is_file():
        with np.load(cache_file) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        logger.info("Ali-CCP: parsing %s (once; cached=%s)", root, cache)
        raw = {s: _read_ali_ccp(root, s, max_samples) for s in ("train", "test")}
        vocabs = {}
        for fld in ALI_CCP_FIELDS:
            counts = Counter(v for row in raw["train"]["ids"][fld] for v in row)
            kept = sorted(v for v, c in counts.items() if c >= min_count)
            vocabs[fld] = {v: i + 1 for i, v in enumerate(kept)}
        arrays = {}
        for s in ("train", "test"):
            for k, v in _encode(raw[s], vocabs, max_len).items():
                arrays[f"{s}/x/{k}"] = v
            arrays[f"{s}/click"], arrays[f"{s}/conversion"] = raw[s]["click"], raw[s]["conversion"]
        arrays["vocab_sizes"] = np.asarray([len(vocabs[f]) + 1 for f in ALI_CCP_FIELDS], np.int64)
        if cache:
            cache_file.parent.mkdir(exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache_file)
    source = "test" if split == "test" else "train"
    n = arrays[f"{source}/click"].shape[0]
    rows = np.arange(n)
    if source == "train":
        held = np.random.default_rng([split_seed, 0xA11]).random(n) < float(val_fraction)
        rows = rows[held] if split == "val" else rows[~held]
    x = {f"f{fld}": arrays[f"{source}/x/f{fld}"][rows] for fld in ALI_CCP_FIELDS}
    features = [
        FeatureSpec(f"f{fld}", "multi_hot", vocab_size=int(v), max_len=max_len)
        if fld in ALI_CCP_MULTI_HOT
        else FeatureSpec(f"f{fld}", "categorical", vocab_size=int(v))
        for fld, v in zip(ALI_CCP_FIELDS, arrays["vocab_sizes"], strict=True)
    ]
    labels = {t: arrays[f"{source}/{t}"][rows] for t in ("click", "conversion")}
    return TabularDataset(
        {"x": x, **labels},
        [TaskSpec("click", "binary", 1), TaskSpec("conversion", "binary", 1)],
        features,
        user_feature="f101",
        name=f"ali_ccp/{split}",
        info={"positive_rate": {t: float(v.mean()) if v.size else float("nan") for t, v in labels.items()}},
    )
