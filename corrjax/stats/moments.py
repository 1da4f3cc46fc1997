"""Moment-based dependence statistics: covariance, Pearson correlation (with p-values), concordance, partial
correlation.

Conventions (see DESIGN.md): data are ``(n, d)`` with observations in rows, a 1-D ``(n,)`` input is one variable
and the matching result axis is dropped; with a second argument ``y`` of shape ``(n, e)`` the result is the
``(d, e)`` cross block. Every reduction over observations accepts ``axis_name``: inside ``shard_map``/``pmap`` with
the rows sharded along that axis the result equals the computation on the gathered data. All centring is shifted
two-pass (never raw one-pass sums), so float32 results hold up when the mean is far larger than the spread.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special

from corrjax._checks import as_columns, as_float_array, check_ddof, check_same_n
from corrjax.stats._centered import (
    AxisName,
    column_exponent,
    compute_dtype,
    global_n,
    normalize_comoment,
    psum,
    scaled_centering,
    scaled_comoment,
    squeeze_1d,
    unscale_outer,
)
from corrjax.stats._explicit import shard_rows
from corrjax.stats._pvalues import check_alternative, check_nan_policy, pearson_pvalue
from corrjax.stats.missing_ranks import pearsonr_omit

Array = jax.Array

__all__ = [
    "ConfidenceInterval",
    "PearsonRResult",
    "concordance",
    "corrcoef",
    "cov",
    "fisher_z_ci",
    "partial_corr",
    "pearsonr",
]


class PearsonRResult(NamedTuple):
    """Result of :func:`pearsonr`: the correlation coefficient and its two-sided p-value."""

    statistic: Array
    pvalue: Array


class ConfidenceInterval(NamedTuple):
    """Lower and upper end of a confidence interval."""

    low: Array
    high: Array


def _weights(n: int, fweights: Any, aweights: Any, dtype: Any) -> tuple[Array | None, Array | None]:
    """Validates numpy-style weights; returns ``(w, aw)`` with ``w = fweights * aweights`` (None when unweighted)."""
    w = None
    aw = None
    for name, v in (("fweights", fweights), ("aweights", aweights)):
        if v is None:
            continue
        arr = as_float_array(v, name).astype(dtype)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(f"`{name}` must be 1-D with one weight per observation (n={n}), got shape {arr.shape}")
        w = arr if w is None else w * arr
        if name == "aweights":
            aw = arr
    return w, aw


def _prepare(x: Any, y: Any) -> tuple[Array, bool, Array | None, bool]:
    """Both as ``(n, d)`` columns in the common dtype in which they are computed (float32 for half precision)."""
    x2, x1 = as_columns(x, "x")
    if y is None:
        return x2.astype(compute_dtype(x2.dtype)), x1, None, x1
    y2, y1 = as_columns(y, "y")
    check_same_n(x2, y2)
    dtype = compute_dtype(jnp.result_type(x2.dtype, y2.dtype))
    return x2.astype(dtype), x1, y2.astype(dtype), y1


def _out_dtype(x: Any, y: Any = None) -> Any:
    """The dtype results are returned in: the inputs' common float dtype (half precision stays half)."""
    dt = as_float_array(x, "x").dtype
    return dt if y is None else jnp.result_type(dt, as_float_array(y, "y").dtype)


