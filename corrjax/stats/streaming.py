"""Streaming, mergeable covariance and correlation: a pytree state updated chunk by chunk and merged exactly.

Each chunk is reduced with the shifted two-pass algorithm, then folded into the state with the pairwise update of
Chan, Golub & LeVeque (1979/1983), "Updating formulae and a pairwise algorithm for computing sample variances":
for parts ``a`` and ``b`` with weights ``Wa, Wb``, means ``ma, mb`` and co-moments ``Ca, Cb``,

    W = Wa + Wb,   m = ma + (mb - ma) Wb / W,   C = Ca + Cb + (mx_b - mx_a)(my_b - my_a)^T Wa Wb / W.

The merge is associative and commutative up to rounding, so any chunking, order or merge tree (including a merge
across devices, :func:`cov_allreduce`) gives the same statistics.

The state carries its scale: per column a power-of-two exponent (that of the largest magnitude seen), and the mean
offsets and co-moments are stored for the data divided by it, so they neither over- nor underflow at any magnitude
of the data. A merge brings both parts to the larger exponent (an exact power-of-two rescaling; a part many
orders of magnitude smaller can only lose digits that are below the other's rounding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from corrjax._checks import as_columns, as_float_array, check_ddof, check_same_n
from corrjax.stats._centered import (
    AxisName,
    compute_dtype,
    linear_index,
    lowest_exponent,
    mul_pow2,
    normalize_comoment,
    pow2,
    reference_row,
    scaled_comoment,
    unscale_outer,
)

Array = jax.Array

__all__ = ["CovState", "corr_finalize", "cov_allreduce", "cov_finalize", "cov_init", "cov_merge", "cov_update"]


@struct.dataclass
class CovState:
    """Mergeable sufficient statistics of a (cross-)covariance.

    Means are stored relative to a per-column reference value (the first observation the state saw), so that a
    float32 state keeps full precision when the mean is far larger than the spread; the offsets and co-moments are
    those of the data divided by ``2**exp`` per column, so that they stay finite and normal at any magnitude.

    Attributes:
      weight: ``()`` total weight seen (the number of observations when unweighted).
      shift_x, shift_y: ``(d,)``, ``(e,)`` reference values (data units); ``mean_x = shift_x + dmean_x * 2**exp_x``.
      dmean_x, dmean_y: ``(d,)``, ``(e,)`` means relative to the reference values, in units of ``2**exp``.
      comoment: ``(d, e)`` sum of weighted products of deviations from the means, in units of
        ``2**(exp_x_i + exp_y_j)`` (:func:`cov_finalize` returns it in data units).
      m2_x, m2_y: ``(d,)``, ``(e,)`` sums of weighted squared deviations (for correlations of a cross state), in
        units of ``2**(2 exp)``.
      exp_x, exp_y: ``(d,)``, ``(e,)`` int32 power-of-two exponents of the columns' scales.
      cross: static; True when the state tracks ``cov(x, y)`` rather than ``cov(x)`` (then the ``y`` fields alias
        the ``x`` ones).
    """

    weight: Array
    shift_x: Array
    dmean_x: Array
    shift_y: Array
    dmean_y: Array
    comoment: Array
    m2_x: Array
    m2_y: Array
    exp_x: Array
    exp_y: Array
    cross: bool = struct.field(pytree_node=False, default=False)

    @property
    def mean_x(self) -> Array:
        """``(d,)`` running mean of ``x``."""
        return self.shift_x + mul_pow2(self.dmean_x, self.exp_x)

    @property
    def mean_y(self) -> Array:
        """``(e,)`` running mean of ``y`` (``mean_x`` for an auto-covariance state)."""
        return self.shift_y + mul_pow2(self.dmean_y, self.exp_y)


def cov_init(d: int, e: int | None = None, dtype: Any = jnp.float32) -> CovState:
    """Empty state for ``d`` variables (and ``e`` more for a cross-covariance ``cov(x, y)``).

    Args:
      d: number of columns of ``x``.
      e: number of columns of ``y``; ``None`` tracks the auto-covariance of ``x``.
      dtype: floating dtype of the statistics (float32 by default; float16/bfloat16 are stored as float32, whose
        range the sums of squares need).
    """
    for name, v in (("d", d), ("e", e)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
    dtype = compute_dtype(dtype)
    ee = d if e is None else e
    z = lambda *s: jnp.zeros(s, dtype)
    lo = lambda k: jnp.full((k,), lowest_exponent(dtype), jnp.int32)
    return CovState(z(), z(d), z(d), z(ee), z(ee), z(d, ee), z(d), z(ee), lo(d), lo(ee), cross=e is not None)


def _chunk_state(state: CovState, x: Array, y: Array | None, w: Array | None) -> CovState:
    """Statistics of one chunk, two-pass, shifted (the chunk's first row is the shift) and scaled, in row blocks."""
    m = scaled_comoment(x, y if state.cross else None, w, None, sumsq=state.cross)
    sx = reference_row(x, None)
    if state.cross:
        sy, m2x, m2y = reference_row(y, None), m.sxx, m.syy
    else:
        sy = sx
        m2x = m2y = jnp.diagonal(m.comoment)
    return CovState(m.wsum, sx, m.dmean_x, sy, m.dmean_y, m.comoment, m2x, m2y, m.exp_x, m.exp_y, cross=state.cross)


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
    dtype = state.comoment.dtype
    d, e = state.comoment.shape
    x2, _ = as_columns(x, "x")
    x2 = x2.astype(compute_dtype(dtype))
    if x2.shape[1] != d:
        raise ValueError(f"`x` must have {d} columns to match the state, got shape {x2.shape}")
    y2 = None
    if state.cross:
        if y is None:
            raise ValueError("this state tracks cov(x, y): pass `y` to cov_update")
        y2, _ = as_columns(y, "y")
        y2 = y2.astype(x2.dtype)
        check_same_n(x2, y2)
        if y2.shape[1] != e:
            raise ValueError(f"`y` must have {e} columns to match the state, got shape {y2.shape}")
    elif y is not None:
        raise ValueError("this state tracks cov(x); create it with cov_init(d, e) to track cov(x, y)")
    w = None
    if weights is not None:
        w = as_float_array(weights, "weights").astype(x2.dtype)
        if w.shape != (x2.shape[0],):
            raise ValueError(f"`weights` must have shape ({x2.shape[0]},) to match x.shape={x2.shape}, got {w.shape}")
    if x2.shape[0] == 0:
        return state
    chunk = _chunk_state(state, x2, y2, w)
    return cov_merge(state, jax.tree.map(lambda v: v if v.dtype == jnp.int32 else v.astype(dtype), chunk))


def _in_frame(frame: Array, shift: Array, dmean: Array, inv: Array) -> Array:
    """A mean ``shift + dmean / inv`` expressed relative to ``frame``, in units of ``1 / inv`` (accurate when the two
    are close; the power-of-two ``inv`` is applied to the data values before they are subtracted, so it is exact)."""
    return (shift * inv - frame * inv) + dmean


def _rescaled(s: CovState, ex: Array, ey: Array) -> CovState:
    """``s`` with its scaled fields expressed for the (not smaller) exponents ``ex``, ``ey`` (exact powers of two)."""
    dx, dy = s.exp_x - ex, s.exp_y - ey
    return s.replace(
        dmean_x=mul_pow2(s.dmean_x, dx),
        dmean_y=mul_pow2(s.dmean_y, dy),
        comoment=unscale_outer(s.comoment, dx, dy),
        m2_x=mul_pow2(s.m2_x, 2 * dx),
        m2_y=mul_pow2(s.m2_y, 2 * dy),
        exp_x=ex,
        exp_y=ey,
    )


def cov_merge(a: CovState, b: CovState) -> CovState:
    """Exact (Chan-Golub-LeVeque) merge of two states over disjoint observations; either may be empty."""
    if a.cross != b.cross or a.comoment.shape != b.comoment.shape:
        raise ValueError(
            f"cannot merge states of shapes {a.comoment.shape} (cross={a.cross}) and "
            f"{b.comoment.shape} (cross={b.cross})"
        )
    w = a.weight + b.weight
    a_on, b_on = a.weight > 0, b.weight > 0

    def common(ea, eb):  # the larger exponent of the non-empty parts
        return jnp.where(a_on, jnp.where(b_on, jnp.maximum(ea, eb), ea), eb)

    ex, ey = common(a.exp_x, b.exp_x), common(a.exp_y, b.exp_y)
    a, b = _rescaled(a, ex, ey), _rescaled(b, ex, ey)
    fb = jnp.where(b_on, b.weight / jnp.where(w > 0, w, jnp.ones_like(w)), jnp.zeros_like(w))
    f = a.weight * fb  # Wa Wb / W

    def mean(sa, ma, sb, mb, e):
        frame = jnp.where(a_on, sa, sb)
        inv = pow2(-e, ma.dtype)
        ma_f = _in_frame(frame, sa, ma, inv)
        mb_f = _in_frame(frame, sb, mb, inv)
        delta = mb_f - ma_f
        merged = jnp.where(a_on, ma_f + delta * fb, mb_f)
        return frame, merged, jnp.where(a_on & b_on, delta, jnp.zeros_like(delta))

    sx, mx, dx = mean(a.shift_x, a.dmean_x, b.shift_x, b.dmean_x, ex)
    if a.cross:
        sy, my, dy = mean(a.shift_y, a.dmean_y, b.shift_y, b.dmean_y, ey)
    else:
        sy, my, dy = sx, mx, dx
    comoment = a.comoment + b.comoment + f * jnp.outer(dx, dy)
    m2_x = a.m2_x + b.m2_x + f * dx * dx
    m2_y = a.m2_y + b.m2_y + f * dy * dy if a.cross else m2_x
    return CovState(w, sx, mx, sy, my, comoment, m2_x, m2_y, ex, ey, cross=a.cross)


def cov_allreduce(state: CovState, axis_name: AxisName) -> CovState:
    """Merges the per-shard states along a mapped axis (``shard_map``/``pmap``); every shard gets the total.

    Means are put in a common frame (the reference values of the first non-empty shard) and combined with one
    ``psum``; each shard's co-moments get the Chan correction ``W_s (m_s - m)(m_s - m)^T`` before a second
    ``psum``. The shards first agree on the scale (a ``pmax`` of the exponents of the non-empty shards). This
    equals a tree of :func:`cov_merge` calls up to rounding.
    """
    lowest = lowest_exponent(state.comoment.dtype)

    def common(e):
        return lax.pmax(jnp.where(state.weight > 0, e, jnp.full_like(e, lowest)), axis_name)

    ex = common(state.exp_x)
    ey = common(state.exp_y) if state.cross else ex
    state = _rescaled(state, ex, ey)
    w = lax.psum(state.weight, axis_name)
    safe_w = jnp.where(w > 0, w, jnp.ones_like(w))
    idx = linear_index(axis_name)
    big = jnp.iinfo(jnp.int32).max
    lead = lax.pmin(jnp.where(state.weight > 0, idx, big), axis_name)
    mine = idx == lead

    def mean(shift, dmean, e):
        frame = lax.psum(jnp.where(mine, shift, jnp.zeros_like(shift)), axis_name)
        m_f = _in_frame(frame, shift, dmean, pow2(-e, dmean.dtype))
        m_f = jnp.where(state.weight > 0, m_f, jnp.zeros_like(m_f))
        merged = lax.psum(state.weight * m_f, axis_name) / safe_w
        return frame, merged, jnp.where(state.weight > 0, m_f - merged, jnp.zeros_like(m_f))

    sx, mx, dx = mean(state.shift_x, state.dmean_x, ex)
    if state.cross:
        sy, my, dy = mean(state.shift_y, state.dmean_y, ey)
    else:
        sy, my, dy = sx, mx, dx
    comoment = lax.psum(state.comoment + state.weight * jnp.outer(dx, dy), axis_name)
    m2_x = lax.psum(state.m2_x + state.weight * dx * dx, axis_name)
    m2_y = lax.psum(state.m2_y + state.weight * dy * dy, axis_name) if state.cross else m2_x
    return CovState(w, sx, mx, sy, my, comoment, m2_x, m2_y, ex, ey, cross=state.cross)


def cov_finalize(state: CovState, ddof: int = 1) -> Array:
    """Covariance ``C / (W - ddof)`` from a state: ``(d, d)`` or ``(d, e)``; NaN where ``W - ddof <= 0``. An entry
    over- or underflows only when its value is outside the dtype's range."""
    check_ddof(ddof)
    denom = state.weight - ddof
    scale = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), jnp.nan).astype(state.comoment.dtype)
    c = state.comoment * scale
    c = c if state.cross else 0.5 * (c + c.T)
    return unscale_outer(c, state.exp_x, state.exp_y)


def corr_finalize(state: CovState) -> Array:
    """Pearson correlation from a state: clipped to [-1, 1], unit diagonal for ``cov(x)`` states, NaN for
    zero-variance columns (and for an empty state). Formed from the scaled co-moments: any magnitude works."""
    if state.cross:
        return normalize_comoment(state.comoment, state.m2_x, state.m2_y, symmetric=False)
    c = 0.5 * (state.comoment + state.comoment.T)
    return normalize_comoment(c, state.m2_x, state.m2_x, symmetric=True)
