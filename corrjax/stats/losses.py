"""Correlation losses and feature regularisers: pure scalar functions for use inside a loss function.

Every function takes observations in rows, ``(n,)`` or ``(n, d)``, returns a scalar, and accepts ``axis_name``:
inside ``shard_map``/``pmap`` with the batch sharded along that axis, the batch statistics (means, variances,
cross-correlations) are reduced with ``lax.psum`` so the value is the one of the global batch on every shard, as the
reference implementations of Barlow Twins and VICReg do with their all-reduce/all-gather. Means are centred in two
passes (shifted by a reference row), so float32 inputs with large offsets are safe.

Scale: the data are divided by a power of two ``2**e > max |x|`` before any product (per column for the
correlations, one for both columns of a concordance pair, one per call for the covariance-type regularisers), so the
correlation losses hold their range at any magnitude of the data in the dtype's normal range; epsilons are applied
in the same units, and the covariance-type values (DeCov, VICReg) are multiplied back exactly. The gradient flows
through the exact scaled computation (the scale is a constant). float16/bfloat16 inputs are computed in float32
and the loss is returned in their dtype.

References:
  Lin. A Concordance Correlation Coefficient to Evaluate Reproducibility. Biometrics 1989.
  Cogswell, Ahmed, Girshick, Zitnick, Batra. Reducing Overfitting in Deep Networks by Decorrelating
    Representations (DeCov). ICLR 2016.
  Zbontar, Jing, Misra, LeCun, Deny. Barlow Twins: Self-Supervised Learning via Redundancy Reduction. ICML 2021.
  Bardes, Ponce, LeCun. VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning. ICLR 2022.
  Blondel, Teboul, Berthet, Djolonga. Fast Differentiable Sorting and Ranking. ICML 2020 (soft Spearman).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from corrjax._checks import as_columns
from corrjax.stats._centered import (
    PRECISION,
    AxisName,
    column_exponent,
    compute_dtype,
    mul_pow2,
    pow2,
    psum,
    scaled_centering,
)
from corrjax.stats._explicit import shard_rows
from corrjax.stats.softsort import soft_rank

Array = jax.Array

__all__ = ["barlow_twins_loss", "concordance_loss", "decov_loss", "pearson_loss", "spearman_loss", "vicreg_loss"]


def _pair(x: Any, y: Any, xname: str, yname: str) -> tuple[Array, Array]:
    """Both as ``(n, d)`` with a common float dtype (float32 for half precision: see :func:`_out`); shapes must
    match exactly."""
    x2, _ = as_columns(x, xname)
    y2, _ = as_columns(y, yname)
    if x2.shape != y2.shape:
        raise ValueError(
            f"`{xname}` and `{yname}` must have the same shape (n,) or (n, d): "
            f"got {xname}.shape={tuple(jnp.shape(x))} and {yname}.shape={tuple(jnp.shape(y))}"
        )
    dtype = compute_dtype(jnp.promote_types(x2.dtype, y2.dtype))
    return x2.astype(dtype), y2.astype(dtype)


def _out(value: Array, *inputs: Any) -> Array:
    """``value`` in the inputs' common float dtype (a half-precision input gets a half-precision loss)."""
    dtypes = [jnp.asarray(a).dtype for a in inputs]
    dt = jnp.result_type(*[d if jnp.issubdtype(d, jnp.floating) else jnp.result_type(float) for d in dtypes])
    return value.astype(dt)


def _scaled_eps(eps: Any, exp: Array, dtype: Any) -> Array:
    """An epsilon in data units, expressed for data divided by ``2**exp`` (``eps * 2**-2exp``), capped far below
    overflow (a cap only binds where ``eps`` dwarfs the variance anyway)."""
    e = mul_pow2(jnp.asarray(eps, dtype), -2 * exp)
    return jnp.minimum(e, jnp.asarray(jnp.finfo(dtype).max / 16, dtype))


def _global_n(x: Array, axis_name: AxisName) -> int:
    return x.shape[0] * (1 if axis_name is None else lax.axis_size(axis_name))


