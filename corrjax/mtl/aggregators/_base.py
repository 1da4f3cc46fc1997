"""The Gramian-weighting interface shared by the aggregators.

Most multi-task aggregators return a weighted combination ``w^T J`` of the task gradients (the rows of ``J``), with
weights ``w`` that depend on the task gradients only through the Gramian ``G = J J^T`` (``T x T``). A
:class:`GramianWeighting` is that map ``G -> w`` (with state); :func:`from_weighting` turns it into an Optax
aggregator over task-stacked pytrees. A training step can also use a weighting directly: compute ``G`` (e.g. from
rep-grads or the Jacobian), get ``w``, and pull ``w`` back with one VJP instead of contracting the Jacobian.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import _gramian

Array = jax.Array


class GramianWeighting(NamedTuple):
    """A map from the task Gramian to task weights.

    Attributes:
      init: ``init() -> state``.
      update: ``update(gramian, state, num_tasks, **extra_args) -> (weights, new_state)`` with ``gramian`` the
        ``(T, T)`` Gramian (``None`` when ``needs_gramian`` is False) and ``weights`` of shape ``(T,)``.
      needs_gramian: whether ``update`` reads the Gramian (False for mean/sum/fixed/random weights).
    """

    init: Callable[[], Any]
    update: Callable[..., tuple[Array, Any]]
    needs_gramian: bool = True


class KeyState(NamedTuple):
    """State of randomised aggregators: a PRNG key split at every update.

    Stored as its raw ``uint32`` key data (``jax.random.key_data``, as optax stores keys), so ``np.asarray`` and
    checkpointers save it as a plain array.
    """

    key: Array


def key_data(key: int | Array) -> Array:
    """The raw ``uint32`` data of :func:`as_key` ``(key)``: what the states store."""
    return jax.random.key_data(as_key(key))


def split_key(key: Array) -> tuple[Array, Array]:
    """``(next, sub)``: the raw data of the state's next key and a typed subkey for this update's draws.

    ``key`` is the state's raw key data (a typed key is accepted too)."""
    k, sub = jax.random.split(as_key(key))
    return jax.random.key_data(k), sub


def as_key(key: int | Array) -> Array:
    """A typed PRNG key from an int seed (Python, NumPy or a scalar integer array) or an existing key.

    Scalar integer arrays are seeds: ``optax.inject_hyperparams`` turns a ``key=0`` argument into one. Raw key data
    (``jax.random.PRNGKey``'s uint32 array) is wrapped.
    """
    if isinstance(key, bool):
        raise TypeError(f"`key` must be an int seed or a PRNG key, got {key!r}")
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
        return jax.random.key(key)
    return jax.random.wrap_key_data(key)


def nan_if_nonfinite(weights: Array, gramian: Array | None) -> Array:
    """Propagates non-finite task gradients: NaN weights (hence a NaN update) if ``gramian`` is not all finite."""
    if gramian is None:
        return weights
    return jnp.where(jnp.all(jnp.isfinite(gramian)), weights, jnp.nan)


def from_weighting(weighting: GramianWeighting) -> optax.GradientTransformationExtraArgs:
    """Aggregator from a Gramian weighting: ``updates -> sum_t w_t * updates[t]``.

    The input is a task-stacked pytree (every leaf ``(T, ...)``); the output drops the task axis and keeps each leaf's
    dtype. The Gramian is computed leaf by leaf in at least float32, or taken from the extra argument
    ``task_gramian`` (a :class:`corrjax.mtl.TaskGramian` of these very updates, e.g. computed once by a training step
    for its diagnostics). Other extra args (e.g. ``task_losses``) are forwarded to ``weighting.update``.
    """

    def init_fn(params: Any) -> Any:
        del params
        return weighting.init()

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        del params
        t = _gramian.num_tasks(updates, floating=True)
        precomputed = extra_args.pop("task_gramian", None)
        g = _gramian.gramian_reusing(updates, precomputed) if weighting.needs_gramian else None
        weights, state = weighting.update(g, state, t, **extra_args)
        return _gramian.combine(weights, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def normalize_gramian(gramian: Array, eps: float) -> tuple[Array, Array]:
    """Returns ``(G / s, s)`` with ``s = max(trace(G), eps)``, the Gramian of the Frobenius-normalised Jacobian."""
    s = jnp.maximum(jnp.trace(gramian), eps)
    return gramian / s, s
