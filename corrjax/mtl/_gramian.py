"""Leaf-by-leaf reductions over task-stacked gradient pytrees.

A task-stacked pytree holds the rows of the task Jacobian ``J`` (shape ``(T, P)``) split over its leaves: every leaf
has shape ``(T, *param_shape)``. The Gramian ``G = J J^T`` and the combination ``w^T J`` are computed one leaf at a
time (a ``(T, p) x (p, T)`` matmul per leaf, summed), so the Jacobian is never concatenated into one ``(T, P)`` array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array


def num_tasks(task_grads: Any, name: str = "updates", *, floating: bool = False) -> int:
    """Returns ``T >= 1``, the common leading axis of every leaf, checking the pytree at trace time.

    Raises ``ValueError`` if there is no leaf, a leaf is a scalar, the leaves disagree on ``T`` or ``T = 0``, and
    ``TypeError`` if a leaf is complex, or (with ``floating=True``, as the aggregators ask) not real floating point
    (integer or boolean gradients), naming ``name`` and the leaves' shapes / dtypes.
    """
    leaves = jax.tree.leaves(task_grads)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; expected a task-stacked pytree (leading task axis T)")
    dtypes = [jnp.result_type(x) for x in leaves]

    def ok(dt: Any) -> bool:
        if floating:
            return bool(jnp.issubdtype(dt, jnp.floating))
        return not jnp.issubdtype(dt, jnp.complexfloating)

    if not all(ok(dt) for dt in dtypes):
        what = "real floating-point" if floating else "real"
        raise TypeError(f"every leaf of `{name}` must be a {what} array; got leaf dtypes {[str(d) for d in dtypes]}")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) >= 1 else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(jnp.shape(x)) for x in leaves]
        raise ValueError(f"every leaf of `{name}` must share a leading task axis T; got leaf shapes {shapes}")
    t = int(sizes.pop())
    if t == 0:
        shapes = [tuple(jnp.shape(x)) for x in leaves]
        raise ValueError(f"`{name}` has T = 0 tasks (leaf shapes {shapes}); at least one task gradient is needed")
    return t


def _gram_dtype(leaves: list[Array]) -> jnp.dtype:
    dtype = jnp.result_type(*[x.dtype for x in leaves])
    # bf16/f16 gradients are accumulated in float32; float64 stays float64.
    return jnp.promote_types(dtype, jnp.float32)


def _replicated(x: Array) -> NamedSharding | None:
    """A replicated sharding on ``x``'s mesh when ``x`` is sharded over a mesh (explicit or auto axes), else None.

    Contracting over a sharded parameter axis is ambiguous for explicit-sharding meshes; the ``(T, T)`` Gramian is
    small, so it is asked for replicated.
    """
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        return None
    return NamedSharding(mesh, PartitionSpec())


def gramian(task_grads: Any) -> Array:
    """Task Gramian ``G[s, t] = <g_s, g_t>`` of a task-stacked pytree, shape ``(T, T)``.

    Summed over leaves, each leaf contributing its contraction with itself over every non-task axis (no reshape, no
    concatenation). Accumulates in at least float32; replicated over the mesh for sharded leaves. Non-finite
    gradients give non-finite entries (they are not masked).
    """
    leaves = jax.tree.leaves(task_grads)
    t = num_tasks(task_grads)
    dtype = _gram_dtype(leaves)
    g = jnp.zeros((t, t), dtype)
    for leaf in leaves:
        x = leaf.astype(dtype)
        out_sharding = _replicated(x)
        if out_sharding is None:
            # (T, p) @ (p, T): XLA:CPU/GPU pick a GEMM directly; measured ~2x faster than contracting the
            # multi-axis leaf in place, which makes XLA materialise a transposed copy.
            mat = jnp.reshape(x, (t, -1))
            g = g + jnp.matmul(mat, mat.T, precision=jax.lax.Precision.HIGHEST)
        else:
            # Sharded leaves: contract every non-task axis in place (a reshape could merge a sharded axis) and ask
            # for a replicated result, which explicit-sharding meshes require for sharded contractions.
            axes = tuple(range(1, x.ndim))
            g = g + jax.lax.dot_general(
                x, x, ((axes, axes), ((), ())), precision=jax.lax.Precision.HIGHEST, out_sharding=out_sharding
            )
    return g


@dataclass(frozen=True, eq=False)
class TaskGramian:
    """A task Gramian computed once, tied to the task-stacked leaves it is the Gramian of.

    A training step that logs Gramian diagnostics (cosines, norms) computes ``TaskGramian.of(task_grads)`` once and
    passes it to the aggregator as the extra argument ``task_gramian=``: Gramian-weighting aggregators
    (:func:`corrjax.mtl.from_weighting`: MGDA, PCGrad, UPGrad, CAGrad, ...) then reuse ``value`` instead of computing
    ``J J^T`` again, provided the updates they receive are the very arrays it was computed from (checked by object
    identity at trace time, so an aggregator behind a transform that changes the gradients, such as IMTL-L's
    scaling, recomputes it). It is a trace-time hint, not a pytree: pass it to ``update`` inside the traced step.

    Attributes:
      value: the ``(T, T)`` Gramian (:func:`gramian`), or None for a pytree without leaves.
      leaves: the leaves it was computed from.
    """

    value: Array | None
    leaves: tuple[Any, ...]

    @classmethod
    def of(cls, task_grads: Any) -> TaskGramian:
        """The Gramian of ``task_grads`` (a task-stacked pytree, possibly without leaves)."""
        leaves = tuple(jax.tree.leaves(task_grads))
        return cls(gramian(task_grads) if leaves else None, leaves)

    def matches(self, task_grads: Any) -> bool:
        """Whether ``task_grads``' leaves are the very arrays (same objects, same order) this was computed from."""
        leaves = jax.tree.leaves(task_grads)
        return (
            self.value is not None
            and len(leaves) == len(self.leaves)
            and all(a is b for a, b in zip(leaves, self.leaves, strict=True))
        )


def gramian_reusing(task_grads: Any, precomputed: Any = None) -> Array:
    """:func:`gramian` of ``task_grads``, taken from ``precomputed`` (a :class:`TaskGramian`) when it was computed
    from these very leaves."""
    if isinstance(precomputed, TaskGramian) and precomputed.matches(task_grads):
        return precomputed.value
    return gramian(task_grads)


def combine(weights: Array, task_grads: Any) -> Any:
    """Returns ``sum_t weights[t] * g_t`` leaf by leaf, dropping the task axis; leaves keep their dtype."""
    leaves = jax.tree.leaves(task_grads)
    dtype = _gram_dtype(leaves) if leaves else jnp.float32

    def leaf_combine(leaf: Array) -> Array:
        out = jnp.tensordot(weights.astype(dtype), leaf.astype(dtype), axes=1, precision=jax.lax.Precision.HIGHEST)
        return out.astype(leaf.dtype)

    return jax.tree.map(leaf_combine, task_grads)