def _moments(x: Array, y: Array, axis_name: AxisName, *, common: bool) -> tuple[Array, ...]:
    """Per column: the mean difference ``mean_x - mean_y``, biased variances and covariance of ``x, y: (n, d)`` over
    the (global) batch, for the data divided by ``2**exp_x`` and ``2**exp_y`` (returned last; ``common``: one
    exponent per pair of columns, as the concordance needs).

    The mean difference is formed from the reference shifts and the shifted means, so a location shift of the size
    of the spread keeps its digits in float32 when the means are ~1e4 (the difference of two rounded means would not).
    """
    n = _global_n(x, axis_name)
    ex, ey = column_exponent(x, axis_name), column_exponent(y, axis_name)
    if common:
        ex = ey = jnp.maximum(ex, ey)
    fx, fy = scaled_centering(x, None, axis_name, exp=ex), scaled_centering(y, None, axis_name, exp=ey)
    xc, yc = fx.apply(x), fy.apply(y)
    sxx = psum(jnp.sum(xc * xc, axis=0), axis_name) / n
    syy = psum(jnp.sum(yc * yc, axis=0), axis_name) / n
    sxy = psum(jnp.sum(xc * yc, axis=0), axis_name) / n
    return (fx.shift - fy.shift) + (fx.mean - fy.mean), sxx, syy, sxy, ex, ey


@shard_rows("pred", "target")
def pearson_loss(pred: Any, target: Any, *, eps: float = 0.0, axis_name: AxisName = None) -> Array:
    """``1 - r``, with ``r`` Pearson's correlation between ``pred`` and ``target`` over the batch.

    ``r = cov(pred, target) / sqrt((var(pred) + eps)(var(target) + eps))`` with biased (1/n) moments. For ``(n, d)``
    inputs the loss is the mean over the ``d`` columns of ``1 - r_j``. Values lie in ``[0, 2]`` (``r`` is clipped
    to [-1, 1]) at any magnitude of the data; half-precision inputs are computed in float32.

    Args:
      pred, target: ``(n,)`` or ``(n, d)`` of the same shape.
      eps: added to both variances (``0``: exact, NaN when a column is constant or ``n < 2``).
      axis_name: reduce the batch statistics over this mapped axis (data-parallel batch).
    """
    x, y = _pair(pred, target, "pred", "target")
    _, sxx, syy, sxy, ex, ey = _moments(x, y, axis_name, common=False)
    den = jnp.sqrt(sxx + _scaled_eps(eps, ex, x.dtype)) * jnp.sqrt(syy + _scaled_eps(eps, ey, x.dtype))
    r = jnp.clip(sxy / den, -1.0, 1.0)
    return _out(jnp.mean(1 - r), pred, target)


@shard_rows("pred", "target")
def concordance_loss(pred: Any, target: Any, *, axis_name: AxisName = None) -> Array:
    """``1 - CCC``, Lin's concordance correlation coefficient (Lin, 1989) over the batch.

    ``CCC = 2 s_xy / (s_x² + s_y² + (m_x - m_y)²)`` with biased (1/n) moments; it penalises both poor correlation
    and shifts in location or scale. For ``(n, d)`` inputs, the mean over columns. Values lie in ``[0, 2]`` at any
    magnitude of the data. NaN only when both columns are constant and equal.

    Args:
      pred, target: ``(n,)`` or ``(n, d)`` of the same shape.
      axis_name: reduce the batch statistics over this mapped axis.
    """
    x, y = _pair(pred, target, "pred", "target")
    dmean, sxx, syy, sxy, _, _ = _moments(x, y, axis_name, common=True)
    ccc = jnp.clip(2 * sxy / (sxx + syy + dmean**2), -1.0, 1.0)
    return _out(jnp.mean(1 - ccc), pred, target)


def _features(z: Any, name: str) -> Array:
    arr, _ = as_columns(z, name)
    return arr.astype(compute_dtype(arr.dtype))


def _scaled(z: Array, exp: Array, axis_name: AxisName) -> Array:
    """The centred ``z / 2**exp`` over the (global) batch."""
    return scaled_centering(z, None, axis_name, exp=exp).apply(z)


