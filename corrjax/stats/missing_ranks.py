"""Pairwise-complete rank correlations (pandas ``DataFrame.corr(method='spearman' | 'kendall')``) and the masked
kernels behind ``nan_policy='omit'``.

Missing values cannot be dropped under ``jit`` (shapes are static), so each pair of columns ``(i, j)`` is handled
on its complete rows by masking:

* **Spearman.** pandas (``nancorr_spearman``) ranks each pair's complete rows again. The average rank of ``x_ik``
  among the rows where both ``x_i`` and ``y_j`` are observed is ``L + (E + 1) / 2`` with ``L`` the number of such rows
  whose ``x_i`` is smaller and ``E`` the number tied with it. Both come from one sort of ``x_i`` (made once per
  column): walk the sorted order, take the running count of the rows that ``y_j`` observes (a cumulative sum of
  the gathered mask), and read it at the ends of each tie run. For a fixed ``i`` that is one ``(n, e)`` cumulative sum
  for the ranks of ``x_i`` given every ``y_j`` and one for the ranks of every ``y_j`` given ``x_i``; then rho is
  Pearson's correlation of the centred ranks ``R - (N_ij + 1) / 2`` over the complete rows. O(n d e) work after
  ``d + e`` sorts, O(n e) memory per column (``lax.map`` over the columns of ``x``).
* **Kendall.** tau-b of each pair over its complete rows (pandas ``nancorr_kendall``, scipy's tau-b), counted in
  O(n log n) per pair by :func:`corrjax.stats._kendall.kendall_counts` with the incomplete rows masked out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from corrjax._checks import as_array, as_columns, check_same_n
from corrjax.stats import _kendall, _sorting
from corrjax.stats._centered import AxisName, axis_size, linear_index, psum, squeeze_1d
from corrjax.stats._pvalues import pearson_pvalue
from corrjax.stats.ranks import _float_dtype, _gather_rows, _result_dtype

Array = jax.Array

__all__ = ["pairwise_kendall", "pairwise_spearman", "pearsonr_omit", "rank_nancorrcoef"]


def _pmax(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.pmax(x, axis_name)


def _first_complete(x: Array, m: Array, axis_name: AxisName) -> Array:
    """Per slice, the first complete value along axis 0 (of the first shard that has one); 0 if none."""
    idx = jnp.argmax(m, axis=0)
    val = jnp.take_along_axis(x, idx[None], axis=0)[0]
    has = jnp.any(m, axis=0)
    val = jnp.where(has, val, jnp.zeros_like(val))
    if axis_name is None:
        return val
    key = jnp.where(has, linear_index(axis_name), axis_size(axis_name))
    first = lax.pmin(key, axis_name)
    return lax.psum(jnp.where(key == first, val, jnp.zeros_like(val)), axis_name)


def _masked_unit_centred(x: Array, m: Array, cnt: Array, axis_name: AxisName) -> Array:
    """``x`` centred over the complete positions ``m`` and divided by its largest deviation (0 elsewhere)."""
    d = jnp.where(m, x - lax.stop_gradient(_first_complete(x, m, axis_name)), jnp.zeros_like(x))
    amax = lax.stop_gradient(_pmax(jnp.max(jnp.abs(d), axis=0), axis_name))
    d = d / jnp.where(amax > 0, amax, jnp.ones_like(amax))
    mean = psum(jnp.sum(d, axis=0), axis_name) / jnp.maximum(cnt, 1)
    return jnp.where(m, d - mean, jnp.zeros_like(d))


def pearsonr_omit(xa: Array, ya: Array, alternative: str, axis_name: AxisName) -> tuple[Array, Array]:
    """Pearson's r and p-value along axis 0 over the positions where neither ``xa`` nor ``ya`` is NaN.

    The count of complete pairs ``N`` is traced; ``N < 2`` gives NaN, ``N == 2`` gives ``r = +-1, p = 1`` (scipy).
    """
    m = ~(jnp.isnan(xa) | jnp.isnan(ya))
    cnt = psum(jnp.sum(m, axis=0, dtype=jnp.int32), axis_name)
    cntf = cnt.astype(xa.dtype)
    xc = _masked_unit_centred(xa, m, cntf, axis_name)
    yc = _masked_unit_centred(ya, m, cntf, axis_name)
    sxy = psum(jnp.sum(xc * yc, axis=0), axis_name)
    sxx = psum(jnp.sum(xc * xc, axis=0), axis_name)
    syy = psum(jnp.sum(yc * yc, axis=0), axis_name)
    ok = (sxx > 0) & (syy > 0) & (cnt >= 2)
    nx = jnp.sqrt(jnp.where(ok, sxx, jnp.ones_like(sxx)))
    ny = jnp.sqrt(jnp.where(ok, syy, jnp.ones_like(syy)))
    r = jnp.where(ok, jnp.clip(sxy / nx / ny, -1.0, 1.0), jnp.full_like(sxy, jnp.nan))
    r = jnp.where(cnt == 2, jnp.round(r), r)
    p = pearson_pvalue(r, jnp.maximum(cnt, 3), alternative)
    p = jnp.where(cnt == 2, jnp.where(jnp.isnan(r), jnp.nan, 1.0), p).astype(r.dtype)
    return r, p


class _SortInfo(NamedTuple):
    """Per column (rows of the transposed ``(k, n)`` data): the sort permutation, its inverse, the tie runs in
    sorted coordinates and the observed mask in row and in sorted order."""

    perm: Array
    inv: Array
    start: Array
    end: Array
    obs: Array
    obs_sorted: Array

    @classmethod
    def of(cls, cols: Array, observed: Array) -> _SortInfo:
        keys = _sorting.order_key(cols)  # (k, n)
        perm = _sorting.stable_argsort(keys)
        sk = jnp.take_along_axis(keys, perm, axis=-1)
        start, end = _sorting.runs(_sorting.run_starts(sk))
        obs_sorted = jnp.take_along_axis(observed, perm, axis=-1)
        return cls(perm, _sorting.invert_permutation(perm), start, end, observed, obs_sorted)

    def columns(self, idx: Array) -> _SortInfo:
        return _SortInfo(*(a[idx] for a in self))


def _average_ranks(g: Array, start: Array, end: Array) -> Array:
    """``(lo, hi)`` in sorted coordinates for ``g`` (.., n), 0/1 flags in sorted order, and tie runs ``[start, end]``:
    the flagged entries before each entry's tie run and up to its end, so the average rank among the flagged
    entries is ``lo + (hi - lo + 1) / 2`` (callers mask the unflagged entries)."""
    c = lax.associative_scan(jnp.add, g, axis=g.ndim - 1)  # XLA:CPU cumsum is ~5x slower (reduce-window)
    lo = jnp.take_along_axis(c - g, jnp.broadcast_to(start, c.shape), axis=-1)
    hi = jnp.take_along_axis(c, jnp.broadcast_to(end, c.shape), axis=-1)
    return lo, hi


def _spearman_row(i: Array, xs: _SortInfo, ys: _SortInfo, dtype: Any) -> tuple[Array, ...]:
    """Sums for the pairs ``(x_i, y_j)``, all ``j``: ``(sxy, sxx, syy, count)``, each ``(e,)``."""
    mi = xs.obs[i]  # (n,)
    # Ranks of every y_j among the rows observed in both, read in y_j's sorted order, then put back in row order.
    g = (jnp.take(mi, ys.perm) & ys.obs_sorted).astype(jnp.int32)  # (e, n)
    lo, hi = _average_ranks(g, ys.start, ys.end)
    ry = jnp.take_along_axis(lo.astype(dtype) + (hi - lo + 1).astype(dtype) * 0.5, ys.inv, axis=-1)
    # Ranks of x_i among the rows observed in both, for every y_j, in x_i's sorted order.
    pi = xs.perm[i]
    gx = (ys.obs[:, pi] & mi[pi][None, :]).astype(jnp.int32)  # (e, n)
    lo, hi = _average_ranks(gx, xs.start[i][None], xs.end[i][None])
    rx = (lo.astype(dtype) + (hi - lo + 1).astype(dtype) * 0.5)[:, xs.inv[i]]
    comp = mi[None, :] & ys.obs  # (e, n)
    count = jnp.sum(comp, axis=-1, dtype=jnp.int32)
    mid = ((count + 1).astype(dtype) * 0.5)[:, None]
    zero = jnp.zeros((), dtype)
    rx = jnp.where(comp, rx - mid, zero)
    ry = jnp.where(comp, ry - mid, zero)
    return jnp.sum(rx * ry, axis=-1), jnp.sum(rx * rx, axis=-1), jnp.sum(ry * ry, axis=-1), count


def pairwise_spearman(
    x2: Array, y2: Array | None, dtype: Any, observed: Callable[[Array], Array]
) -> tuple[Array, Array]:
    """Pairwise-complete Spearman ``(d, e)`` (``(d, d)`` for ``y2=None``) and the complete-row counts ``N_ij``.

    ``observed(a)`` flags the usable entries (``isfinite`` for pandas, ``~isnan`` for scipy's ``'omit'``). Entries
    are NaN where a column is constant on the shared rows or ``N_ij < 2``; the diagonal is 1 where defined.
    """
    xt = x2.T
    d = xt.shape[0]
    xs = _SortInfo.of(xt, observed(xt))
    if y2 is not None:
        ys = _SortInfo.of(y2.T, observed(y2.T))
        sxy, sxx, syy, count = lax.map(lambda i: _spearman_row(i, xs, ys, dtype), jnp.arange(d))
        return _rho(sxy, sxx, syy, count, dtype), count
    if d < 4:
        sxy, sxx, syy, count = lax.map(lambda i: _spearman_row(i, xs, xs, dtype), jnp.arange(d))
        rho = _rho(sxy, sxx, syy, count, dtype)
        rho = 0.5 * (rho + rho.T)
    else:
        # Each unordered pair once (at cyclic distance 1..d//2; for even d the pairs at distance d/2 twice): row i
        # is paired with columns i+1, ..., i+d//2 (mod d), about half the work of the full matrix.
        h = d // 2

        def row(i: Array) -> tuple[Array, ...]:
            idx = (i + 1 + jnp.arange(h)) % d
            return _spearman_row(i, xs, xs.columns(idx), dtype)

        sxy, sxx, syy, cnt = lax.map(row, jnp.arange(d))
        half = _rho(sxy, sxx, syy, cnt, dtype)  # (d, h)
        ii = np.repeat(np.arange(d), h)
        jj = (ii + 1 + np.tile(np.arange(h), d)) % d
        rho = jnp.full((d, d), jnp.nan, dtype).at[ii, jj].set(half.reshape(-1)).at[jj, ii].set(half.reshape(-1))
        count = jnp.zeros((d, d), jnp.int32).at[ii, jj].set(cnt.reshape(-1)).at[jj, ii].set(cnt.reshape(-1))
        # The diagonal: the column's observed count, and rho = 1 where it has two distinct observed values.
        nobs = jnp.sum(xs.obs, axis=-1, dtype=jnp.int32)
        keys = _sorting.order_key(xt)
        top = jnp.asarray(np.iinfo(keys.dtype).max, keys.dtype)
        kmin = jnp.min(jnp.where(xs.obs, keys, top), axis=-1)
        kmax = jnp.max(jnp.where(xs.obs, keys, jnp.zeros_like(keys)), axis=-1)
        varied = kmax > kmin
        diag = jnp.where(varied & (nobs >= 2), 1.0, jnp.nan).astype(dtype)
        eye = np.arange(d)
        rho = rho.at[eye, eye].set(diag)
        count = count.at[eye, eye].set(nobs)
        return rho, count
    eye = jnp.eye(d, dtype=bool)
    return jnp.where(eye & ~jnp.isnan(rho), jnp.ones_like(rho), rho), count


def _rho(sxy: Array, sxx: Array, syy: Array, count: Array, dtype: Any) -> Array:
    ok = (sxx > 0) & (syy > 0) & (count >= 2)
    den = jnp.sqrt(jnp.where(ok, sxx, 1.0)) * jnp.sqrt(jnp.where(ok, syy, 1.0))
    return jnp.where(ok, jnp.clip(sxy / den, -1.0, 1.0), jnp.nan).astype(dtype)


def pairwise_kendall(x2: Array, y2: Array | None, dtype: Any, observed: Callable[[Array], Array]) -> tuple[Array, ...]:
    """Pairwise-complete Kendall tau-b ``(d, e)`` and counts ``N_ij`` (pandas' ``nancorr_kendall``): each pair's
    complete rows, one pair at a time (``lax.map``). For ``y2=None`` only ``i < j`` is computed; the diagonal is 1
    (pandas' convention, even for a constant column) and the caller applies ``min_periods``."""
    xt = x2.T
    yt = xt if y2 is None else y2.T
    ox, oy = observed(xt), observed(yt)
    d, e = xt.shape[0], yt.shape[0]
    if y2 is None:
        ii, jj = np.triu_indices(d, 1)
    else:
        ii, jj = np.divmod(np.arange(d * e), e)

    def one(ij: tuple[Array, Array]) -> Array:
        i, j = ij
        keep = ox[i] & oy[j]
        return _kendall.tau_from_counts(_kendall.kendall_counts(xt[i], yt[j], keep), "b")

    count = jnp.sum(ox[:, None, :] & oy[None, :, :], axis=-1, dtype=jnp.int32)
    if len(ii) == 0:
        tau = jnp.zeros((0,), dtype)
    else:
        tau = lax.map(one, (jnp.asarray(ii, jnp.int32), jnp.asarray(jj, jnp.int32))).astype(dtype)
    out = jnp.ones((d, d), dtype).at[ii, jj].set(tau).at[jj, ii].set(tau) if y2 is None else tau.reshape(d, e)
    return out, count


def rank_nancorrcoef(x: Any, y: Any, method: str, min_periods: int, axis_name: AxisName) -> Array:
    """``nancorrcoef(method='spearman' | 'kendall')``: pandas' pairwise-complete rank correlation (finite entries
    are observed; NaN where ``N_ij < min_periods``). Sharded rows are all-gathered first (ranks need all rows)."""
    x2, x1 = as_columns(as_array(x, "x"), "x")
    y2, y1 = (None, x1) if y is None else as_columns(as_array(y, "y"), "y")
    if y2 is not None:
        check_same_n(x2, y2)
    dtypes = (x2.dtype,) if y2 is None else (x2.dtype, y2.dtype)
    x2 = _gather_rows(x2, axis_name)
    y2 = None if y2 is None else _gather_rows(y2, axis_name)
    fn = pairwise_spearman if method == "spearman" else pairwise_kendall
    r, count = fn(x2, y2, _float_dtype(*dtypes), _finite)
    r = jnp.where(count >= min_periods, r, jnp.nan)
    return squeeze_1d(r.astype(_result_dtype(*dtypes)), x1, y1)


def _finite(a: Array) -> Array:
    return jnp.isfinite(a) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.ones(a.shape, bool)
