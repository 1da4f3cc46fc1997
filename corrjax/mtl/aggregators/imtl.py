"""IMTL-G: the combination with equal projections on every task's unit gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting, nan_if_nonfinite

Array = jax.Array


def imtl_g_weighting() -> GramianWeighting:
    """IMTL-G's weights from the Gramian (see :func:`imtl_g`)."""

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        g = (g + g.T) / 2
        norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
        live = norms > 0
        safe = jnp.where(live, norms, 1.0)
        # Solved for b with a_j = w_j b_j, w_j = min_live |g| / |g_j| (in (0, 1]): the rows u_i . d = c become the
        # cosine matrix, C b = c', and sum(a) = w . b = 1. Both are free of the gradients' scale, so the weights are
        # scale-invariant and a task whose gradient is many times smaller than the others keeps its share.
        cos = g / jnp.outer(safe, safe)
        n_min = jnp.min(jnp.where(live, norms, jnp.inf))
        w = jnp.where(live, jnp.where(jnp.any(live), n_min, 1.0) / safe, 0.0).astype(g.dtype)
        # rows: (C b)_i = c for live tasks, b_i = 0 for zero-gradient tasks; w . b = 1
        a_rows = jnp.where(live[:, None], cos, jnp.eye(t, dtype=g.dtype))
        c_col = jnp.where(live, -1.0, 0.0).astype(g.dtype)[:, None]
        top = jnp.concatenate([a_rows, c_col], axis=1)
        bottom = jnp.concatenate([w, jnp.zeros((1,), g.dtype)])[None]
        system = jnp.concatenate([top, bottom], axis=0)
        rhs = jnp.zeros((t + 1,), g.dtype).at[t].set(1.0)
        # min-norm solution: equal weights when the unit gradients coincide (the system is then singular)
        sol = jnp.linalg.pinv(system, rtol=1e-5) @ rhs
        return nan_if_nonfinite(w * sol[:t], g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def imtl_g() -> optax.GradientTransformationExtraArgs:
    """IMTL-G: the combination ``d = sum_t a_t g_t``, ``sum_t a_t = 1``, whose projections on every unit gradient
    ``u_t = g_t / |g_t|`` are equal (``u_s . d = u_t . d``).

    Solved as one ``(T+1) x (T+1)`` linear system from the Gramian, in the variables ``b_t = a_t |g_t| / min_s |g_s|``
    whose rows are the task-gradient cosines (so the weights do not depend on the gradients' scale), equivalent to the
    paper's closed form ``a_{2:T} = g_1 U^T (D U^T)^{-1}``. Output scale: weights sum to 1 (the paper's); they may be
    negative. Zero-gradient tasks get weight 0; identical gradients give the mean (the minimum-norm solution).
    Parallel gradients of different norms make the system singular; they get its minimum-norm solution in ``b``,
    one of many (the paper's closed form is undefined there).

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Sec. 3.2, gradient balance).
    """
    return from_weighting(imtl_g_weighting())
