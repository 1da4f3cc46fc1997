"""Representation similarity: centered kernel alignment (CKA), one-shot and streamed over minibatches.

CKA compares two representations of the same ``n`` examples, ``x: (n, d1)`` and ``y: (n, d2)``, through their
Gram matrices ``K = x xᵀ`` and ``L = y yᵀ`` (or RBF kernels):

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),

with ``HSIC(K, L) = tr(K H L H) / (n - 1)²`` (``H`` the centring matrix; Gretton et al., 2005), or, with
``debiased=True``, the unbiased estimator HSIC_1 of Song et al. (2012) used by Nguyen et al. (2021). CKA is invariant
to orthogonal transforms and isotropic scaling of either representation, and ``CKA(x, x) = 1``.

Minibatch CKA (Nguyen et al., 2021) sums HSIC_1 over minibatches before forming the ratio; :class:`CKAState` holds
those sums for every pair of layers of two models, so a whole dataset is compared without keeping activations.

Scale: HSIC terms are fourth powers of the activations (float32 activations of ~1e4 overflow them, ~1e-6 underflow
them), so every representation is divided by one power of two ``2**e > max |x|`` before any product (exact, and CKA
is invariant to isotropic scaling), and the ratio is formed as ``xy / (sqrt(xx) sqrt(yy))``; the minibatch state
carries each layer's exponent. float16/bfloat16 activations are computed in float32 and the result returned in
their dtype.

References:
  Kornblith, Norouzi, Lee, Hinton. Similarity of Neural Network Representations Revisited. ICML 2019.
  Song, Smola, Gretton, Bedo, Borgwardt. Feature Selection via Dependence Maximization. JMLR 2012.
  Nguyen, Raghu, Kornblith. Do Wide and Deep Networks Learn the Same Things? ICLR 2021.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from corrjax._checks import as_float_array, check_same_n
from corrjax.stats._centered import (
    PRECISION,
    AxisName,
    column_exponent,
    compute_dtype,
    lowest_exponent,
    mul_pow2,
    psum,
    scaled_centering,
)
from corrjax.stats._explicit import shard_rows

Array = jax.Array

__all__ = ["CKAState", "cka_finalize", "cka_init", "cka_matrix", "cka_merge", "cka_update", "linear_cka", "rbf_cka"]


def _as_features(x: Any, name: str) -> Array:
    """``x`` as ``(n, features)``: 1-D is one feature, trailing axes beyond the first are flattened."""
    arr = as_float_array(x, name)
    if arr.ndim == 0:
        raise ValueError(f"`{name}` must have an observation axis, got a scalar of shape {arr.shape}")
    return arr.reshape(arr.shape[0], math.prod(arr.shape[1:]))  # not -1: that cannot be inferred when n == 0


def _pair(x: Any, y: Any) -> tuple[Array, Array, Any]:
    """Both as ``(n, features)`` in the dtype they are computed in (float32 for half precision), and the dtype of
    the result (their common dtype)."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    check_same_n(x, y)
    dtype = jnp.promote_types(x.dtype, y.dtype)
    return x.astype(compute_dtype(dtype)), y.astype(compute_dtype(dtype)), dtype


def _scaled_centered(x: Array, axis_name: AxisName, exp: Array | None = None) -> Array:
    """``(x - mean) / 2**e``, one power of two for the whole representation (``e`` from its largest entry unless
    given): exact, and every CKA is invariant to it."""
    if exp is None:
        exp = column_exponent(x, axis_name, axes=None)
    return scaled_centering(x, None, axis_name, exp=exp).apply(x)


def _gather(x: Array, axis_name: AxisName) -> Array:
    """All-gathers the observations; the result is invariant across the axis (its VJP slices, no reduce-scatter)."""
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")


def _ratio(xy: Array, xx: Array, yy: Array) -> Array:
    """``xy / (sqrt(xx) sqrt(yy))`` (no product of the two, which can overflow); NaN where a self-similarity is
    zero or negative (undefined), masked on both sides of the division so the gradient stays finite."""
    ok = (xx > 0) & (yy > 0)
    den = jnp.sqrt(jnp.where(ok, xx, jnp.ones_like(xx))) * jnp.sqrt(jnp.where(ok, yy, jnp.ones_like(yy)))
    return jnp.where(ok, xy / den, jnp.full_like(xy * den, jnp.nan))


# ----------------------------------------------------------------------------------------------------------------
# Gram-matrix forms.


