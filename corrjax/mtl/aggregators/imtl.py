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
        norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
        live = norms > 0
        # rows: u_i . d = c for live tasks (d = sum_j a_j g_j), a_i = 0 for zero-gradient tasks; sum(a) = 1
        a_rows = jnp.where(live[:, None], g / jnp.where(live, norms, 1.0)[:, None], jnp.eye(t, dtype=g.dtype))
        c_col = jnp.where(live, -1.0, 0.0).astype(g.dtype)[:, None]
        top = jnp.concatenate([a_rows, c_col], axis=1)
        bottom = jnp.concatenate([live.astype(g.dtype), jnp.zeros((1,), g.dtype)])[None]
        system = jnp.concatenate([top, bottom], axis=0)
        rhs = jnp.zeros((t + 1,), g.dtype).at[t].set(1.0)
        # min-norm solution: equal weights when the unit gradients coincide (the system is then singular)
        sol = jnp.linalg.pinv(system, rtol=1e-5) @ rhs
        return nan_if_nonfinite(sol[:t], g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def imtl_g() -> optax.GradientTransformationExtraArgs:
    """IMTL-G: the combination ``d = sum_t a_t g_t``, ``sum_t a_t = 1``, whose projections on every unit gradient
    ``u_t = g_t / |g_t|`` are equal (``u_s . d = u_t . d``).

    Solved as one ``(T+1) x (T+1)`` linear system from the Gramian (``u_s . g_t = G_st / |g_s|``), equivalent to the
    paper's closed form ``a_{2:T} = g_1 U^T (D U^T)^{-1}``. Output scale: weights sum to 1 (the paper's); they may be
    negative. Zero-gradient tasks get weight 0; identical directions give the mean (the minimum-norm solution).

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Sec. 3.2, gradient balance).
    """
    return from_weighting(imtl_g_weighting())
