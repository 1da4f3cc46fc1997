"""Kendall's tau kernels: exact pair counts in O(n log n), scipy's p-values (exact null distribution and normal).

:func:`kendall_counts` counts discordant pairs and ties without an n x n matrix (sort by ``(x, y)`` with stable
radix passes, then count the strict inversions of the y-ranks with ``ceil(log2 n)`` bit passes). Positions where
``keep`` is False are counted as if they were removed: they are given the same largest key in both samples (the
canonical NaN key), which makes every pair they form a joint tie or a concordant pair with a kept element, and
those contributions are subtracted in closed form. This is how ``nan_policy='omit'`` and the pairwise-complete
Kendall of :func:`corrjax.stats.nancorrcoef` keep static shapes.

The exact null distribution of the number of concordant pairs without ties (Kendall 1970, "Rank Correlation
Methods", 4th ed.; the Mahonian numbers) is built at trace time in float64 by adding one element at a time, as
``scipy.stats._mstats_basic._kendall_p_exact``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from corrjax.stats import _sorting
from corrjax.stats._pvalues import normal_pvalue

Array = jax.Array

# scipy's 'auto' rule: the exact distribution for n <= 33 (no ties), or when at most one pair is discordant
# (or concordant), where it has closed forms.
AUTO_EXACT_MAX_N = 33
# method='exact' builds the half-distribution (n(n-1)/4 + 1 float64 values, O(n^3) work once per n at trace time).
EXACT_MAX_N = 1000
# With nan_policy='omit' the number of complete pairs is traced, so every table up to n is stacked (O(n^3) memory).
EXACT_OMIT_MAX_N = 100


class KendallCounts(NamedTuple):
    """Pair counts of the kept elements (float accumulators; exact integers up to the accumulator's precision)."""

    n: Array  # kept elements
    tot: Array  # n(n-1)/2
    dis: Array  # discordant pairs
    xtie: Array  # pairs tied in x (including joint ties)
    ytie: Array
    ntie: Array  # pairs tied in both
    x0: Array  # sum over x-tie groups of c(c-1)(c-2)
    x1: Array  # sum over x-tie groups of c(c-1)(2c+5)
    y0: Array
    y1: Array
    xdistinct: Array  # number of distinct x values (tau-c)
    ydistinct: Array


def _run_sizes(is_first: Array) -> Array:
    start, end = _sorting.runs(is_first)
    return end - start + 1


def accumulators() -> tuple[Any, Any]:
    """``(acc, isum)``: the float accumulator and the exact integer-sum type for the current x64 setting."""
    x64 = jax.config.jax_enable_x64
    acc = jnp.float64 if x64 else jnp.float32
    return acc, (jnp.int64 if x64 else acc)


def kendall_counts(xa: Array, ya: Array, keep: Array | None = None) -> KendallCounts:
    """Pair counts of the 1-D samples ``xa``, ``ya`` (length ``n``) restricted to the positions where ``keep``.

    ``keep=None`` keeps everything (then NaN counts as one value above all others, like scipy's sort; callers
    mask NaN separately). Integers are compared exactly.
    """
    n = xa.shape[0]
    acc, isum = accumulators()
    kx, ky = _sorting.order_key(xa), _sorting.order_key(ya)
    if keep is None:
        nk = jnp.asarray(n, jnp.int32)
        valid = None
    else:
        kx = jnp.where(keep, kx, jnp.asarray(np.iinfo(kx.dtype).max, kx.dtype))
        ky = jnp.where(keep, ky, jnp.asarray(np.iinfo(ky.dtype).max, ky.dtype))
        nk = jnp.sum(keep, dtype=jnp.int32)
        valid = jnp.arange(n, dtype=jnp.int32) < nk  # dropped elements sort last in every order below
    # Order by y (stable), then stably by x: the sequence is sorted by (x, y, original index).
    py = _sorting.stable_argsort(ky)
    sy = ky[py]
    fy = _sorting.run_starts(sy)
    ystart, yend = _sorting.runs(fy)
    ymin = jnp.zeros((n,), jnp.int32).at[py].set(ystart, unique_indices=True, mode="promise_in_bounds")
    k = jnp.arange(n, dtype=jnp.int32)
    below = jnp.concatenate([jnp.where(fy, k, yend + 1), jnp.full((1,), n, jnp.int32)])
    order = py[_sorting.stable_argsort(kx[py])]
    sx, sy_x = kx[order], ky[order]
    fx = _sorting.run_starts(sx)
    fxy = fx | _sorting.run_starts(sy_x)
    # Discordant pairs: strict inversions of the y min-ranks in (x, y) order (x-ties are ascending in y). A dropped
    # element is last in both orders and has the largest y-rank: it forms no inversion.
    dis = _sorting.wide_sum(_sorting.count_inversions(ymin[order], below), 2 * n, isum).astype(acc)

    cx, cy, cxy = _run_sizes(fx), yend - ystart + 1, _run_sizes(fxy)
    if valid is not None:  # the dropped elements form the last run of every order: leave them out of the sums
        zero = jnp.ones_like(cx)
        cx, cy, cxy = jnp.where(valid, cx, zero), jnp.where(valid, cy, zero), jnp.where(valid, cxy, zero)
        fx, fy = fx & valid, fy & valid
    # Summing a per-group quantity g(c) over elements gives sum_groups c * g(c); these are the tie statistics.
    xtie = _sorting.wide_sum(cx - 1, n, isum).astype(acc) / 2
    ytie = _sorting.wide_sum(cy - 1, n, isum).astype(acc) / 2
    ntie = _sorting.wide_sum(cxy - 1, n, isum).astype(acc) / 2
    nf = nk.astype(acc)
    cxf, cyf = cx.astype(acc), cy.astype(acc)
    return KendallCounts(
        n=nf,
        tot=nf * (nf - 1) / 2,
        dis=dis,
        xtie=xtie,
        ytie=ytie,
        ntie=ntie,
        x0=jnp.sum((cxf - 1) * (cxf - 2)),
        x1=jnp.sum((cxf - 1) * (2 * cxf + 5)),
        y0=jnp.sum((cyf - 1) * (cyf - 2)),
        y1=jnp.sum((cyf - 1) * (2 * cyf + 5)),
        xdistinct=jnp.sum(fx, dtype=jnp.int32).astype(acc),
        ydistinct=jnp.sum(fy, dtype=jnp.int32).astype(acc),
    )


def tau_from_counts(c: KendallCounts, variant: str) -> Array:
    """tau-b ``(P - Q) / sqrt((n0 - T_x)(n0 - T_y))`` or tau-c ``2 (P - Q) / (n^2 (m - 1) / m)``, clipped; NaN if a
    sample is constant (all pairs tied) or has fewer than 2 elements."""
    cmd = c.tot - c.xtie - c.ytie + c.ntie - 2 * c.dis
    if variant == "b":
        tau = cmd / jnp.sqrt((c.tot - c.xtie) * (c.tot - c.ytie))
    else:
        m = jnp.minimum(c.xdistinct, c.ydistinct)
        tau = 2 * cmd / (c.n * c.n * (m - 1) / m)
    undefined = (c.xtie == c.tot) | (c.ytie == c.tot)
    return jnp.where(undefined, jnp.nan, jnp.clip(tau, -1.0, 1.0))


def asymptotic_pvalue(c: KendallCounts, alternative: str) -> Array:
    """Normal approximation of ``P - Q`` with the tie-corrected variance (Kendall & Gibbons 1990; scipy's formula,
    arranged to avoid float32 overflow)."""
    cmd = c.tot - c.xtie - c.ytie + c.ntie - 2 * c.dis
    mm = c.n * (c.n - 1)
    var = (mm * (2 * c.n + 5) - c.x1 - c.y1) / 18 + 2 * (c.xtie / mm) * c.ytie
    var = var + jnp.where(c.n > 2, (c.x0 / (9 * mm)) * (c.y0 / jnp.maximum(c.n - 2, 1)), 0.0)
    return normal_pvalue(cmd / jnp.sqrt(var), alternative)


@functools.lru_cache(maxsize=16)
def _half_cdf_tables(n_max: int, stacked: bool) -> np.ndarray:
    """Left half of the exact null cdf of the number of concordant pairs (no ties), float64.

    ``stacked``: a ``(n_max + 1, L)`` table whose row ``m`` is the cdf for ``m`` elements (rows 0, 1 are all ones);
    otherwise the single row for ``n_max``. ``L = n_max (n_max - 1) // 4 + 1`` covers ``c <= n0 / 2``; entries past a
    row's own half are unused. Each step inserts element ``j``, adding 0..j-1 inversions with probability 1/j.
    """
    length = n_max * (n_max - 1) // 4 + 1
    dist = np.zeros(length)
    dist[0] = 1.0
    rows = [np.ones(length), np.ones(length)] if stacked else []
    for j in range(2, n_max + 1):
        csum = np.cumsum(dist)
        shifted = np.concatenate([np.zeros(j), csum[:-j]]) if j < length else np.zeros(length)
        dist = (csum - shifted) / j
        if stacked:
            rows.append(np.cumsum(dist))
    return np.stack(rows) if stacked else np.cumsum(dist)[None]


def exact_pvalue_from_cdf(cdf_c: Array, cdf_prev: Array, in_right: Array, alternative: str) -> Array:
    """scipy's exact p-value from ``F(cmin)`` and ``F(cmin - 1)``, where ``cmin = min(C, n0 - C)`` and ``in_right``
    says ``C >= n0 - C`` (the left-tail cdf is used by symmetry)."""
    if alternative == "two-sided":
        return jnp.minimum(1.0, 2.0 * cdf_c)
    agree = in_right == (alternative == "greater")
    return jnp.where(agree, cdf_c, 1.0 - cdf_prev)


def exact_pvalue(c: KendallCounts, n_static: int, alternative: str, *, traced_n: bool, full: bool) -> Array:
    """Exact p-value of the concordant count ``C = n0 - Q`` (no ties).

    ``full``: every ``C`` from the table (``n <= EXACT_MAX_N``, or ``EXACT_OMIT_MAX_N`` with a traced ``n``);
    otherwise only scipy's 'auto' cases: the table for ``n <= 33`` and the closed forms for ``min(C, n0 - C) <= 1``
    (``P(C = 0) = 1/n!``, ``P(C = 1) = (n - 1)/n!``), the rest NaN (the caller selects the normal branch there).
    """
    acc = c.dis.dtype
    conc = c.tot - c.dis
    in_right = conc >= c.tot - conc
    cmin = jnp.minimum(conc, c.tot - conc)
    # Closed forms via lgamma (underflow to 0 for large n, as scipy's 2/n! for n >= 171).
    inv_fact = jnp.exp(-special.gammaln(c.n + 1))
    closed_c = jnp.where(cmin == 0, inv_fact, c.n * inv_fact)
    closed_prev = jnp.where(cmin == 0, 0.0, inv_fact)
    table_n = n_static if full else min(n_static, AUTO_EXACT_MAX_N)
    if table_n >= 2:
        table = jnp.asarray(_half_cdf_tables(table_n, traced_n), acc)
        row = jnp.clip(c.n.astype(jnp.int32), 0, table.shape[0] - 1) if traced_n else 0
        idx = jnp.clip(cmin, 0, table.shape[1] - 1).astype(jnp.int32)
        cdf_c = table[row, idx]
        cdf_prev = jnp.where(idx > 0, table[row, jnp.maximum(idx - 1, 0)], 0.0)
        in_table = c.n <= table_n
        cdf_c = jnp.where(in_table, cdf_c, closed_c)
        cdf_prev = jnp.where(in_table, cdf_prev, closed_prev)
    else:
        cdf_c, cdf_prev = closed_c, closed_prev
    p = exact_pvalue_from_cdf(cdf_c, cdf_prev, in_right, alternative)
    if not full:
        p = jnp.where((c.n <= AUTO_EXACT_MAX_N) | (cmin <= 1), p, jnp.nan)
    # scipy: n == 2 gives 1 (two-sided) whatever C; the table gives the same.
    return p


def check_exact_size(n: int, traced_n: bool) -> None:
    cap = EXACT_OMIT_MAX_N if traced_n else EXACT_MAX_N
    if n > cap:
        what = "with nan_policy='omit' " if traced_n else ""
        raise ValueError(
            f"kendalltau(method='exact') {what}is limited to n <= {cap} observations (the exact null distribution is "
            f"built at trace time), got n={n}; use method='asymptotic' or 'auto'"
        )


__all__ = [
    "AUTO_EXACT_MAX_N",
    "KendallCounts",
    "accumulators",
    "asymptotic_pvalue",
    "check_exact_size",
    "exact_pvalue",
    "kendall_counts",
    "tau_from_counts",
]