@shard_rows("h")
def decov_loss(h: Any, *, axis_name: AxisName = None) -> Array:
    """DeCov (Cogswell et al., 2016): ``½ (‖C‖_F² - ‖diag C‖²)`` for the batch covariance of activations.

    ``C = (1/n) Σ_k (h_k - μ)(h_k - μ)ᵀ``: ``(d, d)`` for ``h: (n, d)``; the loss penalises off-diagonal covariance,
    decorrelating the units of a hidden layer.

    Args:
      h: ``(n, d)`` activations (a 1-D input is one unit and gives 0).
      axis_name: reduce the batch statistics over this mapped axis.
    """
    x = _features(h, "h")
    n = _global_n(x, axis_name)
    e = column_exponent(x, axis_name, axes=None)  # one scale: the loss is a fourth power of the data
    xc = _scaled(x, e, axis_name)
    c = psum(jnp.matmul(xc.T, xc, precision=PRECISION), axis_name) / n
    return _out(mul_pow2(0.5 * (jnp.sum(c * c) - jnp.sum(jnp.diagonal(c) ** 2)), 4 * e, parts=8), h)


def _check_views(z1: Any, z2: Any) -> tuple[Array, Array]:
    a, b = _features(z1, "z1"), _features(z2, "z2")
    if a.shape != b.shape:
        raise ValueError(
            f"`z1` and `z2` must be two views (n, d) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def barlow_twins_loss(
    z1: Any, z2: Any, *, lambda_offdiag: float = 0.0051, eps: float = 0.0, axis_name: AxisName = None
) -> Array:
    """Barlow Twins (Zbontar et al., 2021): ``Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²``.

    ``C = (1/n) Σ_k ẑ1_k ẑ2_kᵀ: (d, d)`` is the cross-correlation of the two views' embeddings, each standardised
    per feature by its batch mean and biased std: ``ẑ = (z - μ) / sqrt(σ² + eps)``. ``eps`` reproduces the official
    code's affine-free BatchNorm (PyTorch's ``1e-5``); the default ``0`` is the paper's exact normalisation (NaN for
    a constant feature).

    Args:
      z1, z2: ``(n, d)`` embeddings of two augmentations of the same ``n`` inputs.
      lambda_offdiag: weight of the redundancy-reduction term (paper default 0.0051, tuned for d = 8192).
      eps: variance epsilon of the standardisation.
      axis_name: compute the means, stds and ``C`` over the global batch (as the paper all-reduces ``C``).
    """
    a, b = _check_views(z1, z2)
    n = _global_n(a, axis_name)

    def standardise(z):  # per feature, on the feature divided by a power of two (eps in the same units)
        e = column_exponent(z, axis_name)
        zc = _scaled(z, e, axis_name)
        var = psum(jnp.sum(zc * zc, axis=0), axis_name) / n
        return zc / jnp.sqrt(var + _scaled_eps(eps, e, z.dtype))

    c = psum(jnp.matmul(standardise(a).T, standardise(b), precision=PRECISION), axis_name) / n
    diag = jnp.diagonal(c)
    on = jnp.sum((1 - diag) ** 2)
    off = jnp.sum(c * c) - jnp.sum(diag * diag)
    return _out(on + lambda_offdiag * off, z1, z2)


