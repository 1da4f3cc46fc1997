"""The two-objective toy problem of the CAGrad and Nash-MTL papers, and its Pareto set.

Two losses on ``x = (x1, x2)`` in R^2 (Liu et al. 2021, ``toy.py`` of github.com/Cranial-XIX/CAGrad). In the upper
half-plane they are log-shaped valleys weighted by ``c1 = max(tanh(x2 / 2), 0)``, nearly flat in ``x2``, so that the
mean gradient creeps along a ridge; in the lower half-plane they are quadratic bowls weighted by
``c2 = max(tanh(-x2 / 2), 0)``::

    f1 = c1 * (log(max(|-(x1 + 7) / 2 - tanh(-x2)|, 5e-6)) + 6) + c2 * (((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20)
    f2 = c1 * (log(max(|-(x1 - 3) / 2 + tanh(-x2) + 2|, 5e-6)) + 6) + c2 * (((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20)

The Nash-MTL variant (Navon et al. 2022, ``experiments/toy`` of github.com/AvivNavon/nash-mtl) multiplies ``f1``
by ``f1_scale = 0.1``, so the two gradients differ in scale by an order of magnitude.

The Pareto set (the same for any positive ``f1_scale``: scaling one objective does not change which points are
Pareto-stationary) is a curve from ``x1 = -7`` (the minimiser of ``f2``) to ``x1 = 7`` (the minimiser of ``f1``)
close to the line ``x2 = -8.3552`` that the papers draw. :func:`pareto_set` computes it from the stationarity
conditions; :func:`pareto_stationarity` measures how far a point is from being Pareto-stationary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from corrjax._checks import as_float_array
from corrjax.mtl.task_grad import value_and_task_grad

Array = jax.Array

LOWER = 5e-6
"""The clamp inside the logarithms of the upper half-plane (the papers' ``LOWER``)."""

CAGRAD_STARTS = np.array([[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0]])
"""The three starting points of the CAGrad paper (Fig. 1; ``inits`` in ``toy.py``)."""

NASH_MTL_STARTS = np.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]])
"""The five starting points of the Nash-MTL paper (``inits`` in ``experiments/toy/trainer.py``)."""

PAPERS_FRONT_X2 = -8.3552
"""The ``x2`` of the segment ``x1 in [-7, 7]`` that both papers draw as the Pareto set."""


def _check_point(x: Array) -> Array:
    x = as_float_array(x, "x")  # integers promoted, complex refused
    if x.shape[-1:] != (2,):
        raise ValueError(f"`x` must have a last axis of size 2 (the point (x1, x2)), got shape {x.shape}")
    return x


def toy_losses(x: Array, f1_scale: float | Array = 1.0) -> Array:
    """The two task losses ``(f1_scale * f1(x), f2(x))`` at ``x`` of shape ``(..., 2)``; returns ``(..., 2)``.

    ``f1_scale=1`` is the CAGrad paper's problem, ``f1_scale=0.1`` the Nash-MTL paper's. Both losses are at least
    ``-20`` (times ``f1_scale`` for ``f1``); FAMO's toy code (github.com/Cranial-XIX/FAMO) shifts them by ``21``
    for its positive-loss weighting (``min_losses = [-21 * scale, -21]``).
    """
    x = _check_point(x)
    x1, x2 = x[..., 0], x[..., 1]
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
    return jnp.stack([f1_scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2], axis=-1)


def pareto_stationarity(x: Array, f1_scale: float | Array = 1.0) -> Array:
    """``min_{w in [0, 1]} |w grad f1(x) + (1 - w) grad f2(x)|``: 0 exactly at Pareto-stationary points.

    ``x`` has shape ``(2,)`` (``jax.vmap`` for a batch). The two-task min-norm problem has the closed form
    ``w = clip(g2 . (g2 - g1) / |g1 - g2|^2, 0, 1)`` (the line search of MGDA-UB, Sener & Koltun 2018), so this needs
    no iterative solver and does not depend on :mod:`corrjax.mtl.solvers`.
    """
    x = _check_point(x)
    if x.shape != (2,):
        raise ValueError(f"`x` must have shape (2,) (vmap over a batch of points), got {x.shape}")
    _, g = value_and_task_grad(lambda p: toy_losses(p, f1_scale))(x)
    diff = g[0] - g[1]
    den = diff @ diff
    w = jnp.where(den > 0, jnp.clip(-(g[1] @ diff) / jnp.where(den > 0, den, 1.0), 0.0, 1.0), 0.5)
    return jnp.linalg.norm(w * g[0] + (1 - w) * g[1])


def pareto_set(num: int = 1001, *, iters: int = 60) -> Array:
    """``(num, 2)`` points of the toy's Pareto set, ordered by ``x1`` from ``-7`` to ``7``.

    In the lower half-plane ``f_t = c2(x2) (q_t(x1) + h(x2))`` with ``q_1 = (x1 - 7)^2 / 10``,
    ``q_2 = (x1 + 7)^2 / 10``, ``h = (x2 + 8)^2 / 100 - 20``. A convex combination ``w grad f1 + (1 - w) grad f2``
    vanishes when its ``x1`` part does, ``w = (x1 + 7) / 14`` (so ``x1`` in ``[-7, 7]``), and its ``x2`` part does,
    ``c2'(x2) (Q + h(x2)) + c2(x2) h'(x2) = 0`` with ``Q = w q_1 + (1 - w) q_2``; that root is found by bisection on
    ``x2 in [-12, -8]`` (where the left side changes sign once). The weights are those of the unscaled losses; the
    set does not depend on ``f1_scale``.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"`num` must be an int >= 2, got {num!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"`iters` must be an int >= 1, got {iters!r}")
    return _pareto_set(num, iters)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pareto_set(num: int, iters: int) -> Array:
    x1 = jnp.linspace(-7.0, 7.0, num)
    w = (x1 + 7.0) / 14.0
    q = w * (x1 - 7.0) ** 2 / 10 + (1 - w) * (x1 + 7.0) ** 2 / 10

    def phi(x2: Array) -> Array:
        c2 = jnp.tanh(-0.5 * x2)
        dc2 = -0.5 / jnp.cosh(0.5 * x2) ** 2
        h = (x2 + 8.0) ** 2 / 100 - 20
        dh = (x2 + 8.0) / 50
        return dc2 * (q + h) + c2 * dh

    def bisect(_: int, lohi: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        neg = phi(mid) < 0  # phi < 0 below the root, > 0 above it
        return jnp.where(neg, mid, lo), jnp.where(neg, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, bisect, (jnp.full_like(x1, -12.0), jnp.full_like(x1, -8.0)))
    return jnp.stack([x1, 0.5 * (lo + hi)], axis=-1)


def distance_to_set(points: np.ndarray, curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each of ``points`` ``(n, 2)`` to the polyline ``curve`` ``(m, 2)``, and the nearest
    point on it ``(n, 2)`` (NumPy, for reporting)."""
    p = np.asarray(points, dtype=np.float64)[:, None, :]
    a = np.asarray(curve, dtype=np.float64)[None, :-1, :]
    b = np.asarray(curve, dtype=np.float64)[None, 1:, :]
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-300), 0.0, 1.0)
    nearest = a + t[..., None] * ab
    d = np.linalg.norm(p - nearest, axis=-1)
    k = np.argmin(d, axis=1)
    rows = np.arange(d.shape[0])
    return d[rows, k], nearest[rows, k]
