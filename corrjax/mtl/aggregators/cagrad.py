"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import solvers
from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting, nan_if_nonfinite

Array = jax.Array

_RESCALE = (0, 1, 2)


def cagrad_inner(gramian: Array, c: float | Array, *, max_iter: int = 300, tol: float = 1e-7) -> Array:
    """Solves CAGrad's dual ``min_{w in simplex} w^T G 1/T + c |g_0| sqrt(w^T G w)`` (``|g_0| = sqrt(1^T G 1) / T``).

    Projected gradient descent with backtracking (Armijo on the quadratic upper model), on the trace-normalised
    Gramian (the minimiser is scale-invariant); stops when a step moves ``w`` by less than ``tol`` or after
    ``max_iter`` steps. Returns ``(T,)`` simplex weights.
    """
    g = jnp.asarray(gramian)
    t = g.shape[0]
    s = jnp.trace(g) / t
    gn = (g + g.T) / (2 * jnp.where(s > 0, s, 1.0))
    gb = gn @ jnp.full((t,), 1.0 / t, g.dtype)
    sqrt_phi = c * jnp.sqrt(jnp.maximum(jnp.mean(gb), 0.0))  # c |g0| with |g0|^2 = 1^T G 1 / T^2
    eps = jnp.finfo(g.dtype).eps

    def f_and_grad(w: Array) -> tuple[Array, Array]:
        gw = gn @ w
        nrm = jnp.sqrt(jnp.maximum(w @ gw, 0.0) + eps)
        return gb @ w + sqrt_phi * nrm, gb + sqrt_phi * gw / nrm

    def body(state: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        w, step, it, _ = state
        f, grad = f_and_grad(w)
        w_new = solvers.project_simplex(w - step * grad)
        dw = w_new - w
        f_new, _ = f_and_grad(w_new)
        accept = f_new <= f + grad @ dw + (dw @ dw) / (2 * step) + 10 * eps * jnp.abs(f)
        small = jnp.sqrt(dw @ dw) < tol
        w = jnp.where(accept, w_new, w)
        step = jnp.where(accept, step * 1.5, step * 0.5)
        return w, step, it + 1, (accept & small) | (step < 1e-12)

    w0 = jnp.full((t,), 1.0 / t, g.dtype)
    init = (w0, jnp.asarray(1.0, g.dtype), jnp.array(0), jnp.array(False))
    w, *_ = jax.lax.while_loop(lambda st: (~st[3]) & (st[2] < max_iter), body, init)
    return w


def cagrad_weighting(
    c: float | Array = 0.5, rescale: int = 2, max_iter: int = 300, tol: float = 1e-7
) -> GramianWeighting:
    """CAGrad's combination weights from the Gramian (see :func:`cagrad`)."""
    if not isinstance(rescale, jax.core.Tracer) and rescale not in _RESCALE:
        raise ValueError(f"`rescale` must be one of {_RESCALE}, got {rescale!r}")
    if not isinstance(c, jax.core.Tracer) and not bool(jnp.all(jnp.asarray(c) >= 0)):
        raise ValueError(f"`c` (the ball's radius relative to |g_0|) must be >= 0, got {c!r}")

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        cc = jnp.asarray(c, g.dtype)
        w = cagrad_inner(g, cc, max_iter=max_iter, tol=tol)
        mean_w = jnp.full((t,), 1.0 / t, g.dtype)
        g0_norm = jnp.sqrt(jnp.maximum(mean_w @ g @ mean_w, 0.0))
        gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
        tiny = jnp.sqrt(jnp.finfo(g.dtype).eps) * jnp.sqrt(jnp.maximum(jnp.trace(g) / t, 0.0))
        lam = jnp.where(gw_norm > tiny, cc * g0_norm / jnp.where(gw_norm > tiny, gw_norm, 1.0), 0.0)
        weights = mean_w + lam * w
        # traceable in `rescale` (optax.inject_hyperparams injects every numeric argument)
        weights = weights / jnp.where(rescale == 1, 1.0 + cc**2, jnp.where(rescale == 2, 1.0 + cc, 1.0))
        return nan_if_nonfinite(weights, g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def cagrad(
    c: float | Array = 0.5, rescale: int = 2, max_iter: int = 300, tol: float = 1e-7
) -> optax.GradientTransformationExtraArgs:
    """Conflict-Averse Gradient descent: the best worst-task improvement within a ball around the mean gradient.

    ``d = g_0 + (c |g_0| / |g_w|) g_w`` where ``g_0`` is the mean gradient, ``g_w = J^T w`` and ``w`` minimises
    ``g_w . g_0 + c |g_0| |g_w|`` over the simplex (:func:`cagrad_inner`, in JAX). Output scale: ``rescale=2``
    (default) returns ``d / (1 + c)``, so identical gradients and ``T = 1`` give the gradient itself and ``c = 0``
    gives :func:`mean`; ``rescale=1`` returns ``d / (1 + c^2)`` (the default of the authors' code and LibMTL);
    ``rescale=0`` returns ``d`` as in the paper's Algorithm 1. When ``g_w`` vanishes (a Pareto-stationary point) the
    update is ``g_0`` scaled as above.

    Args:
      c: radius of the ball relative to ``|g_0|`` (the paper's ``c``, default 0.5 as in LibMTL); may be an array.
      rescale: 0, 1 or 2 as above.
      max_iter, tol: inner solver controls.

    Reference: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
    """
    return from_weighting(cagrad_weighting(c, rescale, max_iter, tol))
