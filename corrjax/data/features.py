"""Feature specifications of tabular datasets: categorical, numeric and multi-hot input columns.

A tabular dataset exposes ``features: tuple[FeatureSpec, ...]`` besides ``tasks``, and its batches carry the inputs
as a dict keyed by feature name instead of one dense array::

    batch["x"] = {feature.name: array}
      categorical -> int32 (n,)          ids in [0, vocab_size)
      numeric     -> float32 (n,)        when dim == 1, else (n, dim)
      multi_hot   -> int32 (n, max_len)  ids in [0, vocab_size), padded with -1

Task labels are as for every dataset (``batch[task.name]``, see :class:`corrjax.data.TaskSpec`). The batch iterator,
the sources and the sharding helpers treat ``batch["x"]`` as a pytree, so each array is split over the mesh's data
axis along its leading (example) axis. Models build their embedding tables from the same tuple of specs, so the two
agree on names, vocabularies and shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

FeatureKind = Literal["categorical", "numeric", "multi_hot"]
FEATURE_KINDS: tuple[str, ...] = ("categorical", "numeric", "multi_hot")
# Padding id of multi-hot features.
PAD_ID = -1


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | np.integer)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One input column of a tabular dataset.

    Attributes:
      name: the feature's key in ``batch["x"]``.
      kind: ``"categorical"`` (one id per example, int32 ``(n,)``), ``"numeric"`` (float32 ``(n,)`` when
        ``dim == 1``, else ``(n, dim)``) or ``"multi_hot"`` (a bag of ids, int32 ``(n, max_len)`` padded with -1).
      vocab_size: number of distinct ids (categorical and multi-hot; ids lie in ``[0, vocab_size)``).
      dim: width of a numeric feature (1 for a scalar column).
      max_len: the padded length of a multi-hot feature's id bags.
    """

    name: str
    kind: FeatureKind
    vocab_size: int | None = None
    dim: int = 1
    max_len: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"`name` must be a non-empty str, got {self.name!r}")
        if self.kind not in FEATURE_KINDS:
            raise ValueError(
                f"feature {self.name!r}: unknown `kind`={self.kind!r}; expected one of "
                f"{', '.join(map(repr, FEATURE_KINDS))}"
            )
        if self.kind in ("categorical", "multi_hot") and (not _is_int(self.vocab_size) or self.vocab_size < 1):
            raise ValueError(
                f"{self.kind} feature {self.name!r} needs `vocab_size` an int >= 1, got {self.vocab_size!r}"
            )
        if not _is_int(self.dim) or self.dim < 1:
            raise ValueError(f"feature {self.name!r} needs `dim` an int >= 1, got {self.dim!r}")
        if self.kind == "multi_hot" and (not _is_int(self.max_len) or self.max_len < 1):
            raise ValueError(f"multi_hot feature {self.name!r} needs `max_len` an int >= 1, got {self.max_len!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-example shape of the feature's array: ``()``, ``(dim,)`` or ``(max_len,)``."""
        if self.kind == "multi_hot":
            return (self.max_len,)
        if self.kind == "numeric" and self.dim > 1:
            return (self.dim,)
        return ()

    @property
    def dtype(self) -> np.dtype:
        """``float32`` for numeric features, ``int32`` for id features."""
        return np.dtype(np.float32 if self.kind == "numeric" else np.int32)


def check_features(features: Sequence[FeatureSpec], name: str = "features") -> tuple[FeatureSpec, ...]:
    """Returns ``features`` as a tuple after checking it is a non-empty sequence of uniquely named FeatureSpecs."""
    if isinstance(features, FeatureSpec | str | Mapping):
        raise TypeError(f"`{name}` must be a sequence of FeatureSpec, got {type(features).__name__}")
    features = tuple(features)
    if not features:
        raise ValueError(f"`{name}` must contain at least one FeatureSpec")
    for f in features:
        if not isinstance(f, FeatureSpec):
            raise TypeError(f"`{name}` must contain FeatureSpec instances, got {type(f).__name__}")
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        raise ValueError(f"`{name}` has duplicate feature names: {names}")
    return features


def check_feature_batch(features: Sequence[FeatureSpec], x: Mapping[str, Any], name: str = "x") -> None:
    """Checks that ``x`` (host arrays) follows the batch contract of ``features``: one entry per feature with the
    right dtype kind, per-example shape and id range; raises ``ValueError`` naming the feature otherwise."""
    features = check_features(features)
    if not isinstance(x, Mapping):
        raise TypeError(f"`{name}` must be a dict {{feature name: array}}, got {type(x).__name__}")
    expected = {f.name for f in features}
    if set(x) != expected:
        raise ValueError(f"`{name}` keys {sorted(x)} differ from the features {sorted(expected)}")
    n = None
    for f in features:
        v = np.asarray(x[f.name])
        if v.ndim < 1 or v.shape[1:] != f.shape:
            raise ValueError(f"`{name}[{f.name!r}]` must have shape (n, *{f.shape}), got {v.shape}")
        if n is not None and v.shape[0] != n:
            raise ValueError(f"`{name}[{f.name!r}]` has {v.shape[0]} rows, other features {n}")
        n = v.shape[0]
        if f.kind == "numeric":
            if not np.issubdtype(v.dtype, np.floating):
                raise ValueError(f"numeric `{name}[{f.name!r}]` must be floating, got {v.dtype}")
            continue
        if not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{f.kind} `{name}[{f.name!r}]` must hold integer ids, got {v.dtype}")
        low = PAD_ID if f.kind == "multi_hot" else 0
        if v.size and (v.min() < low or v.max() >= f.vocab_size):
            raise ValueError(
                f"`{name}[{f.name!r}]` ids must lie in [{low}, {f.vocab_size}), got [{v.min()}, {v.max()}]"
            )
