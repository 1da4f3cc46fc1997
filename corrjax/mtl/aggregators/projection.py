"""Gradient surgery by pairwise projection: ``pcgrad`` and ``gradvac``.

Both modify each task gradient ``g_i`` against the others in a random order and return the sum of the modified
gradients. Every modified gradient stays in the span of the task gradients, ``g_i' = sum_k C[i, k] g_k``, and all
inner products it needs are entries of ``C G`` and ``C G C^T``, so the surgery runs on the ``T x T`` Gramian and the
output is the single combination ``(1^T C) J``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import (
    GramianWeighting,
    KeyState,
    from_weighting,
    key_data,
    nan_if_nonfinite,
    split_key,
)

Array = jax.Array


def _orders(key: Array, t: int) -> Array:
    """``(T, T)``: row ``i`` is a random permutation of the tasks, the order in which ``g_i`` meets the others."""
    return jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(key, t))


def _safe_div(num: Array, den: Array) -> Array:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def pcgrad_weighting(key: int | Array = 0) -> GramianWeighting:
    """PCGrad's weights ``1^T C`` from the Gramian (see :func:`pcgrad`)."""

    def update(g: Array, state: KeyState, t: int, **_: Any) -> tuple[Array, KeyState]:
        k, sub = split_key(state.key)
        orders = _orders(sub, t)

        def row(i: Array, order: Array) -> Array:
            def body(n: int, c: Array) -> Array:
                j = order[n]
                dot = c @ g[:, j]
                coef = jnp.where(dot < 0, _safe_div(dot, g[j, j]), 0.0)
                return c.at[j].add(-coef)

            return jax.lax.fori_loop(0, t, body, jax.nn.one_hot(i, t, dtype=g.dtype))

        c = jax.vmap(row)(jnp.arange(t), orders)
        return nan_if_nonfinite(jnp.sum(c, axis=0), g), KeyState(k)

    return GramianWeighting(init=lambda: KeyState(key_data(key)), update=update)


def pcgrad(key: int | Array = 0) -> optax.GradientTransformationExtraArgs:
    """PCGrad: project each task gradient off the normal planes of the gradients it conflicts with; sum.

    For every task ``i`` and every other task ``j`` in a random order, if ``g_i' . g_j < 0`` then
    ``g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j`` (projections use the *original* ``g_j``). Output scale: the **sum**
    ``sum_i g_i'`` (as the paper's code and LibMTL); with no conflict it equals :func:`sum`. The orders are drawn from
    the key in the state (an int seed or PRNG key), so the result is deterministic given the key.

    Reference: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020 (Algorithm 1).
    """
    return from_weighting(pcgrad_weighting(key))


class GradVacState(NamedTuple):
    """GradVac state: the PRNG key (raw ``uint32`` data) and the EMA ``(T, T)`` of pairwise cosine targets
    ``phi_hat[i, j]`` (in the default float dtype: float32, float64 under x64)."""

    key: Array
    ema: Array


def gradvac_weighting(beta: float | Array = 0.5, *, num_tasks: int, key: int | Array = 0) -> GramianWeighting:
    """GradVac's weights from the Gramian (see :func:`gradvac`)."""

    def update(g: Array, state: GradVacState, t: int, **_: Any) -> tuple[Array, GradVacState]:
        if t != num_tasks:
            raise ValueError(f"gradvac was built with num_tasks={num_tasks} but the updates have T={t} tasks")
        k, sub = split_key(state.key)
        orders = _orders(sub, t)
        norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
        ema0 = state.ema.astype(g.dtype)

        def row(i: Array, order: Array, ema_row: Array) -> tuple[Array, Array]:
            def body(n: int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
                c, e = carry
                j = order[n]
                ni = jnp.sqrt(jnp.maximum(c @ g @ c, 0.0))
                phi = _safe_div(c @ g[:, j], ni * norms[j])
                target = e[j]
                s_phi = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
                s_tgt = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
                coef = _safe_div(ni * (target * s_phi - phi * s_tgt), norms[j] * s_tgt)
                active = (j != i) & (phi < target)
                c = c.at[j].add(jnp.where(active, coef, 0.0))
                e = jnp.where(j != i, e.at[j].set((1.0 - beta) * target + beta * phi), e)
                return c, e

            return jax.lax.fori_loop(0, t, body, (jax.nn.one_hot(i, t, dtype=g.dtype), ema_row))

        c, ema = jax.vmap(row)(jnp.arange(t), orders, ema0)
        weights = nan_if_nonfinite(jnp.sum(c, axis=0), g)
        return weights, GradVacState(k, ema.astype(state.ema.dtype))

    return GramianWeighting(
        init=lambda: GradVacState(key_data(key), jnp.zeros((num_tasks, num_tasks), jnp.result_type(float))),
        update=update,
    )


def gradvac(
    beta: float | Array = 0.5, *, num_tasks: int, key: int | Array = 0
) -> optax.GradientTransformationExtraArgs:
    """Gradient Vaccine: raise pairwise cosine similarities towards their running targets; sum.

    For every task ``i`` and every other task ``j`` in a random order, with ``phi = cos(g_i', g_j)`` and the EMA
    target ``phi_hat[i, j]``: if ``phi < phi_hat``,
    ``g_i' <- g_i' + |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)) g_j``;
    then ``phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi``. Targets start at 0 (so the first step acts like
    PCGrad's conflict test). Output scale: the **sum** ``sum_i g_i'`` (as LibMTL). Applied to the whole parameter
    vector (LibMTL's default granularity); for per-layer GradVac wrap each layer with ``optax.masked``.

    Args:
      beta: EMA rate of the cosine targets (LibMTL's default 0.5; the paper uses 1e-2).
      num_tasks: ``T``, needed to size the ``(T, T)`` target state.
      key: int seed or PRNG key for the random orders.

    Reference: Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models", ICLR 2021 (Algorithm 1).
    """
    return from_weighting(gradvac_weighting(beta, num_tasks=num_tasks, key=key))
