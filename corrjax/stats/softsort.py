"""Differentiable sorting and ranking by projection onto the permutahedron (Blondel et al., 2020).

``soft_sort`` and ``soft_rank`` replace the piecewise-constant ``sort``/``rank`` by the projection of a scaled
input onto the permutahedron (the convex hull of the permutations of ``(n, n-1, ..., 1)``, or of the values for
sorting), regularised by a quadratic (``"l2"``) or entropic (``"kl"``) term of strength ``ε``. The projection
reduces to an isotonic regression solved by pool-adjacent-violators in O(n log n) (the sort) plus O(n) (PAV), in
pure JAX: it jits, vmaps, and differentiates in forward (``jax.jvp``, ``jacfwd``) and reverse mode through exact
custom JVPs that reverse mode transposes (block averaging for l2, block softmax for kl). As ``ε -> 0`` the outputs
equal the hard sort/ranks (ties get their average rank); as ``ε -> ∞`` they tend to constants (the mean value for
l2 sorting, ``(n + 1) / 2`` for ranks).

Conventions follow the paper's reference code (``google-research/fast-soft-sort``) for ascending order: for
``x: (n,)`` ranks run from 1 (smallest) to n (largest). Operations act along ``axis`` (default the last), so a
``(batch, n)`` input ranks each row, as in ``torchsort``.

Reference:
  Blondel, Teboul, Berthet, Djolonga. Fast Differentiable Sorting and Ranking. ICML 2020, arXiv:2002.08871.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from corrjax._checks import as_float_array, check_choice
from corrjax.stats._isotonic import (
    _block_logsumexp,
    _block_mean,
    _partition_kl,
    _partition_l2,
    project_kl,
    project_l2,
)

Array = jax.Array

__all__ = ["soft_rank", "soft_sort"]

_REGULARIZATIONS = ("l2", "kl")


def _check_strength(strength: Any) -> None:
    if isinstance(strength, int | float) and not strength > 0:
        raise ValueError(f"`regularization_strength` must be positive, got {strength!r}")


def _along_axis(fn, x: Array, axis: int) -> Array:
    """Applies a row function ``fn: (n,) -> (n,)`` along ``axis`` of ``x`` (vmapped over the other axes)."""
    if x.ndim == 0:
        raise ValueError(f"`x` must have at least one axis to sort along, got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"`axis`={axis} is out of range for `x` of shape {x.shape}")
    if x.size == 0:
        return x
    moved = jnp.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = jax.vmap(fn)(flat)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)


def _order_key(x: Array) -> Array:
    """Unsigned integers with the numeric order of ``x`` (``-0.0`` maps with ``+0.0``); ``x`` is float32/float64."""
    utype = jnp.uint32 if x.dtype.itemsize == 4 else jnp.uint64
    top = jnp.asarray(1 << (8 * x.dtype.itemsize - 1), utype)
    u = lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), utype)
    return jnp.where(u & top, ~u, u | top)


def _from_order_key(k: Array, dtype: Any) -> Array:
    top = jnp.asarray(1 << (8 * k.dtype.itemsize - 1), k.dtype)
    return lax.bitcast_convert_type(jnp.where(k & top, k ^ top, ~k), dtype)


def _sorted_and_positions(theta: Array) -> tuple[Array, Array]:
    """``(s, q)``: ``theta`` sorted non-increasingly, and each element's position in ``s`` (ties share one).

    XLA's CPU sort is fast for one operand of primitive type and several times slower with a payload (``argsort``),
    so the values are sorted as order-preserving integer keys and the positions found by binary search; soft ranks
    need no more, since tied values always fall into one block.
    """
    n = theta.shape[0]
    key_dtype = jnp.float64 if theta.dtype == jnp.float64 else jnp.float32
    keys = _order_key(theta.astype(key_dtype))
    sorted_keys = lax.sort(keys, is_stable=False)
    s = _from_order_key(sorted_keys, key_dtype).astype(theta.dtype)[::-1]
    q = n - 1 - jnp.searchsorted(sorted_keys, keys, side="left", method="scan_unrolled").astype(jnp.int32)
    return s, q


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _soft_rank_theta(theta: Array, regularization: str) -> Array:
    return _soft_rank_theta_parts(theta, regularization)[0]


def _soft_rank_theta_parts(theta: Array, regularization: str) -> tuple[Array, tuple[Array, ...]]:
    """Ranks of one row ``theta = x / ε``: the permutahedron projection in sorted coordinates, read back per element.

    Residuals are per element in the input order (its block, the block size or block softmax), so the Jacobian
    needs no permutation: for l2 it is ``I - A`` (``A`` block averaging, symmetric); for kl, ``J t = r ⊙ (t - Σ_B
    softmax_B(θ) t)`` (its transpose ``h - softmax_B(θ) Σ_B h`` with ``h = g ⊙ r`` is the VJP of Blondel et al.).
    """
    n = theta.shape[0]
    s, q = _sorted_and_positions(theta)
    rho = jnp.arange(n, 0, -1, dtype=theta.dtype)
    if regularization == "l2":
        blocks = _partition_l2(s - rho)
        ranks = (_block_mean(s, blocks)[1] + _block_mean(rho, blocks)[0])[q]
        return ranks, (blocks.block_id[q], blocks.count[q])
    log_rho = jnp.log(rho)
    blocks = _partition_kl(s, log_rho)
    _, log_ps = _block_logsumexp(s, blocks)
    lse_w, _ = _block_logsumexp(log_rho, blocks)
    ranks = jnp.exp(log_ps + lse_w)[q]
    return ranks, (blocks.block_id[q], jnp.exp(log_ps)[q], ranks)


@_soft_rank_theta.defjvp
def _soft_rank_theta_jvp(regularization: str, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (theta,), (t,) = primals, tangents
    n = theta.shape[0]
    ranks, res = _soft_rank_theta_parts(theta, regularization)
    if regularization == "l2":
        block_of, count = res
        return ranks, t - jax.ops.segment_sum(t, block_of, num_segments=n)[block_of] / count
    block_of, p, _ = res
    return ranks, ranks * (t - jax.ops.segment_sum(p * t, block_of, num_segments=n)[block_of])


def _rank_row(x: Array, strength: Array, regularization: str) -> Array:
    out = _soft_rank_theta(x / strength, regularization)
    return jnp.where(jnp.any(jnp.isnan(x)), jnp.nan, out)


def _sort_row(x: Array, strength: Array, regularization: str) -> Array:
    n = x.shape[0]
    w = jnp.arange(n, 0, -1, dtype=x.dtype) / strength
    s = -jnp.sort(x)  # the values of -x, non-increasing
    out = -(project_l2(w, s) if regularization == "l2" else project_kl(w, s))
    return jnp.where(jnp.any(jnp.isnan(x)), jnp.nan, out)


def soft_rank(
    x: Any, *, regularization_strength: float | Array = 1.0, regularization: str = "l2", axis: int = -1
) -> Array:
    """Soft ranks of ``x`` along ``axis`` (ascending: the smallest value gets rank ≈ 1, the largest ≈ n).

    For one row ``θ: (n,)`` and strength ``ε``, the l2 soft rank is the Euclidean projection of ``θ / ε`` onto the
    permutahedron of ``ρ = (n, ..., 1)``; the kl soft rank is ``exp`` of the KL projection of ``θ / ε`` onto that of
    ``log ρ``. Both reduce to one isotonic regression of the sorted ``θ / ε`` (Blondel et al., 2020, Prop. 3).

    Args:
      x: array of any shape with at least one axis; integer input is promoted to float.
      regularization_strength: ``ε > 0`` (float or scalar array, so it may be scheduled). Small ``ε``: hard ranks
        (ties share their average rank, as ``scipy.stats.rankdata``); large ``ε``: every rank tends to ``(n + 1) / 2``.
      regularization: ``"l2"`` (piecewise linear in ``x``) or ``"kl"`` (smooth within blocks, ranks > 0).
      axis: the axis to rank along; every other axis is a batch axis.

    Returns:
      Ranks with the shape and float dtype of ``x``; a row containing NaN gives all-NaN ranks.
    """
    check_choice(regularization, "regularization", _REGULARIZATIONS)
    _check_strength(regularization_strength)
    x = as_float_array(x, "x")
    strength = jnp.asarray(regularization_strength, x.dtype)
    return _along_axis(lambda row: _rank_row(row, strength, regularization), x, axis)


def soft_sort(
    x: Any, *, regularization_strength: float | Array = 1.0, regularization: str = "l2", axis: int = -1
) -> Array:
    """Soft sort of ``x`` along ``axis`` in ascending order.

    For one row ``θ: (n,)`` the l2 soft sort is the projection of ``ρ / ε`` (``ρ = (n, ..., 1)``) onto the
    permutahedron of ``θ`` (Blondel et al., 2020, Sec. 3-4), computed from one isotonic regression of the sorted
    values; the kl variant uses the KL projection (its block values are log-sum-exps, so it sorts "in log space").

    Args:
      x: array of any shape with at least one axis; integer input is promoted to float.
      regularization_strength: ``ε > 0``. Small ``ε``: ``jnp.sort(x)``; large ``ε`` (l2): every entry tends to the
        row mean (kl: to ``-log(mean(exp(-x)))``).
      regularization: ``"l2"`` or ``"kl"``.
      axis: the axis to sort along; every other axis is a batch axis.

    Returns:
      The soft-sorted values, same shape and float dtype as ``x``; a row containing NaN gives all-NaN values.
    """
    check_choice(regularization, "regularization", _REGULARIZATIONS)
    _check_strength(regularization_strength)
    x = as_float_array(x, "x")
    strength = jnp.asarray(regularization_strength, x.dtype)
    return _along_axis(lambda row: _sort_row(row, strength, regularization), x, axis)
