"""Private kernels shared by the moment-based statistics: shifted two-pass centring and collective helpers.

Everything that reduces over observations goes through :func:`centered`, which

1. subtracts a *reference row* (the first observation of the first shard) from every observation, so that the
   running sums below are of deviations of size ~spread rather than ~mean (no catastrophic cancellation in float32
   when the mean is 1e4 times the spread; a constant column becomes exactly zero);
2. takes the (weighted) mean of the shifted data, reduced with ``lax.psum`` over ``axis_name`` when given;
3. returns the centred data, so callers form co-moments with one matrix product and a final ``psum``.

This is the classical two-pass algorithm (Chan, Golub & LeVeque 1983, "Algorithms for computing the sample
variance"), made exact across shards because every shard centres with the same global mean.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
AxisName = Hashable | Sequence[Hashable] | None

# Matrix products of statistics: full float32 on every backend (no TF32/bf16 passes on GPU/TPU).
PRECISION = lax.Precision.HIGHEST


def psum(x: Any, axis_name: AxisName) -> Any:
    """``lax.psum`` over ``axis_name``, or the identity when it is ``None``."""
    return x if axis_name is None else lax.psum(x, axis_name)


def _names(axis_name: AxisName) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def axis_size(axis_name: AxisName) -> int:
    """Static number of shards along ``axis_name`` (a name or a tuple of names; 1 when ``None``)."""
    if axis_name is None:
        return 1
    count = 1
    for name in _names(axis_name):
        count *= int(lax.axis_size(name))
    return count


def linear_index(axis_name: AxisName) -> Array:
    """This shard's row-major position along ``axis_name`` (a name or a tuple of names)."""
    idx = jnp.asarray(0, jnp.int32)
    for name in _names(axis_name):
        idx = idx * lax.axis_size(name) + lax.axis_index(name)
    return idx


def global_n(n_local: int, axis_name: AxisName) -> int:
    """Static global number of observations when each of the shards holds ``n_local`` rows."""
    return n_local * axis_size(axis_name)


def _is_first_shard(axis_name: AxisName) -> Array:
    return linear_index(axis_name) == 0


def reference_row(x: Array, axis_name: AxisName) -> Array:
    """The first observation (row 0 of ``x``) of the first shard, the same on every shard; zeros if ``n == 0``."""
    if x.shape[0] == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    x0 = lax.stop_gradient(x[0])  # the shift cancels exactly; keep it out of the gradient graph
    if axis_name is None:
        return x0
    return lax.psum(jnp.where(_is_first_shard(axis_name), x0, jnp.zeros_like(x0)), axis_name)


def centered(x: Array, w: Array | None, axis_name: AxisName) -> tuple[Array, Array, Array]:
    """Returns ``(xc, mean, wsum)`` for observations along axis 0 of ``x``.

    ``xc = x - mean`` (computed as ``(x - x_ref) - mean(x - x_ref)``), ``mean`` the global weighted mean with the
    observation axis removed, ``wsum`` the global sum of weights (the number of observations when ``w`` is None).
    """
    shift = reference_row(x, axis_name)
    d = x - shift
    if w is None:
        wsum = jnp.asarray(global_n(x.shape[0], axis_name), x.dtype)
        sum_d = psum(jnp.sum(d, axis=0), axis_name)
    else:
        wsum = psum(jnp.sum(w), axis_name)
        sum_d = psum(jnp.tensordot(w, d, axes=(0, 0), precision=PRECISION), axis_name)
    mean_d = sum_d / jnp.where(wsum != 0, wsum, jnp.ones_like(wsum))  # no weight: the shift stands in
    return d - mean_d, shift + mean_d, wsum


# From this many columns on, a Gram matrix is computed as two products over the upper block triangle (3/4 of the
# flops of the full product); below it the single product is as fast.
SYMMETRIC_SPLIT_MIN_D = 256


def gram(a: Array, b: Array | None = None) -> Array:
    """``a^T b`` (``(n, d)``, ``(n, d)`` -> ``(d, d)``) for a symmetric result; ``b = a`` when omitted.

    The caller guarantees ``a^T b`` is symmetric (``b`` is ``a`` or ``a`` with rows scaled). For wide inputs the
    result is assembled from ``a_1^T b`` (the top block row) and ``a_2^T b_2`` (the bottom-right block), saving a
    quarter of the multiply-adds of a plain GEMM (XLA has no SYRK).
    """
    b = a if b is None else b
    d = a.shape[1]
    if d < SYMMETRIC_SPLIT_MIN_D:
        return jnp.matmul(a.T, b, precision=PRECISION)
    h = d // 2
    top = jnp.matmul(a[:, :h].T, b, precision=PRECISION)  # (h, d)
    bottom_right = jnp.matmul(a[:, h:].T, b[:, h:], precision=PRECISION)  # (d - h, d - h)
    bottom = jnp.concatenate([top[:, h:].T, bottom_right], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def comoment(xc: Array, yc: Array | None, w: Array | None, axis_name: AxisName) -> Array:
    """``sum_k w_k xc_k yc_k^T`` over all shards: ``(n, d), (n, e) -> (d, e)``; ``yc=None`` means ``yc = xc``
    (a symmetric result, computed with :func:`gram`)."""
    if yc is None:
        return psum(gram(xc, None if w is None else xc * w[:, None].astype(xc.dtype)), axis_name)
    if w is not None:
        yc = yc * w[:, None].astype(yc.dtype)
    return psum(jnp.matmul(xc.T, yc, precision=PRECISION), axis_name)


def normalize_comoment(c: Array, sxx: Array, syy: Array, *, symmetric: bool) -> Array:
    """Pearson normalisation ``c_ij / sqrt(sxx_i syy_j)``, clipped to [-1, 1]; NaN where a variance is 0.

    With ``symmetric`` (a matrix of a variable set with itself) the diagonal is exactly 1 where defined.
    """
    sx = jnp.sqrt(sxx)
    sy = jnp.sqrt(syy)
    r = c / (sx[:, None] * sy[None, :])  # one product: symmetric inputs give an exactly symmetric result
    r = jnp.clip(r, -1.0, 1.0)
    if symmetric:
        eye = jnp.eye(r.shape[0], dtype=bool)
        r = jnp.where(eye, jnp.where(jnp.isnan(r), r, jnp.ones_like(r)), r)
    return r


def squeeze_1d(r: Array, x_was_1d: bool, y_was_1d: bool) -> Array:
    """Drops the result axes that correspond to 1-D (single-variable) inputs."""
    if x_was_1d and y_was_1d:
        return r[0, 0]
    if x_was_1d:
        return r[0]
    if y_was_1d:
        return r[:, 0]
    return r
