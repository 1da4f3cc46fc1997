"""Fast ranking machinery for XLA on CPU: order-preserving integer keys, key-only sorts, packed stable argsorts.

XLA's CPU sort has a fast path for a *single* operand of a primitive type (about numpy's speed), while a sort that
carries a payload (``lax.sort`` with several operands, ``jnp.argsort``) goes through a generic comparator and is
5-10x slower. Everything here therefore sorts one unsigned-integer array at a time:

* :func:`order_key` maps floats (and integers) to unsigned integers whose unsigned order is the numeric order
  (``-0.0`` and ``+0.0`` tie, NaN sorts last), so ties are exact.
* :func:`min_rank` sorts the keys alone and finds every key's insertion point with a branch-free, vectorised binary
  search (``ceil(log2 n)`` gathers), giving the number of strictly smaller elements without any payload.
* :func:`stable_argsort` is an LSD radix sort whose passes are key-only sorts of packed words
  ``digit << b | position`` (``b = ceil(log2 n)``): the position makes every word unique, so each pass is a stable
  sort by the digit and the low bits are the payload.
* :func:`count_inversions` counts the inversions of a permutation with ``ceil(log2 n)`` MSD bit passes (stable
  partition by one bit inside each value-prefix group: a cumulative sum and a scatter per pass), O(n log n) work and
  O(n) memory.

All functions act on the last axis and broadcast over leading axes (``vmap`` works as well).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def index_bits(n: int) -> int:
    """Bits needed to store a position in ``[0, n)`` (at least 1)."""
    return max(1, (n - 1).bit_length())


def order_key(x: Array) -> Array:
    """Unsigned-integer keys with the numeric order of ``x`` (uint32, or uint64 for 64-bit input under x64).

    Floats: ``-0.0`` is mapped to ``+0.0`` and every NaN to the canonical positive NaN (which sorts after ``+inf``);
    then the IEEE bits of negatives are inverted and the sign bit of the others is set. Signed integers have their
    sign bit flipped. Sub-32-bit types are widened first.
    """
    x = lax.stop_gradient(x)
    dt = x.dtype
    if jnp.issubdtype(dt, jnp.floating):
        if dt.itemsize < 4:
            x = x.astype(jnp.float32)
        # Canonicalise in the bit domain (XLA's CPU comparisons flush denormals to zero, bits do not).
        udt, width = (jnp.uint64, 64) if x.dtype.itemsize == 8 else (jnp.uint32, 32)
        bits = lax.bitcast_convert_type(x, udt)
        sign = jnp.asarray(1, udt) << (width - 1)
        mag = bits & ~sign
        exp_all = jnp.asarray(0x7FF0000000000000 if width == 64 else 0x7F800000, udt)
        qnan = jnp.asarray(0x7FF8000000000000 if width == 64 else 0x7FC00000, udt)
        bits = jnp.where(mag == 0, jnp.zeros_like(bits), bits)
        bits = jnp.where(mag > exp_all, qnan, bits)
        return jnp.where(bits & sign != 0, ~bits, bits | sign)
    if dt == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(dt, jnp.signedinteger):
        if dt.itemsize == 8:
            return lax.bitcast_convert_type(x, jnp.uint64) ^ (jnp.asarray(1, jnp.uint64) << 63)
        return lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32) ^ jnp.uint32(1 << 31)
    if jnp.issubdtype(dt, jnp.unsignedinteger):
        return x if dt.itemsize == 8 else x.astype(jnp.uint32)
    raise TypeError(f"cannot rank values of dtype {dt}")


def sort_last(keys: Array) -> Array:
    """Sorts unsigned keys along the last axis (single-operand sort: XLA's fast path)."""
    return lax.sort(keys, dimension=keys.ndim - 1, is_stable=False)


def _take(a: Array, idx: Array) -> Array:
    return jnp.take_along_axis(a, idx, axis=-1, mode="promise_in_bounds")


_BLOCK_BITS = 6


def searchsorted_left(sorted_keys: Array, queries: Array, *, fanout_bits: int = 5) -> Array:
    """For each query, the number of entries of its row of ``sorted_keys`` strictly below it (int32).

    Branch-free, vectorised over all queries. Long rows are searched in two levels, for cache locality: first the
    splitters ``sorted_keys[..., 63::64]`` (a small array), which pins the answer to one 64-entry block, then that
    block (six rounds on a few cache lines). In the splitter search the first ``fanout_bits`` halvings are replaced
    by comparing each query with ``2**fanout_bits - 1`` evenly spaced entries (a fused elementwise count, cheaper
    on CPU than that many gathers); every other round is one gather and one select. ``sorted_keys`` is
    ``(..., n)`` sorted along the last axis, ``queries`` is ``(..., q)`` with the same leading shape.
    """
    n = sorted_keys.shape[-1]
    block = 1 << _BLOCK_BITS
    if n < 64 * block:
        return _search_flat(sorted_keys, queries, jnp.zeros(queries.shape, jnp.int32), n, fanout_bits)
    splitters = sorted_keys[..., block - 1 :: block]  # the last entry of every full block
    pos = _search_flat(splitters, queries, jnp.zeros(queries.shape, jnp.int32), splitters.shape[-1], fanout_bits)
    # The answer lies in [block * b, block * b + block - 1] (or in the tail after the last full block).
    return _bisect(sorted_keys, queries, pos * block, block >> 1, n)


def _bisect(sorted_keys: Array, queries: Array, pos: Array, step: int, n: int) -> Array:
    while step:
        cand = pos + step
        probe = _take(sorted_keys, jnp.minimum(cand, n) - 1)
        pos = jnp.where((cand <= n) & (probe < queries), cand, pos)
        step >>= 1
    return pos


def _search_flat(sorted_keys: Array, queries: Array, pos: Array, n: int, fanout_bits: int) -> Array:
    if n == 0:
        return pos
    step = 1 << (n.bit_length() - 1)
    levels = min(fanout_bits, n.bit_length())
    if levels > 1:
        unit = step >> (levels - 1)
        splits = [j * unit - 1 for j in range(1, 1 << levels) if j * unit <= n]
        spl = sorted_keys[..., np.asarray(splits)]
        count = sum((spl[..., j : j + 1] < queries).astype(jnp.int32) for j in range(len(splits)))
        pos = count * unit
        step = unit >> 1
    return _bisect(sorted_keys, queries, pos, step, n)


def runs(is_first: Array) -> tuple[Array, Array]:
    """First and last positions (int32, inclusive) of the run containing each position, given run-start flags
    along the last axis (``is_first[..., 0]`` must be True)."""
    n = is_first.shape[-1]
    axis = is_first.ndim - 1
    k = lax.broadcasted_iota(jnp.int32, is_first.shape, axis)
    is_last = jnp.concatenate([is_first[..., 1:], jnp.ones((*is_first.shape[:-1], 1), bool)], axis=-1)
    start = lax.cummax(jnp.where(is_first, k, 0), axis=axis)
    end = lax.cummin(jnp.where(is_last, k, n - 1), axis=axis, reverse=True)
    return start, end


def run_starts(sorted_keys: Array) -> Array:
    """Flags marking the first entry of each run of equal keys along the (sorted) last axis."""
    first = jnp.ones((*sorted_keys.shape[:-1], 1), bool)
    return jnp.concatenate([first, sorted_keys[..., 1:] != sorted_keys[..., :-1]], axis=-1)


def min_rank(keys: Array) -> tuple[Array, Array]:
    """``(sorted_keys, r)`` with ``r`` the number of strictly smaller keys in the same row (0-based min rank)."""
    s = sort_last(keys)
    return s, searchsorted_left(s, keys)


def stable_argsort(keys: Array, key_bits: int | None = None) -> Array:
    """Stable argsort of unsigned ``keys`` along the last axis (int32 permutation), ties kept in position order.

    LSD radix sort: each pass sorts the unique words ``digit << b | position`` (``b`` = :func:`index_bits`) with a
    key-only sort, so a pass is stable and its low bits say where each element came from. ``key_bits`` (static) is
    the number of significant low bits of ``keys`` (default: the full width); fewer bits mean fewer passes.
    """
    n = keys.shape[-1]
    width = 8 * keys.dtype.itemsize
    key_bits = width if key_bits is None else key_bits
    ib = index_bits(n)
    if ib >= width:
        raise ValueError(f"cannot argsort {n} entries with {width}-bit keys")
    digit_bits = width - ib
    iota = lax.broadcasted_iota(keys.dtype, keys.shape, keys.ndim - 1)
    idx_mask = jnp.asarray((1 << ib) - 1, keys.dtype)
    perm = iota.astype(jnp.int32)
    current = keys
    for shift in range(0, key_bits, digit_bits):
        nb = min(digit_bits, key_bits - shift)
        digit = (current >> shift) & jnp.asarray((1 << nb) - 1, keys.dtype)
        step = (sort_last((digit << ib) | iota) & idx_mask).astype(jnp.int32)
        perm = step if shift == 0 else _take(perm, step)
        current = _take(keys, perm)
    return perm


def invert_permutation(perm: Array) -> Array:
    """Inverse of int32 permutations along the last axis (one scatter)."""
    iota = lax.broadcasted_iota(jnp.int32, perm.shape, perm.ndim - 1)
    if perm.ndim == 1:
        return jnp.zeros_like(perm).at[perm].set(iota, unique_indices=True, mode="promise_in_bounds")
    return jax.vmap(invert_permutation)(perm.reshape(-1, perm.shape[-1])).reshape(perm.shape)


def _ones_before(bit: Array) -> Array:
    """Exclusive prefix count of a 1-D 0/1 int32 array, via 32-bit words and popcounts.

    XLA's CPU cumulative sum is slow (a log-depth reduce-window), so the flags are packed 32 to a word: one
    population count per word, a prefix sum over the n/32 word counts, and a masked popcount inside each word.
    """
    n = bit.shape[0]
    m = -(-n // 32)
    lane = jnp.arange(32, dtype=jnp.uint32)
    b = jnp.pad(bit, (0, 32 * m - n)).reshape(m, 32).astype(jnp.uint32)
    words = jnp.sum(b << lane, axis=1, dtype=jnp.uint32)
    pc = lax.population_count(words).astype(jnp.int32)
    word_excl = lax.associative_scan(jnp.add, pc) - pc
    low = (jnp.uint32(1) << lane) - jnp.uint32(1)
    within = lax.population_count(words[:, None] & low[None, :]).astype(jnp.int32)
    return (word_excl[:, None] + within).reshape(-1)[:n]


def count_inversions(seq: Array, below: Array | None = None) -> Array:
    """Per-position counts of strict inversions of a 1-D int32 sequence of min-ranks; their sum is the number of
    pairs ``i < j`` with ``seq[i] > seq[j]``.

    ``seq`` holds values in ``[0, n)``; ``below[v]`` (length ``n + 1``) must be the number of entries of ``seq``
    smaller than ``v`` (for min-ranks: the next group start at or after ``v``). ``below=None`` means ``seq`` is a
    permutation (``below[v] = v``). Equal values are never counted.

    MSD bit passes: after the passes for bits above ``b`` the sequence is stably partitioned by value prefix, so the
    group with prefix ``P`` occupies positions ``[below[P 2^(b+1)], below[(P+1) 2^(b+1)])``. Within a group each
    element whose bit ``b`` is 0 is inverted with every earlier element whose bit is 1 (their order is decided at
    this bit); then each group is stably partitioned by bit ``b``. A pass costs a popcount prefix count, two small
    gathers and a two-stream scatter: O(n log n) work, O(n) memory. Each returned count is below ``2n``.
    """
    n = seq.shape[0]
    counts = jnp.zeros((n,), jnp.int32)
    if n < 2:
        return counts
    pos = jnp.arange(n, dtype=jnp.int32)
    lookup = (lambda v: jnp.minimum(v, n)) if below is None else (lambda v: below[jnp.minimum(v, n)])
    for b in range(index_bits(n) - 1, -1, -1):
        bit = (seq >> b) & 1
        prefix = (seq >> (b + 1)) << (b + 1)
        gstart = lookup(prefix)
        zeros_in_group = lookup(prefix + (1 << b)) - gstart
        ones_excl = _ones_before(bit)
        ones_before = ones_excl - ones_excl[gstart]
        counts = counts + jnp.where(bit == 0, ones_before, 0)
        zeros_before = pos - gstart - ones_before
        newpos = jnp.where(bit == 0, gstart + zeros_before, gstart + zeros_in_group + ones_before)
        seq = jnp.zeros_like(seq).at[newpos].set(seq, unique_indices=True, mode="promise_in_bounds")
    return counts


def wide_sum(v: Array, bound: int, acc_dtype) -> Array:
    """Sum of a 1-D array of non-negative int32 values below ``bound`` in ``acc_dtype`` without int32 overflow.

    Blocks small enough that their int32 sums cannot overflow are summed exactly, and the block sums are added in
    ``acc_dtype`` (int64/float64 under x64; float32 otherwise, where the total is then rounded, not wrapped).
    """
    n = v.shape[0]
    if jnp.dtype(acc_dtype).itemsize == 8 and jnp.issubdtype(acc_dtype, jnp.integer):
        return jnp.sum(v.astype(acc_dtype))
    block = max(1, (2**31 - 1) // max(bound, 1))
    block = 1 << (block.bit_length() - 1)
    if block >= n:
        return jnp.sum(v).astype(acc_dtype)
    nb = math.ceil(n / block)
    v = jnp.pad(v, (0, nb * block - n))
    return jnp.sum(jnp.sum(v.reshape(nb, block), axis=1).astype(acc_dtype))