@shard_rows("x", "y", "fweights", "aweights")
def cov(
    x: Any,
    y: Any = None,
    *,
    ddof: int = 1,
    fweights: Any = None,
    aweights: Any = None,
    axis_name: AxisName = None,
) -> Array:
    """Covariance matrix of the columns of ``x``, or the cross-covariance block with ``y``.

    numpy's ``np.cov`` semantics (``ddof``, frequency weights ``fweights``, observation weights ``aweights``, and
    numpy's normalisation ``v1 - ddof * sum(w * aweights) / v1`` when both are used) with observations in rows.

    Args:
      x: ``(n, d)`` or ``(n,)`` data.
      y: optional ``(n, e)`` or ``(n,)``; then the result is the ``(d, e)`` block ``cov(x_i, y_j)``.
      ddof: delta degrees of freedom (static, non-negative).
      fweights, aweights: optional ``(n,)`` non-negative weights (values are not checked: that is not jittable).
      axis_name: mapped axis over which the rows are sharded (``shard_map``/``pmap``); results are global.

    Returns:
      ``(d, d)`` (or ``(d, e)``); axes of 1-D inputs are dropped, so two vectors give a scalar. Entries are NaN when
      the normalisation ``n - ddof`` (weighted: numpy's factor) is not positive. NaN input propagates. The
      products are formed from column-scaled data and multiplied back at the end, so an entry over- or underflows
      only when its value is outside the dtype's range; float16/bfloat16 input is accumulated in float32 and the
      result returned in the input dtype.
    """
    check_ddof(ddof)
    out_dtype = _out_dtype(x, y)
    x2, x1, y2, y1 = _prepare(x, y)
    w, aw = _weights(x2.shape[0], fweights, aweights, x2.dtype)
    m = scaled_comoment(x2, y2, w, axis_name)
    c, wsum = m.comoment, m.wsum
    if y2 is None:
        c = 0.5 * (c + c.T)  # exactly symmetric
    # numpy's normalisation: v1 - ddof, or v1 - ddof * sum(w * aweights) / v1 with observation weights.
    correction = 1.0 if aw is None or ddof == 0 else psum(jnp.sum(w * aw), axis_name) / wsum
    fact = wsum - ddof * correction
    c = c * jnp.where(fact > 0, 1.0 / jnp.where(fact > 0, fact, 1.0), jnp.nan).astype(c.dtype)
    c = unscale_outer(c, m.exp_x, m.exp_y)  # after the division: overflows only when the covariance does
    return squeeze_1d(c.astype(out_dtype), x1, y1)


@shard_rows("x", "y", "fweights", "aweights")
def corrcoef(
    x: Any,
    y: Any = None,
    *,
    fweights: Any = None,
    aweights: Any = None,
    axis_name: AxisName = None,
) -> Array:
    """Pearson correlation matrix of the columns of ``x``, or the cross block with ``y``.

    ``r_ij = cov_ij / sqrt(cov_ii cov_jj)`` (``np.corrcoef`` with observations in rows); optional weights as in
    :func:`cov` give the weighted Pearson correlation (the normalisation factor cancels).

    Args:
      x: ``(n, d)`` or ``(n,)``.
      y: optional ``(n, e)`` or ``(n,)``; then the ``(d, e)`` cross block.
      fweights, aweights: optional ``(n,)`` weights.
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``(d, d)`` or ``(d, e)`` (1-D axes dropped), clipped to [-1, 1], with an exact unit diagonal for ``y=None``.
      Entries involving a zero-variance column are NaN (numpy gives NaN with a warning); NaN input propagates.
      Each column is scaled by a power of two before the products, so any non-constant data between the smallest
      and the largest normal number of the dtype give the correlation; float16/bfloat16 input is accumulated in
      float32 and the result returned in the input dtype.
    """
    out_dtype = _out_dtype(x, y)
    x2, x1, y2, y1 = _prepare(x, y)
    w, _ = _weights(x2.shape[0], fweights, aweights, x2.dtype)
    m = scaled_comoment(x2, y2, w, axis_name, sumsq=True)
    if y2 is None:
        c = 0.5 * (m.comoment + m.comoment.T)
        var = jnp.diagonal(c)
        r = normalize_comoment(c, var, var, symmetric=True)
    else:
        r = normalize_comoment(m.comoment, m.sxx, m.syy, symmetric=False)
    return squeeze_1d(r.astype(out_dtype), x1, y1)


