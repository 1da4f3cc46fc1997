"""Pairwise-complete covariance and correlation with missing values (pandas ``DataFrame.cov``/``corr`` semantics).

Each pair of columns ``(i, j)`` uses the rows where both are observed. Instead of a loop over pairs, every pairwise
sum is one masked matrix product: with ``M`` the observed-mask and ``X0`` the shifted data with missing entries
set to 0,

    N    = M^T M            (pair counts)          Sx  = X0^T M     Sy  = M^T Y0
    Sxy  = X0^T Y0          Sxx = (X0^2)^T M       Syy = M^T Y0^2

and the pairwise-centred sums follow as ``Sxy - Sx Sy / N`` (and ``Sxx - Sx^2 / N``). The products are accumulated
over row blocks (``_centered.sum_over_row_blocks``), so the mask and the shifted copy are never materialised whole.
The shift is, per column, an observed value near the column's centre (see ``_shift``), so the sums are of deviations
of size ~spread (no float32 cancellation when the mean is far larger than the spread, and integer-valued data stay
exact). Before the products every column is divided by a power of two ``2**e > max |x|`` (over its finite entries,
the same on every shard), so the sums neither over- nor underflow at any magnitude of the data; the division is
exact, correlations are scale-free and covariances are multiplied back after the normalisation
(``_centered.unscale_outer``). float16/bfloat16 input is computed in float32 and returned in its dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from corrjax._checks import as_columns, check_choice, check_ddof, check_same_n
from corrjax.stats._centered import (
    PRECISION,
    AxisName,
    axis_size,
    block_rows,
    column_exponent,
    compute_dtype,
    linear_index,
    pow2,
    psum,
    squeeze_1d,
    sum_over_row_blocks,
    unscale_outer,
)
from corrjax.stats._explicit import shard_rows
from corrjax.stats.missing_ranks import rank_nancorrcoef

Array = jax.Array

__all__ = ["nancorrcoef", "nancov"]


def _check_min_periods(min_periods: Any) -> int:
    if isinstance(min_periods, bool) or not isinstance(min_periods, int):
        raise TypeError(f"`min_periods` must be a non-negative int, got {min_periods!r}")
    if min_periods < 0:
        raise ValueError(f"`min_periods` must be non-negative, got {min_periods}")
    return max(min_periods, 1)


_HEAD_ROWS = 512


def _shift(x: Array, mask: Array, axis_name: AxisName) -> Array:
    """Per column, an observed value near the column's centre, the same on every shard (0 for an empty column).

    Preferably the observed value nearest the mean of the first ``_HEAD_ROWS`` rows of the first shard that has one
    (cheap, and robust to a leading outlier); for a column with nothing observed in any head, its smallest observed
    value (one fused min-reduction). Being an actual data value keeps integer-valued data exact after the shift.
    """
    if x.shape[0] == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    head, hmask = x[:_HEAD_ROWS], mask[:_HEAD_ROWS]
    hz = jnp.where(hmask, head, jnp.zeros_like(head))
    hcount = jnp.sum(hmask, axis=0, dtype=x.dtype)
    hmean = jnp.sum(hz, axis=0) / jnp.where(hcount > 0, hcount, 1.0)
    near = jnp.argmin(jnp.where(hmask, jnp.abs(head - hmean), jnp.inf), axis=0)
    head_value = jnp.take_along_axis(hz, near[None], axis=0)[0]
    has_head = hcount > 0
    lowest = jnp.min(jnp.where(mask, x, jnp.inf), axis=0)
    if axis_name is not None:
        lowest = lax.pmin(lowest, axis_name)
        # the head value of the lowest-indexed shard that has one
        key = jnp.where(has_head, linear_index(axis_name), axis_size(axis_name))
        first = lax.pmin(key, axis_name)
        head_value = lax.psum(jnp.where(key == first, head_value, jnp.zeros_like(head_value)), axis_name)
        has_head = first < axis_size(axis_name)
    fallback = jnp.where(jnp.isfinite(lowest), lowest, jnp.zeros_like(lowest))
    return lax.stop_gradient(jnp.where(has_head, head_value, fallback))


def _masked(x: Array, inv: Array, shift: Array) -> tuple[Array, Array]:
    """``(x0, m)``: the scaled shifted data ``x * inv - shift`` with missing entries 0, and the observed-mask as
    ``x``'s dtype (``shift`` is already scaled)."""
    mask = jnp.isfinite(x)
    return jnp.where(mask, x * inv - shift, jnp.zeros_like(x)), mask.astype(x.dtype)


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a.T, b, precision=PRECISION)


