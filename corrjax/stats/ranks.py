"""Rank statistics: ``rankdata``, Spearman's rho and Kendall's tau (tau-b, tau-c) with scipy's p-values.

Conventions (see DESIGN.md): data are ``(n, d)`` with observations in rows and a 1-D ``(n,)`` input is one variable
(its result axis is dropped); with ``y`` of shape ``(n, e)`` :func:`spearmanr` gives the ``(d, e)`` cross block.
Ties get average ranks; ``-0.0`` ties with ``+0.0``. NaN propagates as in scipy's ``nan_policy='propagate'``.
Ranks are piecewise constant, so gradients through these functions are zero (never NaN).

The sorting machinery lives in :mod:`corrjax.stats._sorting`: XLA's CPU sort is only fast for a single primitive
operand, so ranks come from key-only sorts of order-preserving integer keys plus a vectorised binary search, and
stable orderings from an LSD radix sort over packed ``digit | position`` words. Kendall's tau counts discordant
pairs exactly (integer counts; ties handled as scipy) in O(n log n) time and O(n) memory, never an n x n matrix.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from corrjax._checks import as_array, as_columns, check_choice, check_same_n
from corrjax.stats import _kendall, _sorting
from corrjax.stats._centered import squeeze_1d
from corrjax.stats._explicit import shard_rows
from corrjax.stats._pvalues import check_alternative, check_nan_policy, pearson_pvalue

Array = jax.Array
AxisName = Any

__all__ = ["KendallTauResult", "SpearmanRResult", "kendalltau", "rankdata", "spearmanr"]

_RANK_METHODS = ("average", "min", "max", "dense", "ordinal")


class SpearmanRResult(NamedTuple):
    """Result of :func:`spearmanr`: Spearman's rho and its two-sided p-value (same shapes)."""

    statistic: Array
    pvalue: Array


class KendallTauResult(NamedTuple):
    """Result of :func:`kendalltau`: Kendall's tau and its two-sided p-value (scalars)."""

    statistic: Array
    pvalue: Array


def _float_dtype(*dtypes: Any) -> Any:
    """Floating result dtype: the inputs' float dtype, at least float32 (ranks need the precision)."""
    dt = jnp.result_type(*[d if jnp.issubdtype(d, jnp.floating) else jnp.result_type(float) for d in dtypes])
    return jnp.promote_types(dt, jnp.float32)


def _result_dtype(*dtypes: Any) -> Any:
    """The dtype rank correlations are returned in: the inputs' float dtype (float16/bfloat16 stay half, as the
    moments do; the ranks themselves are computed in :func:`_float_dtype`), the default float for integers."""
    return jnp.result_type(*[d if jnp.issubdtype(d, jnp.floating) else jnp.result_type(float) for d in dtypes])


def _has_nan(a: Array, axis: int | None = None, keepdims: bool = False) -> Array:
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.any(jnp.isnan(a), axis=axis, keepdims=keepdims)
    shape = () if axis is None else tuple(s for i, s in enumerate(a.shape) if i != axis % a.ndim)
    if keepdims and axis is not None:
        shape = tuple(1 if i == axis % a.ndim else s for i, s in enumerate(a.shape))
    return jnp.zeros(shape, bool)


# From this many observations per slice on, slices are ranked one at a time (``lax.map``): a single slice's keys,
# sorted keys and search state stay in cache (100000 uint32 keys are 400 KB), while ranking all slices at once makes
# every binary-search round a cache-missing gather over the whole array. Measured on 100000 x 64: 0.63x the time.
_MAP_SLICES_MIN_N = 4096


def _ranks_last(keys: Array, method: str, dtype: Any) -> Array:
    """1-based ranks of unsigned ``keys`` along the last axis, as ``dtype``."""
    n = keys.shape[-1]
    if keys.ndim > 1 and n >= _MAP_SLICES_MIN_N and math.prod(keys.shape[:-1]) > 1:
        flat = keys.reshape(-1, n)
        return lax.map(lambda k: _rank_slices(k, method, dtype), flat).reshape(keys.shape)
    return _rank_slices(keys, method, dtype)


def _rank_slices(keys: Array, method: str, dtype: Any) -> Array:
    # Materialise the keys once: otherwise XLA fuses the (transposing) key computation into every search round.
    keys = lax.optimization_barrier(keys)
    if method == "ordinal":
        return (_sorting.invert_permutation(_sorting.stable_argsort(keys)) + 1).astype(dtype)
    s, r = _sorting.min_rank(keys)
    if method == "min":
        return (r + 1).astype(dtype)
    is_first = _sorting.run_starts(s)
    if method == "dense":
        dense = jnp.cumsum(is_first, axis=-1, dtype=jnp.int32)
        return jnp.take_along_axis(dense, r, axis=-1, mode="promise_in_bounds").astype(dtype)
    _, end = _sorting.runs(is_first)
    last = jnp.take_along_axis(end, r, axis=-1, mode="promise_in_bounds")
    if method == "max":
        return (last + 1).astype(dtype)
    return ((r + last).astype(dtype) + 2) * jnp.asarray(0.5, dtype)


