"""Shrunk covariance estimators: Ledoit-Wolf, OAS and fixed shrinkage, with scikit-learn's exact formulas.

All shrink the maximum-likelihood covariance ``S`` (1/n normalisation; data centred at the sample mean, or not at
all with ``assume_centered=True``, as scikit-learn) towards the scaled identity ``mu I`` with ``mu = tr(S) / p``:
``(1 - s) S + s mu I``. They differ in the shrinkage ``s``: estimated (Ledoit-Wolf, OAS) or given.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from corrjax._checks import as_columns
from corrjax.stats._centered import AxisName, centered, comoment, global_n, psum
from corrjax.stats._explicit import shard_rows

Array = jax.Array

__all__ = ["ShrunkCovariance", "ledoit_wolf", "oas", "shrunk_covariance"]


class ShrunkCovariance(NamedTuple):
    """A shrunk covariance ``(p, p)`` and the shrinkage coefficient ``s`` in [0, 1] (a scalar)."""

    covariance: Array
    shrinkage: Array


def _empirical(x: Any, axis_name: AxisName, assume_centered: bool = False) -> tuple[Array, Array, int]:
    if not isinstance(assume_centered, bool | np.bool_):
        raise TypeError(f"`assume_centered` must be a bool, got {assume_centered!r}")
    x2, _ = as_columns(x, "x")
    n = global_n(x2.shape[0], axis_name)
    if n < 1:
        raise ValueError(f"`x` needs at least one observation, got shape {x2.shape}")
    xc = x2 if assume_centered else centered(x2, None, axis_name)[0]
    s = comoment(xc, None, None, axis_name) / n
    return xc, 0.5 * (s + s.T), n


def _shrink(s: Array, shrinkage: Array) -> Array:
    p = s.shape[0]
    mu = jnp.trace(s) / p
    return (1.0 - shrinkage) * s + shrinkage * mu * jnp.eye(p, dtype=s.dtype)


@shard_rows("x")
def ledoit_wolf(x: Any, *, assume_centered: bool = False, axis_name: AxisName = None) -> ShrunkCovariance:
    """Ledoit-Wolf shrunk covariance, as ``sklearn.covariance.LedoitWolf(assume_centered=...)``.

    Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices", J. Multivar.
    Anal. 88:365. With centred rows ``x_k``, ``m = tr(S)/p``, ``d2 = ||S - m I||_F^2 / p`` and
    ``b2 = (sum_k ||x_k||^4 / n - ||S||_F^2 n) / (p n^2)``, the shrinkage is ``min(b2, d2) / d2`` (0 if that is 0).

    Args:
      x: ``(n, p)`` data (a 1-D input is one variable: shrinkage 0).
      assume_centered: use the raw rows (``S = X^T X / n``, no mean subtracted), as scikit-learn.
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``ShrunkCovariance(covariance (p, p), shrinkage ())``.
    """
    xc, s, n = _empirical(x, axis_name, assume_centered)
    p = s.shape[0]
    if p == 1:
        return ShrunkCovariance(s, jnp.zeros((), s.dtype))
    row_sq = jnp.sum(xc * xc, axis=1)
    beta_sum = psum(jnp.sum(row_sq * row_sq), axis_name)  # sum_ij ((X^2)^T X^2)_ij = sum_k ||x_k||^4
    trace = jnp.trace(s)
    mu = trace / p
    delta_sum = jnp.sum(s * s)  # sum_ij ((X^T X)_ij / n)^2
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2.0 * mu * trace + p * mu * mu) / p
    beta = jnp.minimum(beta, delta)
    shrinkage = jnp.where(beta == 0, jnp.zeros_like(beta), beta / jnp.where(beta == 0, 1.0, delta))
    return ShrunkCovariance(_shrink(s, shrinkage), shrinkage)


@shard_rows("x")
def oas(x: Any, *, assume_centered: bool = False, axis_name: AxisName = None) -> ShrunkCovariance:
    """Oracle Approximating Shrinkage covariance, as ``sklearn.covariance.OAS(assume_centered=...)``.

    Chen, Wiesel, Eldar & Hero (2010), "Shrinkage algorithms for MMSE covariance estimation", IEEE TSP 58:5016, in
    scikit-learn's form: with ``a = mean(S_ij^2)`` and ``m = tr(S)/p``,
    ``s = min((a + m^2) / ((n + 1) (a - m^2 / p)), 1)`` (1 if the denominator is 0).

    Args:
      x: ``(n, p)`` data (a 1-D input is one variable: shrinkage 0).
      assume_centered: use the raw rows (``S = X^T X / n``), as scikit-learn.
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``ShrunkCovariance(covariance (p, p), shrinkage ())``.
    """
    _, s, n = _empirical(x, axis_name, assume_centered)
    p = s.shape[0]
    if p == 1:
        return ShrunkCovariance(s, jnp.zeros((), s.dtype))
    alpha = jnp.mean(s * s)
    mu = jnp.trace(s) / p
    num = alpha + mu * mu
    den = (n + 1.0) * (alpha - mu * mu / p)
    shrinkage = jnp.where(den == 0, jnp.ones_like(den), jnp.minimum(num / jnp.where(den == 0, 1.0, den), 1.0))
    return ShrunkCovariance(_shrink(s, shrinkage), shrinkage)


@shard_rows("x")
def shrunk_covariance(
    x: Any, *, shrinkage: float | Array = 0.1, assume_centered: bool = False, axis_name: AxisName = None
) -> ShrunkCovariance:
    """Covariance shrunk by a fixed coefficient: ``(1 - s) S + s (tr(S) / p) I``.

    ``sklearn.covariance.ShrunkCovariance(shrinkage=s, assume_centered=...).fit(x).covariance_``, i.e.
    ``sklearn.covariance.shrunk_covariance(empirical_covariance(x), s)`` (scikit-learn's function takes the
    covariance matrix; this one takes the data, like :func:`ledoit_wolf` and :func:`oas`).

    Args:
      x: ``(n, p)`` data (1-D: one variable, where shrinkage changes nothing).
      shrinkage: ``s`` in [0, 1]; a Python number is checked, an array may be traced (e.g. scheduled).
      assume_centered: use the raw rows (``S = X^T X / n``).
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``ShrunkCovariance(covariance (p, p), shrinkage ())``.
    """
    if isinstance(shrinkage, int | float | np.number) and not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"`shrinkage` must be in [0, 1], got {shrinkage!r}")
    _, s, _ = _empirical(x, axis_name, assume_centered)
    coef = jnp.asarray(shrinkage, s.dtype)
    if coef.ndim != 0:
        raise ValueError(f"`shrinkage` must be a scalar, got shape {coef.shape}")
    return ShrunkCovariance(_shrink(s, coef), coef)
