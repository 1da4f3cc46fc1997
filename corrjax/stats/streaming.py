"""Streaming, mergeable covariance and correlation: a pytree state updated chunk by chunk and merged exactly.

Each chunk is reduced with the shifted two-pass algorithm, then folded into the state with the pairwise update of
Chan, Golub & LeVeque (1979/1983), "Updating formulae and a pairwise algorithm for computing sample variances":
for parts ``a`` and ``b`` with weights ``Wa, Wb``, means ``ma, mb`` and co-moments ``Ca, Cb``,

    W = Wa + Wb,   m = ma + (mb - ma) Wb / W,   C = Ca + Cb + (mx_b - mx_a)(my_b - my_a)^T Wa Wb / W.

The merge is associative and commutative up to rounding, so any chunking, order or merge tree (including a merge
across devices, :func:`cov_allreduce`) gives the same statistics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from corrjax._checks import as_columns, as_float_array, check_ddof, check_same_n
from corrjax.stats._centered import PRECISION, AxisName, centered, normalize_comoment

Array = jax.Array

__all__ = ["CovState", "corr_finalize", "cov_allreduce", "cov_finalize", "cov_init", "cov_merge", "cov_update"]


@struct.dataclass
class CovState:
    """Mergeable sufficient statistics of a (cross-)covariance.

    Attributes:
      weight: ``()`` total weight seen (the number of observations when unweighted).
      mean_x: ``(d,)`` running mean of ``x``.
      mean_y: ``(e,)`` running mean of ``y`` (equal to ``mean_x`` for an auto-covariance state).
      comoment: ``(d, e)`` sum of weighted products of deviations from the means.
      m2_x: ``(d,)`` sum of weighted squared deviations of ``x`` (for correlations of a cross state).
      m2_y: ``(e,)`` same for ``y``.
      cross: static; True when the state tracks ``cov(x, y)`` rather than ``cov(x)``.
    """

    weight: Array
    mean_x: Array
    mean_y: Array
    comoment: Array
    m2_x: Array
    m2_y: Array
    cross: bool = struct.field(pytree_node=False, default=False)


def cov_init(d: int, e: int | None = None, dtype: Any = jnp.float32) -> CovState:
    """Empty state for ``d`` variables (and ``e`` more for a cross-covariance ``cov(x, y)``).

    Args:
      d: number of columns of ``x``.
      e: number of columns of ``y``; ``None`` tracks the auto-covariance of ``x``.
      dtype: floating dtype of the statistics (float32 by default).
    """
    for name, v in (("d", d), ("e", e)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
    ee = d if e is None else e
    z = lambda *s: jnp.zeros(s, dtype)
    return CovState(z(), z(d), z(ee), z(d, ee), z(d), z(ee), cross=e is not None)


def _chunk_state(state: CovState, x: Array, y: Array | None, w: Array | None) -> CovState:
    """Statistics of one chunk, two-pass and shifted."""
    xc, mx, wsum = centered(x, w, None)
    xw = xc if w is None else xc * w[:, None]
    if state.cross:
        yc, my, _ = centered(y, w, None)
    else:
        yc, my = xc, mx
    c = jnp.matmul(xw.T, yc, precision=PRECISION)
    m2x = jnp.sum(xw * xc, axis=0)
    m2y = m2x if not state.cross else jnp.sum((yc if w is None else yc * w[:, None]) * yc, axis=0)
    return CovState(wsum, mx, my, c, m2x, m2y, cross=state.cross)


def cov_update(state: CovState, x: Any, y: Any = None, weights: Any = None) -> CovState:
    """Folds a chunk of observations into ``state``.

    Args:
      state: from :func:`cov_init`/:func:`cov_update`/:func:`cov_merge`.
      x: ``(m, d)`` (or ``(m,)`` when ``d == 1``) new observations.
      y: ``(m, e)`` paired observations; required for a cross state, rejected otherwise.
      weights: optional ``(m,)`` non-negative frequency weights (real values allowed; ``W - ddof`` normalises).

    Returns:
      The updated state (same structure and dtype).
    """
    dtype = state.mean_x.dtype
    x2, _ = as_columns(x, "x")
    x2 = x2.astype(dtype)
    if x2.shape[1] != state.mean_x.shape[0]:
        raise ValueError(f"`x` must have {state.mean_x.shape[0]} columns to match the state, got shape {x2.shape}")
    y2 = None
    if state.cross:
        if y is None:
            raise ValueError("this state tracks cov(x, y): pass `y` to cov_update")
        y2, _ = as_columns(y, "y")
        y2 = y2.astype(dtype)
        check_same_n(x2, y2)
        if y2.shape[1] != state.mean_y.shape[0]:
            raise ValueError(f"`y` must have {state.mean_y.shape[0]} columns to match the state, got {y2.shape}")
    elif y is not None:
        raise ValueError("this state tracks cov(x); create it with cov_init(d, e) to track cov(x, y)")
    w = None
    if weights is not None:
        w = as_float_array(weights, "weights").astype(dtype)
        if w.shape != (x2.shape[0],):
            raise ValueError(f"`weights` must have shape ({x2.shape[0]},) to match x.shape={x2.shape}, got {w.shape}")
    if x2.shape[0] == 0:
        return state
    return cov_merge(state, _chunk_state(state, x2, y2, w))


def cov_merge(a: CovState, b: CovState) -> CovState:
    """Exact (Chan-Golub-LeVeque) merge of two states over disjoint observations; either may be empty."""
    if a.cross != b.cross or a.comoment.shape != b.comoment.shape:
        raise ValueError(
            f"cannot merge states of shapes {a.comoment.shape} (cross={a.cross}) and "
            f"{b.comoment.shape} (cross={b.cross})"
        )
    w = a.weight + b.weight
    safe_w = jnp.where(w > 0, w, jnp.ones_like(w))
    fb = jnp.where(w > 0, b.weight / safe_w, jnp.zeros_like(w))
    dx = b.mean_x - a.mean_x
    dy = b.mean_y - a.mean_y if a.cross else dx
    f = a.weight * fb  # Wa Wb / W
    mean_x = a.mean_x + dx * fb
    mean_y = a.mean_y + dy * fb if a.cross else mean_x
    comoment = a.comoment + b.comoment + f * jnp.outer(dx, dy)
    m2_x = a.m2_x + b.m2_x + f * dx * dx
    m2_y = a.m2_y + b.m2_y + f * dy * dy if a.cross else m2_x
    return CovState(w, mean_x, mean_y, comoment, m2_x, m2_y, cross=a.cross)


def cov_allreduce(state: CovState, axis_name: AxisName) -> CovState:
    """Merges the per-shard states along a mapped axis (``shard_map``/``pmap``); every shard gets the total.

    The weighted global mean is one ``psum``; the co-moments are shifted to it with the Chan correction
    ``W_s (m_s - m)(m_s - m)^T`` before a second ``psum``, which equals a tree of :func:`cov_merge` calls.
    """
    w = lax.psum(state.weight, axis_name)
    safe_w = jnp.where(w > 0, w, jnp.ones_like(w))
    # Means are combined relative to a common reference (shard 0's mean) to keep the sums of size ~spread.
    ref_x = _first(state.mean_x, axis_name)
    mean_x = ref_x + lax.psum(state.weight * (state.mean_x - ref_x), axis_name) / safe_w
    dx = state.mean_x - mean_x
    if state.cross:
        ref_y = _first(state.mean_y, axis_name)
        mean_y = ref_y + lax.psum(state.weight * (state.mean_y - ref_y), axis_name) / safe_w
        dy = state.mean_y - mean_y
    else:
        mean_y, dy = mean_x, dx
    comoment = lax.psum(state.comoment + state.weight * jnp.outer(dx, dy), axis_name)
    m2_x = lax.psum(state.m2_x + state.weight * dx * dx, axis_name)
    m2_y = lax.psum(state.m2_y + state.weight * dy * dy, axis_name) if state.cross else m2_x
    return CovState(w, mean_x, mean_y, comoment, m2_x, m2_y, cross=state.cross)


def _first(v: Array, axis_name: AxisName) -> Array:
    names = axis_name if isinstance(axis_name, tuple | list) else (axis_name,)
    first = jnp.asarray(True)
    for name in names:
        first = first & (lax.axis_index(name) == 0)
    return lax.psum(jnp.where(first, v, jnp.zeros_like(v)), axis_name)


def cov_finalize(state: CovState, ddof: int = 1) -> Array:
    """Covariance ``C / (W - ddof)`` from a state: ``(d, d)`` or ``(d, e)``; NaN where ``W - ddof <= 0``."""
    check_ddof(ddof)
    denom = state.weight - ddof
    scale = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), jnp.nan).astype(state.comoment.dtype)
    c = state.comoment * scale
    return c if state.cross else 0.5 * (c + c.T)


def corr_finalize(state: CovState) -> Array:
    """Pearson correlation from a state: clipped to [-1, 1], unit diagonal for ``cov(x)`` states, NaN for
    zero-variance columns (and for an empty state)."""
    if state.cross:
        return normalize_comoment(state.comoment, state.m2_x, state.m2_y, symmetric=False)
    c = 0.5 * (state.comoment + state.comoment.T)
    return normalize_comoment(c, state.m2_x, state.m2_x, symmetric=True)
