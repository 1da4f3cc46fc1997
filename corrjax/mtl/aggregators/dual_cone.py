"""Projections onto the dual cone of the task gradients: ``upgrad`` and ``dualproj`` (Jacobian descent)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import solvers
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting

Array = jax.Array


def _pref(pref_vector: Any, t: int, dtype: Any) -> Array:
    if pref_vector is None:
        return jnp.full((t,), 1.0 / t, dtype)
    p = jnp.asarray(pref_vector, dtype)
    if p.shape != (t,):
        raise ValueError(f"`pref_vector` must have shape (T,) = ({t},), got {p.shape}")
    return p


def upgrad_weighting(
    pref_vector: Any = None, *, reg_eps: float = 1e-4, max_iter: int | None = None
) -> GramianWeighting:
    """UPGrad's weights from the Gramian (see :func:`upgrad`)."""

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        u = jnp.diag(_pref(pref_vector, t, g.dtype))
        w = jax.vmap(lambda row: solvers.project_dual_cone(g, row, reg_eps=reg_eps, max_iter=max_iter))(u)
        return jnp.sum(w, axis=0), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def upgrad(
    pref_vector: Any = None, *, reg_eps: float = 1e-4, max_iter: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Unconflicting Projection of Gradients: project each task gradient onto the dual cone of all; combine.

    Each ``g_t`` is projected onto ``{x : J x >= 0}`` (the directions that conflict with no task) and the projections
    are combined with the preference weights (default ``1/T``): ``d = sum_t p_t pi_J(g_t)``. Output scale: the mean of
    the projections (TorchJD's default), so with non-conflicting gradients it equals :func:`mean`; ``J d >= 0`` up to
    the ridge ``reg_eps`` (relative to ``trace(G)``) on the normalised Gramian, TorchJD's default. That ridged QP is
    solved to rounding (quadprog's answer on the same problem; :func:`corrjax.mtl.solvers.project_dual_cone`).

    Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (TorchJD ``UPGrad``).
    """
    return from_weighting(upgrad_weighting(pref_vector, reg_eps=reg_eps, max_iter=max_iter))


def dualproj_weighting(
    pref_vector: Any = None, *, reg_eps: float = 1e-4, max_iter: int | None = None
) -> GramianWeighting:
    """DualProj's weights from the Gramian (see :func:`dualproj`)."""

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        return solvers.project_dual_cone(g, _pref(pref_vector, t, g.dtype), reg_eps=reg_eps, max_iter=max_iter), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def dualproj(
    pref_vector: Any = None, *, reg_eps: float = 1e-4, max_iter: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """DualProj: project the preference-weighted combination (default the mean) onto the dual cone of the gradients.

    ``d = pi_J(sum_t p_t g_t)``; output on the scale of :func:`mean` (equal to it when no task conflicts with the mean).
    Same ridged QP as :func:`upgrad`, solved to rounding.

    Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (TorchJD ``DualProj``).
    """
    return from_weighting(dualproj_weighting(pref_vector, reg_eps=reg_eps, max_iter=max_iter))
