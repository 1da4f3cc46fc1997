"""TFDS-backed multi-task datasets, read without TensorFlow: ``tfds.data_source`` (array_record) + our iterator.

- :func:`multimnist`: MultiMNIST (Sabour et al., 2017; Sener & Koltun, 2018) composed on the fly from TFDS
  ``mnist``: two 28x28 digits on a 36x36 canvas, tasks ``left`` and ``right``.
- :func:`celeba`: TFDS ``celeb_a``, the 40 binary attributes as 40 tasks, images centre-cropped and area-resized.
- :func:`cifar10`: TFDS ``cifar10`` with tasks ``label`` (10 classes) and ``animal`` (binary).

Splits are ``train``, ``val`` and ``test`` (:func:`open_split`, for any TFDS dataset): ``val`` is the dataset's own
validation split where it has one (CelebA's ``validation``), else a held-out part of its train split: a seeded
permutation (``split_seed``) of the train records cut at ``val_fraction`` (default 0.1), ``val`` taking the first
part and ``train`` the rest, so the two are disjoint and the same for every run seed.

Reading needs the prepared dataset under ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
Its presence (in array_record, the random-access format ``tfds.data_source`` needs: ``tfds build --file_format=
array_record``) is checked on the file system before TFDS is touched, so a missing dataset fails at once with
:class:`DatasetNotPreparedError` saying how to prepare it; no download is ever attempted (``download=False``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corrjax.data.iterator import check_seed
from corrjax.data.multidigits import compose
from corrjax.data.source import Batch, RecordDataset, _check_indices
from corrjax.data.spec import TaskSpec, check_tasks

logger = logging.getLogger(__name__)

# Default TFDS versions of the datasets read here (tensorflow-datasets 4.9.x); pass `version=` to read another.
VERSIONS: dict[str, str] = {"mnist": "3.0.1", "cifar10": "3.0.2", "celeb_a": "2.1.0"}
# Our split names (validation held out from train where the TFDS dataset has none: open_split).
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# The TFDS splits of the datasets read here, for when the prepared dataset_info.json does not list them.
KNOWN_SPLITS: dict[str, tuple[str, ...]] = {
    "mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "celeb_a": ("train", "validation", "test"),
}
DEFAULT_VAL_FRACTION = 0.1
CELEBA_FILES = (
    "img_align_celeba.zip",
    "list_eval_partition.txt",
    "list_attr_celeba.txt",
    "list_landmarks_align_celeba.txt",
    "identity_CelebA.txt",
)
CIFAR10_ANIMALS = (2, 3, 4, 5, 6, 7)  # bird, cat, deer, dog, frog, horse
# File formats tfds.data_source can read (random access). `tfds build` writes tfrecord unless given --file_format.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


class DatasetNotPreparedError(FileNotFoundError):
    """The prepared TFDS dataset is not in ``data_dir``; the message says how to prepare it."""


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (TFDS's own default)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))


def _file_formats(info_path: Path) -> list[str]:
    """The record formats a prepared dataset holds, from its ``dataset_info.json`` (TFDS writes ``fileFormat`` and
    ``alternativeFileFormats``; no ``fileFormat`` means tfrecord, TFDS's default). Unreadable JSON: unknown, []."""
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(info, dict):
        return []
    return [info.get("fileFormat") or "tfrecord", *info.get("alternativeFileFormats", [])]


def check_prepared(name: str, data_dir: str | os.PathLike | None = None, version: str | None = None) -> Path:
    """Returns ``<data_dir>/<name>/<version>`` if it holds a prepared dataset in a format ``tfds.data_source`` reads
    (array_record or parquet), else raises DatasetNotPreparedError saying how to prepare it.

    Only the file system is consulted (milliseconds): TFDS is not imported and nothing is downloaded.
    """
    root = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    version = version or VERSIONS.get(name)
    if version is None:
        raise ValueError(f"unknown TFDS dataset {name!r}: pass `version=` explicitly")
    path = root / name / version
    build = [
        "    pip install 'corrjax[tfds-prepare]'   # tensorflow-cpu, needed only to build",
        f"    tfds build {name} --data_dir {root} --file_format=array_record",
    ]
    if (path / "dataset_info.json").is_file():
        formats = _file_formats(path / "dataset_info.json")
        if not formats or any(f in RANDOM_ACCESS_FORMATS for f in formats):
            return path  # unknown formats: let TFDS decide
        raise DatasetNotPreparedError(
            "\n".join(
                [
                    f"TFDS dataset {name!r} version {version} in {path} is prepared as {', '.join(formats)}, which "
                    f"tfds.data_source cannot read (it needs one of {', '.join(RANDOM_ACCESS_FORMATS)}). Rebuild it "
                    "(after moving the old version away) with:",
                    *build,
                ]
            )
        )
    found = sorted(p.name for p in (root / name).iterdir() if p.is_dir()) if (root / name).is_dir() else []
    lines = [
        f"TFDS dataset {name!r} version {version} is not prepared: {path / 'dataset_info.json'} does not exist"
        + (f" (found versions: {', '.join(found)})." if found else "."),
        "corrjax reads TFDS data without TensorFlow and never downloads it. Prepare it once with:",
        *build,
        "or point `data_dir` (or $TFDS_DATA_DIR) at the directory where it is prepared.",
    ]
    if name == "celeb_a":
        lines.insert(
            -1,
            "CelebA's Google-Drive files are quota-limited, so download them by hand from "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html first: put "
            f"{', '.join(CELEBA_FILES)} into {root / 'downloads' / 'manual'} (TFDS's default manual_dir; "
            "tfds build picks them up from there).",
        )
    raise DatasetNotPreparedError("\n".join(lines))


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None, version: str | None = None) -> Any:
    """``tfds.data_source(name, split=...)`` after :func:`check_prepared`; never downloads."""
    path = check_prepared(name, data_dir, version)
    import tensorflow_datasets as tfds  # imported only once the data is known to be there

    return tfds.data_source(f"{name}:{path.name}", split=split, data_dir=str(path.parent.parent), download=False)


