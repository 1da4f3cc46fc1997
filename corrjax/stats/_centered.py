"""Private kernels shared by the moment-based statistics: shifted two-pass centring and collective helpers.

Everything that reduces over observations goes through :func:`centered`, which

1. subtracts a *reference row* (the first observation of the first shard) from every observation, so that the
   running sums below are of deviations of size ~spread rather than ~mean (no catastrophic cancellation in float32
   when the mean is 1e4 times the spread; a constant column becomes exactly zero);
2. takes the (weighted) mean of the shifted data, reduced with ``lax.psum`` over ``axis_name`` when given;
3. returns the centred data, so callers form co-moments with one matrix product and a final ``psum``;
   :func:`scaled_comoment` (cov/corrcoef) instead streams row blocks, each shifted by the running mean and folded in
   with the pairwise update, so that neither a centred copy nor a separate pass for the mean is needed.

This is the classical two-pass algorithm (Chan, Golub & LeVeque 1983, "Algorithms for computing the sample
variance"), made exact across shards because every shard centres with the same global mean.

Scale. Products of raw data under- or overflow long before the data do (float32 squares of 1e20 or 1e-20), so the
kernels that form second moments first divide every column by a power of two ``2**e`` with ``max |x| < 2**e``
(:func:`column_exponent`, a ``pmax`` over shards, so every shard uses the same scale): the scaled data lie in
(-1, 1), their products and sums stay far from the ends of the dtype's range, and the division is exact (a power of
two only changes the exponent), so in the normal range the scaled moments are the unscaled ones times ``2**-2e``
bit for bit. Correlations are scale-free and use the scaled moments directly; covariances are multiplied back with
:func:`mul_pow2`, which never overflows or underflows when the result itself is representable (as scipy and pandas,
which rescale before they multiply). Half-precision input (float16, bfloat16) is computed in float32
(:func:`compute_dtype`) and the results are returned in the input dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

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


def compute_dtype(dtype: Any) -> Any:
    """The dtype statistics are accumulated in: ``dtype``, or float32 for half precision (float16, bfloat16)."""
    return jnp.promote_types(dtype, jnp.float32)


def _exponent_limits(dtype: Any) -> tuple[int, int]:
    """Exponents ``e`` for which both ``2**e`` and ``2**-e`` are normal numbers of ``dtype``, as ``(lo, hi)``."""
    fi = jnp.finfo(dtype)
    return int(fi.minexp), int(fi.maxexp) - 2


def pow2(k: Array, dtype: Any) -> Array:
    """``2**k`` exactly, built from its bits, for integers ``k`` clipped to ``[minexp, maxexp - 2]`` (normal, and
    so is ``2**-k``)."""
    fi = jnp.finfo(dtype)
    uint = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[fi.bits]
    k = jnp.clip(jnp.asarray(k, jnp.int32), *_exponent_limits(dtype))
    biased = (k + (int(fi.maxexp) - 1)).astype(uint)
    return lax.bitcast_convert_type(biased << jnp.asarray(int(fi.nmant), uint), dtype)


def mul_pow2(v: Array, k: Array, parts: int = 4) -> Array:
    """``v * 2**k`` for integer ``k`` up to ``parts`` times the exponent range, as ``parts`` exact multiplications.

    The factors are ``2**(k // parts)``-sized steps of the same sign, so each intermediate lies between ``v`` and
    the result in magnitude: nothing overflows or underflows unless the result does. Differentiable in ``v``.
    (Every exponent difference of two clamped column exponents, and every sum of two, is within 4 ranges.)
    """
    k = jnp.asarray(k, jnp.int32)
    for i in range(parts, 0, -1):
        step = jnp.floor_divide(k, i) if i > 1 else k
        v = v * pow2(step, v.dtype)
        k = k - step
    return v


def column_exponent(x: Array, axis_name: AxisName, *, axes: Any = 0, finite_only: bool = False) -> Array:
    """Per column (reducing ``axes``, default the observation axis 0), the int32 ``e`` with ``max |x| < 2**e``.

    With ``finite_only`` non-finite entries are ignored (the NaN-aware functions mask them); otherwise a column
    holding NaN or inf gets an arbitrary exponent (its results are NaN whatever the scale) and the maximum needs no
    select, so XLA fuses it into the read of ``x``. ``e`` is clamped to the range
    where ``2**e`` and ``2**-e`` are normal (at the ends of the range the scaled data are at most 4 in magnitude). A
    column of zeros gets the lowest exponent, so that merging it with any other data keeps the other's scale. With
    ``axis_name`` the maximum is a ``pmax`` over the shards. Not differentiated.
    """
    x = lax.stop_gradient(x)
    lo = _exponent_limits(x.dtype)[0]
    if x.size == 0:
        return jnp.full(jnp.sum(x, axis=axes).shape, lo, jnp.int32)
    if finite_only:
        a = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), jnp.zeros_like(x)), axis=axes)
    else:
        a = jnp.max(jnp.abs(x), axis=axes)
    if axis_name is not None:
        a = lax.pmax(a, axis_name)
    return _exponent_of_max(a, x.dtype)


def _exponent_of_max(a: Array, dtype: Any) -> Array:
    """The clamped exponent ``e`` with ``a < 2**e`` for column maxima ``a``; the lowest one for 0 (or NaN)."""
    lo, hi = _exponent_limits(dtype)
    e = jnp.clip(jnp.frexp(a)[1], lo, hi)
    e = jnp.where(jnp.isinf(a), jnp.full_like(e, hi), e)
    return jnp.where(a > 0, e, jnp.full_like(e, lo))


def lowest_exponent(dtype: Any) -> int:
    """The exponent :func:`column_exponent` gives a column of zeros (the identity of ``max`` over exponents)."""
    return _exponent_limits(dtype)[0]


def reference_row(x: Array, axis_name: AxisName) -> Array:
    """The first observation (row 0 of ``x``) of the first shard, the same on every shard; zeros if ``n == 0``."""
    if x.shape[0] == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    x0 = lax.stop_gradient(x[0])  # the shift cancels exactly; keep it out of the gradient graph
    if axis_name is None:
        return x0
    return lax.psum(jnp.where(_is_first_shard(axis_name), x0, jnp.zeros_like(x0)), axis_name)


def centering(x: Array, w: Array | None, axis_name: AxisName) -> tuple[Array, Array, Array]:
    """Returns ``(shift, mean_d, wsum)``: the centred data are ``(x - shift) - mean_d`` (not materialised here).

    ``shift`` is the reference row, ``mean_d`` the global weighted mean of ``x - shift`` and ``wsum`` the global sum
    of weights (the number of observations when ``w`` is None).
    """
    shift = reference_row(x, axis_name)
    d = x - shift  # fused into the reductions below: no (n, d) temporary
    if w is None:
        wsum = jnp.asarray(global_n(x.shape[0], axis_name), x.dtype)
        sum_d = psum(jnp.sum(d, axis=0), axis_name)
    else:
        wsum = psum(jnp.sum(w), axis_name)
        sum_d = psum(jnp.tensordot(w, d, axes=(0, 0), precision=PRECISION), axis_name)
    mean_d = sum_d / jnp.where(wsum != 0, wsum, jnp.ones_like(wsum))  # no weight: the shift stands in
    return shift, mean_d, wsum


class Frame(NamedTuple):
    """A scaled, shifted centring of data ``x`` (see :func:`scaled_centering`): ``apply(x) = (x - mean) / 2**exp``."""

    exp: Array  # int32 power-of-two exponent per column (observation axis removed)
    inv: Array  # 2**-exp
    shift: Array  # the reference row times ``inv``
    mean: Array  # the weighted mean of ``x * inv - shift``
    wsum: Array  # global sum of weights (n unweighted)

    def apply(self, x: Array) -> Array:
        """The scaled centred data ``(x * inv - shift) - mean``: entries below 2 in magnitude (8 at the range ends)."""
        return (x * self.inv - self.shift) - self.mean


def scaled_centering(x: Array, w: Array | None, axis_name: AxisName, exp: Array | None = None) -> Frame:
    """The global scaled centring of ``x`` (observations along axis 0): one pass for the scale, one for the mean.

    ``exp`` (default :func:`column_exponent`) may be given to share one scale between variables (it must
    broadcast against a row of ``x``). Scaling before the shift keeps ``x - shift`` from overflowing near the
    largest finite numbers; being a power of two it changes no rounding in the normal range.
    """
    if exp is None:
        exp = column_exponent(x, axis_name)
    inv = pow2(-exp, x.dtype)
    shift = reference_row(x, axis_name) * inv
    d = x * inv - shift  # fused into the reductions below: no (n, d) temporary
    if w is None:
        wsum = jnp.asarray(global_n(x.shape[0], axis_name), x.dtype)
        sum_d = psum(jnp.sum(d, axis=0), axis_name)
    else:
        wsum = psum(jnp.sum(w), axis_name)
        sum_d = psum(jnp.tensordot(w, d, axes=(0, 0), precision=PRECISION), axis_name)
    mean = sum_d / jnp.where(wsum != 0, wsum, jnp.ones_like(wsum))
    return Frame(jnp.broadcast_to(exp, mean.shape), inv, shift, mean, wsum)


def centered(x: Array, w: Array | None, axis_name: AxisName) -> tuple[Array, Array, Array]:
    """Returns ``(xc, mean, wsum)`` for observations along axis 0 of ``x``.

    ``xc = x - mean`` (computed as ``(x - x_ref) - mean(x - x_ref)``), ``mean`` the global weighted mean with the
    observation axis removed, ``wsum`` the global sum of weights (the number of observations when ``w`` is None).
    """
    shift, mean_d, wsum = centering(x, w, axis_name)
    return (x - shift) - mean_d, shift + mean_d, wsum


# Row blocks. XLA's CPU runtime gives each large temporary of a program (a centred copy of the data, a mask) a fresh
# allocation whose pages the kernel zero-fills on first touch: for 100000 x 512 float32 that costs more than the
# centring arithmetic itself. Reductions over observations therefore stream the rows in blocks of ~4 MB, whose
# temporaries stay in cache and are reused by every iteration of one loop; each block's matrix products are still
# large enough to run at full GEMM speed. Accelerators have no such cost and take the rows in one block.
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK_ROWS = 512


def block_rows(width: int) -> int | None:
    """Rows per block for data with ``width`` columns in total (``None``: one block, on accelerators)."""
    if jax.default_backend() != "cpu":
        return None
    return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(width, 1) // 8 * 8)


def fold_over_row_blocks(step: Callable[..., Any], init: Any, *arrays: Array | None, rows: int | None) -> Any:
    """``acc = step(acc, *blocks_b)`` from ``acc = init`` over consecutive row blocks of ``arrays``, in order.

    All non-None arrays share the leading (observation) axis; ``None`` entries are passed through. Blocks hold
    ``rows`` rows (the last one the remainder); with fewer than two full blocks, or ``rows=None``, ``step`` sees the
    whole arrays. The loop is a ``lax.fori_loop`` with a static trip count, so it differentiates, vmaps and shards.
    """
    n = next(a.shape[0] for a in arrays if a is not None)
    count = 0 if rows is None else n // rows
    if count < 2:
        return step(init, *arrays)

    def take(start: Any, size: int) -> list[Array | None]:
        return [None if a is None else lax.dynamic_slice_in_dim(a, start, size) for a in arrays]

    acc = lax.fori_loop(0, count, lambda i, acc: step(acc, *take(i * rows, rows)), init)
    if count * rows < n:
        acc = step(acc, *[None if a is None else a[count * rows :] for a in arrays])
    return acc


def sum_over_row_blocks(fn: Callable[..., Any], *arrays: Array | None, rows: int | None) -> Any:
    """``sum_b fn(*blocks_b)`` (a pytree sum) over consecutive row blocks of ``arrays``
    (:func:`fold_over_row_blocks`)."""
    shapes = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *shapes))
    return fold_over_row_blocks(lambda acc, *b: jax.tree.map(jnp.add, acc, fn(*b)), zeros, *arrays, rows=rows)


def triangle_blocks(d: int) -> int:
    """Column groups of a ``d x d`` symmetric product: 1 (a plain GEMM) below 256 columns, else 3."""
    return 1 if d < 256 else 3


def group_edges(d: int, k: int) -> list[int]:
    """Column boundaries of ``k`` near-equal groups of ``d`` columns."""
    return [d * i // k for i in range(k + 1)]


def split_columns(a: Array, k: int) -> list[Array]:
    """``a`` cut into the ``k`` column groups of :func:`group_edges`."""
    return [a[:, lo:hi] for lo, hi in itertools.pairwise(group_edges(a.shape[1], k))]


def gram_pairs(a: list[Array], b: list[Array]) -> dict[tuple[int, int], Array]:
    """The upper block triangle ``{(i, j): a_i^T b_j, i <= j}`` of a symmetric product of column groups.

    With ``k`` groups this costs ``(k + 1) / (2k)`` of a GEMM's multiply-adds (2/3 for ``k = 3``); XLA has no SYRK.
    Each group is its own operand, so the producer of a group writes only its columns (slicing a whole block row
    ``b[:, lo:]`` instead copies the trailing columns once per block row). Sum these, then :func:`assemble_pairs`.
    """
    k = len(a)
    return {(i, j): jnp.matmul(a[i].T, b[j], precision=PRECISION) for i in range(k) for j in range(i, k)}


def assemble_pairs(pairs: dict[tuple[int, int], Array], k: int) -> Array:
    """The full symmetric matrix from its upper block triangle (:func:`gram_pairs`)."""
    if k == 1:
        return pairs[0, 0]
    rows = [[pairs[i, j] if i <= j else pairs[j, i].T for j in range(k)] for i in range(k)]
    return jnp.concatenate([jnp.concatenate(r, axis=1) for r in rows], axis=0)


def gram(a: Array, b: Array | None = None) -> Array:
    """``a^T b`` (``(n, d)``, ``(n, d)`` -> ``(d, d)``) for a symmetric result; ``b = a`` when omitted.

    The caller guarantees ``a^T b`` is symmetric (``b`` is ``a`` or ``a`` with rows scaled); wide inputs use the
    block triangle (:func:`gram_pairs`).
    """
    k = triangle_blocks(a.shape[1])
    ga = split_columns(a, k)
    return assemble_pairs(gram_pairs(ga, ga if b is None else split_columns(b, k)), k)


def comoment(xc: Array, yc: Array | None, w: Array | None, axis_name: AxisName) -> Array:
    """``sum_k w_k xc_k yc_k^T`` over all shards: ``(n, d), (n, e) -> (d, e)``; ``yc=None`` means ``yc = xc``
    (a symmetric result, computed with :func:`gram`)."""
    if yc is None:
        return psum(gram(xc, None if w is None else xc * w[:, None].astype(xc.dtype)), axis_name)
    if w is not None:
        yc = yc * w[:, None].astype(yc.dtype)
    return psum(jnp.matmul(xc.T, yc, precision=PRECISION), axis_name)


class CenteredMoments(NamedTuple):
    """Second moments about the global (weighted) mean, summed over all shards (:func:`scaled_comoment`), of the
    scaled data ``x / 2**exp_x`` (and ``y / 2**exp_y``); :func:`unscale_outer` takes them back to the data's units.
    """

    comoment: Array  # (d, e): sum_k w_k xc_k yc_k^T (symmetric (d, d) when y is None)
    sxx: Array | None  # (d,): sum_k w_k xc_k^2, with ``sumsq`` and a cross block
    syy: Array | None  # (e,)
    wsum: Array  # sum of weights (n unweighted)
    exp_x: Array  # (d,) int32
    exp_y: Array  # (e,) int32 (``exp_x`` when y is None)
    dmean_x: Array | None = None  # (d,): the mean of ``x / 2**exp_x - reference_row(x) / 2**exp_x``
    dmean_y: Array | None = None  # (e,): the same for ``y`` (``dmean_x`` when y is None)


class _Frame(NamedTuple):
    """The global scale and shift of one variable set: a block's shifted data are ``x * inv - shift``."""

    exp: Array
    inv: Array
    shift: Array


def _frame(x: Array, axis_name: AxisName) -> _Frame:
    exp = column_exponent(x, axis_name)
    inv = pow2(-exp, x.dtype)
    return _Frame(exp, inv, reference_row(x, axis_name) * inv)


def scaled_comoment(
    x: Array, y: Array | None, w: Array | None, axis_name: AxisName, *, sumsq: bool = False
) -> CenteredMoments:
    """Centred (co-)moments of the column-scaled data: one pass for the scale, one over row blocks for the rest.

    The columns are scaled by the global power of two of :func:`column_exponent` and shifted by the global
    reference row (scaled entries below 2 in magnitude, 8 at the ends of the range: nothing over- or underflows
    whatever the magnitude of the data). The rows are then streamed in blocks (:func:`block_rows`), each shifted
    by the running mean ``m`` of the blocks before it (the first by its own exact mean) and multiplied with itself;
    a column of ones appended to the first operand makes the same products return the block's sums ``s`` (and its
    weight ``Wb``), so the mean needs no pass of its own. With ``mb = s / Wb`` the deviation of the block mean from
    the running one, the pairwise update of Chan, Golub & LeVeque (1983) becomes

        W' = W + Wb,   m' = m + mb Wb / W',   C' = C + G - mb mb^T Wb^2 / W',

    where ``G`` is the block's product about ``m``: ``G - Wb mb mb^T`` is the block's centred co-moment and
    ``W Wb / W' mb mb^T`` the Chan term, so the subtraction never cancels more than half of ``G`` after the first
    block, and the result is as accurate as the two-pass algorithm. The shards merge with one ``psum`` of the
    weighted means and one of the corrected co-moments. Correlations are formed from these moments directly.
    """
    dtype = x.dtype
    d = x.shape[1]
    kx = triangle_blocks(d) if y is None else 1
    fx = _frame(x, axis_name)
    fy = None if y is None else _frame(y, axis_name)

    def shifted(b: Array, f: _Frame, m: Array) -> Array:
        return (b * f.inv - f.shift) - m  # first about the reference row (exact for close values), then m

    def with_ones(b: Array) -> Array:  # a column of ones: the products with it are the block's (weighted) sums
        return jnp.concatenate([b, jnp.ones((b.shape[0], 1), dtype)], axis=1)

    def products(xb: Array, yb: Array | None, wb: Array | None, mx: Array, my: Array | None) -> dict[str, Any]:
        """The block's products about the running means, its sums ``sx``, ``sy`` and weight, from the same dots."""
        a = split_columns(shifted(xb, fx, mx), kx)
        a[0] = with_ones(a[0])
        aw = a if wb is None else [g * wb[:, None] for g in a]
        weight = jnp.asarray(xb.shape[0], dtype) if wb is None else jnp.sum(wb)
        if y is None:
            pairs = gram_pairs(a, aw)
            n0 = a[0].shape[1] - 1
            sums = jnp.concatenate([pairs[0, 0][n0, :n0]] + [pairs[0, j][n0] for j in range(1, kx)])
            pairs = {ij: (g[:n0] if ij[0] == 0 else g) for ij, g in pairs.items()}
            pairs[0, 0] = pairs[0, 0][:, :n0]
            return {"g": pairs, "sx": sums, "w": weight}
        b = with_ones(shifted(yb, fy, my))
        g = jnp.matmul(aw[0].T, b, precision=PRECISION)  # (d + 1, e + 1): products, sums of x, sums of y
        out = {"g": g[:d, :-1], "sx": g[:d, -1], "sy": g[d, :-1], "w": weight}
        if sumsq:
            out["sxx"] = jnp.sum(aw[0][:, :d] * a[0][:, :d], axis=0)
            out["syy"] = jnp.sum(b[:, :-1] * b[:, :-1] * (1 if wb is None else wb[:, None]), axis=0)
        return out

    def step(acc: dict[str, Any], xb: Array, yb: Array | None, wb: Array | None) -> dict[str, Any]:
        p = products(xb, yb, wb, acc["mx"], acc.get("my"))
        wb_ = p["w"]
        total = acc["w"] + wb_
        safe_b = jnp.where(wb_ != 0, wb_, jnp.ones_like(wb_))
        safe_t = jnp.where(total > 0, total, jnp.ones_like(total))
        mbx = p["sx"] / safe_b  # the block mean's deviation from the running mean
        f = wb_ * wb_ / safe_t
        out = {"w": total, "mx": acc["mx"] + p["sx"] / safe_t}
        if y is None:
            chan = outer_pairs(mbx, f * mbx)
            out["c"] = {ij: acc["c"][ij] + (g - chan[ij]) for ij, g in p["g"].items()}
            return out
        mby = p["sy"] / safe_b
        out["my"] = acc["my"] + p["sy"] / safe_t
        out["c"] = acc["c"] + (p["g"] - jnp.outer(mbx, f * mby))
        if sumsq:
            out["sxx"] = acc["sxx"] + (p["sxx"] - f * mbx * mbx)
            out["syy"] = acc["syy"] + (p["syy"] - f * mby * mby)
        return out

    def outer_pairs(u: Array, v: Array) -> dict[tuple[int, int], Array]:
        """``outer(u, v)`` in the column groups' upper block triangle (the layout of :func:`gram_pairs`)."""
        us, vs = ([a[lo:hi] for lo, hi in itertools.pairwise(group_edges(d, kx))] for a in (u, v))
        return {(i, j): jnp.outer(us[i], vs[j]) for i in range(kx) for j in range(i, kx)}

    rows = block_rows(d + (0 if y is None else y.shape[1]))
    n0 = x.shape[0] if rows is None or x.shape[0] < 2 * rows else rows

    def first_mean(v: Array, f: _Frame) -> Array:
        """The first shift: the first block's exact mean; with weights, the global weighted mean (one pass), so
        that blocks of zero or tiny weight ahead of the data never leave a far-off running mean behind."""
        if w is None:
            return jnp.sum(v[:n0] * f.inv - f.shift, axis=0) / max(n0, 1)
        ws = psum(jnp.sum(w), axis_name)
        sums = psum(jnp.tensordot(w, v * f.inv - f.shift, axes=(0, 0), precision=PRECISION), axis_name)
        return sums / jnp.where(ws != 0, ws, jnp.ones_like(ws))

    init: dict[str, Any] = {"w": jnp.zeros((), dtype), "mx": first_mean(x, fx)}
    if y is None:
        zeros = jnp.zeros((d,), dtype)
        init["c"] = outer_pairs(zeros, zeros)
    else:
        init.update(my=first_mean(y, fy), c=jnp.zeros((d, y.shape[1]), dtype))
        if sumsq:
            init.update(sxx=jnp.zeros((d,), dtype), syy=jnp.zeros((y.shape[1],), dtype))
    part = fold_over_row_blocks(step, init, x, y, w, rows=rows)
    if axis_name is not None:  # every shard is in the same frame: merge the means, then the corrected moments
        total = lax.psum(part["w"], axis_name)
        safe = jnp.where(total > 0, total, jnp.ones_like(total))
        mx = lax.psum(part["w"] * part["mx"], axis_name) / safe
        dx = part["mx"] - mx
        if y is None:
            shift = outer_pairs(dx, part["w"] * dx)
            fixed = {ij: g + shift[ij] for ij, g in part["c"].items()}
            part = {"w": total, "mx": mx, "c": lax.psum(fixed, axis_name)}
        else:
            my = lax.psum(part["w"] * part["my"], axis_name) / safe
            dy = part["my"] - my
            fixed = {"c": part["c"] + jnp.outer(dx, part["w"] * dy)}
            if sumsq:
                fixed.update(sxx=part["sxx"] + part["w"] * dx * dx, syy=part["syy"] + part["w"] * dy * dy)
            part = {**lax.psum(fixed, axis_name), "w": total, "mx": mx, "my": my}
    wsum = jnp.asarray(global_n(x.shape[0], axis_name), dtype) if w is None else part["w"]
    c = assemble_pairs(part["c"], kx) if y is None else part["c"]
    ey = fx.exp if fy is None else fy.exp
    my = part["mx"] if y is None else part["my"]
    return CenteredMoments(c, part.get("sxx"), part.get("syy"), wsum, fx.exp, ey, part["mx"], my)


def unscale_outer(c: Array, exp_x: Array, exp_y: Array) -> Array:
    """``c_ij * 2**(exp_x_i + exp_y_j)`` for a ``(d, e)`` moment of scaled data (exact; see :func:`mul_pow2`)."""
    return mul_pow2(c, exp_x[:, None] + exp_y[None, :])


def normalize_comoment(c: Array, sxx: Array, syy: Array, *, symmetric: bool) -> Array:
    """Pearson normalisation ``c_ij / sqrt(sxx_i syy_j)``, clipped to [-1, 1]; NaN where a variance is 0.

    With ``symmetric`` (a matrix of a variable set with itself) the diagonal is exactly 1 where defined.
    """
    # Undefined entries are masked with ``where`` on both sides of the division, so that their zero cotangents do not
    # turn into 0 * inf = NaN in the gradient of the defined ones (NaN variances fail ``> 0`` and propagate as NaN).
    ok = (sxx[:, None] > 0) & (syy[None, :] > 0)
    sx = jnp.sqrt(jnp.where(sxx > 0, sxx, jnp.ones_like(sxx)))
    sy = jnp.sqrt(jnp.where(syy > 0, syy, jnp.ones_like(syy)))
    r = c / (sx[:, None] * sy[None, :])  # one product: symmetric inputs give an exactly symmetric result
    r = jnp.where(ok, jnp.clip(r, -1.0, 1.0), jnp.full_like(r, jnp.nan))
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