def _center_gram(k: Array) -> Array:
    """``H K H`` for a symmetric Gram matrix ``k: (n, n)``."""
    row = jnp.mean(k, axis=1)
    return k - row[:, None] - row[None, :] + jnp.mean(row)


def _unbiased_center_gram(k: Array) -> Array:
    """``U(K)`` with ``<U(K), U(L)> = n (n - 3) HSIC_1(K, L)`` for symmetric ``k: (n, n)``, ``n >= 4``.

    Zeroes the diagonal, then removes row/column means with the U-statistic weights (the centring of Song et al.'s
    estimator in matrix form; Kornblith et al. 2019 use the same device), and zeroes the diagonal again.
    """
    n = k.shape[0]
    eye = jnp.eye(n, dtype=bool)
    k = jnp.where(eye, 0, k)
    m = jnp.sum(k, axis=1) / (n - 2)
    m = m - jnp.sum(m) / (2 * (n - 1))
    return jnp.where(eye, 0, k - m[:, None] - m[None, :])


def _gram_cka(k: Array, gram_y: Array, debiased: bool) -> Array:
    n = k.shape[0]
    if debiased:
        if n < 4:
            return jnp.full((), jnp.nan, k.dtype)
        kc, lc = _unbiased_center_gram(k), _unbiased_center_gram(gram_y)
    else:
        kc, lc = _center_gram(k), _center_gram(gram_y)
    return _ratio(jnp.vdot(kc, lc), jnp.vdot(kc, kc), jnp.vdot(lc, lc))


def _linear_gram(xc: Array) -> Array:
    return jnp.matmul(xc, xc.T, precision=PRECISION)


# ----------------------------------------------------------------------------------------------------------------
# One-shot CKA.


def _feature_space_terms(xc: Array, yc: Array, n: int, debiased: bool, axis_name: AxisName) -> Array:
    """``n (n - 3) HSIC_1`` (debiased) or ``(n - 1)² HSIC`` for linear kernels of centred features, in O(n d1 d2).

    Uses ``tr(K L) = ‖xᵀ y‖_F²`` and, for the unbiased estimator with ``a_i = ‖x_i‖²``, ``b_i = ‖y_i‖²``:
    ``‖xᵀy‖² - n/(n-2) aᵀb + (Σa)(Σb)/((n-1)(n-2))``. Every sum over observations is ``psum``-ed over ``axis_name``.
    """
    cross = psum(jnp.matmul(xc.T, yc, precision=PRECISION), axis_name)
    tr_kl = jnp.sum(cross * cross)
    if not debiased:
        return tr_kl
    a = jnp.sum(xc * xc, axis=1)
    b = jnp.sum(yc * yc, axis=1)
    ab = psum(jnp.vdot(a, b), axis_name)
    sa, sb = psum(jnp.sum(a), axis_name), psum(jnp.sum(b), axis_name)
    return tr_kl - n / (n - 2) * ab + sa * sb / ((n - 1) * (n - 2))


@shard_rows("x", "y")
def linear_cka(x: Any, y: Any, *, debiased: bool = False, axis_name: AxisName = None) -> Array:
    """Linear CKA between ``x: (n, d1)`` and ``y: (n, d2)`` (Kornblith et al., 2019, Eq. 4); a scalar.

    Computed in feature space, ``‖xᵀy‖²_F / (‖xᵀx‖_F ‖yᵀy‖_F)`` after centring (O(n d²)), or from the ``(n, n)``
    Gram matrices when that is cheaper (n small against the widths); both forms give the same value.

    Args:
      x: ``(n, d1)`` representation; 1-D is one feature and trailing axes beyond the first are flattened.
      y: ``(n, d2)`` representation of the same ``n`` examples.
      debiased: use the unbiased HSIC_1 estimator (Song et al., 2012; Nguyen et al., 2021) in every HSIC term.
        Then the value may fall slightly outside ``[0, 1]`` and needs ``n >= 4``.
      axis_name: when given, the observations are sharded along this mapped axis and the statistics are global.

    Returns:
      CKA in the dtype of the inputs (float16/bfloat16 are computed in float32). NaN when either representation is
      constant (zero HSIC), when ``n < 2`` (``n < 4`` with ``debiased``), or when a debiased self-term is not
      positive. Each representation is scaled by a power of two first, so any magnitude in the dtype's normal
      range gives the same value.
    """
    x, y, out_dtype = _pair(x, y)
    n_local = x.shape[0]
    n = n_local if axis_name is None else n_local * lax.axis_size(axis_name)
    if n < (4 if debiased else 2):
        return jnp.full((), jnp.nan, out_dtype)
    xc = _scaled_centered(x, axis_name)
    yc = _scaled_centered(y, axis_name)
    d1, d2 = x.shape[1], y.shape[1]
    if axis_name is None and n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:
        return _gram_cka(_linear_gram(xc), _linear_gram(yc), debiased).astype(out_dtype)
    xy = _feature_space_terms(xc, yc, n, debiased, axis_name)
    xx = _feature_space_terms(xc, xc, n, debiased, axis_name)
    yy = _feature_space_terms(yc, yc, n, debiased, axis_name)
    return _ratio(xy, xx, yy).astype(out_dtype)


