"""Diagnostics of task-gradient conflict, returned as arrays so a jitted training step can emit them for logging.

All functions take the task-stacked gradient pytree (every leaf has a leading task axis ``T``, as returned by
``corrjax.mtl.value_and_task_grad``) and work from the ``(T, T)`` Gramian ``G_ij = <g_i, g_j>`` summed over leaves,
so the cost is one pass over the gradients whatever ``T`` is. Under an explicit-sharding mesh the leaves keep their
parameter shardings and the small results are replicated.

Undefined values follow the library convention (NaN, never an exception): the cosine with a zero gradient, a conflict
fraction with fewer than two tasks, ratios when every gradient is zero. Non-finite gradients propagate as NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from corrjax.mtl import _gramian

__all__ = [
    "conflict_fraction",
    "gradient_diagnostics",
    "gradient_magnitude_similarity",
    "gradient_norm_ratios",
    "tag_affinity",
    "task_gradient_cosine",
    "task_gradient_norms",
]


def _task_gramian(task_grads: Any) -> jax.Array:
    """``(T, T)`` Gramian of the task gradients (``corrjax.mtl.task_gramian``: leaf by leaf, at least float32)."""
    _gramian.num_tasks(task_grads, "task_grads")
    return _gramian.gramian(task_grads)


def _cosine_from_gramian(gram: jax.Array) -> jax.Array:
    diag = jnp.diagonal(gram)
    norms = jnp.sqrt(diag)
    denom = norms[:, None] * norms[None, :]
    cos = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    cos = jnp.where(jnp.isnan(gram), jnp.nan, cos)  # NaN gradients stay NaN (not masked by the denominator test).
    cos = jnp.clip(cos, -1.0, 1.0)
    eye = jnp.eye(gram.shape[0], dtype=bool)
    return jnp.where(eye & (diag > 0) & jnp.isfinite(diag), jnp.ones_like(cos), cos)


def cosine_from_gramian(gramian: jax.Array) -> jax.Array:
    """:func:`task_gradient_cosine` from the ``(T, T)`` task Gramian ``G = J J^T`` (e.g. a
    :class:`corrjax.mtl.TaskGramian`'s ``value``, computed once and shared with the aggregator)."""
    return _cosine_from_gramian(jnp.asarray(gramian))


def task_gradient_cosine(task_grads: Any) -> jax.Array:
    """``(T, T)`` cosine similarities ``<g_i, g_j> / (|g_i| |g_j|)`` of the task gradients over the whole pytree.

    Clipped to ``[-1, 1]``; the diagonal is exactly 1 for a non-zero gradient. Rows and columns of a zero gradient
    are NaN (undefined, as ``scipy.spatial.distance.cosine``); NaN gradients give NaN.

    Args:
      task_grads: task-stacked gradient pytree, every leaf ``(T, ...)``.

    Returns:
      ``(T, T)`` array.

    References:
      Yu et al., *Gradient Surgery for Multi-Task Learning* (PCGrad), NeurIPS 2020: conflict is a negative cosine.
    """
    return _cosine_from_gramian(_task_gramian(task_grads))


def _conflict_from_gramian(gram: jax.Array) -> jax.Array:
    t = gram.shape[0]
    if t < 2:
        return jnp.asarray(jnp.nan, gram.dtype)
    iu = jnp.triu_indices(t, k=1)
    off = gram[iu]
    frac = jnp.mean((off < 0).astype(gram.dtype))
    return jnp.where(jnp.any(jnp.isnan(off)), jnp.nan, frac)


def conflict_fraction(task_grads: Any) -> jax.Array:
    """Fraction of the ``T (T - 1) / 2`` task pairs whose gradients conflict (``<g_i, g_j> < 0``).

    A zero gradient conflicts with nothing. ``T = 1`` gives NaN (no pairs); NaN gradients give NaN.

    Args:
      task_grads: task-stacked gradient pytree, every leaf ``(T, ...)``.

    Returns:
      Scalar array in ``[0, 1]``.
    """
    return _conflict_from_gramian(_task_gramian(task_grads))


def task_gradient_norms(task_grads: Any) -> jax.Array:
    """``(T,)`` Euclidean norms ``|g_t|`` of each task's gradient over the whole pytree."""
    return jnp.sqrt(jnp.diagonal(_task_gramian(task_grads)))


def _ratios_from_norms(norms: jax.Array) -> jax.Array:
    mean = jnp.mean(norms)
    return jnp.where(mean > 0, norms / jnp.where(mean > 0, mean, 1.0), jnp.nan) + 0.0 * mean


def gradient_norm_ratios(task_grads: Any) -> jax.Array:
    """``(T,)`` task-gradient norms relative to their mean, ``|g_t| / mean_s |g_s|``.

    1 everywhere means balanced magnitudes; NaN if every gradient is zero. ``max / min`` of this vector is the
    dominance ratio that GradNorm and IMTL try to remove.

    References:
      Chen et al., *GradNorm*, ICML 2018; Liu et al., *Towards Impartial Multi-task Learning* (IMTL), ICLR 2021.
    """
    return _ratios_from_norms(task_gradient_norms(task_grads))


def _magnitude_similarity_from_gramian(gram: jax.Array) -> jax.Array:
    sq = jnp.diagonal(gram)
    norms = jnp.sqrt(sq)
    denom = sq[:, None] + sq[None, :]
    return jnp.where(denom > 0, 2.0 * norms[:, None] * norms[None, :] / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def gradient_magnitude_similarity(task_grads: Any) -> jax.Array:
    """``(T, T)`` magnitude similarity ``2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2)`` in ``[0, 1]`` (1: equal norms).

    NaN for a pair of zero gradients.

    References:
      Yu et al., *Gradient Surgery for Multi-Task Learning* (PCGrad), NeurIPS 2020, Definition 3.
    """
    return _magnitude_similarity_from_gramian(_task_gramian(task_grads))


def gradient_diagnostics(task_grads: Any) -> dict[str, jax.Array]:
    """All Gramian-based diagnostics from one pass over the gradients, as a dict of arrays for a logger.

    Returns:
      ``{"cosine": (T, T), "conflict_fraction": (), "norms": (T,), "norm_ratios": (T,),
      "magnitude_similarity": (T, T), "gramian": (T, T)}``.
    """
    gram = _task_gramian(task_grads)
    norms = jnp.sqrt(jnp.diagonal(gram))
    return {
        "cosine": _cosine_from_gramian(gram),
        "conflict_fraction": _conflict_from_gramian(gram),
        "norms": norms,
        "norm_ratios": _ratios_from_norms(norms),
        "magnitude_similarity": _magnitude_similarity_from_gramian(gram),
        "gramian": gram,
    }


def tag_affinity(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    task_grads: Any,
    *args: Any,
    learning_rate: Any = 1e-3,
    update_fn: Callable[[Any], Any] | None = None,
    shared: Any = None,
    task_losses: jax.Array | None = None,
) -> jax.Array:
    r"""Inter-task affinity by lookahead (TAG): how a step on task ``i`` alone changes the loss of task ``j``.

    For each task ``i`` the shared parameters take one step using only ``g_i``,
    ``theta_{s|i} = theta_s + update_fn(g_i)`` (default SGD: ``update_fn(g) = -learning_rate * g``), task-specific
    parameters are left unchanged, and all ``T`` losses are re-evaluated on the same inputs:

    .. math:: Z_{i \to j} = 1 - \frac{L_j(\theta_{s|i}, \theta_j)}{L_j(\theta_s, \theta_j)} .

    Positive ``Z[i, j]``: task ``i``'s gradient step lowers task ``j``'s loss. The ``T`` lookahead evaluations are
    one ``vmap`` over tasks (``T`` forward passes, no extra backward). ``Z[i, j]`` is NaN when ``L_j = 0``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> (T,)`` task losses.
      params: the current parameters (no task axis).
      task_grads: task-stacked gradients of ``loss_fn`` w.r.t. ``params`` (every leaf ``(T, ...)``, same structure
        as ``params``).
      *args: further arguments of ``loss_fn`` (e.g. the batch).
      learning_rate: lookahead step size of the default SGD update.
      update_fn: maps one task's gradient pytree to a parameter update (e.g. the optimiser's current
        preconditioner, as the paper does with Adam); overrides ``learning_rate``.
      shared: pytree of Python bools like ``params`` (e.g. ``corrjax.models.shared_mask(model)``); only leaves marked
        True take the lookahead step. Default: every leaf.
      task_losses: the ``(T,)`` losses at ``params`` if already computed (saves one forward pass).

    Half-precision parameters: the lookahead step and both losses are computed on float32 copies of the shared
    parameters (a small step would round away in bfloat16).

    Returns:
      ``(T, T)`` array ``Z`` with ``Z[i, j] = Z_{i -> j}``.

    References:
      Fifty, Amid, Zhao, Yu, Anil & Finn, *Efficiently Identifying Task Groupings for Multi-Task Learning*,
      NeurIPS 2021 (Eq. 3).
    """
    t = _gramian.num_tasks(task_grads, "task_grads")
    if jax.tree.structure(task_grads) != jax.tree.structure(params):
        raise ValueError(
            "tag_affinity: `task_grads` must have the structure of `params`, got "
            f"{jax.tree.structure(task_grads)} vs {jax.tree.structure(params)}"
        )
    if shared is None:
        shared = jax.tree.map(lambda _: True, params)
    elif jax.tree.structure(shared) != jax.tree.structure(params):
        raise ValueError(
            "tag_affinity: `shared` must have the structure of `params`, got "
            f"{jax.tree.structure(shared)} vs {jax.tree.structure(params)}"
        )
    if update_fn is None:
        update_fn = lambda g: jax.tree.map(lambda x: -learning_rate * x, g)

    # In at least float32: a small step on half-precision parameters would round away (mixed-precision training
    # applies it to float32 master weights), and the losses before and after must be computed alike.
    wide = lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float32))
    if task_losses is None:
        task_losses = loss_fn(jax.tree.map(lambda p, s: wide(p) if s else p, params, shared), *args)
    base = jnp.asarray(task_losses)
    base = base.astype(jnp.promote_types(base.dtype, jnp.float32))
    if base.shape != (t,):
        raise ValueError(f"tag_affinity: the losses must have shape ({t},) (T,), got {base.shape}")

    def lookahead(g_i):
        step = update_fn(g_i)
        moved = jax.tree.map(lambda p, u, s: wide(p) + wide(u) if s else p, params, step, shared)
        return loss_fn(moved, *args)

    after = jax.vmap(lookahead)(task_grads)  # (T_i, T_j)
    if after.shape != (t, t):
        raise ValueError(f"tag_affinity: `loss_fn` must return ({t},) task losses, got lookahead shape {after.shape}")
    safe = jnp.where(base != 0, base, 1.0)
    return jnp.where(base[None, :] != 0, 1.0 - after / safe[None, :], jnp.nan)
