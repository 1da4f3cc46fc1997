"""GradDrop: sign-consistency dropout of task gradients, elementwise."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import _gramian
from corrjax.mtl.aggregators._base import KeyState, as_key

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
        return KeyState(as_key(key))

    def update_fn(updates: Any, state: KeyState, params: Any = None, **extra_args: Any) -> tuple[Any, KeyState]:
        del params, extra_args
        _gramian.num_tasks(updates)
        leaves, treedef = jax.tree.flatten(updates)
        k, sub = jax.random.split(state.key)
        keys = jax.random.split(sub, len(leaves))

        def drop(leaf: Array, lk: Array) -> Array:
            total = jnp.sum(leaf, axis=0)
            mass = jnp.sum(jnp.abs(leaf), axis=0)
            p = 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0))
            u = jax.random.uniform(lk, p.shape, dtype=jnp.float32)
            keep = ((p > u) & (leaf > 0)) | ((p < u) & (leaf < 0))
            m = leak + (1.0 - leak) * keep.astype(leaf.dtype)
            out = jnp.sum(m * leaf, axis=0)
            # NaN gradients make the sign tests false; propagate them explicitly.
            return jnp.where(jnp.isnan(total), jnp.nan, out).astype(leaf.dtype)

        out = jax.tree.unflatten(treedef, [drop(x, kk) for x, kk in zip(leaves, keys, strict=True)])
        return out, KeyState(k)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
