"""FairGrad: alpha-fair resource allocation over the task gradients (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators._base import GramianWeighting, from_weighting

Array = jax.Array

_GRID = 40  # step sizes 2^0 .. 2^-39 tried at once by the line search


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}")
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}")


def fair_allocation(
    gramian: Array, alpha: chex.Numeric = 1.0, *, max_iter: int = 50, tol: float | None = None, reg_eps: float = 0.0
) -> Array:
    r"""Solves FairGrad's system ``(G w)_i = w_i^{-1/alpha}``, ``w > 0``.

    The system is the stationarity condition of the strictly convex (for ``alpha > 0``)

    .. math:: \phi(w) = \tfrac12 w^\top G w - \sum_i \frac{w_i^{p} - 1}{p}, \qquad p = 1 - 1/\alpha

    (``-sum log w`` at ``alpha = 1``, Nash-MTL's system), minimised by Newton steps with a line search that keeps
    ``w > 0`` and stops where the directional derivative of ``phi`` changes sign (the largest of the steps
    ``2^{-k}`` with ``phi'(t) <= lambda^2 / 2``, ``lambda^2`` the Newton decrement), so no difference of ``phi`` values
    is ever rounded away. The Newton systems are Jacobi-scaled, so task-gradient norms many orders of magnitude apart
    stay well conditioned. Solved on ``G / s`` with ``s = trace(G) / T`` and rescaled: ``w(c G) = c^{-alpha/(alpha+1)}
    w(G)``. Orthogonal gradients give ``w_i = |g_i|^{-2 alpha/(alpha+1)}`` (the starting point). A task with a zero
    gradient has no finite solution (``w_i -> inf`` times a zero vector); it is taken out of the system and gets
    ``w_i = 0``. Where ``0`` is in the convex hull of the gradients (a Pareto-stationary point: opposite gradients,
    ``T > d`` spanning the space) the system has no solution either: ``w`` grows along the null direction until
    ``max_iter`` (or until the Newton system is numerically singular) and the update ``J^T w`` tends to 0, the
    stationary point's answer; ``reg_eps > 0`` adds a ridge (relative to ``s``) that keeps ``w`` bounded instead.

    Args:
      gramian: ``(T, T)`` PSD Gramian ``J J^T``.
      alpha: fairness ``alpha > 0`` (may be a traced scalar); 1 is proportional fairness (Nash-MTL), large values
        approach max-min fairness, small values the utilitarian (sum) allocation.
      max_iter: Newton iteration cap.
      tol: stop when the squared Newton decrement is below ``tol`` (the last step is still taken, so the final
        decrement is about ``tol``'s square); default: the dtype's machine epsilon.
      reg_eps: ridge on the normalised Gramian (0: the exact system).

    Returns:
      ``(T,)`` weights ``w`` (positive for non-zero gradients; NaN if the Gramian is not finite).

    Reference: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (Eq. 7; the authors' code
    solves it with ``scipy.optimize.least_squares``).
    """
    g = jnp.asarray(gramian)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise ValueError(f"`gramian` must be a square (T, T) matrix with T >= 1, got shape {tuple(g.shape)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        g = g.astype(jnp.result_type(float))
    _check_positive(alpha, "alpha")
    t = g.shape[0]
    dtype = g.dtype
    tol = float(jnp.finfo(dtype).eps) if tol is None else tol
    g = (g + g.T) / 2
    s = jnp.trace(g) / t
    s = jnp.where(s > 0, s, 1.0)
    eye = jnp.eye(t, dtype=dtype)
    gn = g / s + reg_eps * eye
    diag = jnp.diag(gn)
    live = diag > jnp.finfo(dtype).tiny
    both = live[:, None] & live[None, :]
    a_mat = jnp.where(both, gn, eye)  # dead tasks decouple (w_i = 1 solves their row), zeroed below
    alpha = jnp.asarray(alpha, dtype)
    r = 1.0 / alpha  # the system's exponent: (A w)_i = w_i^{-r}
    steps = 0.5 ** jnp.arange(_GRID, dtype=dtype)

    def slope(w: Array, d: Array, tt: Array) -> Array:
        """phi'(t) along d at the step sizes tt: (A(w + t d)) . d - sum (w + t d)^{-r} d."""
        wt = w[None, :] + tt[:, None] * d[None, :]
        return (wt @ a_mat) @ d - jnp.sum(wt ** (-r) * d[None, :], axis=1)

    def body(state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        w, it, _ = state
        grad = a_mat @ w - w ** (-r)
        hess = a_mat + jnp.diag(r * w ** (-r - 1.0))
        sc = 1.0 / jnp.sqrt(jnp.diag(hess))
        d = -sc * jnp.linalg.solve(hess * jnp.outer(sc, sc), sc * grad)
        lam2 = jnp.maximum(-grad @ d, 0.0)
        # stay inside w > 0 (a 0.99 fraction of the way to the boundary), then the largest step whose slope is not
        # yet clearly positive: phi decreases along it (phi is convex on the segment)
        t_max = jnp.min(jnp.where(d < 0, -0.99 * w / jnp.where(d < 0, d, -1.0), jnp.inf))
        tt = jnp.minimum(1.0, t_max) * steps
        ok = slope(w, d, tt) <= 0.5 * lam2
        step = jnp.where(jnp.any(ok), tt[jnp.argmax(ok)], tt[-1])
        w_new = w + step * d
        w_new = jnp.where(w_new > 0, w_new, 0.5 * w)
        # Pareto-stationary input: w diverges until the Hessian is numerically singular; keep the last finite w
        bad = ~jnp.all(jnp.isfinite(w_new))
        return jnp.where(bad, w, w_new), it + 1, bad | ~(lam2 > tol)

    w0 = jnp.where(live, diag, 1.0) ** (-alpha / (alpha + 1.0))
    w, *_ = jax.lax.while_loop(lambda st: (~st[2]) & (st[1] < max_iter), body, (w0, jnp.array(0), jnp.array(False)))
    w = jnp.where(live, w, 0.0) * s ** (-alpha / (alpha + 1.0))
    return jnp.where(jnp.all(jnp.isfinite(g)), w, jnp.nan)


def fairgrad_weighting(
    alpha: chex.Numeric = 1.0, max_iter: int = 50, tol: float | None = None, reg_eps: float = 0.0
) -> GramianWeighting:
    """FairGrad's weights from the Gramian (see :func:`fairgrad`)."""
    _check_positive(alpha, "alpha")

    def update(g: Array, state: Any, t: int, **_: Any) -> tuple[Array, Any]:
        return fair_allocation(g, alpha, max_iter=max_iter, tol=tol, reg_eps=reg_eps), state

    return GramianWeighting(init=optax.EmptyState, update=update)


def fairgrad(
    alpha: chex.Numeric = 1.0, max_iter: int = 50, tol: float | None = None, reg_eps: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    r"""FairGrad: ``d = J^T w`` with the alpha-fair weights ``(G w)_i = w_i^{-1/alpha}``, ``w > 0``.

    The update maximises the alpha-fair utility of the task improvements ``sum_i u_alpha(g_i . d)`` (``u_alpha(x) =
    x^{1-alpha} / (1 - alpha)``, ``log x`` at ``alpha = 1``) over a ball; its KKT conditions give ``d = J^T w`` with
    ``g_i . d = w_i^{-1/alpha}``. Solved exactly inside jit by :func:`fair_allocation` (Newton with a line search)
    instead of the authors' ``scipy.optimize.least_squares``. ``alpha = 1`` is Nash-MTL's system
    (:func:`corrjax.mtl.nash_mtl`, ``d`` invariant to per-task rescaling); ``alpha -> inf`` approaches max-min
    fairness (equal ``g_i . d``), ``alpha -> 0`` the sum of the gradients.

    Output scale: the paper's (no normalisation). Scaling every gradient by ``c`` scales ``w`` by
    ``c^{-2 alpha/(alpha+1)}`` and ``d`` by ``c^{(1 - alpha)/(1 + alpha)}``; ``T = 1`` gives
    ``|g|^{-2 alpha/(alpha+1)} g`` (``g / |g|`` at ``alpha = 1``). Zero-gradient tasks get weight 0. Chain
    ``optax.clip_by_global_norm`` for the authors' ``max_norm`` clipping.

    Args:
      alpha: fairness ``alpha > 0`` (may be an array under ``optax.inject_hyperparams``).
      max_iter, tol, reg_eps: see :func:`fair_allocation`.

    Reference: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024; LibMTL ``FairGrad``
    (``FairGrad_alpha``).
    """
    return from_weighting(fairgrad_weighting(alpha, max_iter, tol, reg_eps))
