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


def cagrad_solve(gramian: Array, c: float | Array, *, max_iter: int | None = None, tol: float | None = None) -> Array:
    """Weights ``a`` (shape ``(T,)``) of CAGrad's direction ``d = J^T a = g_0 + (c |g_0| / |g_w|) g_w`` (unscaled).

    CAGrad's dual is ``min_{w in simplex} F(w) = g_w . g_0 + phi |g_w|`` with ``g_w = J^T w``, ``g_0 = J^T m``
    (``m = 1/T``) and ``phi = c |g_0|``. Its KKT conditions with ``x = |g_w| / phi`` say that ``w`` is the
    min-norm point of the hull translated by ``x g_0`` (``min_{w in simplex} |J^T w + x g_0|^2``) and that
    ``|J^T w| = phi x``. On a fixed support ``F`` the first problem's solution is affine in ``x``,
    ``w(x) = w_0 + x w_1`` (one bordered ``(T+1)``-system with two right-hand sides), so ``|J^T w(x)|^2 = (phi x)^2``
    is a quadratic in ``x``, solved in closed form. The solver follows this piecewise-affine path from ``x = 0`` (the
    MGDA point, :func:`corrjax.mtl.solvers.min_norm_simplex` with its primal active set) through its breakpoints (a
    weight or a reduced cost reaching 0; one support change per step, a parametric active-set method) to the first
    root, so it
    is exact up to rounding, and ``a = m + w(x) / x = m + w_0 / x + w_1``. The systems use the cosine matrix
    (rows scaled by the task-gradient norms), so norms 1e-12 .. 1e12 apart are solved to rounding.

    When the root is at ``x -> 0`` (an exactly Pareto-stationary point whose dual optimum has ``g_w = 0``, e.g. a
    zero task gradient with ``c >= 1``) ``a`` is the limit ``m + w_1``: ``d`` is then the projection of ``g_0`` onto the
    dual cone ``{d : J d >= 0}``, so ``J d >= 0`` holds there too. ``phi = 0`` (``c = 0`` or ``g_0 = 0``) gives ``m``.

    Args:
      gramian: ``(T, T)`` PSD Gramian.
      c: the ball's radius relative to ``|g_0|`` (``>= 0``).
      max_iter: cap on path steps (default ``4 T + 10``; typically a handful).
      tol: relative tolerance of the pivoting tests (default ``100 eps`` of the dtype).
    """
    g = jnp.asarray(gramian)
    t = g.shape[0]
    dtype = g.dtype
    max_iter = 4 * t + 10 if max_iter is None else int(max_iter)
    tol = solvers.default_tol(dtype) if tol is None else float(tol)
    ok = jnp.all(jnp.isfinite(g))
    g = jnp.where(ok, (g + g.T) / 2, jnp.eye(t, dtype=dtype))
    s = jnp.trace(g) / t
    gs = g / jnp.where(s > 0, s, 1.0)
    m = jnp.full((t,), 1.0 / t, dtype)
    b = gs @ m
    phi2 = jnp.asarray(c, dtype) ** 2 * jnp.maximum(m @ b, 0.0)
    diag = jnp.diag(gs)
    live = diag > 0
    n_min = jnp.min(jnp.where(live, jnp.sqrt(jnp.where(live, diag, 1.0)), jnp.inf))
    n_min = jnp.where(jnp.any(live), n_min, 1.0)
    n = jnp.where(live, jnp.sqrt(jnp.where(live, diag, 1.0)), n_min)
    cos = gs / jnp.outer(n, n)
    e = n_min / n
    idx = jnp.arange(t)
    zero_t = jnp.zeros((t,), dtype)

    def pieces(free: Array) -> tuple[Array, Array, Array, Array]:
        """``w_0, w_1, mu_0, mu_1`` of ``G_FF w - mu 1 = -x b_F``, ``1^T w = 1`` (in ``beta = n w``)."""
        f = free.astype(dtype)
        top = jnp.concatenate([cos * jnp.outer(f, f) + jnp.diag(1.0 - f), -(e * f)[:, None]], axis=1)
        bottom = jnp.concatenate([e * f, jnp.zeros((1,), dtype)])[None]
        mat = jnp.concatenate([top, bottom], axis=0)
        rhs = jnp.stack(
            [
                jnp.concatenate([zero_t, n_min[None]]),
                jnp.concatenate([-(b / n) * f, jnp.zeros((1,), dtype)]),
            ],
            axis=1,
        )
        sol = jnp.linalg.solve(mat, rhs)
        return sol[:t, 0] * f / n, sol[:t, 1] * f / n, sol[t, 0] * n_min, sol[t, 1] * n_min

    def body(state: tuple[Array, Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array, Array]:
        free, x, it, _, _ = state
        w0, w1, mu0, mu1 = pieces(free)
        # reduced costs rho(x) = rho_0 + x rho_1 (zero on F, >= 0 off F at a solution of the translated problem)
        r0 = gs @ w0 - mu0
        r1 = gs @ w1 + b - mu1
        # Values below the rounding of their own terms are exact zeros: a Gramian entry carries ~eps |g_i| |g_j|, so
        # the scale of (G w)_j is |g_j| (|w| . |g|) (per task, so norms 1e12 apart are not mistaken for rounding).
        # Degenerate w_0 / rho_0 are breakpoints at the current x (noise of either sign would decide whether the path
        # may stop at x -> 0); zero slopes are not breakpoints at all.
        w0 = jnp.where(jnp.abs(w0) * n <= t * tol * (jnp.abs(w0) @ n), 0.0, w0)
        r0 = jnp.where(jnp.abs(r0) <= t * tol * (n * (jnp.abs(w0) @ n) + jnp.abs(mu0)), 0.0, r0)
        a0, b0, c0 = w0 @ gs @ w0, w0 @ gs @ w1, w1 @ gs @ w1
        # |J^T w_0|^2 below the rounding of a Gramian quadratic form: J^T w_0 = 0 (0 is in the support's affine hull),
        # so the root is at x -> 0 and the limit m + w_1 applies (|B| <= sqrt(A C) vanishes with A)
        flat = a0 <= tol * (jnp.abs(w0) @ n) ** 2
        a0 = jnp.where(flat, 0.0, a0)
        b0 = jnp.where(flat, 0.0, b0)
        a2 = c0 - phi2
        disc = b0 * b0 - a2 * a0
        has = (disc >= 0) & ((a2 < 0) | (b0 < 0))
        den = -b0 + jnp.sqrt(jnp.maximum(disc, 0.0))
        xr = jnp.where(has, jnp.where(den > 0, jnp.maximum(a0, 0.0) / jnp.where(den > 0, den, 1.0), 0.0), jnp.inf)
        xr = jnp.maximum(xr, x)
        # slopes below the rounding of their own terms are zero (not candidates for a breakpoint)
        wt = t * tol * (jnp.abs(w1) @ n) / n
        rt = t * tol * (n * (jnp.abs(w1) @ n + jnp.abs(m) @ n) + jnp.abs(mu1))
        cand_w = free & (w1 < -wt)
        cand_r = ~free & (r1 < -rt)
        xw = -w0 / jnp.where(cand_w, w1, -1.0)
        xz = -r0 / jnp.where(cand_r, r1, -1.0)
        xs = jnp.where(cand_w, xw, jnp.where(cand_r, xz, jnp.inf))
        xs = jnp.maximum(xs, x)
        k = jnp.argmin(xs)
        xb = xs[k]
        finish = (xr < xb) | ~jnp.isfinite(xb)
        pos = xr > 0
        inv = 1.0 / jnp.where(pos, xr, 1.0)
        a = jnp.where(pos & ~flat, m + w0 * inv + w1, m + w1)
        free = jnp.where(finish, free, free ^ (idx == k))
        x = jnp.where(finish, xr, jnp.where(jnp.isfinite(xb), xb, x))
        return free, x, it + 1, finish, a

    # the primal active set keeps the support's gradients affinely independent, so the bordered systems are regular
    w_start = solvers.min_norm_simplex(g, qp_method="active_set")
    init = (w_start > 0, jnp.zeros((), dtype), jnp.array(0), jnp.array(False), m)
    *_, a = jax.lax.while_loop(lambda st: (~st[3]) & (st[2] < max_iter), body, init)
    a = jnp.where(phi2 > 0, a, m)
    return jnp.where(ok, a, jnp.nan)


def cagrad_weighting(
    c: float | Array = 0.5, rescale: int = 2, max_iter: int | None = None, tol: float | None = None
) -> GramianWeighting:
    """CAGrad's combination weights from the Gramian (see :func:`cagrad`)."""
    if not isinstance(rescale, jax.core.Tracer) and rescale not in _RESCALE:
        raise ValueError(f"`rescale` must be one of {_RESCALE}, got {rescale!r}")
    if not isinstance(c, jax.core.Tracer) and not bool(jnp.all(jnp.asarray(c) >= 0)):
        raise ValueError(f"`c` (the ball's radius relative to |g_0|) must be >= 0, got {c!r}")

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        cc = jnp.asarray(c, g.dtype)
        weights = cagrad_solve(g, cc, max_iter=max_iter, tol=tol)
        # traceable in `rescale` (optax.inject_hyperparams injects every numeric argument)
        weights = weights / jnp.where(rescale == 1, 1.0 + cc**2, jnp.where(rescale == 2, 1.0 + cc, 1.0))
        return nan_if_nonfinite(weights, g), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def cagrad(
    c: float | Array = 0.5, rescale: int = 2, max_iter: int | None = None, tol: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """Conflict-Averse Gradient descent: the best worst-task improvement within a ball around the mean gradient.

    ``d = g_0 + (c |g_0| / |g_w|) g_w`` where ``g_0`` is the mean gradient, ``g_w = J^T w`` and ``w`` minimises
    ``g_w . g_0 + c |g_0| |g_w|`` over the simplex, solved exactly (up to rounding) by a parametric active-set method
    in JAX (:func:`cagrad_solve`: no fixed-step iterations, no ridge), so for ``c >= 1`` the update conflicts with no
    task (``J d >= 0``, the primal optimum over a ball that contains 0). Output scale: ``rescale=2``
    (default) returns ``d / (1 + c)``, so identical gradients and ``T = 1`` give the gradient itself and ``c = 0``
    gives :func:`mean`; ``rescale=1`` returns ``d / (1 + c^2)`` (the default of the authors' code and LibMTL);
    ``rescale=0`` returns ``d`` as in the paper's Algorithm 1. Where the dual optimum has ``g_w = 0`` (an exactly
    Pareto-stationary point, e.g. a zero task gradient with ``c >= 1``) ``d`` is the limit of the formula, the
    projection of ``g_0`` onto the dual cone ``{d : J d >= 0}`` (the authors' code returns ``g_0`` there).

    Args:
      c: radius of the ball relative to ``|g_0|`` (the paper's ``c``, default 0.5 as in LibMTL); may be an array.
      rescale: 0, 1 or 2 as above.
      max_iter, tol: :func:`cagrad_solve`'s path-step cap and pivoting tolerance (defaults ``4 T + 10``, ``100 eps``).

    Reference: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
    """
    return from_weighting(cagrad_weighting(c, rescale, max_iter, tol))
