"""Helpers for aggregators that keep per-task gradient pytrees in their state (MoCo, DB-MTL, ExcessMTL)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from corrjax.mtl import _gramian

Array = jax.Array


def acc_dtype(dtype: Any) -> Any:
    """The accumulation dtype of a state buffer: at least float32 (bf16/f16 gradients), float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def stacked_zeros(params: Any, num_tasks: int, name: str) -> Any:
    """``(T, *leaf.shape)`` zero buffers for every leaf of ``params`` (arrays or ``ShapeDtypeStruct``)."""
    if params is None:
        raise ValueError(
            f"{name} keeps per-task gradient buffers shaped like the parameters: call init(params) with the "
            "parameter pytree (arrays or jax.ShapeDtypeStruct), not None"
        )

    def zeros(p: Any) -> Array:
        dtype = getattr(p, "dtype", None) or jnp.result_type(float)
        return jnp.zeros((num_tasks, *jnp.shape(p)), acc_dtype(dtype))

    return jax.tree.map(zeros, params)


def check_buffers(updates: Any, buffers: Any, num_tasks: int, name: str) -> int:
    """Checks that ``updates`` is task-stacked with ``T = num_tasks`` and shaped like the state's buffers."""
    t = check_gradients(updates, name)
    if t != num_tasks:
        raise ValueError(f"{name}: the gradient's leading task axis is {t} but num_tasks={num_tasks}")
    u_struct, b_struct = jax.tree.structure(updates), jax.tree.structure(buffers)
    if u_struct != b_struct:
        raise ValueError(f"{name}: `updates` has tree structure {u_struct} but the state was built for {b_struct}")
    for u, b in zip(jax.tree.leaves(updates), jax.tree.leaves(buffers), strict=True):
        if tuple(u.shape) != tuple(b.shape):
            raise ValueError(
                f"{name}: a leaf of `updates` has shape {tuple(u.shape)} but its state buffer has {tuple(b.shape)} "
                "(init(params) with the parameters, not the task-stacked gradients)"
            )
        if not jnp.issubdtype(u.dtype, jnp.floating):
            raise TypeError(f"{name}: `updates` must be real floating point, got a leaf of dtype {u.dtype}")
    return t


def scale_tasks(weights: Array, tree: Any, dtype_like: Any = None) -> Any:
    """``w_t * tree[t]`` leaf by leaf, in each leaf's accumulation dtype (or cast to ``dtype_like``'s leaves)."""

    def scale(x: Array) -> Array:
        dtype = acc_dtype(x.dtype)
        return weights.astype(dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * x.astype(dtype)

    return jax.tree.map(scale, tree)


def cast_like(tree: Any, like: Any) -> Any:
    """Casts each leaf of ``tree`` to the dtype of the corresponding leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def task_sq_norms(tree: Any) -> Array:
    """``(T,)`` squared norms of each task's slice over all leaves (accumulated in float32 or wider)."""
    leaves = jax.tree.leaves(tree)
    sq = [jnp.sum(jnp.square(x.astype(acc_dtype(x.dtype))).reshape(x.shape[0], -1), axis=1) for x in leaves]
    return sum(sq[1:], sq[0])


def check_gradients(updates: Any, name: str) -> int:
    """Returns ``T`` after checking that ``updates`` is task-stacked with ``T >= 1`` and real floating leaves
    (:func:`corrjax.mtl._gramian.num_tasks`, which every aggregator runs; ``name`` is the caller, for the log)."""
    del name
    return _gramian.num_tasks(updates, "updates", floating=True)


def checked(tx: Any, name: str) -> Any:
    """``tx`` whose ``update`` first runs :func:`check_gradients` on the task-stacked gradients."""
    import optax

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        check_gradients(updates, name)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
