"""Fixed and random linear scalarisations: ``mean``, ``sum``, ``weighted`` and ``rlw``.

Each returns ``sum_t w_t g_t`` for task-stacked gradients ``g`` (leaves ``(T, ...)``) without forming the Gramian.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import GramianWeighting, KeyState, from_weighting, key_data, split_key

Array = jax.Array


def _weight_dtype() -> Any:
    """The default float dtype (float64 under x64), so float64 gradients are not combined with float32 weights;
    :func:`corrjax.mtl.combine_tasks` casts the weights to each leaf's (at least float32) precision."""
    return jnp.result_type(float)


def mean_weighting() -> GramianWeighting:
    """Weights ``1/T`` (the gradient of the mean loss)."""
    return GramianWeighting(
        init=optax.EmptyState,
        update=lambda g, s, t, **_: (jnp.full((t,), 1.0 / t, _weight_dtype()), s),
        needs_gramian=False,
    )


def sum_weighting() -> GramianWeighting:
    """Weights ``1`` (the gradient of the summed loss)."""
    return GramianWeighting(
        init=optax.EmptyState, update=lambda g, s, t, **_: (jnp.ones((t,), _weight_dtype()), s), needs_gramian=False
    )


def mean() -> optax.GradientTransformationExtraArgs:
    """Average of the task gradients, ``(1/T) sum_t g_t``: the gradient of the mean task loss."""
    return from_weighting(mean_weighting())


def sum() -> optax.GradientTransformationExtraArgs:
    """Sum of the task gradients, ``sum_t g_t``: the gradient of the summed task loss (``T`` times :func:`mean`)."""
    return from_weighting(sum_weighting())


def weighted_weighting(weights: Any) -> GramianWeighting:
    """Fixed weights ``w`` (shape ``(T,)``); may be a traced array (e.g. under ``optax.inject_hyperparams``)."""

    def update(g: Array | None, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        w = jnp.asarray(weights)
        if w.shape != (t,):
            raise ValueError(f"`weights` must have shape (T,) = ({t},) to match the task axis, got {w.shape}")
        return w, state

    return GramianWeighting(init=optax.EmptyState, update=update, needs_gramian=False)


def weighted(weights: Any) -> optax.GradientTransformationExtraArgs:
    """Fixed linear scalarisation ``sum_t weights[t] g_t`` (``weights`` of shape ``(T,)``; not normalised)."""
    return from_weighting(weighted_weighting(weights))


def rlw_weighting(key: int | Array = 0) -> GramianWeighting:
    """Random weights ``softmax(z)``, ``z ~ N(0, I_T)`` drawn afresh at every update from the key in the state."""

    def update(g: Array | None, state: KeyState, t: int, **_: Any) -> tuple[Array, KeyState]:
        k, sub = split_key(state.key)
        # float32 draws whatever the precision (the same weights for a key), normalised in the default float dtype
        z = jax.random.normal(sub, (t,), jnp.float32).astype(_weight_dtype())
        return jax.nn.softmax(z), KeyState(k)

    return GramianWeighting(init=lambda: KeyState(key_data(key)), update=update, needs_gramian=False)


def rlw(key: int | Array = 0) -> optax.GradientTransformationExtraArgs:
    """Random Loss Weighting: ``sum_t w_t g_t`` with ``w = softmax(z)``, ``z ~ N(0, I)`` at every step.

    Scale: the weights sum to 1, so the output is on the scale of :func:`mean`. Deterministic given ``key`` (an int
    seed or a PRNG key), which is split in the state at every update.

    Reference: Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
    TMLR 2022 (the Normal-softmax variant used by LibMTL).
    """
    return from_weighting(rlw_weighting(key))
