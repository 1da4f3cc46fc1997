"""Shared helpers for hypothesis-test options: ``alternative``, ``nan_policy`` and null-distribution p-values.

Every test in :mod:`corrjax.stats` follows scipy's names and semantics:

* ``alternative`` is ``'two-sided'`` (the default), ``'less'`` (the true correlation is negative: small statistics
  are evidence) or ``'greater'`` (positive). A one-sided p-value is the cdf (``'less'``) or survival function
  (``'greater'``) of the null distribution at the statistic; the two-sided one is twice the tail beyond ``|stat|``.
* ``nan_policy`` is ``'propagate'`` (NaN in, NaN out), ``'omit'`` (the rows with NaN are left out; with static
  shapes under ``jit`` they are masked, not removed, so the effective number of observations is a traced value) or
  ``'raise'``. Under ``jit`` the values are unknown when Python runs, so ``'raise'`` can only check concrete input:
  a traced input is refused with a ``ValueError`` that says so (check ``jnp.isnan(x).any()`` before ``jit``, or use
  ``'propagate'`` and test the result for NaN).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from corrjax._checks import check_choice

Array = jax.Array

ALTERNATIVES = ("two-sided", "less", "greater")
NAN_POLICIES = ("propagate", "omit", "raise")


def check_alternative(alternative: Any) -> str:
    """Returns ``alternative`` if it is one of :data:`ALTERNATIVES`, else raises ``ValueError``."""
    return check_choice(alternative, "alternative", ALTERNATIVES)


def check_nan_policy(nan_policy: Any, **arrays: Any) -> str:
    """Validates ``nan_policy``; with ``'raise'``, raises ``ValueError`` if a named array contains NaN.

    ``'raise'`` needs concrete values: a traced array (inside ``jit``/``vmap``/``grad``) is refused with a
    ``ValueError`` explaining that NaN cannot be detected at trace time.
    """
    check_choice(nan_policy, "nan_policy", NAN_POLICIES)
    if nan_policy != "raise":
        return nan_policy
    for name, a in arrays.items():
        if a is None:
            continue
        if isinstance(a, jax.core.Tracer):
            raise ValueError(
                f"nan_policy='raise' needs concrete input, but `{name}` is traced (inside jit/vmap/grad), where its "
                "values are unknown; check `jnp.isnan(x).any()` before jit, or use nan_policy='propagate' (NaN "
                "results) or 'omit'"
            )
        arr = np.asarray(a)
        if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
            raise ValueError(f"`{name}` contains NaN (nan_policy='raise')")
    return nan_policy


def normal_pvalue(z: Array, alternative: str) -> Array:
    """p-value of a standard-normal statistic ``z``: ``cdf`` (less), ``sf`` (greater) or ``2 sf(|z|)``."""
    rt2 = jnp.sqrt(jnp.asarray(2.0, z.dtype))
    if alternative == "less":
        return 0.5 * special.erfc(-z / rt2)
    if alternative == "greater":
        return 0.5 * special.erfc(z / rt2)
    return special.erfc(jnp.abs(z) / rt2)


# Above this many observations, float32 p-values use the normal approximation below: XLA's float32 betainc loses
# accuracy for large shape parameters (its log-prefactor cancels), ~1e-4 relative at n = 1000 and ~10% at n = 1e5.
F32_BETAINC_MAX_N = 2000


def pearson_pvalue(r: Array, n: Any, alternative: str = "two-sided") -> Array:
    """p-value of Pearson's ``r`` from ``n`` observations (``n >= 3``) under bivariate normal independence.

    Under the null ``r`` follows Beta(n/2 - 1, n/2 - 1) on [-1, 1] (as ``scipy.stats.pearsonr``): ``'less'`` is
    ``I_{(1+r)/2}(a, a)``, ``'greater'`` ``I_{(1-r)/2}(a, a)`` and ``'two-sided'`` ``2 I_{(1-|r|)/2}(a, a)``
    (``a = n/2 - 1``), whose arguments keep small p-values to relative accuracy. The same law is Student's t with
    ``n - 2`` degrees of freedom for ``t = r sqrt((n-2)/(1-r^2))``, so Spearman's t-test uses it with ``n = dof + 2``.
    For float32 with ``n > 2000`` the t tail is the Gaver-Kafadar normal approximation
    ``z^2 = -(n - 2.5) log(1 - r^2)`` (Gaver & Kafadar 1984, Am. Stat. 38:308; ~1e-4 relative at n = 2000, falling
    like 1/n^2). ``n`` may be a Python int or a traced array (``nan_policy='omit'``). NaN ``r`` gives NaN.
    """
    nan = jnp.isnan(r)
    r0 = jnp.where(nan, jnp.zeros_like(r), r)  # finite gradient in the masked-out branch
    x = {"less": 0.5 * (1.0 + r0), "greater": 0.5 * (1.0 - r0)}.get(alternative, 0.5 * (1.0 - jnp.abs(r0)))
    factor = 2.0 if alternative == "two-sided" else 1.0
    static_n = isinstance(n, int | np.integer)
    use_exact = jnp.finfo(r.dtype).bits >= 64 or (static_n and n <= F32_BETAINC_MAX_N)
    nf = jnp.asarray(n, r.dtype)
    ab = jnp.maximum(nf / 2.0 - 1.0, jnp.asarray(0.5, r.dtype))
    p = factor * special.betainc(ab, ab, x)
    if not use_exact:
        z = jnp.sqrt(-(nf - 2.5) * jnp.log1p(-r0 * r0))
        z = {"less": -jnp.sign(r0) * z, "greater": jnp.sign(r0) * z}.get(alternative, z)
        rt2 = jnp.sqrt(jnp.asarray(2.0, r.dtype))
        approx = special.erfc(z / rt2) * (1.0 if alternative == "two-sided" else 0.5)
        p = approx if static_n else jnp.where(nf > F32_BETAINC_MAX_N, approx, p)
    return jnp.where(nan, jnp.asarray(jnp.nan, r.dtype), jnp.clip(p, 0.0, 1.0))