def _broadcast_pair(x: Any, y: Any, axis: int) -> tuple[Array, Array]:
    """scipy's rule: left-pad the ranks, check the lengths along ``axis``, then broadcast the remaining axes."""
    xa = as_float_array(x, "x")
    ya = as_float_array(y, "y")
    dtype = jnp.result_type(xa.dtype, ya.dtype)
    xa, ya = xa.astype(dtype), ya.astype(dtype)
    ndim = max(xa.ndim, ya.ndim)
    if ndim == 0:
        raise ValueError(f"`x` and `y` must have an observation axis, got shapes {xa.shape} and {ya.shape}")
    xa = xa.reshape((1,) * (ndim - xa.ndim) + xa.shape)
    ya = ya.reshape((1,) * (ndim - ya.ndim) + ya.shape)
    if not isinstance(axis, int | jnp.integer) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise ValueError(f"`axis`={axis!r} is not a valid axis for inputs of rank {ndim}")
    if xa.shape[axis] != ya.shape[axis]:
        raise ValueError(
            f"`x` and `y` must have the same length along axis {axis}: got x.shape={xa.shape}, y.shape={ya.shape}"
        )
    xa = jnp.moveaxis(xa, axis, 0)
    ya = jnp.moveaxis(ya, axis, 0)
    try:
        shape = jnp.broadcast_shapes(xa.shape, ya.shape)
    except ValueError as e:
        raise ValueError(f"`x` and `y` must be broadcastable, got shapes {xa.shape} and {ya.shape}") from e
    return jnp.broadcast_to(xa, shape), jnp.broadcast_to(ya, shape)


@shard_rows("x", "y")
def pearsonr(
    x: Any,
    y: Any,
    *,
    alternative: str = "two-sided",
    nan_policy: str = "propagate",
    axis: int = 0,
    axis_name: AxisName = None,
) -> PearsonRResult:
    """Pearson correlation of ``x`` and ``y`` along ``axis`` with its p-value, like ``scipy.stats.pearsonr``.

    Under independent normal samples ``r`` follows a Beta(n/2 - 1, n/2 - 1) law on [-1, 1], so the two-sided
    p-value is ``2 * I_{(1 - |r|)/2}(n/2 - 1, n/2 - 1)`` (regularised incomplete beta; exact, as scipy); the
    one-sided ones are the cdf (``'less'``) and survival function (``'greater'``) of that law at ``r``. ``x`` and
    ``y`` are broadcast against each other after left-padding their ranks, as scipy does.

    Args:
      x, y: arrays with the same length ``n >= 2`` along ``axis``.
      alternative: ``'two-sided'``, ``'less'`` (negative correlation) or ``'greater'`` (static).
      nan_policy: ``'propagate'`` (NaN in a slice gives NaN), ``'omit'`` (per slice, the positions where ``x`` or
        ``y`` is NaN are masked out and ``n`` becomes the traced count of complete pairs; fewer than 2 give NaN,
        exactly 2 give ``r = +-1, p = 1``), or ``'raise'`` (a ``ValueError`` for NaN in concrete input; refused under
        ``jit``, see :mod:`corrjax.stats._pvalues`). scipy's pearsonr has no ``nan_policy``; ``'omit'`` equals
        scipy on the complete pairs.
      axis: the observation axis (static).
      axis_name: mapped axis over which the observations are sharded; ``n`` is then the global length.

    Returns:
      ``PearsonRResult(statistic, pvalue)`` with the broadcast shape minus ``axis``. A constant input gives NaN for
      both; ``n == 2`` gives ``r = +-1`` and ``p = 1`` as scipy. Use :func:`fisher_z_ci` for a confidence interval.
      Each variable is scaled by a power of two before the products (any magnitude of non-constant data in the
      dtype's normal range works); float16/bfloat16 input is computed in float32 and returned in its dtype.
    """
    check_alternative(alternative)
    check_nan_policy(nan_policy, x=x, y=y)
    xa, ya = _broadcast_pair(x, y, axis)
    out_dtype = xa.dtype
    xa, ya = xa.astype(compute_dtype(out_dtype)), ya.astype(compute_dtype(out_dtype))
    n = global_n(xa.shape[0], axis_name)
    if n < 2:
        raise ValueError(f"`x` and `y` need at least 2 observations along axis {axis}, got {n}")
    if nan_policy == "omit":
        r, p = pearsonr_omit(xa, ya, alternative, axis_name)
        return PearsonRResult(r.astype(out_dtype), p.astype(out_dtype))
    fx, fy = scaled_centering(xa, None, axis_name), scaled_centering(ya, None, axis_name)
    xc, yc = fx.apply(xa), fy.apply(ya)
    sxy = psum(jnp.sum(xc * yc, axis=0), axis_name)
    sxx = psum(jnp.sum(xc * xc, axis=0), axis_name)
    syy = psum(jnp.sum(yc * yc, axis=0), axis_name)
    ok = (sxx > 0) & (syy > 0)  # masked on both sides of the division: a finite gradient for the defined entries
    nx = jnp.sqrt(jnp.where(ok, sxx, jnp.ones_like(sxx)))
    ny = jnp.sqrt(jnp.where(ok, syy, jnp.ones_like(syy)))
    r = jnp.where(ok, jnp.clip(sxy / nx / ny, -1.0, 1.0), jnp.full_like(sxy, jnp.nan))
    if n == 2:
        r = jnp.round(r)
        p = jnp.where(jnp.isnan(r), jnp.nan, jnp.ones_like(r))
        return PearsonRResult(r.astype(out_dtype), p.astype(out_dtype))
    return PearsonRResult(r.astype(out_dtype), pearson_pvalue(r, n, alternative).astype(out_dtype))


