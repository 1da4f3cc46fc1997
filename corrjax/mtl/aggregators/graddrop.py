"""GradDrop: sign-consistency dropout of task gradients, elementwise."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import _gramian
from corrjax.mtl.aggregators._base import KeyState, key_data, split_key

Array = jax.Array


def graddrop(key: int | Array = 0, leak: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Gradient Sign Dropout: keep, per coordinate, only the task gradients of one randomly chosen sign.

    For each coordinate, ``P = (1 + sum_t g_t / sum_t |g_t|) / 2`` is the positive-sign purity and ``U ~ U(0, 1)``;
    task ``t`` keeps its component if ``(P > U and g_t > 0)`` or ``(P < U and g_t < 0)``. Output scale: the **sum** of
    the kept components, ``sum_t (leak + (1 - leak) M_t) g_t`` (LibMTL's convention with ``leak=0``). Coordinates where
    every task gradient is zero stay zero. Unlike the Gramian methods this acts elementwise, so the paper applies it
    to the gradient w.r.t. the shared representation (rep-grad mode, :func:`corrjax.mtl.value_and_rep_grad`); on
    parameter gradients it is the same rule applied per parameter. Deterministic given ``key``.

    Reference: Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020.
    """

    def init_fn(params: Any) -> KeyState:
        del params
        return KeyState(key_data(key))

    def update_fn(updates: Any, state: KeyState, params: Any = None, **extra_args: Any) -> tuple[Any, KeyState]:
        del params, extra_args
        _gramian.num_tasks(updates, floating=True)
        leaves, treedef = jax.tree.flatten(updates)
        k, sub = split_key(state.key)
        keys = jax.random.split(sub, len(leaves))

        def drop(leaf: Array, lk: Array) -> Array:
            # Whether a task keeps its component depends only on the coordinate's draw and the component's sign, so
            # the kept sum is [P > U] * (sum of positive parts) + [P < U] * (sum of negative parts): two reductions
            # over T instead of a (T, ...) mask. The reductions are contractions with ones: on XLA:CPU a reduce over
            # the leading axis of a (T, p) array measured ~100x slower than the equivalent GEMV.
            ones = jnp.ones((leaf.shape[0],), leaf.dtype)
            pos = jnp.tensordot(ones, jnp.maximum(leaf, 0), axes=1)
            neg = jnp.tensordot(ones, jnp.minimum(leaf, 0), axes=1)
            total, mass = pos + neg, pos - neg
            p = 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0))
            u = jax.random.uniform(lk, p.shape, dtype=jnp.float32)
            kept = jnp.where(p > u, pos, 0.0) + jnp.where(p < u, neg, 0.0)
            out = leak * total + (1.0 - leak) * kept
            # NaN gradients make the sign tests false; propagate them explicitly.
            return jnp.where(jnp.isnan(total), jnp.nan, out).astype(leaf.dtype)

        out = jax.tree.unflatten(treedef, [drop(x, kk) for x, kk in zip(leaves, keys, strict=True)])
        return out, KeyState(k)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
