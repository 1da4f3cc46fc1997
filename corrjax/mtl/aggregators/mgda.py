"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Any

import jax
import optax

from corrjax._checks import check_choice
from corrjax.mtl import solvers
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting

Array = jax.Array


def mgda_weighting(
    method: str = "active_set", max_iter: int | None = None, tol: float | None = None
) -> GramianWeighting:
    """MGDA's simplex weights from the Gramian (see :func:`mgda`)."""
    check_choice(method, "method", ("active_set", "frank_wolfe"))

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        return solvers.min_norm_simplex(g, method=method, max_iter=max_iter, tol=tol), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def mgda(
    method: str = "active_set", max_iter: int | None = None, tol: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """Multiple-Gradient Descent: ``d = J^T w`` with ``w = argmin_{w in simplex} |J^T w|^2``.

    ``d`` is the min-norm element of the convex hull of the task gradients, a common descent direction (``g_t . d >=
    |d|^2`` for all ``t``) that vanishes at Pareto-stationary points. Output scale: weights sum to 1 (a convex
    combination, no gradient normalisation; LibMTL's ``mgda_gn="none"``). ``method="active_set"`` solves the QP exactly
    with no ridge (:func:`corrjax.mtl.solvers.min_norm_simplex`: equilibrated by the task-gradient norms, so norms
    1e12 apart are exact to rounding; a task with a zero gradient gives exactly ``d = 0``); ``"frank_wolfe"`` is
    MGDA-UB's iterative solver. ``tol`` defaults to ``100 eps`` (active set) / ``1e-6`` (Frank-Wolfe).

    Reference: Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012; Sener &
    Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
    """
    return from_weighting(mgda_weighting(method, max_iter, tol))