def rankdata(x: Any, *, method: str = "average", axis: int | None = 0) -> Array:
    """Ranks of ``x`` along ``axis`` (1-based), like ``scipy.stats.rankdata``.

    ``method`` resolves ties: ``"average"`` (mean of the tied positions), ``"min"``, ``"max"``, ``"dense"``
    (consecutive ranks of the distinct values) or ``"ordinal"`` (ties in order of appearance). A slice that contains
    NaN is all NaN (scipy's ``nan_policy='propagate'``). Integer input is ranked exactly (no float promotion).

    Args:
      x: array of any rank; observations along ``axis``.
      method: tie method (static).
      axis: the axis to rank along (default 0, observations in rows); ``None`` ranks the flattened array.

    Returns:
      Floating ranks with the shape of ``x`` (flattened for ``axis=None``): JAX needs one static dtype and NaN must
      be representable, so every method returns floats (float32, or float64 for float64 input); integer-valued
      ranks are exact up to 2**24 observations in float32.
    """
    check_choice(method, "method", _RANK_METHODS)
    a = as_array(x, "x")
    if axis is None:
        a, axis = a.reshape(-1), 0
    if a.ndim == 0:
        raise ValueError(f"`x` must have at least one axis to rank along, got shape {a.shape}")
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool) or not -a.ndim <= axis < a.ndim:
        raise ValueError(f"`axis`={axis!r} is out of range for `x` of shape {a.shape}")
    dtype = _float_dtype(a.dtype)
    if a.shape[axis] == 0:
        return jnp.zeros(a.shape, dtype)
    a_last = jnp.moveaxis(a, axis, -1)
    ranks = _ranks_last(_sorting.order_key(a_last), method, dtype)
    ranks = jnp.where(_has_nan(a_last, -1, keepdims=True), jnp.asarray(jnp.nan, dtype), ranks)
    return jnp.moveaxis(ranks, -1, axis)


def _gather_rows(a: Array, axis_name: AxisName) -> Array:
    """All rows of ``a`` from every shard of ``axis_name``, in shard order, as a mapped-axis-invariant value.

    Written as a ``psum`` of zero-padded blocks (adding zeros is exact) so that the result is invariant, i.e. valid
    for ``out_specs=P()`` under ``shard_map``'s replication checks, which an ``all_gather`` is not.
    """
    if axis_name is None:
        return a
    if a.dtype == jnp.bool_:
        a = a.astype(jnp.int32)
    size = int(lax.axis_size(axis_name))
    n = a.shape[0]
    full = jnp.zeros((size * n, *a.shape[1:]), a.dtype)
    full = lax.dynamic_update_slice_in_dim(full, a, lax.axis_index(axis_name) * n, axis=0)
    return lax.psum(full, axis_name)


