"""Nash-MTL: the Nash bargaining solution over the task gradients."""

from __future__ import annotations

from typing import Any

import jax
import optax

from corrjax.mtl import solvers
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting

Array = jax.Array


def nash_mtl_weighting(max_iter: int = 200, tol: float | None = None, reg_eps: float = 1e-6) -> GramianWeighting:
    """Nash-MTL's weights ``alpha`` from the Gramian (see :func:`nash_mtl`)."""

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        return solvers.nash_bargaining(g, max_iter=max_iter, tol=tol, reg_eps=reg_eps), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def nash_mtl(
    max_iter: int = 200, tol: float | None = None, reg_eps: float = 1e-6
) -> optax.GradientTransformationExtraArgs:
    """Nash-MTL: ``d = sum_t alpha_t g_t`` with ``alpha > 0`` solving ``G alpha = 1 / alpha``.

    The update maximises ``sum_t log(g_t . d)`` over a ball, the Nash bargaining solution; the system is solved
    exactly in JAX by damped Newton (:func:`corrjax.mtl.solvers.nash_bargaining`) instead of the paper's sequence of
    convex programs. Output scale: the paper's, ``sum_t alpha_t g_t`` with ``g_t . d = 1 / alpha_t`` (for orthogonal
    gradients ``alpha_t = 1 / |g_t|``, so ``d = sum_t g_t / |g_t|``). The weights are recomputed at every step
    (the paper's ``update_weights_every=1``) and not norm-clipped; chain ``optax.clip_by_global_norm`` to reproduce
    LibMTL's ``max_norm``. Zero-gradient tasks get weight 0. The optional ridge ``reg_eps`` (default 1e-6) is added
    to the task-gradient cosine matrix, after the per-task rescaling, so the update does not depend on any task's
    gradient scale (Nash bargaining is invariant to it); ``reg_eps=0`` is the exact system, which has no solution at a
    Pareto-stationary point (the ridge keeps ``|d|^2 <= T`` there).

    Reference: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
    """
    return from_weighting(nash_mtl_weighting(max_iter, tol, reg_eps))
