"""Weighted Kendall's tau (Vigna 2015), as ``scipy.stats.weightedtau``.

Each element ``i`` has an importance rank ``r_i`` (0 = most important) and a weight ``w_i = weigher(r_i)``
(hyperbolic ``1 / (r + 1)`` by default); a pair weighs ``w_i + w_j`` (additive) or ``w_i w_j``. With
``s^x_ij = sign(x_i - x_j)``,

    tau_w = sum_{i<j} w_ij s^x_ij s^y_ij / sqrt(sum_{i<j} w_ij |s^x_ij| * sum_{i<j} w_ij |s^y_ij|),

which is scipy's ``((tot - (u + v - t)) - 2 exchanges) / sqrt((tot - u)(tot - v))`` written over pairs (``u``,
``v``, ``t``: the weight of the pairs tied in x, in y, in both; ``exchanges``: of the discordant pairs). The pairs
are summed exactly in row blocks: O(n^2) time, O(n * block) memory, no n x n matrix (scipy's merge sort is
O(n log n); this is meant for the n of ranking evaluations, up to ~10^4).

Reference: Sebastiano Vigna, "A weighted correlation index for rankings with ties", WWW 2015, pp. 1166-1176.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from corrjax._checks import as_array, check_same_n
from corrjax.stats import _sorting
from corrjax.stats.ranks import rankdata

Array = jax.Array

__all__ = ["WeightedTauResult", "weightedtau"]

_BLOCK = 256


class WeightedTauResult(NamedTuple):
    """Result of :func:`weightedtau`: the weighted tau and a NaN p-value (scipy's: its null law is unknown)."""

    statistic: Array
    pvalue: Array


def _hyperbolic(r: Array) -> Array:
    return 1.0 / (r + 1.0)


def _key(a: Array) -> Array:
    """Order keys where NaN is the smallest value (scipy maps NaN below every number in weightedtau)."""
    k = _sorting.order_key(a)
    if jnp.issubdtype(a.dtype, jnp.floating):
        k = jnp.where(jnp.isnan(a), jnp.zeros_like(k), k)
    return k


def _lex_rank(k1: Array, k2: Array) -> Array:
    """scipy's rank for ``rank=None``: the inverse of the reversed ``lexsort((k2, k1))`` (by ``k1``, ties by ``k2``,
    then by position), so the largest ``(k1, k2)`` gets rank 0 and, among exact ties, the later position ranks
    first."""
    n = k1.shape[0]
    p2 = _sorting.stable_argsort(k2)
    perm = p2[_sorting.stable_argsort(k1[p2])]
    return (n - 1) - _sorting.invert_permutation(perm)


def _tau(kx: Array, ky: Array, w: Array, additive: bool, acc: Any) -> Array:
    n = kx.shape[0]
    pad = (-n) % _BLOCK if n > _BLOCK else 0
    rows = n + pad
    block = min(_BLOCK, n)
    # Padded rows get weight 0 in both factors below (additive: the row's weight and the column's weight are both
    # needed, so padding is masked explicitly).
    valid = jnp.arange(rows) < n
    kxp, kyp = jnp.pad(kx, (0, pad)), jnp.pad(ky, (0, pad))
    wp = jnp.pad(w, (0, pad))

    def body(b: Array) -> Array:
        sl = lambda a: lax.dynamic_slice_in_dim(a, b * block, block)
        bx, by, bw, bv = sl(kxp), sl(kyp), sl(wp), sl(valid)
        sx = (bx[:, None] > kx[None, :]).astype(acc) - (bx[:, None] < kx[None, :]).astype(acc)
        sy = (by[:, None] > ky[None, :]).astype(acc) - (by[:, None] < ky[None, :]).astype(acc)
        wij = bw[:, None] + w[None, :] if additive else bw[:, None] * w[None, :]
        wij = jnp.where(bv[:, None], wij, jnp.zeros_like(wij))
        return jnp.stack([jnp.sum(wij * sx * sy), jnp.sum(wij * jnp.abs(sx)), jnp.sum(wij * jnp.abs(sy))])

    sums = jnp.sum(lax.map(body, jnp.arange(rows // block)), axis=0)
    num, dx, dy = sums[0], sums[1], sums[2]  # each ordered pair twice: the factor 2 cancels
    ok = (dx > 0) & (dy > 0)
    den = jnp.sqrt(jnp.where(ok, dx, 1.0)) * jnp.sqrt(jnp.where(ok, dy, 1.0))
    return jnp.where(ok, jnp.clip(num / den, -1.0, 1.0), jnp.nan)


def weightedtau(
    x: Any,
    y: Any,
    *,
    rank: bool | Any | None = True,
    weigher: Callable[[Array], Array] | None = None,
    additive: bool = True,
) -> WeightedTauResult:
    """Weighted Kendall's tau of two 1-D samples, as ``scipy.stats.weightedtau``.

    Args:
      x, y: 1-D samples of the same length ``n`` (float or integer). NaN is the smallest value (scipy's rule).
      rank: ``True`` (default): the mean of the tau with importance ranks by decreasing lexicographic ``(x, y)``
        and the one by decreasing ``(y, x)``; ``None``: only the first; ``False``: the element index is its rank;
        or an array ``(n,)`` of ranks (0 = most important; reduced to dense ranks 0, 1, ... as scipy does).
      weigher: maps an array of ranks (float, elementwise) to weights; default hyperbolic ``1 / (r + 1)``. It is
        called on traced arrays, so it must be written with ``jnp``; ``lambda r: jnp.ones_like(r)`` gives
        Kendall's tau-b.
      additive: pair weight ``w_i + w_j`` (default) or ``w_i w_j``.

    Returns:
      ``WeightedTauResult(statistic, pvalue)``: scalars; ``statistic`` in [-1, 1], NaN when either sample is
      constant or ``n < 2``; ``pvalue`` is NaN, as scipy's.
    """
    xa, ya = as_array(x, "x"), as_array(y, "y")
    if xa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"`x` and `y` must be 1-D samples, got x.shape={xa.shape} and y.shape={ya.shape}")
    check_same_n(xa, ya)
    if not isinstance(additive, bool | np.bool_):
        raise TypeError(f"`additive` must be a bool, got {additive!r}")
    weigher = _hyperbolic if weigher is None else weigher
    if not callable(weigher):
        raise TypeError(f"`weigher` must be callable or None, got {type(weigher).__name__}")
    x64 = jax.config.jax_enable_x64
    acc = jnp.float64 if x64 else jnp.float32
    n = xa.shape[0]
    nan = jnp.asarray(jnp.nan, acc)
    if n < 2:
        return WeightedTauResult(nan, nan)
    kx, ky = _key(xa), _key(ya)

    def tau_with(r: Array) -> Array:
        w = jnp.asarray(weigher(r.astype(acc)), acc)
        if w.shape != (n,):
            raise ValueError(f"`weigher` must map ranks of shape {(n,)} to weights of that shape, got {w.shape}")
        return _tau(kx, ky, w, additive, acc)

    if rank is True:
        tau = 0.5 * (tau_with(_lex_rank(kx, ky)) + tau_with(_lex_rank(ky, kx)))
    elif rank is None:
        tau = tau_with(_lex_rank(kx, ky))
    elif rank is False:
        tau = tau_with(jnp.arange(n))
    else:
        ra = as_array(rank, "rank")
        if ra.shape != (n,):
            raise ValueError(f"`rank` must be True, False, None or an array of shape {(n,)}, got shape {ra.shape}")
        tau = tau_with(rankdata(ra, method="dense") - 1)  # scipy reduces a rank array to dense 0-based ranks
    return WeightedTauResult(tau, nan)