def vicreg_loss(
    z1: Any,
    z2: Any,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    axis_name: AxisName = None,
) -> Array:
    """VICReg (Bardes et al., 2022): ``λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')]``.

    - invariance ``s``: mean squared error between the views, averaged over all ``n d`` entries;
    - variance ``v(Z) = (1/d) Σ_j max(0, γ - sqrt(Var(z_j) + eps))`` with the unbiased variance;
    - covariance ``c(Z) = (1/d) Σ_{i≠j} C(Z)_ij²`` with the unbiased covariance ``C(Z)``.

    Weights default to the paper's ``λ = μ = 25``, ``ν = 1``; as in the official implementation
    (``facebookresearch/vicreg``, whose loss these defaults were tuned with), the variance terms of the two views are
    averaged (the paper's Eq. 6 writes their sum).

    Args:
      z1, z2: ``(n, d)`` embeddings of the two views.
      invariance_weight, variance_weight, covariance_weight: ``λ, μ, ν``.
      gamma: target standard deviation ``γ``.
      eps: variance epsilon in the hinge.
      axis_name: compute every statistic over the global batch (the official code all-gathers the embeddings).
    """
    a, b = _check_views(z1, z2)
    n, d = _global_n(a, axis_name), a.shape[1]
    # One power of two for both views (the terms are in data units): every product is of the scaled data, and each
    # term is multiplied back exactly, so it over- or underflows only when its value does.
    e = jnp.maximum(column_exponent(a, axis_name, axes=None), column_exponent(b, axis_name, axes=None))
    inv = pow2(-e, a.dtype)
    diff = a * inv - b * inv
    invariance = mul_pow2(psum(jnp.sum(diff * diff), axis_name) / (n * d), 2 * e)
    eps_s = _scaled_eps(eps, e, a.dtype)

    def var_cov(z):
        zc = _scaled(z, e, axis_name)
        cov = psum(jnp.matmul(zc.T, zc, precision=PRECISION), axis_name) / (n - 1)
        var = jnp.diagonal(cov)
        std = mul_pow2(jnp.sqrt(var + eps_s), e)
        v = jnp.mean(jax.nn.relu(gamma - std))
        c = mul_pow2((jnp.sum(cov * cov) - jnp.sum(var * var)) / d, 4 * e, parts=8)
        return v, c

    va, ca = var_cov(a)
    vb, cb = var_cov(b)
    loss = invariance_weight * invariance + variance_weight * (va + vb) / 2 + covariance_weight * (ca + cb)
    return _out(loss, z1, z2)


def _average_ranks(t: Array) -> Array:
    """Ranks 1..n of ``t: (n,)`` with ties given their average rank (``scipy.stats.rankdata``'s default)."""
    n = t.shape[0]
    order = jnp.argsort(t)
    ts = t[order]
    idx = jnp.arange(n)
    differs = ts[1:] != ts[:-1]
    starts = jnp.concatenate([jnp.ones((1,), bool), differs])
    ends = jnp.concatenate([differs, jnp.ones((1,), bool)])
    first = lax.cummax(jnp.where(starts, idx, 0))
    last = lax.cummin(jnp.where(ends, idx, n - 1), reverse=True)
    ranks_sorted = (first + last).astype(t.dtype) / 2 + 1
    ranks = jnp.zeros((n,), t.dtype).at[order].set(ranks_sorted)
    return jnp.where(jnp.any(jnp.isnan(t)), jnp.nan, ranks)


def spearman_loss(
    pred: Any,
    target: Any,
    *,
    regularization_strength: float | Array = 1.0,
    regularization: str = "l2",
    axis_name: AxisName = None,
) -> Array:
    """``1 - ρ_soft``: one minus the Pearson correlation of the soft ranks of ``pred`` with the ranks of ``target``.

    The soft ranks (:func:`corrjax.stats.soft_rank` over the observations, Blondel et al., 2020) make Spearman's
    correlation differentiable in ``pred``; ``target`` is ranked exactly (ties averaged) and not differentiated. As
    the strength goes to 0 the value equals ``1 - scipy.stats.spearmanr``. The strength acts on ``pred / ε``, so
    choose it relative to the spread of the predictions. For ``(n, d)`` inputs, the mean over columns.

    Args:
      pred, target: ``(n,)`` or ``(n, d)`` of the same shape.
      regularization_strength, regularization: passed to :func:`soft_rank`.
      axis_name: the batch is sharded along this mapped axis; predictions and targets are all-gathered (ranks need
        the whole batch) and every shard returns the global loss, whose gradient flows back to each shard.
    """
    x, y = _pair(pred, target, "pred", "target")
    out_dtype = _out(jnp.zeros(()), pred, target).dtype
    if axis_name is not None:
        # Invariant gathers: the loss is the same value on every shard and each shard's gradient is its own slice.
        x = lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")
        y = lax.all_gather(y, axis_name, axis=0, tiled=True, to="invarying")
    rx = soft_rank(x, regularization_strength=regularization_strength, regularization=regularization, axis=0)
    ry = jax.vmap(_average_ranks, in_axes=1, out_axes=1)(lax.stop_gradient(y))
    return pearson_loss(rx, ry).astype(out_dtype)
