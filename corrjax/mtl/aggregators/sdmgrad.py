"""SDMGrad: MGDA regularised towards the mean direction (Xiao et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import solvers
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting, nan_if_nonfinite
from corrjax.mtl.weighting import _check_num_tasks

Array = jax.Array


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad`.

    Attributes:
      simplex_weights: ``(T,)`` the inner weights ``w`` on the simplex, warm start of the next step's iterations.
      weights: ``(T,)`` the combination weights ``(w + lamda / T) / (1 + lamda)`` applied at the last step.
    """

    simplex_weights: Array
    weights: Array


def sdmgrad_weighting(
    num_tasks: int,
    lamda: chex.Numeric = 0.3,
    niter: chex.Numeric = 20,
    *,
    learning_rate: chex.Numeric = 5.0,
    momentum: chex.Numeric = 0.5,
) -> GramianWeighting:
    """SDMGrad's weights from the Gramian (see :func:`sdmgrad`)."""
    num_tasks = _check_num_tasks(num_tasks)
    if isinstance(niter, int | float) and not isinstance(niter, bool) and (niter < 0 or int(niter) != niter):
        raise ValueError(f"`niter` must be a non-negative int, got {niter!r}")

    def init() -> SDMGradState:
        w = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.result_type(float))
        return SDMGradState(simplex_weights=w, weights=jnp.array(w))

    def update(g: Array, state: SDMGradState, t: int, **_: Any) -> tuple[Array, SDMGradState]:
        if t != num_tasks:
            raise ValueError(f"sdmgrad: the gradient's leading task axis is {t} but num_tasks={num_tasks}")
        dtype = jnp.promote_types(g.dtype, state.simplex_weights.dtype)
        g = ((g + g.T) / 2).astype(dtype)
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0)))
        gg = g / jnp.where(scale > 0, scale**2, 1.0)
        lam = jnp.asarray(lamda, dtype)
        lr = jnp.asarray(learning_rate, dtype)
        mom = jnp.asarray(momentum, dtype)
        gg_mean = jnp.mean(gg, axis=1)

        def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            w, buf = carry
            grad = gg @ w + lam * gg_mean
            buf = jnp.where(i == 0, grad, mom * buf + grad)  # torch SGD momentum (no dampening)
            return solvers.project_simplex(w - lr * buf), buf

        w0 = state.simplex_weights.astype(dtype)
        w, _ = jax.lax.fori_loop(0, niter, body, (w0, jnp.zeros_like(w0)))
        weights = nan_if_nonfinite((w + lam / t) / (1.0 + lam), g)
        new_state = SDMGradState(
            simplex_weights=w.astype(state.simplex_weights.dtype), weights=weights.astype(state.weights.dtype)
        )
        return weights, new_state

    return GramianWeighting(init=init, update=update)


def sdmgrad(
    num_tasks: int,
    lamda: chex.Numeric = 0.3,
    niter: chex.Numeric = 20,
    *,
    learning_rate: chex.Numeric = 5.0,
    momentum: chex.Numeric = 0.5,
) -> optax.GradientTransformationExtraArgs:
    r"""SDMGrad: ``d = (J^T w + lamda * mean_t g_t) / (1 + lamda)`` with ``w`` on the simplex minimising
    ``|J^T w + lamda * mean_t g_t|^2``.

    The direction-oriented MGDA of Xiao et al.: the min-norm problem over the simplex, regularised towards the mean
    gradient ``g_0`` (``lamda = 0`` is MGDA, ``lamda -> inf`` the mean). As in the authors' and LibMTL's code, ``w``
    takes ``niter`` projected heavy-ball steps per update on the objective's gradient ``G' w + lamda G' 1 / T``,
    ``G' = G / mean_t(|g_t|)^2`` (torch ``SGD(lr=learning_rate, momentum=momentum)``, the momentum buffer restarted
    at every update, then the Euclidean projection onto the simplex), warm-started from the previous update's ``w``
    (kept in the state; uniform at first). ``niter`` steps approximate the optimum only; many small steps
    (``learning_rate`` below ``1 / lambda_max(G')``) converge to it.

    The paper's stochastic algorithm uses three independent mini-batch gradients (one for the update, two for the
    ``w`` subproblem's unbiased estimate of ``G``). A transformation sees one task-stacked gradient, so this is the
    deterministic variant: the same gradients for all three (pass a Gramian of independent samples through
    :func:`sdmgrad_weighting` to reproduce the stochastic one). Departure from LibMTL: ``G'`` is divided by
    ``mean |g_t|^2`` exactly (LibMTL adds ``1e-8``, which changes the weights for gradients of norm below ~1e-4),
    so the weights do not depend on the gradients' scale. Output scale: the weights sum to 1; ``T = 1`` gives ``g``.

    Args:
      num_tasks: ``T`` (static; the state holds the ``(T,)`` warm start).
      lamda: regularisation towards the mean direction (LibMTL ``SDMGrad_lamda``; may be an array).
      niter: inner iterations per update (LibMTL ``SDMGrad_niter``).
      learning_rate, momentum: the inner heavy-ball step (the authors' 5 and 0.5).

    Reference: Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023 (Algorithm 1); LibMTL ``SDMGrad``.
    """
    weighting = sdmgrad_weighting(num_tasks, lamda, niter, learning_rate=learning_rate, momentum=momentum)
    return from_weighting(weighting)