def fisher_z_ci(
    statistic: Any, n: Any, *, confidence_level: float = 0.95, alternative: str = "two-sided"
) -> ConfidenceInterval:
    """Fisher-z confidence interval for a Pearson correlation from ``n`` observations.

    As ``scipy.stats.pearsonr(...).confidence_interval()``: with ``z = arctanh(r)`` and ``se = 1 / sqrt(n - 3)``,
    ``'two-sided'`` is ``tanh(z -+ ndtri((1 + level)/2) se)``; ``'less'`` (the one-sided interval matching a test
    of ``rho < r``) is ``[-1, tanh(z + ndtri(level) se)]`` and ``'greater'`` is ``[tanh(z - ndtri(level) se), 1]``.
    ``n <= 3`` gives the trivial interval [-1, 1].

    Args:
      statistic: Pearson ``r`` (any shape).
      n: number of observations (scalar or broadcastable to ``statistic``).
      confidence_level: in (0, 1).
      alternative: ``'two-sided'``, ``'less'`` or ``'greater'`` (static).

    float16/bfloat16 ``statistic`` is computed in float32 and the interval returned in its dtype.
    """
    check_alternative(alternative)
    if not 0.0 < float(confidence_level) < 1.0:
        raise ValueError(f"`confidence_level` must be in (0, 1), got {confidence_level}")
    r = as_float_array(statistic, "statistic")
    out_dtype = r.dtype
    r = r.astype(compute_dtype(out_dtype))
    n = jnp.asarray(n, r.dtype)
    q = 0.5 + confidence_level / 2.0 if alternative == "two-sided" else float(confidence_level)
    h = special.ndtri(jnp.asarray(q, r.dtype))
    zr = jnp.arctanh(r)
    se = 1.0 / jnp.sqrt(jnp.where(n > 3, n - 3, 1.0))
    small = n <= 3
    low = -1.0 if alternative == "less" else jnp.tanh(zr - h * se)
    high = 1.0 if alternative == "greater" else jnp.tanh(zr + h * se)
    low = jnp.broadcast_to(jnp.where(small, -1.0, low), jnp.broadcast_shapes(r.shape, n.shape)).astype(out_dtype)
    high = jnp.broadcast_to(jnp.where(small, 1.0, high), low.shape).astype(out_dtype)
    return ConfidenceInterval(low, high)