def _rbf_gram(xc: Array, sigma_frac: float | Array) -> Array:
    """``exp(-‖x_i - x_j‖² / (2 σ²))`` with ``σ² = sigma_frac² · median(‖x_i - x_j‖²)`` over all n² pairs."""
    g = _linear_gram(xc)
    sq = jnp.diagonal(g)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * g, 0)
    d2 = jnp.where(jnp.eye(g.shape[0], dtype=bool), 0, d2)
    return jnp.exp(-d2 / (2 * sigma_frac**2 * jnp.median(d2)))


def rbf_cka(
    x: Any, y: Any, *, sigma_frac: float | Array = 0.8, debiased: bool = False, axis_name: AxisName = None
) -> Array:
    """CKA with Gaussian (RBF) kernels between ``x: (n, d1)`` and ``y: (n, d2)``; a scalar.

    The bandwidth of each kernel is ``sigma_frac`` times the median pairwise distance of its representation (the
    median taken over all ``n²`` squared distances, zeros on the diagonal included), as in Kornblith et al. (2019).

    Args:
      x, y: representations of the same ``n`` examples (1-D is one feature; trailing axes are flattened).
      sigma_frac: bandwidth as a fraction of the median distance.
      debiased: use the unbiased HSIC_1 estimator (needs ``n >= 4``).
      axis_name: when given, the observations are sharded along this mapped axis; they are all-gathered (the
        ``(n, n)`` kernels need every pair), so each shard returns the global value.

    Returns:
      CKA in the dtype of the inputs (float16/bfloat16 are computed in float32); NaN when a representation is
      constant or its median distance is zero, or ``n`` is too small. The distances are those of the
      representation scaled by a power of two (the kernel only sees their ratio to the median): any magnitude works.
    """
    x, y, out_dtype = _pair(x, y)
    x, y = _gather(x, axis_name), _gather(y, axis_name)
    n = x.shape[0]
    if n < (4 if debiased else 2):
        return jnp.full((), jnp.nan, out_dtype)
    xc = _scaled_centered(x, None)
    yc = _scaled_centered(y, None)
    return _gram_cka(_rbf_gram(xc, sigma_frac), _rbf_gram(yc, sigma_frac), debiased).astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Minibatch (streaming) CKA.


class CKAState(NamedTuple):
    """Sums over minibatches of unbiased HSIC_1 terms for ``P`` layers ``x`` against ``Q`` layers ``y``.

    Attributes:
      hsic_xy: ``(P, Q)`` sums of ``HSIC_1(K_p, L_q)``.
      hsic_xx: ``(P,)`` sums of ``HSIC_1(K_p, K_p)``.
      hsic_yy: ``(Q,)`` sums of ``HSIC_1(L_q, L_q)``.
      count: number of minibatches accumulated (int32 scalar).
      exp_x: ``(P,)`` int32 scale exponents of the x-layers: the sums are those of the activations divided by
        ``2**exp_x`` (``hsic_xy`` in units of ``2**(2 exp_x_p + 2 exp_y_q)``), so they stay finite at any scale.
      exp_y: ``(Q,)`` int32 scale exponents of the y-layers.
    """

    hsic_xy: Array
    hsic_xx: Array
    hsic_yy: Array
    count: Array
    exp_x: Array
    exp_y: Array


