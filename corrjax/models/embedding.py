"""Embedding inputs for tabular data: categorical, multi-hot and numeric features to one dense vector.

Tabular datasets (``corrjax.data.FeatureSpec``) give ``batch["x"]`` as a dict ``{feature name: array}``.
:class:`EmbeddingInput` maps it to ``(n, out_features)``: one ``nnx.Embed`` table per categorical or multi-hot feature
(a multi-hot bag is pooled, mean or sum, over its ids, the ``-1`` padding ignored), numeric features passed through,
everything concatenated in the order of the specs. :class:`EmbeddedModel` puts it in front of any multi-task model
(HPS, MMoE, CGC, PLE, ESMM): the tables are shared by every expert, gate and task (the embedding-and-MLP layout of
recommendation models, e.g. MMoE at YouTube, PLE at Tencent, ESMM at Alibaba).

Sharding: the training codebase runs data parallel (batches split over the mesh's data axis, parameters
replicated), and so do the tables by default. ``row_axis`` is the hook for sharding the rows of the tables over a
model axis: the tables' ``nnx.Param``s then carry the sharding metadata ``(row_axis, None)``
(``nnx.get_partition_spec`` reads it), so a setup with a model mesh axis places each table's rows there and GSPMD
turns the lookups into sharded gathers. Nothing in this module depends on the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from corrjax.data.features import FeatureSpec, check_features
from corrjax.models.base import MultiTaskModel

POOLINGS: tuple[str, ...] = ("mean", "sum")


class EmbeddingInput(nnx.Module):
    """Tabular features ``{name: array}`` -> ``(n, out_features)``.

    Args:
      features: the dataset's feature specs (``dataset.features``).
      embed_dim: width of every embedding table, or ``{feature name: width}`` (features not named get
        ``default_dim``).
      pooling: how a multi-hot bag of ids becomes one vector: ``"mean"`` (of the non-padding ids) or ``"sum"``.
        An empty bag (all ``-1``) gives zeros either way.
      default_dim: the width of the tables ``embed_dim`` (a mapping) does not name.
      row_axis: a mesh axis name to annotate the tables' rows with (sharding metadata ``(row_axis, None)``);
        ``None`` (default) leaves them unannotated, replicated under the training codebase's data parallelism.
      rngs: the table initialisers' randomness (``nnx.Embed``'s default init, ``N(0, 1 / embed_dim)``).

    Per feature, in the order of ``features``: categorical ``(n,)`` ids -> ``(n, embed_dim)``; multi-hot
    ``(n, max_len)`` ids padded with -1 -> pooled ``(n, embed_dim)``; numeric ``(n,)`` or ``(n, dim)`` -> ``(n, dim)``
    float32. Negative ids (padding, or a missing categorical value) look up nothing: they contribute zeros and
    receive no gradient. ``out_features`` is the sum of the widths.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        embed_dim: int | Mapping[str, int] = 8,
        *,
        pooling: str = "mean",
        default_dim: int = 8,
        row_axis: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.features = check_features(features)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown `pooling`={pooling!r}; expected one of {POOLINGS}")
        names = {f.name for f in self.features}
        if isinstance(embed_dim, Mapping):
            unknown = sorted(set(embed_dim) - names)
            if unknown:
                raise ValueError(f"`embed_dim` names unknown features {unknown}; features are {sorted(names)}")
            dims = {f.name: int(embed_dim.get(f.name, default_dim)) for f in self.features}
        else:
            dims = {f.name: int(embed_dim) for f in self.features}
        bad = {k: v for k, v in dims.items() if v < 1}
        if bad:
            raise ValueError(f"`embed_dim` must be >= 1, got {bad}")
        metadata = {} if row_axis is None else {"out_sharding": (row_axis, None), "eager_sharding": False}
        tables = {}
        widths = []
        for f in self.features:
            if f.kind == "numeric":
                widths.append(f.dim)
                continue
            tables[f.name] = nnx.Embed(f.vocab_size, dims[f.name], rngs=rngs, embedding_metadata=metadata)
            widths.append(dims[f.name])
        self.tables = nnx.Dict(tables)
        self.pooling = pooling
        self.row_axis = row_axis
        self.widths = tuple(widths)
        self.out_features = int(sum(widths))

    def _lookup(self, name: str, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(vectors (..., d), valid (...))``: embeddings of ``ids``, zero where an id is negative."""
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"feature {name!r} holds ids and must be an integer array, got {ids.dtype}")
        valid = ids >= 0
        vectors = self.tables[name](jnp.where(valid, ids, 0).astype(jnp.int32))
        return vectors * valid[..., None].astype(vectors.dtype), valid

    def embed(self, x: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{feature name: (n, width)}``: each feature's part of the output, before concatenation."""
        if not isinstance(x, Mapping):
            raise TypeError(f"EmbeddingInput expects x as a dict {{feature name: array}}, got {type(x).__name__}")
        missing = [f.name for f in self.features if f.name not in x]
        if missing:
            raise ValueError(f"x lacks features {missing}; it has {sorted(x)}")
        out = {}
        for f in self.features:
            v = x[f.name]
            if f.kind == "numeric":
                v = jnp.asarray(v, jnp.float32)
                out[f.name] = v.reshape(v.shape[0], f.dim)
            elif f.kind == "categorical":
                out[f.name] = self._lookup(f.name, v.reshape(v.shape[0]))[0]
            else:
                vectors, valid = self._lookup(f.name, v.reshape(v.shape[0], f.max_len))
                pooled = vectors.sum(axis=1)
                if self.pooling == "mean":
                    count = valid.sum(axis=1, keepdims=True).astype(pooled.dtype)
                    pooled = pooled / jnp.maximum(count, 1.0)
                out[f.name] = pooled
        return out

    def __call__(self, x: Mapping[str, jax.Array]) -> jax.Array:
        parts = self.embed(x)
        return jnp.concatenate([parts[f.name] for f in self.features], axis=1)


class EmbeddedModel(MultiTaskModel):
    """A multi-task model with an :class:`EmbeddingInput` in front: ``model(x) = inner(input(x))``.

    The tables are shared parameters (every task's loss reaches them); the inner model's task-specific parameters
    stay task-specific. ``features(x) = inner.features(input(x))`` is the inner model's shared representation (what
    regularisers and CKA diagnostics see), and ``from_features(z, x)`` embeds ``x`` again for the parts that read
    the input (MMoE/CGC/PLE gates): under ``jit`` XLA computes the lookups once, and the gradient reaches the
    tables through both paths.

    Args:
      input: the embedding front, e.g. ``EmbeddingInput(dataset.features, 8, rngs=rngs)``.
      inner: a multi-task model whose input width is ``input.out_features`` (built for it).
    """

    def __init__(self, input: EmbeddingInput, inner: MultiTaskModel) -> None:
        if not isinstance(inner, MultiTaskModel):
            raise TypeError(f"`inner` must be a MultiTaskModel, got {type(inner).__name__}")
        self._init_tasks(inner.tasks)
        self.input = input
        self.inner = inner
        self.reported_outputs = tuple(getattr(inner, "reported_outputs", ()))

    def is_task_specific(self, path: tuple[str | int, ...]) -> bool:
        return bool(path) and path[0] == "inner" and self.inner.is_task_specific(tuple(path[1:]))

    def features(self, x: Mapping[str, jax.Array]) -> Any:
        return self.inner.features(self.input(x))

    def from_features(self, z: Any, x: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return self.inner.from_features(z, self.input(x))

    def __call__(self, x: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        e = self.input(x)
        return self.inner.from_features(self.inner.features(e), e)

    @property
    def gate_weights(self):
        """The inner model's ``gate_weights`` on the embedded input (MMoE/CGC/PLE); AttributeError otherwise."""
        if not hasattr(self.inner, "gate_weights"):
            raise AttributeError(f"{type(self.inner).__name__} has no gate_weights")
        return lambda x: self.inner.gate_weights(self.input(x))
