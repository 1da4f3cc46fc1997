"""Significance tests built on the moment statistics: p-values for partial correlations.

``partial_corr_test`` returns the partial correlation matrix of :func:`corrjax.stats.partial_corr` with the
t-test p-values of pingouin (``pingouin.partial_corr`` / ``pcorr``) and R's ``ppcor::pcor``: the partial correlation
of two variables given ``k`` others, from ``n`` observations, is tested with ``t = r sqrt(dof / (1 - r^2))`` and
``dof = n - 2 - k`` degrees of freedom (Fisher 1924; ppcor: Kim 2015, "ppcor: an R package for a fast calculation
to semi-partial correlation coefficients", Commun. Stat. Appl. Methods 22:665). For the full matrix every pair is
conditioned on the other ``k = d - 2`` columns, so ``dof = n - d``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from corrjax._checks import as_columns
from corrjax.stats._centered import AxisName, global_n
from corrjax.stats._explicit import shard_rows
from corrjax.stats._pvalues import check_alternative, pearson_pvalue
from corrjax.stats.moments import partial_corr

Array = jax.Array

__all__ = ["PartialCorrResult", "partial_corr_test"]


class PartialCorrResult(NamedTuple):
    """Result of :func:`partial_corr_test`: the ``(d, d)`` partial correlations, their p-values, and ``dof``."""

    statistic: Array
    pvalue: Array
    dof: int


@shard_rows("x")
def partial_corr_test(x: Any, *, alternative: str = "two-sided", axis_name: AxisName = None) -> PartialCorrResult:
    """Partial correlation matrix with p-values (pingouin / R ppcor semantics).

    Entry ``(i, j)`` is the correlation of columns ``i`` and ``j`` given all ``d - 2`` others
    (:func:`corrjax.stats.partial_corr`); its p-value is the t-test with ``dof = n - d`` degrees of freedom,
    two-sided or one-sided (``alternative``: the t distribution's cdf for ``'less'``, survival function for
    ``'greater'``), as ``pingouin.partial_corr(..., covar=others, alternative=...)``.

    Args:
      x: ``(n, d)`` data, ``d >= 2``.
      alternative: ``'two-sided'``, ``'less'`` or ``'greater'`` (static).
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      ``PartialCorrResult(statistic (d, d), pvalue (d, d), dof)``. p-values are NaN where the statistic is NaN or
      ``dof < 1`` (``n <= d``: the partial correlations are then +-1 or undefined); the diagonal is that of r = 1.
    """
    check_alternative(alternative)
    x2, was_1d = as_columns(x, "x")
    if was_1d or x2.shape[1] < 2:
        raise ValueError(f"`x` must be (n, d) with d >= 2 variables, got shape {jnp.shape(x)}")
    n = global_n(x2.shape[0], axis_name)
    d = x2.shape[1]
    dof = n - d
    # The p-values from the float32 (or wider) statistic: from a half-precision one they would inherit its rounding.
    r = partial_corr(x2.astype(jnp.promote_types(x2.dtype, jnp.float32)), axis_name=axis_name)
    if dof < 1:
        return PartialCorrResult(r.astype(x2.dtype), jnp.full_like(r, jnp.nan), dof)
    return PartialCorrResult(r.astype(x2.dtype), pearson_pvalue(r, dof + 2, alternative), dof)