def cka_init(num_x: int, num_y: int | None = None, dtype: Any = jnp.float32) -> CKAState:
    """Empty minibatch-CKA state for ``num_x`` layers against ``num_y`` layers (default: ``num_x``, self-CKA).

    ``dtype`` is that of the sums (float16/bfloat16 are stored as float32, whose range the HSIC sums need).
    """
    num_y = num_x if num_y is None else num_y
    for name, v in (("num_x", num_x), ("num_y", num_y)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int (a number of layers), got {v!r}")
    dtype = compute_dtype(dtype)
    lowest = lowest_exponent(dtype)
    return CKAState(
        hsic_xy=jnp.zeros((num_x, num_y), dtype),
        hsic_xx=jnp.zeros((num_x,), dtype),
        hsic_yy=jnp.zeros((num_y,), dtype),
        count=jnp.zeros((), jnp.int32),
        exp_x=jnp.full((num_x,), lowest, jnp.int32),
        exp_y=jnp.full((num_y,), lowest, jnp.int32),
    )


def _rescaled(s: CKAState, ex: Array, ey: Array) -> CKAState:
    """``s`` with its sums expressed for the (not smaller) exponents ``ex``, ``ey`` (exact powers of two)."""
    dx, dy = s.exp_x - ex, s.exp_y - ey
    return CKAState(
        hsic_xy=mul_pow2(s.hsic_xy, 2 * dx[:, None] + 2 * dy[None, :], parts=8),
        hsic_xx=mul_pow2(s.hsic_xx, 4 * dx, parts=8),
        hsic_yy=mul_pow2(s.hsic_yy, 4 * dy, parts=8),
        count=s.count,
        exp_x=ex,
        exp_y=ey,
    )


def _layers(xs: Any, name: str) -> list[Array]:
    items = [xs] if hasattr(xs, "shape") else list(xs)
    if not items:
        raise ValueError(f"`{name}` must hold at least one layer's activations")
    return [_as_features(a, f"{name}[{i}]") for i, a in enumerate(items)]


def _unbiased_gram_rows(x: Array, axis_name: AxisName, exp: Array) -> Array:
    """The local rows of ``U(x xᵀ)`` (see :func:`_unbiased_center_gram`) over the global minibatch: ``(n_local, n)``.

    Features are centred with the global mean (numerics only: HSIC_1 does not depend on it) and divided by
    ``2**exp``. With ``axis_name`` each shard forms its block of rows against the all-gathered minibatch, so the
    work is split across shards.
    """
    n_local = x.shape[0]
    xc = _scaled_centered(x, axis_name, exp)
    xg = _gather(xc, axis_name)
    n = xg.shape[0]
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * n_local
    k = jnp.matmul(xc, xg.T, precision=PRECISION)
    diag = jnp.arange(n)[None, :] == (offset + jnp.arange(n_local))[:, None]
    k = jnp.where(diag, 0, k)
    m = _gather(jnp.sum(k, axis=1), axis_name) / (n - 2)
    m = m - jnp.sum(m) / (2 * (n - 1))
    m_local = lax.dynamic_slice_in_dim(m, offset, n_local)
    return jnp.where(diag, 0, k - m_local[:, None] - m[None, :])


def cka_update(state: CKAState, xs: Any, ys: Any = None, *, axis_name: AxisName = None) -> CKAState:
    """Adds one minibatch's unbiased HSIC_1 terms for every pair of layers (Nguyen et al., 2021, Eq. 3).

    Args:
      state: from :func:`cka_init` (``P`` x-layers, ``Q`` y-layers).
      xs: the ``P`` layers' activations on this minibatch: a sequence of arrays ``(n, d_p)`` (or one array when
        ``P = 1``); trailing axes beyond the first are flattened, so ``(n, h, w, c)`` feature maps work.
      ys: the ``Q`` layers of the other model on the same ``n`` examples; ``None`` compares ``xs`` with itself.
      axis_name: when given, the minibatch's observations are sharded along this mapped axis (equal shards); the
        update is that of the global minibatch and is the same on every shard.

    Returns:
      The new state. Cost: one ``(n, n)`` Gram per layer and one ``(P, n²) x (n², Q)`` product.

    Raises:
      ValueError: when the (global) minibatch has fewer than 4 observations (HSIC_1 is undefined), the numbers of
        layers do not match the state, or the layers disagree on ``n``.
    """
    x_layers = _layers(xs, "xs")
    y_layers = None if ys is None else _layers(ys, "ys")
    num_x, num_y = state.hsic_xy.shape
    if len(x_layers) != num_x or (y_layers is not None and len(y_layers) != num_y):
        got = (len(x_layers), num_x if y_layers is None else len(y_layers))
        raise ValueError(f"the state compares {num_x} x-layers with {num_y} y-layers, got {got[0]} and {got[1]}")
    if y_layers is None and num_x != num_y:
        raise ValueError(f"`ys` is None (self-CKA) but the state is for {num_x} x {num_y} layers")
    for i, a in enumerate([*x_layers, *(y_layers or [])]):
        check_same_n(x_layers[0], a, "xs[0]", f"layer {i}")
    n = x_layers[0].shape[0] * (1 if axis_name is None else lax.axis_size(axis_name))
    if n < 4:
        raise ValueError(f"minibatch CKA needs at least 4 observations per minibatch, got {n}")
    dtype = state.hsic_xy.dtype

    def exponents(layers, old):  # the larger of the state's and this minibatch's scale, per layer
        x_layers_c = [a.astype(compute_dtype(dtype)) for a in layers]
        new = jnp.stack([column_exponent(a, axis_name, axes=None) for a in x_layers_c])
        return x_layers_c, jnp.maximum(old, new)

    x_layers, ex = exponents(x_layers, state.exp_x)
    if y_layers is None:
        ey = ex
    else:
        y_layers, ey = exponents(y_layers, state.exp_y)
    state = _rescaled(state, ex, ey)

    def grams(layers, exps):
        return jnp.stack([_unbiased_gram_rows(a, axis_name, exps[i]).ravel() for i, a in enumerate(layers)])

    ux = grams(x_layers, ex)
    uy = ux if y_layers is None else grams(y_layers, ey)
    scale = 1.0 / (n * (n - 3))
    xy = psum(jnp.matmul(ux, uy.T, precision=PRECISION), axis_name) * scale
    xx = psum(jnp.sum(ux * ux, axis=1), axis_name) * scale
    yy = xx if y_layers is None else psum(jnp.sum(uy * uy, axis=1), axis_name) * scale
    return CKAState(state.hsic_xy + xy, state.hsic_xx + xx, state.hsic_yy + yy, state.count + 1, ex, ey)


def cka_merge(a: CKAState, b: CKAState) -> CKAState:
    """Combines two states accumulated over disjoint sets of minibatches (e.g. on different hosts): both are brought
    to the larger scale exponent of each layer, then added."""
    ex, ey = jnp.maximum(a.exp_x, b.exp_x), jnp.maximum(a.exp_y, b.exp_y)
    a, b = _rescaled(a, ex, ey), _rescaled(b, ex, ey)
    return CKAState(a.hsic_xy + b.hsic_xy, a.hsic_xx + b.hsic_xx, a.hsic_yy + b.hsic_yy, a.count + b.count, ex, ey)


def cka_finalize(state: CKAState) -> Array:
    """Minibatch CKA matrix ``(P, Q)``: ``Σ HSIC_1(K_p, L_q) / sqrt(Σ HSIC_1(K_p, K_p) Σ HSIC_1(L_q, L_q))``.

    NaN where a layer's summed self-HSIC is not positive (constant activations, or no minibatch yet).
    """
    return _ratio(state.hsic_xy, state.hsic_xx[:, None], state.hsic_yy[None, :])


@functools.partial(jax.jit, static_argnames=("self_cka",))
def _jit_update(state: CKAState, xs: Any, ys: Any, self_cka: bool) -> CKAState:
    return cka_update(state, xs, None if self_cka else ys)


def cka_matrix(batches: Iterable[tuple[Sequence[Any], Sequence[Any] | None]]) -> Array:
    """Layer-by-layer minibatch CKA over a dataset: the ``(P, Q)`` matrix from an iterable of activations.

    Each item of ``batches`` is ``(xs, ys)``: the ``P`` layers of one model and the ``Q`` layers of the other on the
    same minibatch (``ys=None`` for self-CKA, giving a symmetric ``(P, P)`` matrix). Activations are consumed one
    minibatch at a time by a jitted :func:`cka_update` (compiled once per distinct batch shape), so nothing beyond
    one minibatch is held. Minibatches may differ in size (each needs at least 4 observations). The result has the
    activations' dtype (float16/bfloat16 are accumulated in float32).
    """
    state = None
    out_dtype = None
    for xs, ys in batches:
        xs_list = [xs] if hasattr(xs, "shape") else list(xs)
        ys_list = None if ys is None else ([ys] if hasattr(ys, "shape") else list(ys))
        if state is None:
            num_y = len(xs_list) if ys_list is None else len(ys_list)
            out_dtype = jnp.result_type(as_float_array(xs_list[0], "xs[0]").dtype)
            state = cka_init(len(xs_list), num_y, out_dtype)
        state = _jit_update(state, xs_list, ys_list, self_cka=ys_list is None)
    if state is None:
        raise ValueError("`batches` is empty")
    return cka_finalize(state).astype(out_dtype)
