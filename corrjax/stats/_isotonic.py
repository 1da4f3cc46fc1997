"""Isotonic regression by pool-adjacent-violators (PAV) in pure JAX, with exact custom JVPs (forward and reverse mode).

Both solvers fit a *non-increasing* sequence to one row ``(n,)`` (``jax.vmap`` them for batches). PAV scans the
row once and keeps a stack of blocks; each step either pushes the next element or pools the two top blocks when
they violate the order, so a row takes at most ``2n`` steps of O(1) work in one ``lax.while_loop`` and O(n) memory.

- :func:`isotonic_l2` solves ``argmin_{v_1 >= ... >= v_n} ½‖v - y‖²``; a block's value is the mean of ``y`` on it.
- :func:`isotonic_kl` solves ``argmin_{v_1 >= ... >= v_n} <exp(s - v), 1> + <exp(w), v>``; a block's value is
  ``logsumexp(s_B) - logsumexp(w_B)``.

The solution is piecewise given by its blocks, so its Jacobian is block diagonal (Blondel et al., 2020, Sec. 5):
block averaging for l2, a per-block softmax for kl. The custom JVPs apply exactly these Jacobians; reverse mode
transposes them.

References:
  Blondel, Teboul, Berthet, Djolonga. Fast Differentiable Sorting and Ranking. ICML 2020.
  Best, Chakravarti. Active set algorithms for isotonic regression; a unifying framework. Math. Prog. 1990.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

Array = jax.Array


def _take(arr: Array, idx: Array) -> Array:
    """``arr[b, idx[b]]`` for every row ``b``; ``arr: (B, n, m)``, ``idx: (B,)`` -> ``(B, m)``."""
    return jnp.take_along_axis(arr, idx[:, None, None], axis=1, mode="clip")[:, 0]


def _pav_rows(
    inp: Array, combine: Callable[[Array, Array], Array], value: Callable[[Array], Array]
) -> tuple[Array, Array]:
    """PAV on every row of ``inp: (B, n, m)`` (``m`` accumulators per element, the last one a count).

    Returns ``(block_id, blocks)``: ``block_id: (B, n) int32`` numbers each element's block ``0..k-1`` left to
    right; ``blocks: (B, n, m)`` holds the pooled accumulators of the ``k`` blocks in its first ``k`` slots.

    One ``lax.while_loop`` advances all rows together; a row that has finished makes no change (its writes go out of
    bounds and are dropped), so the loop carries no per-iteration select over whole arrays and the work per row is
    O(n) amortised. Adjacent blocks with equal values are pooled too (the fit is the same); so tied inputs of a soft
    rank always share a block, even when rounding hides the gap between them.
    """
    bsz, n, _ = inp.shape
    idt = jnp.int32
    rows = jnp.arange(bsz)

    def step(state):
        i, k, below, cur, stack, _ = state
        viol = (k >= 1) & (value(below) <= value(cur))
        more = i < n
        push = ~viol & more
        # Merge: the block below absorbs the current one. Push: the current block goes onto the stack and the next
        # element becomes current. Finished rows (neither) keep their state.
        stack = stack.at[rows, jnp.where(push, k, n)].set(cur, mode="drop")
        nxt = _take(inp, i)
        new_cur = jnp.where(viol[:, None], combine(below, cur), jnp.where(push[:, None], nxt, cur))
        new_k = jnp.where(viol, k - 1, jnp.where(push, k + 1, k))
        new_i = jnp.where(push, i + 1, i)
        below2 = _take(stack, jnp.maximum(k - 2, 0))
        new_below = jnp.where(viol[:, None], below2, jnp.where(push[:, None], cur, below))
        active = ((new_k >= 1) & (value(new_below) <= value(new_cur))) | (new_i < n)
        return new_i, new_k, new_below, new_cur, stack, jnp.any(active)

    init = (
        jnp.ones((bsz,), idt),
        jnp.zeros((bsz,), idt),
        inp[:, 0],
        inp[:, 0],
        jnp.zeros_like(inp),
        jnp.asarray(n > 1),
    )
    _, k, _, cur, stack, _ = lax.while_loop(lambda s: s[-1], step, init)
    stack = stack.at[rows, k].set(cur, mode="drop")
    k = k + 1
    used = jnp.arange(n, dtype=idt)[None, :] < k[:, None]
    counts = jnp.where(used, stack[..., -1], 0).astype(idt)
    starts = jnp.where(used, jnp.cumsum(counts, axis=1) - counts, n)
    marks = jnp.zeros((bsz, n), idt).at[rows[:, None], starts].set(1, mode="drop")
    return jnp.cumsum(marks, axis=1) - 1, stack


def _batched_pav(combine, value):
    @custom_vmap
    def pav(inp):
        return _pav_rows(inp, combine, value)

    @pav.def_vmap
    def _rule(axis_size, in_batched, inp):
        del in_batched
        lead = inp.shape[:2]
        block_id, blocks = pav(inp.reshape(-1, *inp.shape[2:]))
        return (block_id.reshape(*lead, *block_id.shape[1:]), blocks.reshape(*lead, *blocks.shape[1:])), (True, True)

    return pav


_pav_l2 = _batched_pav(jnp.add, lambda acc: acc[..., 0] / acc[..., 1])


def _logaddexp_counts(a, b):
    return jnp.concatenate([jnp.logaddexp(a[..., :-1], b[..., :-1]), a[..., -1:] + b[..., -1:]], axis=-1)


_pav_kl = _batched_pav(_logaddexp_counts, lambda acc: acc[..., 0] - acc[..., 1])


# ----------------------------------------------------------------------------------------------------------------
# Block statistics from a partition. Each is computed relative to a reference inside the block (its first element,
# or its maximum for log-sum-exp), so values with a large common offset lose no precision.


class _Blocks(NamedTuple):
    block_id: Array  # (n,) int32, non-decreasing, 0..k-1
    start: Array  # (n,) index of the first element of each element's block
    count: Array  # (n,) size of each element's block (float)


def _blocks(block_id: Array, dtype: Any) -> _Blocks:
    n = block_id.shape[0]
    idx = jnp.arange(n, dtype=block_id.dtype)
    is_start = jnp.concatenate([jnp.ones((1,), bool), block_id[1:] != block_id[:-1]])
    start = lax.cummax(jnp.where(is_start, idx, 0))
    count = _segment_sum(jnp.ones((n,), dtype), block_id)[block_id]
    return _Blocks(block_id, start, count)


def _segment_sum(v: Array, block_id: Array) -> Array:
    return jax.ops.segment_sum(v, block_id, num_segments=v.shape[0], indices_are_sorted=True)


def _block_mean(v: Array, b: _Blocks) -> Array:
    """Per element, the mean of ``v`` over its block, and ``v`` minus that mean: ``(mean, deviation)``."""
    ref = v[b.start]
    dev = v - ref
    mean_dev = _segment_sum(dev, b.block_id)[b.block_id] / b.count
    return ref + mean_dev, dev - mean_dev


def _block_logsumexp(v: Array, b: _Blocks) -> tuple[Array, Array]:
    """Per element, ``logsumexp`` of ``v`` over its block, and the log-softmax ``v - logsumexp``."""
    n = v.shape[0]
    top = jax.ops.segment_max(v, b.block_id, num_segments=n, indices_are_sorted=True)[b.block_id]
    rel = v - top
    log_z = jnp.log(_segment_sum(jnp.exp(rel), b.block_id))[b.block_id]
    return top + log_z, rel - log_z


def _partition_l2(y: Array) -> _Blocks:
    block_id, _ = _pav_l2(jnp.stack([y, jnp.ones_like(y)], axis=-1)[None])
    return _blocks(block_id[0], y.dtype)


def _partition_kl(s: Array, w: Array) -> _Blocks:
    block_id, _ = _pav_kl(jnp.stack([s, w, jnp.ones_like(s)], axis=-1)[None])
    return _blocks(block_id[0], s.dtype)


def _block_average(g: Array, b: _Blocks) -> Array:
    return _segment_sum(g, b.block_id)[b.block_id] / b.count


# ----------------------------------------------------------------------------------------------------------------
# Isotonic regressions. Each has a custom JVP that is linear in the tangents (built from segment sums, gathers and
# products with primal-only residuals), so forward mode (jax.jvp, jacfwd) uses it directly and reverse mode
# (jax.grad, vjp, jacrev) transposes it: the transpose of the block Jacobians below is the VJP of Blondel et al.


@jax.custom_jvp
def isotonic_l2(y: Array) -> Array:
    """Non-increasing l2 isotonic regression of one row ``y: (n,)``; returns ``v: (n,)``.

    ``v`` minimises ``½‖v - y‖²`` subject to ``v_1 >= v_2 >= ... >= v_n``. Jacobian: block averaging (symmetric).
    """
    return _block_mean(y, _partition_l2(y))[0]


@isotonic_l2.defjvp
def _isotonic_l2_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (y,), (ty,) = primals, tangents
    b = _partition_l2(y)
    return _block_mean(y, b)[0], _block_average(ty, b)


@jax.custom_jvp
def isotonic_kl(s: Array, w: Array) -> Array:
    """Non-increasing KL isotonic regression of one row; ``s, w: (n,)``, returns ``v: (n,)``.

    ``v`` minimises ``<exp(s - v), 1> + <exp(w), v>`` subject to ``v_1 >= ... >= v_n``; on each block ``B``,
    ``v_B = logsumexp(s_B) - logsumexp(w_B)``, so ``dv = Σ_B softmax_B(s) ds - Σ_B softmax_B(w) dw``.
    """
    b = _partition_kl(s, w)
    return _block_logsumexp(s, b)[0] - _block_logsumexp(w, b)[0]


@isotonic_kl.defjvp
def _isotonic_kl_jvp(primals: tuple[Array, Array], tangents: tuple[Array, Array]) -> tuple[Array, Array]:
    (s, w), (ts, tw) = primals, tangents
    b = _partition_kl(s, w)
    lse_s, log_ps = _block_logsumexp(s, b)
    lse_w, log_pw = _block_logsumexp(w, b)
    dv = _segment_sum(jnp.exp(log_ps) * ts - jnp.exp(log_pw) * tw, b.block_id)[b.block_id]
    return lse_s - lse_w, dv


# ----------------------------------------------------------------------------------------------------------------
# Projections onto the permutahedron in sorted coordinates: ``a - isotonic(a - b)`` (l2) and ``a - isotonic_kl(a, b)``
# (kl), formed block-relatively so that no large common offset cancels (Blondel et al., 2020, Prop. 3).


@jax.custom_jvp
def project_l2(a: Array, b: Array) -> Array:
    """``a - isotonic_l2(a - b)`` for one row (``a`` non-increasing); per block ``a_j - mean_B(a) + mean_B(b)``.

    JVP: ``(I - A) da + A db`` with ``A`` the block-averaging matrix (symmetric, so the VJP has the same form).
    """
    blocks = _partition_l2(a - b)
    return _block_mean(a, blocks)[1] + _block_mean(b, blocks)[0]


@project_l2.defjvp
def _project_l2_jvp(primals: tuple[Array, Array], tangents: tuple[Array, Array]) -> tuple[Array, Array]:
    (a, b), (ta, tb) = primals, tangents
    blocks = _partition_l2(a - b)
    out = _block_mean(a, blocks)[1] + _block_mean(b, blocks)[0]
    return out, ta + _block_average(tb - ta, blocks)


@jax.custom_jvp
def project_kl(a: Array, b: Array) -> Array:
    """``a - isotonic_kl(a, b)`` for one row; per block ``log_softmax_B(a)_j + logsumexp(b_B)``.

    JVP: ``da - Σ_B p_a da + Σ_B p_b db`` with ``p`` the block softmaxes (the VJP is its transpose,
    ``(g - p_a Σ_B g, p_b Σ_B g)``).
    """
    blocks = _partition_kl(a, b)
    return _block_logsumexp(a, blocks)[1] + _block_logsumexp(b, blocks)[0]


@project_kl.defjvp
def _project_kl_jvp(primals: tuple[Array, Array], tangents: tuple[Array, Array]) -> tuple[Array, Array]:
    (a, b), (ta, tb) = primals, tangents
    blocks = _partition_kl(a, b)
    _, log_pa = _block_logsumexp(a, blocks)
    lse_b, log_pb = _block_logsumexp(b, blocks)
    mix = _segment_sum(jnp.exp(log_pb) * tb - jnp.exp(log_pa) * ta, blocks.block_id)[blocks.block_id]
    return log_pa + lse_b, ta + mix