def _pairwise_sums(x: Any, y: Any, axis_name: AxisName, need_var: bool):
    x2, x1 = as_columns(x, "x")
    if y is None:
        y2, y1 = None, x1
    else:
        y2, y1 = as_columns(y, "y")
        check_same_n(x2, y2)
    out_dtype = x2.dtype if y2 is None else jnp.result_type(x2.dtype, y2.dtype)
    dtype = compute_dtype(out_dtype)
    x2 = x2.astype(dtype)
    y2 = None if y2 is None else y2.astype(dtype)
    exp_x = column_exponent(x2, axis_name, finite_only=True)
    exp_y = exp_x if y2 is None else column_exponent(y2, axis_name, finite_only=True)
    inv_x, inv_y = pow2(-exp_x, dtype), pow2(-exp_y, dtype)
    # The shift of the scaled data (a scaled data value: exact), so the head mean near the top of the range is finite.
    shift_x = _shift(x2 * inv_x, jnp.isfinite(x2), axis_name)
    shift_y = None if y2 is None else _shift(y2 * inv_y, jnp.isfinite(y2), axis_name)

    def block(xb: Array, yb: Array | None) -> dict[str, Array]:
        x0, mx = _masked(xb, inv_x, shift_x)
        y0, my = (x0, mx) if yb is None else _masked(yb, inv_y, shift_y)
        sums = {"n": _mm(mx, my), "sx": _mm(x0, my), "sxy": _mm(x0, y0)}
        if yb is not None:
            sums["sy"] = _mm(mx, y0)
        if need_var:
            sums["sxx"] = _mm(x0 * x0, my)
            if yb is not None:
                sums["syy"] = _mm(mx, y0 * y0)
        return sums

    width = x2.shape[1] + (0 if y2 is None else y2.shape[1])
    s = psum(sum_over_row_blocks(block, x2, y2, rows=block_rows(2 * width)), axis_name)
    n, sx = s["n"], s["sx"]
    sy = sx.T if y2 is None else s["sy"]
    safe_n = jnp.where(n > 0, n, 1.0)
    cxy = s["sxy"] - sx * sy / safe_n
    out = {"n": n, "cxy": cxy, "x1": x1, "y1": y1, "sym": y2 is None, "exp": (exp_x, exp_y), "dtype": out_dtype}
    if need_var:
        sxx = s["sxx"]
        syy = sxx.T if y2 is None else s["syy"]
        vx = sxx - sx * sx / safe_n
        vy = syy - sy * sy / safe_n
        # Rounding leaves ~sqrt(n) eps * Sxx where the exact pairwise variance is 0 (a column constant on the rows
        # it shares with the other): call those zero, as pandas' exact Welford recursion would.
        tol = 8.0 * jnp.finfo(dtype).eps * jnp.sqrt(safe_n)
        out["vx"] = jnp.where(vx > tol * sxx, vx, jnp.zeros_like(vx))
        out["vy"] = jnp.where(vy > tol * syy, vy, jnp.zeros_like(vy))
    return out