@shard_rows("x", "y")
def concordance(x: Any, y: Any, *, axis_name: AxisName = None) -> Array:
    """Lin's concordance correlation coefficient of paired columns (Lin 1989, "A concordance correlation
    coefficient to evaluate reproducibility", Biometrics 45:255).

    ``rho_c = 2 s_xy / (s_x^2 + s_y^2 + (mean_x - mean_y)^2)`` with 1/n moments.

    Args:
      x, y: ``(n, d)`` (or ``(n,)``); column ``j`` of ``x`` is paired with column ``j`` of ``y``. A single column
        broadcasts against ``d`` columns.
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``(d,)`` (a scalar for two 1-D inputs), in [-1, 1]. NaN when both columns are constant and equal (0/0).
      Each pair of columns is scaled by one common power of two before the products (the coefficient is not
      invariant to scaling them apart), so any magnitude in the dtype's normal range works; float16/bfloat16
      input is computed in float32 and returned in its dtype.
    """
    out_dtype = _out_dtype(x, y)
    x2, x1, y2, y1 = _prepare(x, y)
    if x2.shape[1] != y2.shape[1] and 1 not in (x2.shape[1], y2.shape[1]):
        raise ValueError(f"`x` and `y` must have the same number of columns, got {x2.shape} and {y2.shape}")
    n = jnp.asarray(global_n(x2.shape[0], axis_name), x2.dtype)
    shape = (x2.shape[0], max(x2.shape[1], y2.shape[1]))  # a single column pairs with each of d
    x2, y2 = jnp.broadcast_to(x2, shape), jnp.broadcast_to(y2, shape)
    exp = jnp.maximum(column_exponent(x2, axis_name), column_exponent(y2, axis_name))  # one scale per pair
    fx, fy = scaled_centering(x2, None, axis_name, exp=exp), scaled_centering(y2, None, axis_name, exp=exp)
    xc, yc = fx.apply(x2), fy.apply(y2)
    # mean_x - mean_y from the shifts and the shifted means: the difference of two rounded means ~1e4 would lose the
    # digits of a location shift of size ~spread in float32.
    dmean = (fx.shift - fy.shift) + (fx.mean - fy.mean)
    sxy = psum(jnp.sum(xc * yc, axis=0), axis_name) / n
    sxx = psum(jnp.sum(xc * xc, axis=0), axis_name) / n
    syy = psum(jnp.sum(yc * yc, axis=0), axis_name) / n
    out = jnp.clip(2.0 * sxy / (sxx + syy + dmean**2), -1.0, 1.0).astype(out_dtype)
    return out[0] if (x1 and y1) else out


@shard_rows("x")
def partial_corr(x: Any, *, axis_name: AxisName = None) -> Array:
    """Partial correlation matrix: the correlation of columns ``i`` and ``j`` given all the others.

    ``pcorr_ij = -P_ij / sqrt(P_ii P_jj)`` with ``P`` the Moore-Penrose pseudo-inverse of the covariance matrix
    (as ``pingouin.pcorr``; Whittaker 1990, "Graphical Models in Applied Multivariate Statistics", ch. 5).

    Args:
      x: ``(n, d)`` data.
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``(d, d)``, clipped to [-1, 1], unit diagonal where defined; rows of zero-variance columns are NaN. The
      co-moments are those of column-scaled data (any magnitude in the dtype's normal range works);
      float16/bfloat16 input is computed in float32 and the result returned in its dtype.
    """
    x2, _ = as_columns(x, "x")
    out_dtype = x2.dtype
    m = scaled_comoment(x2.astype(compute_dtype(out_dtype)), None, None, axis_name)
    c = 0.5 * (m.comoment + m.comoment.T)  # scaled co-moments: the correlation matrix below is scale-free
    var = jnp.diagonal(c)
    # A zero-variance variable is set apart as an identity row/column, so the pseudo-inverse of the others is exact
    # (a zero row left in would pick up rounding noise from the eigensolver and give garbage, not NaN); its row and
    # column are NaN at the end. NaN variances are not "zero" and propagate through the pseudo-inverse.
    zero = var == 0
    apart = zero[:, None] | zero[None, :]
    # Scale to a correlation matrix first: the pseudo-inverse's rank cut-off is then scale-free.
    s = jnp.sqrt(jnp.where(zero, jnp.ones_like(var), var))
    r = c / s[:, None] / s[None, :]
    r = jnp.where(apart, jnp.eye(r.shape[0], dtype=r.dtype), r)
    p = jnp.linalg.pinv(r, hermitian=True)
    p = 0.5 * (p + p.T)
    dp = jnp.diagonal(p)
    out = normalize_comoment(-p, dp, dp, symmetric=True)
    return jnp.where(apart, jnp.full_like(out, jnp.nan), out).astype(out_dtype)