class Subset:
    """The records ``indices`` of a random-access record source (``len``, ``[i]``, ``__getitems__``); other
    attributes (``dataset_info``) are the source's."""

    def __init__(self, records: Any, indices: np.ndarray) -> None:
        self.records, self.indices = records, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> Any:
        return self.records[int(self.indices[index])]

    def __getitems__(self, keys: Sequence[int]) -> list[Any]:
        mapped = [int(self.indices[k]) for k in keys]
        getitems = getattr(self.records, "__getitems__", None)
        return list(getitems(mapped)) if getitems is not None else [self.records[k] for k in mapped]

    def __getattr__(self, name: str) -> Any:
        if name in ("records", "indices"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.records, name)


def tfds_splits(name: str, path: Path) -> tuple[str, ...]:
    """The splits of prepared dataset ``path`` from its ``dataset_info.json`` (``splits[].name``), else
    :data:`KNOWN_SPLITS`, else ``("train", "test")``."""
    try:
        info = json.loads((path / "dataset_info.json").read_text())
        listed = tuple(str(s["name"]) for s in info.get("splits", []))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        listed = ()
    return listed or KNOWN_SPLITS.get(name, ("train", "test"))


def holdout_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` sorted indices into ``n`` train records: a permutation seeded by ``split_seed`` cut at
    ``round(val_fraction * n)`` (at least 1) validation records. Raises ``ValueError`` naming ``val_fraction`` outside
    (0, 1) or leaving no training record."""
    if isinstance(val_fraction, bool) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"`val_fraction`={val_fraction} must be in (0, 1)")
    n_val = max(1, round(float(val_fraction) * n))
    if n_val >= n:
        raise ValueError(f"`val_fraction`={val_fraction} of {n} train records leaves none to train on")
    perm = np.random.default_rng([check_seed(split_seed, "split_seed"), 0x7A11]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def open_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    version: str | None = None,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> Any:
    """Our ``split`` (``train``, ``val`` or ``test``) of TFDS dataset ``name`` as a random-access record source.

    ``test`` is the TFDS ``test`` split. Where the dataset has a ``validation`` split (its ``dataset_info.json``, or
    :data:`KNOWN_SPLITS`), ``val`` is it and ``train`` is TFDS ``train``; otherwise ``val`` and ``train`` are the
    two parts of TFDS ``train`` cut by :func:`holdout_indices` (``val_fraction``, ``split_seed``), as
    :class:`Subset` views. ``val_fraction`` is ignored for datasets with their own validation split."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown `split`={split!r}; expected one of {', '.join(map(repr, SPLIT_NAMES))}")
    if isinstance(val_fraction, bool) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"`val_fraction`={val_fraction} must be in (0, 1)")
    path = check_prepared(name, data_dir, version)
    if split == "test":
        return open_source(name, "test", data_dir, version)
    if "validation" in tfds_splits(name, path):
        return open_source(name, "train" if split == "train" else "validation", data_dir, version)
    records = open_source(name, "train", data_dir, version)
    train, val = holdout_indices(len(records), val_fraction, split_seed)
    return Subset(records, train if split == "train" else val)


@functools.lru_cache(maxsize=16)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of area (box) resampling: each output pixel averages the input span it covers."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j), 0.0, None)
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Area-resizes ``image (H, W, C)`` to ``(size, size, C)`` float32 (the same units as the input)."""
    h, w = image.shape[:2]
    rows = np.tensordot(_area_matrix(h, size), image.astype(np.float32), axes=(1, 0))  # (size, W, C)
    return np.tensordot(rows, _area_matrix(w, size), axes=(1, 1)).transpose(0, 2, 1)  # (size, size, C)


# ---------------------------------------------------------------------------------------------------- multimnist
class MultiMNISTDataset:
    """MultiMNIST pairs of records of an MNIST source, composed per batch (see :func:`multimnist`)."""

    CANVAS = 36
    MAX_SHIFT = 4

    def __init__(self, records: Any, pairs: np.ndarray, offsets: np.ndarray, *, name: str, num_threads: int = 4):
        self.tasks = (TaskSpec("left", "classification", 10), TaskSpec("right", "classification", 10))
        self.reader = RecordDataset(records, self.tasks, lambda r: r, name=name, num_threads=num_threads)
        self.pairs, self.offsets, self.name = pairs, offsets, name

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    def __getitem__(self, index: int) -> Batch:
        return {k: v[0] for k, v in self.get_batch(np.array([index])).items()}

    def read_batch(self, indices: np.ndarray) -> dict[str, Any]:
        """The MNIST records a batch needs (each once) and how the batch's pairs index them."""
        idx = _check_indices(indices, len(self))
        needed, inverse = np.unique(self.pairs[idx].ravel(), return_inverse=True)
        return {"records": self.reader.read_records(needed), "inverse": inverse.reshape(-1, 2), "indices": idx}

    def decode_batch(self, raw: dict[str, Any]) -> Batch:
        """Composes the canvases of a :meth:`read_batch` output."""
        records, inv = raw["records"], raw["inverse"]
        images = np.stack([np.asarray(r["image"])[..., 0] for r in records]).astype(np.float32) / 255.0
        labels = np.asarray([int(r["label"]) for r in records], np.int32)
        x = compose(images[inv[:, 0]], images[inv[:, 1]], self.offsets[raw["indices"]], self.CANVAS)[..., None]
        return {"x": x, "left": labels[inv[:, 0]], "right": labels[inv[:, 1]]}

    def get_batch(self, indices: np.ndarray) -> Batch:
        return self.decode_batch(self.read_batch(indices))


def multimnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    num_threads: int = 4,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> MultiMNISTDataset:
    """MultiMNIST from TFDS ``mnist``: ``x`` float32 ``(n, 36, 36, 1)`` in [0, 1], tasks ``left`` and ``right``.

    Each example overlays two MNIST digits of the same split (train and val: the two parts of MNIST train held out
    by :func:`open_split` with ``val_fraction`` and ``split_seed``; test: MNIST test; so splits share no source
    image), the left one shifted 0..4 px from the top-left
    corner, the right one from the bottom-right; overlaps take the maximum. Sener & Koltun then resize to 28x28;
    we keep the 36x36 canvas. Pairs and offsets are fixed by ``seed``; ``num_examples`` defaults to the size of
    the source split; ``seed`` is an int in ``[0, 2**31)``.
    """
    seed = check_seed(seed)
    records = open_split("mnist", split, data_dir, val_fraction=val_fraction, split_seed=split_seed)
    m = len(records)
    n = m if num_examples is None else int(num_examples)
    if n < 1 or m < 1:
        raise ValueError(f"`num_examples` must be positive and the source non-empty, got {n} and {m}")
    rng = np.random.default_rng([seed, SPLIT_NAMES.index(split)])
    pairs = rng.integers(0, m, size=(n, 2))
    offsets = rng.integers(0, MultiMNISTDataset.MAX_SHIFT + 1, size=(n, 4))
    return MultiMNISTDataset(records, pairs, offsets, name=f"multimnist/{split}", num_threads=num_threads)


# ---------------------------------------------------------------------------------------------------- celeba
def celeba(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 64,
    attributes: Sequence[str] | None = None,
    num_threads: int = 4,
) -> RecordDataset:
    """CelebA from TFDS ``celeb_a``: ``x`` float32 ``(n, s, s, 3)`` in [0, 1]; one binary task per attribute.

    Images (218x178, aligned) are centre-cropped to 178x178 and area-resized to ``image_size``. ``attributes``
    selects tasks by TFDS attribute name (default: all 40, in TFDS order); labels are float32 0/1. ``val`` is
    CelebA's own validation split.
    """
    records = open_split("celeb_a", split, data_dir)
    names = list(records.dataset_info.features["attributes"].keys())
    chosen = list(names if attributes is None else attributes)
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ValueError(f"unknown `attributes` {unknown}; CelebA has {names}")
    tasks = check_tasks([TaskSpec(a, "binary", 1) for a in chosen])
    convert = functools.partial(celeba_example, image_size=image_size, attributes=tuple(chosen))
    return RecordDataset(records, tasks, convert, name=f"celeba/{split}", num_threads=num_threads)


def celeba_example(record: dict[str, Any], *, image_size: int, attributes: Sequence[str]) -> Batch:
    """One CelebA record -> ``{"x": (s, s, 3) float32 in [0, 1], attribute: float32 0/1}``: the image centre-cropped
    to a square and area-resized to ``image_size`` (a module-level function, so sources pickle to worker processes)."""
    img = np.asarray(record["image"])
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = area_resize(img[top : top + s, left : left + s], image_size) / 255.0
    return {"x": x, **{a: np.float32(record["attributes"][a]) for a in attributes}}


# ---------------------------------------------------------------------------------------------------- cifar10
def cifar10(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    num_threads: int = 4,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> RecordDataset:
    """CIFAR-10 from TFDS ``cifar10``: ``x`` float32 ``(n, 32, 32, 3)`` in [0, 1].

    Tasks: ``label`` (the 10 classes) and ``animal`` (binary: bird, cat, deer, dog, frog or horse), a coarse task
    that is correlated with ``label`` by construction. ``val`` is ``val_fraction`` of the TFDS train split, held out
    by a permutation seeded with ``split_seed`` (:func:`open_split`); ``train`` is the rest.
    """
    records = open_split("cifar10", split, data_dir, val_fraction=val_fraction, split_seed=split_seed)
    tasks = (TaskSpec("label", "classification", 10), TaskSpec("animal", "binary", 1))
    return RecordDataset(records, tasks, _cifar10_example, name=f"cifar10/{split}", num_threads=num_threads)


def _cifar10_example(record: dict[str, Any]) -> Batch:
    label = int(record["label"])
    animal = np.float32(label in CIFAR10_ANIMALS)
    return {"x": np.asarray(record["image"], np.float32) / 255.0, "label": np.int32(label), "animal": animal}