@shard_rows("x", "y")
def nancov(x: Any, y: Any = None, *, ddof: int = 1, min_periods: int = 1, axis_name: AxisName = None) -> Array:
    """Pairwise-complete covariance, like ``pandas.DataFrame.cov(min_periods=..., ddof=...)``.

    Entry ``(i, j)`` is the covariance of columns ``i`` and ``j`` over the rows where both are finite (NaN and +-inf
    count as missing, as in pandas' ``nancorr``), normalised by ``N_ij - ddof``. Unlike pandas, which silently uses
    ``ddof=1`` once any value is missing, the ``ddof`` you pass is always used.

    Args:
      x: ``(n, d)`` or ``(n,)``.
      y: optional ``(n, e)`` or ``(n,)``; then the ``(d, e)`` cross block.
      ddof: delta degrees of freedom.
      min_periods: fewer than this many complete pairs gives NaN (values below 1 act as 1).
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``(d, d)``/``(d, e)`` (1-D axes dropped); NaN where ``N_ij < min_periods`` or ``N_ij - ddof <= 0``. An
      entry over- or underflows only when its value is outside the dtype's range; float16/bfloat16 input is
      computed in float32 and returned in its dtype.
    """
    check_ddof(ddof)
    minp = _check_min_periods(min_periods)
    s = _pairwise_sums(x, y, axis_name, need_var=False)
    n, cxy = s["n"], s["cxy"]
    denom = n - ddof
    ok = (n >= minp) & (denom > 0)
    c = jnp.where(ok, cxy / jnp.where(ok, denom, 1.0), jnp.nan)
    if s["sym"]:
        c = 0.5 * (c + c.T)
    c = unscale_outer(c, *s["exp"])  # after the division: overflows only when the covariance does
    return squeeze_1d(c.astype(s["dtype"]), s["x1"], s["y1"])


@shard_rows("x", "y")
def nancorrcoef(
    x: Any, y: Any = None, *, method: str = "pearson", min_periods: int = 1, axis_name: AxisName = None
) -> Array:
    """Pairwise-complete correlation, like ``pandas.DataFrame.corr(method=..., min_periods=...)``.

    Entry ``(i, j)`` is the correlation of columns ``i`` and ``j`` over the rows where both are finite (NaN and
    +-inf are missing, as pandas). ``'pearson'``: means and variances over those same rows. ``'spearman'``: each
    pair's complete rows are ranked again (average ranks for ties) and correlated, as pandas' ``nancorr_spearman``.
    ``'kendall'``: Kendall's tau-b of each pair's complete rows (pandas/scipy); its diagonal is 1 wherever the
    column has at least ``min_periods`` values, even for a constant column (pandas' convention). See
    :mod:`corrjax.stats.missing_ranks` for the static-shape algorithms.

    Args:
      x: ``(n, d)`` or ``(n,)``.
      y: optional ``(n, e)`` or ``(n,)``; then the ``(d, e)`` cross block.
      method: ``'pearson'``, ``'spearman'`` or ``'kendall'`` (static).
      min_periods: fewer than this many complete pairs gives NaN (values below 1 act as 1).
      axis_name: mapped axis over which the rows are sharded (rank methods all-gather the rows).

    Returns:
      ``(d, d)``/``(d, e)`` (1-D axes dropped), clipped to [-1, 1], unit diagonal where defined; NaN where
      ``N_ij < min_periods`` or either column is constant on the shared rows. Columns are scaled by powers of two
      before the products, so any magnitude in the dtype's normal range works; float16/bfloat16 input is computed
      in float32 and returned in its dtype.
    """
    check_choice(method, "method", ("pearson", "spearman", "kendall"))
    minp = _check_min_periods(min_periods)
    if method != "pearson":
        return rank_nancorrcoef(x, y, method, minp, axis_name)
    s = _pairwise_sums(x, y, axis_name, need_var=True)
    n, cxy, vx, vy = s["n"], s["cxy"], s["vx"], s["vy"]
    ok = (n >= minp) & (vx > 0) & (vy > 0)
    denom = jnp.sqrt(jnp.where(ok, vx, 1.0)) * jnp.sqrt(jnp.where(ok, vy, 1.0))
    r = jnp.where(ok, jnp.clip(cxy / denom, -1.0, 1.0), jnp.nan)
    if s["sym"]:
        r = 0.5 * (r + r.T)
        eye = jnp.eye(r.shape[0], dtype=bool)
        r = jnp.where(eye & ~jnp.isnan(r), jnp.ones_like(r), r)
    return squeeze_1d(r.astype(s["dtype"]), s["x1"], s["y1"])