@shard_rows("x", "y")
def spearmanr(
    x: Any,
    y: Any = None,
    *,
    alternative: str = "two-sided",
    nan_policy: str = "propagate",
    axis_name: AxisName = None,
) -> SpearmanRResult:
    """Spearman rank correlation matrix of the columns of ``x`` (or the cross block with ``y``) and p-values.

    rho is Pearson's correlation of the average ranks (ties get the mean of their positions), as
    ``scipy.stats.spearmanr``; the centred ranks ``r - (n + 1) / 2`` are exact, so only the final products round.
    The p-value is scipy's t-test with ``n - 2`` degrees of freedom (asymptotic; exact for no n), two-sided or
    one-sided (``alternative``).

    Args:
      x: ``(n, d)`` or ``(n,)``.
      y: optional ``(n, e)`` or ``(n,)``; then the ``(d, e)`` cross block (scipy returns the full
        ``(d + e) x (d + e)`` matrix of the concatenated columns instead).
      alternative: ``'two-sided'``, ``'less'`` or ``'greater'`` (static).
      nan_policy: ``'propagate'`` (a column containing NaN gives NaN), ``'omit'`` or ``'raise'`` (``ValueError`` on
        concrete input containing NaN; refused under ``jit``). ``'omit'`` is scipy's: each pair of columns is ranked
        again on the rows where both are not NaN (pairwise-complete, ``N_ij`` rows, computed with static shapes by
        masking) and its p-value uses ``N_ij - 2`` degrees of freedom; ``+-inf`` stays a value. Unlike scipy, a
        diagonal entry is 1 (p = 0) only where the column has two distinct values (scipy fills 1 / 0 always).
      axis_name: mapped axis over which the rows are sharded; the rows are all-gathered (ranks need every
        observation) and every shard returns the global result.

    Returns:
      ``SpearmanRResult(statistic, pvalue)``, each ``(d, d)`` / ``(d, e)`` with 1-D axes dropped, rho clipped to
      [-1, 1] with an exact unit diagonal for ``y=None``. A constant column, a column containing NaN, or
      ``n < 2`` give NaN; ``n == 2`` gives p = NaN (t has no degrees of freedom), as scipy.
    """
    check_alternative(alternative)
    check_nan_policy(nan_policy, x=x, y=y)
    x2, x1 = as_columns(as_array(x, "x"), "x")
    y2, y1 = (None, False) if y is None else as_columns(as_array(y, "y"), "y")
    if y2 is not None:
        check_same_n(x2, y2)
    dtypes = (x2.dtype,) if y2 is None else (x2.dtype, y2.dtype)
    dtype, out = _float_dtype(*dtypes), _result_dtype(*dtypes)
    x2 = _gather_rows(x2, axis_name)
    y2 = None if y2 is None else _gather_rows(y2, axis_name)
    n, d = x2.shape
    y_1d = x1 if y2 is None else y1

    def result(rho: Array, p: Array) -> SpearmanRResult:
        return SpearmanRResult(squeeze_1d(rho.astype(out), x1, y_1d), squeeze_1d(p.astype(out), x1, y_1d))

    if nan_policy == "omit":
        from corrjax.stats.missing_ranks import pairwise_spearman  # imports this module

        rho, count = pairwise_spearman(x2, y2, dtype, observed=lambda a: ~jnp.isnan(a))
        return result(rho, jnp.where(count > 2, pearson_pvalue(rho, count, alternative), jnp.nan))
    cols = x2 if y2 is None else jnp.concatenate([x2.astype(dtype), y2.astype(dtype)], axis=1)
    if n < 2:
        nan = jnp.full((d, d if y2 is None else y2.shape[1]), jnp.nan, dtype)
        return result(nan, nan)
    ranks = rankdata(cols.T, method="average", axis=1).astype(dtype)  # (variables, n), NaN rows for NaN columns
    # Centred ranks are exact (half-)integers; the power-of-two scale is exact too and keeps the products of sums of
    # squares below float32 overflow, so sqrt(s * s) == s and identical/reversed rankings give exactly +-1.
    scale = jnp.asarray(2.0 ** -max(1, (n - 1).bit_length()), dtype)
    rc = (ranks - jnp.asarray((n + 1) / 2, dtype)) * scale
    gram = jnp.matmul(rc, rc.T, precision=lax.Precision.HIGHEST)
    gram = 0.5 * (gram + gram.T)
    ss_ = jnp.diagonal(gram)
    c, sxx, syy = (gram, ss_, ss_) if y2 is None else (gram[:d, d:], ss_[:d], ss_[d:])
    den = jnp.sqrt(sxx[:, None] * syy[None, :])
    rho = jnp.clip(c / jnp.where(den > 0, den, jnp.nan), -1.0, 1.0)
    if y2 is None:
        eye = jnp.eye(d, dtype=bool)
        rho = jnp.where(eye & ~jnp.isnan(rho), jnp.ones_like(rho), rho)
    p = jnp.full_like(rho, jnp.nan) if n == 2 else pearson_pvalue(rho, n, alternative)
    return result(rho, p)


_KENDALL_METHODS = ("auto", "exact", "asymptotic")


