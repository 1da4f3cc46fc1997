"""ROC AUC and group AUC (GAUC): exact, jit-compatible, and streaming over batches.

The area under the ROC curve is the Mann-Whitney statistic: the probability that a random positive scores above a
random negative, ties counting one half,

    AUC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (W+ W-),

which equals scikit-learn's ``roc_auc_score`` (the trapezoidal area under the ROC curve with tied thresholds
collapsed), sample weights included. It is computed in O(n log n) from one sort: every positive is credited with
the weight of the negatives strictly below its score plus half of those tied with it.

GAUC (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018, eq. 1) averages per-user
AUCs weighted by each user's number of impressions, ``GAUC = sum_u #imp_u AUC_u / sum_u #imp_u``; users whose
impressions are all of one class have no AUC and are left out of both sums (the common practice of the public
implementations). ``group_weights="positives"`` weights users by their clicks instead, ``"uniform"`` equally.

Conventions: ``scores`` ``(n,)`` (logits or probabilities: only their order matters), ``labels`` ``(n,)`` with a label
``> 0.5`` counting as positive, ``weights`` ``(n,)`` non-negative sample weights (a zero weight drops the example, so
a padding mask is a valid weight). Integer or boolean weights are accumulated in int32, exactly (up to 2**31 total
weight); float weights in the float dtype of ``scores`` and ``weights`` (at least float32). The credits are summed
by a tree reduction for :func:`roc_auc` (float32 results within ~1e-7 of scikit-learn's float64 at a million rows)
and by segment sums per group otherwise (fine for the many small groups of GAUC; use float64 under x64 for groups of
millions of rows). A split with no positive
or no negative gives NaN, as does a NaN score with a positive weight (scikit-learn raises in both cases). Ties are
exact: two scores tie when their values are equal (``-0.0`` ties with ``+0.0``), so float32 scores with a large
common offset are ranked exactly as given.

Streaming: :class:`AUCState` buffers ``(score, label, weight, group)`` rows in arrays of a static capacity
(:func:`auc_init`, :func:`auc_update`, :func:`auc_merge`) and gives the exact AUC / GAUC of everything it has seen
(:func:`auc_result`, :func:`gauc_result`); past its capacity it flags an overflow and returns NaN rather than a
wrong value. :class:`AUCHistogram` needs O(bins) memory whatever the number of rows: it counts positive and negative
weight per score bin, and its estimate treats pairs in the same bin as ties, so it errs by at most
``sum_b P_b N_b / (2 W+ W-)``, a bound it reports alongside the estimate (:func:`auc_histogram_result`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from corrjax._checks import as_array, as_float_array, check_choice
from corrjax.stats import _sorting
from corrjax.stats.ranks import _gather_rows

Array = jax.Array
AxisName = Any
GroupWeights = Literal["impressions", "positives", "uniform"]
GROUP_WEIGHTS: tuple[str, ...] = ("impressions", "positives", "uniform")

__all__ = [
    "AUCEstimate",
    "AUCHistogram",
    "AUCState",
    "GroupedAUC",
    "auc_histogram_init",
    "auc_histogram_merge",
    "auc_histogram_result",
    "auc_histogram_update",
    "auc_init",
    "auc_merge",
    "auc_result",
    "auc_update",
    "gauc",
    "gauc_result",
    "grouped_roc_auc",
    "roc_auc",
]


class GroupedAUC(NamedTuple):
    """Per-group AUCs (:func:`grouped_roc_auc`), each ``(G,)``.

    Attributes:
      auc: the group's AUC; NaN for a group without both classes.
      impressions: the group's total weight (its number of impressions when unweighted).
      positives: the group's positive weight (its clicks).
    """

    auc: Array
    impressions: Array
    positives: Array


# ------------------------------------------------------------------------------------------------------ inputs
def _inputs(scores: Any, labels: Any, weights: Any) -> tuple[Array, Array, Array, Any]:
    """``(scores, positive flags, weights, float dtype)`` checked to be 1-D of one length."""
    s = as_float_array(scores, "scores")
    y = as_array(labels, "labels")
    if s.ndim != 1:
        raise ValueError(f"`scores` must be 1-D (n,), got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"`labels` must have the shape of `scores` {s.shape}, got {y.shape}")
    pos = y > 0.5 if y.dtype != jnp.bool_ else y
    if weights is None:
        w = jnp.ones(s.shape, jnp.int32)
    else:
        w = as_array(weights, "weights")
        if w.shape != s.shape:
            raise ValueError(f"`weights` must have the shape of `scores` {s.shape}, got {w.shape}")
        w = w.astype(jnp.int32) if not jnp.issubdtype(w.dtype, jnp.floating) else w
    dt = jnp.promote_types(s.dtype, jnp.float32)
    if jnp.issubdtype(w.dtype, jnp.floating):
        dt = jnp.promote_types(dt, w.dtype)
    return s, pos, w, dt


def _check_num_groups(num_groups: Any) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"`num_groups` must be a positive int (static), got {num_groups!r}")
    return num_groups


def _group_ids(groups: Any, n: int) -> Array:
    g = as_array(groups, "groups")
    if g.shape != (n,) or not jnp.issubdtype(g.dtype, jnp.integer):
        raise ValueError(f"`groups` must be integer ids of shape ({n},), got shape {g.shape} dtype {g.dtype}")
    return g.astype(jnp.int32)


# ------------------------------------------------------------------------------------------------------ kernel
def _grouped(s: Array, pos: Array, w: Array, dt: Any, groups: Array | None, num_groups: int) -> GroupedAUC:
    """Per-group AUCs from one lexicographic sort by ``(group, score)``."""
    n = s.shape[0]
    if groups is None:
        g = jnp.zeros((n,), jnp.int32)
    else:
        valid = (groups >= 0) & (groups < num_groups)
        w = jnp.where(valid, w, jnp.zeros_like(w))  # ids outside [0, num_groups) are dropped
        g = jnp.where(valid, groups, 0)
    w = jnp.maximum(w, jnp.zeros_like(w))
    if n == 0:
        nan = jnp.full((num_groups,), jnp.nan, dt)
        return GroupedAUC(nan, jnp.zeros((num_groups,), w.dtype), jnp.zeros((num_groups,), w.dtype))
    key = _sorting.order_key(s)
    perm = _sorting.stable_argsort(key)
    if num_groups > 1:
        gbits = _sorting.index_bits(num_groups)
        perm = jnp.take(perm, _sorting.stable_argsort(jnp.take(g, perm).astype(key.dtype), key_bits=gbits))
    key, g, pos, w, s = (jnp.take(a, perm) for a in (key, g, pos, w, s))
    zero = jnp.zeros_like(w)
    neg_w, pos_w = jnp.where(pos, zero, w), jnp.where(pos, w, zero)
    cum = jnp.concatenate([jnp.zeros((1,), w.dtype), jnp.cumsum(neg_w)])  # cum[k]: negative weight before k
    new_group = jnp.concatenate([jnp.ones((1,), bool), g[1:] != g[:-1]])
    new_block = new_group | jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
    group_start, _ = _sorting.runs(new_group)
    block_start, block_end = _sorting.runs(new_block)
    below = (cum[block_start] - cum[group_start]).astype(dt)  # exact in int32 for integer weights
    tied = (cum[block_end + 1] - cum[block_start]).astype(dt)
    credit = pos_w.astype(dt) * (below + 0.5 * tied)
    if num_groups == 1:  # a tree reduction: far less float32 rounding than a sequential scatter-add
        seg = lambda v: jnp.sum(v, keepdims=True)
    else:
        seg = lambda v: jax.ops.segment_sum(v, g, num_segments=num_groups, indices_are_sorted=True)
    pos_total, neg_total = seg(pos_w), seg(neg_w)
    p, q = pos_total.astype(dt), neg_total.astype(dt)
    nan_score = seg((jnp.isnan(s) & (w > 0)).astype(jnp.int32)) > 0
    defined = (pos_total > 0) & (neg_total > 0) & ~nan_score
    auc = jnp.where(defined, seg(credit) / jnp.where(defined, p * q, 1), jnp.nan)
    return GroupedAUC(auc, pos_total + neg_total, pos_total)


# ------------------------------------------------------------------------------------------------------ exact
def roc_auc(scores: Any, labels: Any, weights: Any = None, *, axis_name: AxisName = None) -> Array:
    """Exact area under the ROC curve (scikit-learn's ``roc_auc_score``, ties and sample weights included).

    Args:
      scores: ``(n,)`` predictions (logits or probabilities; only their order matters).
      labels: ``(n,)`` binary labels; a label ``> 0.5`` (or True) is positive.
      weights: optional ``(n,)`` non-negative sample weights; 0 drops an example (a padding mask works).
      axis_name: mapped axis over which the rows are sharded (the rows are gathered: the AUC is not a sum).

    Returns:
      A scalar in ``[0, 1]``; NaN without both classes or with a NaN score of positive weight.
    """
    s, pos, w, dt = _inputs(scores, labels, weights)
    if axis_name is not None:
        s, pos, w = (_gather_rows(a, axis_name) for a in (s, pos, w))
        pos = pos.astype(bool)
    return _grouped(s, pos, w, dt, None, 1).auc[0]


def grouped_roc_auc(
    scores: Any, labels: Any, groups: Any, num_groups: int, weights: Any = None, *, axis_name: AxisName = None
) -> GroupedAUC:
    """Exact per-group AUCs (one sort by group then score; segment sums over a static ``num_groups``).

    Args:
      scores, labels, weights: as in :func:`roc_auc`, ``(n,)``.
      groups: ``(n,)`` integer group (user) ids; ids outside ``[0, num_groups)`` are dropped.
      num_groups: static number of groups ``G``.
      axis_name: mapped axis over which the rows are sharded.

    Returns:
      :class:`GroupedAUC` of ``(G,)`` arrays.
    """
    num_groups = _check_num_groups(num_groups)
    s, pos, w, dt = _inputs(scores, labels, weights)
    g = _group_ids(groups, s.shape[0])
    if axis_name is not None:
        s, pos, w, g = (_gather_rows(a, axis_name) for a in (s, pos, w, g))
        pos = pos.astype(bool)
    return _grouped(s, pos, w, dt, g, num_groups)


def _gauc_from(grouped: GroupedAUC, group_weights: str) -> Array:
    check_choice(group_weights, "group_weights", GROUP_WEIGHTS)
    auc = grouped.auc
    if group_weights == "impressions":
        gw = grouped.impressions.astype(auc.dtype)
    elif group_weights == "positives":
        gw = grouped.positives.astype(auc.dtype)
    else:
        gw = jnp.ones_like(auc)
    defined = ~jnp.isnan(auc)
    gw = jnp.where(defined, gw, 0)
    total = gw.sum()
    return jnp.where(total > 0, jnp.where(defined, auc * gw, 0).sum() / jnp.where(total > 0, total, 1), jnp.nan)


def gauc(
    scores: Any,
    labels: Any,
    groups: Any,
    num_groups: int,
    weights: Any = None,
    *,
    group_weights: GroupWeights = "impressions",
    axis_name: AxisName = None,
) -> Array:
    """Group AUC (Zhou et al., KDD 2018): the mean of per-group (per-user) AUCs weighted by impressions.

    ``GAUC = sum_u v_u AUC_u / sum_u v_u`` over the groups that have both classes, with ``v_u`` the group's total
    sample weight (``"impressions"``, DIN's definition), its positive weight (``"positives"``: clicks) or 1
    (``"uniform"``). Arguments as in :func:`grouped_roc_auc`. NaN when no group has both classes.
    """
    check_choice(group_weights, "group_weights", GROUP_WEIGHTS)
    grouped = grouped_roc_auc(scores, labels, groups, num_groups, weights, axis_name=axis_name)
    return _gauc_from(grouped, group_weights)


# ------------------------------------------------------------------------------------------------ streaming, exact
class AUCState(NamedTuple):
    """Rows seen so far, in buffers of a static capacity ``C`` (:func:`auc_init`).

    Attributes:
      scores: ``(C,)`` scores; ``labels``: ``(C,)`` bool; ``weights``: ``(C,)`` (0 on unused slots);
      groups: ``(C,)`` int32 group ids (0 when none are given); count: int32 rows written; overflow: bool, True once
      more rows arrived than fit (the results are then NaN).
    """

    scores: Array
    labels: Array
    weights: Array
    groups: Array
    count: Array
    overflow: Array


def auc_init(capacity: int, dtype: Any = jnp.float32, weight_dtype: Any = jnp.float32) -> AUCState:
    """An empty :class:`AUCState` holding up to ``capacity`` rows (static) of ``dtype`` scores and
    ``weight_dtype`` weights (an integer dtype keeps count weights exact beyond 2**24)."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"`capacity` must be a positive int, got {capacity!r}")
    return AUCState(
        scores=jnp.zeros((capacity,), dtype),
        labels=jnp.zeros((capacity,), bool),
        weights=jnp.zeros((capacity,), weight_dtype),
        groups=jnp.zeros((capacity,), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        overflow=jnp.zeros((), bool),
    )


def _append(state: AUCState, s: Array, pos: Array, w: Array, g: Array, count: Array) -> AUCState:
    """Writes ``s, pos, w, g`` (their first ``count`` rows valid, the rest zero-weighted) at ``state.count``."""
    cap = state.scores.shape[0]
    idx = state.count + jnp.arange(s.shape[0], dtype=jnp.int32)
    put = lambda buf, v: buf.at[idx].set(v.astype(buf.dtype), mode="drop")
    return AUCState(
        scores=put(state.scores, s),
        labels=put(state.labels, pos),
        weights=put(state.weights, w),
        groups=put(state.groups, g),
        count=jnp.minimum(state.count + count, cap),
        overflow=state.overflow | (state.count + count > cap),
    )


def auc_update(state: AUCState, scores: Any, labels: Any, weights: Any = None, groups: Any = None) -> AUCState:
    """Appends a batch of ``(n,)`` rows (as in :func:`roc_auc`; ``groups`` optional ids for :func:`gauc_result`)."""
    s, pos, w, _ = _inputs(scores, labels, weights)
    g = jnp.zeros(s.shape, jnp.int32) if groups is None else _group_ids(groups, s.shape[0])
    return _append(state, s, pos, w, g, jnp.asarray(s.shape[0], jnp.int32))


def auc_merge(a: AUCState, b: AUCState) -> AUCState:
    """The state of ``a``'s rows followed by ``b``'s, in ``a``'s buffers (overflow if they do not fit)."""
    if a.scores.dtype != b.scores.dtype or a.weights.dtype != b.weights.dtype:
        raise ValueError("`a` and `b` must have the same score and weight dtypes")
    merged = _append(a, b.scores, b.labels, b.weights, b.groups, b.count)
    return merged._replace(overflow=merged.overflow | b.overflow)


def auc_result(state: AUCState) -> Array:
    """Exact AUC of every row seen (:func:`roc_auc`); NaN after an overflow."""
    auc = roc_auc(state.scores, state.labels, state.weights)
    return jnp.where(state.overflow, jnp.nan, auc)


def gauc_result(state: AUCState, num_groups: int, group_weights: GroupWeights = "impressions") -> Array:
    """Exact GAUC of every row seen (:func:`gauc`); NaN after an overflow."""
    value = gauc(state.scores, state.labels, state.groups, num_groups, state.weights, group_weights=group_weights)
    return jnp.where(state.overflow, jnp.nan, value)


# ----------------------------------------------------------------------------------------------- streaming, binned
class AUCHistogram(NamedTuple):
    """Positive and negative weight per score bin: ``num_bins`` equal bins over ``[low, high]`` (scores outside
    fall in the end bins).

    Attributes:
      positives, negatives: ``(B,)`` weights per bin; low, high: scalar bin range.
    """

    positives: Array
    negatives: Array
    low: Array
    high: Array


class AUCEstimate(NamedTuple):
    """:func:`auc_histogram_result`: the binned AUC and a bound on its distance to the exact AUC of the same rows."""

    auc: Array
    error_bound: Array


def auc_histogram_init(
    num_bins: int = 1024, low: float = 0.0, high: float = 1.0, dtype: Any = jnp.float32
) -> AUCHistogram:
    """An empty :class:`AUCHistogram` (default: 1024 bins over probabilities ``[0, 1]``; pass ``low, high`` that
    cover the scores, e.g. of logits)."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be a positive int, got {num_bins!r}")
    if not float(high) > float(low):
        raise ValueError(f"`high` must exceed `low`, got low={low!r}, high={high!r}")
    zeros = jnp.zeros((num_bins,), dtype)
    return AUCHistogram(zeros, zeros, jnp.asarray(low, dtype), jnp.asarray(high, dtype))


def auc_histogram_update(
    state: AUCHistogram, scores: Any, labels: Any, weights: Any = None, *, axis_name: AxisName = None
) -> AUCHistogram:
    """Adds a batch of ``(n,)`` rows (as in :func:`roc_auc`); NaN scores are dropped. With ``axis_name`` the
    batch's counts are summed over the mapped axis (``psum``)."""
    s, pos, w, _ = _inputs(scores, labels, weights)
    nb = state.positives.shape[0]
    dt = state.positives.dtype
    frac = (s.astype(dt) - state.low) / (state.high - state.low)
    b = jnp.clip(jnp.floor(frac * nb), 0, nb - 1).astype(jnp.int32)
    w = jnp.where(jnp.isnan(s), 0, w).astype(dt)
    zero = jnp.zeros_like(w)
    p = jax.ops.segment_sum(jnp.where(pos, w, zero), b, num_segments=nb)
    q = jax.ops.segment_sum(jnp.where(pos, zero, w), b, num_segments=nb)
    if axis_name is not None:
        p, q = lax.psum((p, q), axis_name)
    return state._replace(positives=state.positives + p, negatives=state.negatives + q)


def auc_histogram_merge(a: AUCHistogram, b: AUCHistogram) -> AUCHistogram:
    """The histogram of both parts' rows (same bins)."""
    if a.positives.shape != b.positives.shape:
        raise ValueError(f"`a` and `b` must have the same bins, got {a.positives.shape} and {b.positives.shape}")
    return a._replace(positives=a.positives + b.positives, negatives=a.negatives + b.negatives)


def auc_histogram_result(state: AUCHistogram) -> AUCEstimate:
    """The AUC of the binned rows, pairs in one bin counted as ties, and the bound ``sum_b P_b N_b / (2 W+ W-)``
    on its error (those pairs count 1/2 here and 0, 1/2 or 1 exactly; pairs in different bins are ordered
    correctly). NaN for both without both classes."""
    p, q = state.positives, state.negatives
    below = jnp.cumsum(q) - q
    wp, wq = p.sum(), q.sum()
    defined = (wp > 0) & (wq > 0)
    denom = jnp.where(defined, wp * wq, 1)
    auc = (p * (below + 0.5 * q)).sum() / denom
    bound = 0.5 * (p * q).sum() / denom
    nan = jnp.asarray(jnp.nan, p.dtype)
    return AUCEstimate(jnp.where(defined, auc, nan), jnp.where(defined, bound, nan))