@shard_rows("x", "y")
def kendalltau(
    x: Any,
    y: Any,
    *,
    variant: str = "b",
    method: str = "auto",
    alternative: str = "two-sided",
    nan_policy: str = "propagate",
    axis_name: AxisName = None,
) -> KendallTauResult:
    """Kendall's tau-b or tau-c of two 1-D samples with its p-value, like ``scipy.stats.kendalltau``.

    With ``P``/``Q`` the concordant/discordant pairs, ``T``/``U`` the pairs tied in ``x``/``y`` only and ``n0 =
    n(n-1)/2``: tau-b ``= (P - Q) / sqrt((n0 - T_x)(n0 - T_y))`` and tau-c ``= 2 (P - Q) / (n^2 (m - 1) / m)`` with
    ``m`` the smaller number of distinct values. ``Q`` is counted exactly, never with an n x n matrix: sort by
    ``(x, y)`` (stable radix passes), then count the strict inversions of the y-ranks with ``ceil(log2 n)`` bit
    passes; O(n log n) time, O(n) memory.

    p-values (scipy's ``method``): ``'exact'`` uses the exact null distribution of the number of concordant pairs
    without ties (Kendall 1970), built once per ``n`` at trace time in float64 (``n <= 1000``; ``n <= 100`` with
    ``nan_policy='omit'``, where ``n`` is traced); with ties it gives NaN (scipy raises ``ValueError``, which a
    traced value cannot). ``'asymptotic'`` is the normal approximation with the tie-corrected variance (Kendall &
    Gibbons 1990). ``'auto'`` is scipy's rule: exact without ties when ``n <= 33`` or at most one pair is
    discordant (or concordant), asymptotic otherwise. Counts are integers; with 64-bit types disabled their sums
    are accumulated in float32 (exact block sums, then rounded), so the statistic is float32-accurate.

    Args:
      x, y: 1-D samples of the same length ``n`` (float or integer; integers are compared exactly).
      variant: ``"b"`` or ``"c"`` (static).
      method: ``'auto'``, ``'exact'`` or ``'asymptotic'`` (static).
      alternative: ``'two-sided'``, ``'less'`` or ``'greater'`` (static).
      nan_policy: ``'propagate'``, ``'omit'`` (the positions where ``x`` or ``y`` is NaN are masked out: the counts
        and ``n`` are those of the complete pairs, as scipy's, with static shapes) or ``'raise'`` (concrete input
        only; refused under ``jit``).
      axis_name: mapped axis over which the samples are sharded; they are all-gathered, every shard returns the
        global result.

    Returns:
      ``KendallTauResult(statistic, pvalue)`` (scalars, float32 or float64). NaN if either sample is constant,
      contains NaN (``'propagate'``), or has fewer than 2 (complete) observations.
    """
    check_choice(variant, "variant", ("b", "c"))
    check_choice(method, "method", _KENDALL_METHODS)
    check_alternative(alternative)
    check_nan_policy(nan_policy, x=x, y=y)
    xa, ya = as_array(x, "x"), as_array(y, "y")
    if xa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"`x` and `y` must be 1-D samples, got x.shape={xa.shape} and y.shape={ya.shape}")
    check_same_n(xa, ya)
    dtype = _result_dtype(xa.dtype, ya.dtype)  # the counts are integers; only tau and p are floating
    xa, ya = _gather_rows(xa, axis_name), _gather_rows(ya, axis_name)
    n = xa.shape[0]
    nan = jnp.asarray(jnp.nan, dtype)
    if n < 2:
        return KendallTauResult(nan, nan)
    omit = nan_policy == "omit"
    if method == "exact":
        _kendall.check_exact_size(n, omit)
    keep = _complete(xa, ya) if omit else None
    counts = _kendall.kendall_counts(xa, ya, keep)
    tau = _kendall.tau_from_counts(counts, variant)
    p = kendall_pvalue(counts, n, method, alternative, traced_n=omit)
    undefined = jnp.isnan(tau) | (counts.n < 2)
    if not omit:
        undefined = undefined | _has_nan(xa) | _has_nan(ya)
    tau = jnp.where(undefined, jnp.nan, tau).astype(dtype)
    p = jnp.where(undefined, jnp.nan, jnp.clip(p, 0.0, 1.0)).astype(dtype)
    return KendallTauResult(tau, p)


def _complete(xa: Array, ya: Array) -> Array:
    """Positions where neither sample is NaN (integers are never NaN)."""
    return ~(_isnan(xa) | _isnan(ya))


def _isnan(a: Array) -> Array:
    return jnp.isnan(a) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, bool)


def kendall_pvalue(counts: _kendall.KendallCounts, n: int, method: str, alternative: str, *, traced_n: bool) -> Array:
    """scipy's p-value of Kendall's tau for ``method`` from the pair counts (``n`` the static sample length)."""
    no_ties = (counts.xtie == 0) & (counts.ytie == 0)
    if method == "asymptotic":
        return _kendall.asymptotic_pvalue(counts, alternative)
    if method == "exact":
        p = _kendall.exact_pvalue(counts, n, alternative, traced_n=traced_n, full=True)
        return jnp.where(no_ties, p, jnp.nan)
    p_exact = _kendall.exact_pvalue(counts, n, alternative, traced_n=traced_n, full=False)
    p_norm = _kendall.asymptotic_pvalue(counts, alternative)
    return jnp.where(no_ties & ~jnp.isnan(p_exact), p_exact, p_norm)
