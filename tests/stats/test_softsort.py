"""soft_rank / soft_sort / PAV isotonic regression against a brute-force float64 NumPy transcription."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp

from corrjax.stats import soft_rank, soft_sort
from corrjax.stats._isotonic import isotonic_kl, isotonic_l2

N = 12

# ---------------------------------------------------------------------------------------------------------------
# Float64 references: PAV by repeated pooling of the first violating pair (quadratic, obviously correct), and the
# permutahedron projections of Blondel et al. (2020) written with it.


def pav_ref(y, w=None, kind="l2"):
    """Non-increasing isotonic regression; blocks pooled until no adjacent pair violates the order."""
    y = np.asarray(y, np.float64)
    blocks = [[i] for i in range(len(y))]

    def val(b):
        if kind == "l2":
            return np.mean(y[b])
        return logsumexp(y[b]) - logsumexp(w[b])

    changed = True
    while changed:
        changed = False
        for j in range(len(blocks) - 1):
            if val(blocks[j]) < val(blocks[j + 1]):
                blocks[j] = blocks[j] + blocks.pop(j + 1)
                changed = True
                break
    out = np.empty(len(y))
    for b in blocks:
        out[b] = val(b)
    return out, len(blocks)


def soft_rank_ref(x, eps, reg):
    x = np.asarray(x, np.float64)
    n = len(x)
    theta = x / eps
    rho = np.arange(n, 0, -1, dtype=np.float64)
    perm = np.argsort(-theta, kind="stable")
    s = theta[perm]
    r = s - pav_ref(s - rho)[0] if reg == "l2" else np.exp(s - pav_ref(s, np.log(rho), "kl")[0])
    out = np.empty(n)
    out[perm] = r
    return out


def soft_sort_ref(x, eps, reg):
    x = np.asarray(x, np.float64)
    n = len(x)
    w = np.arange(n, 0, -1, dtype=np.float64) / eps
    s = -np.sort(x)
    v = pav_ref(w - s)[0] if reg == "l2" else pav_ref(w, s, "kl")[0]
    return v - w


def test_pav_ref_sanity():
    out, k = pav_ref([1.0, 3.0, 2.0, 0.0])
    np.testing.assert_allclose(out, [2.0, 2.0, 2.0, 0.0])
    assert k == 3  # ties between blocks are not pooled


# ---------------------------------------------------------------------------------------------------------------
# Jitted functions, reused across hypothesis examples (one compilation per shape and dtype).

_iso_l2 = jax.jit(jax.vmap(isotonic_l2))
_iso_kl = jax.jit(jax.vmap(isotonic_kl))


# The strength is a traced argument here, so these also check that it may be an array (for schedules). Ranks and
# sorts share one compiled function per regularisation and dtype (compilation dominates these tests' time).
@functools.partial(jax.jit, static_argnames=("reg",))
def _both(x, eps, reg):
    return soft_rank(x, regularization_strength=eps, regularization=reg), soft_sort(
        x, regularization_strength=eps, regularization=reg
    )


def _rank(x, eps, reg):
    return _both(x, eps, reg)[0]


def _sort(x, eps, reg):
    return _both(x, eps, reg)[1]


# Values on a coarse grid give ties and, at these strengths, many pooled blocks.
rows = st.lists(st.integers(-6, 6).map(lambda v: v / 2.0), min_size=N, max_size=N)
batches = st.lists(rows, min_size=3, max_size=3).map(np.array)
regs = st.sampled_from(["l2", "kl"])
STRENGTHS = (0.05, 0.4, 0.6, 3.0)
strengths = st.sampled_from(STRENGTHS)


@given(y=batches, w=batches)
def test_isotonic_matches_bruteforce(y, w):
    with jax.enable_x64(True):
        got_l2 = np.asarray(_iso_l2(jnp.asarray(y)))
        got_kl = np.asarray(_iso_kl(jnp.asarray(y), jnp.asarray(w)))
    for b in range(y.shape[0]):
        np.testing.assert_allclose(got_l2[b], pav_ref(y[b])[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_kl[b], pav_ref(y[b], w[b], "kl")[0], rtol=1e-12, atol=1e-12)
        assert np.all(np.diff(got_l2[b]) <= 1e-12)


@given(x=batches, eps=strengths, reg=regs)
def test_soft_rank_and_sort_match_reference(x, eps, reg):
    with jax.enable_x64(True):
        ranks, sort = map(np.asarray, _both(jnp.asarray(x), eps, reg))
    for b in range(x.shape[0]):
        np.testing.assert_allclose(ranks[b], soft_rank_ref(x[b], eps, reg), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(sort[b], soft_sort_ref(x[b], eps, reg), rtol=1e-10, atol=1e-10)
    if reg == "l2":  # the l2 projection stays on the permutahedron's hyperplanes
        np.testing.assert_allclose(ranks.sum(1), N * (N + 1) / 2, rtol=1e-12)
        np.testing.assert_allclose(sort.sum(1), x.sum(1), rtol=1e-12, atol=1e-12)


def test_reference_forms_many_blocks():
    """On the hypothesis grid the strengths span singletons, partial pooling and one block."""
    x = np.random.default_rng(0).integers(-6, 7, size=N) / 2.0
    counts = []
    for eps in STRENGTHS:
        s = -np.sort(-x / eps)
        counts.append(pav_ref(s - np.arange(N, 0, -1.0))[1])
    distinct = len(np.unique(x))
    assert counts[0] == distinct and counts[-1] == 1, counts  # tied values always pool
    assert any(1 < k < distinct - 2 for k in counts), counts


@given(x=batches, reg=regs)
def test_float32_matches_float64_reference(x, reg):
    got = np.asarray(_rank(jnp.asarray(x, jnp.float32), 1.0, reg))
    for b in range(x.shape[0]):
        np.testing.assert_allclose(got[b], soft_rank_ref(x[b], 1.0, reg), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_hard_limit_equals_ranks_and_sort(reg):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(3, N)).astype(np.float32)  # many ties
    ranks = np.asarray(_rank(jnp.asarray(x), 1e-2, reg))
    np.testing.assert_allclose(ranks, scipy.stats.rankdata(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(_sort(jnp.asarray(x), 1e-2, reg)), np.sort(x, axis=1), rtol=1e-5, atol=1e-5)
    if reg == "l2":  # integer input is promoted and gives the same answer
        np.testing.assert_allclose(np.asarray(_rank(jnp.asarray(x, jnp.int32), 1e-2, reg)), ranks)


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_large_strength_gives_near_constant(reg):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, N)), jnp.float32)
    ranks = np.asarray(_rank(x, 1e4, reg))
    np.testing.assert_allclose(ranks, (N + 1) / 2, atol=1e-2)
    assert np.ptp(ranks, axis=1).max() < 1e-2
    sort = np.asarray(_sort(x, 1e4, reg))
    expect = x.mean(1) if reg == "l2" else -np.log(np.mean(np.exp(-np.asarray(x, np.float64)), axis=1))
    np.testing.assert_allclose(sort, np.broadcast_to(np.asarray(expect)[:, None], sort.shape), atol=1e-2)


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_gradients_match_finite_differences(reg):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(3, N)))
        # Random weights on every output of both functions: the check sees both whole Jacobians, pooled blocks
        # included (a wrong rank gradient cannot be cancelled by the sort's: the weights are generic).
        w_rank, w_sort = jnp.asarray(rng.normal(size=(2, 3, N)))

        def loss(x):
            rank, sort = _both(x, 0.5, reg)
            return jnp.sum(w_rank * rank) + jnp.sum(w_sort * sort)

        g = np.asarray(jax.jit(jax.grad(loss))(x))
        fd = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            dx = np.zeros(x.shape)
            dx[idx] = 1e-6
            fd[idx] = (loss(x + dx) - loss(x - dx)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)
    if reg == "l2":  # shift equivariance: rank(x + c) = rank(x), sort(x + c) = sort(x) + c
        np.testing.assert_allclose(g.sum(1), np.asarray(w_sort).sum(1), rtol=1e-9, atol=1e-9)


def test_axis_vmap_and_nested_vmap_agree():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, N)), jnp.float32)
    rank = lambda v: soft_rank(v, regularization_strength=0.6)

    @jax.jit
    def variants(x):
        by_vmap = jax.vmap(rank)(x)
        nested = jax.vmap(jax.vmap(rank))(x.reshape(1, 3, N))[0]
        along_0 = soft_rank(x.T.reshape(N, 1, 3), regularization_strength=0.6, axis=0)[:, 0].T
        return by_vmap, nested, along_0

    batched = _rank(x, 0.6, "l2")
    for got in variants(x):
        np.testing.assert_allclose(got, batched, rtol=1e-6)
    for b in range(3):
        np.testing.assert_allclose(batched[b], soft_rank_ref(x[b], 0.6, "l2"), rtol=1e-5)


def test_translation_invariance_float32_large_offset():
    x = np.random.default_rng(5).normal(size=(3, N))
    shifted = (x + 1e4).astype(np.float32)
    got = np.asarray(_rank(jnp.asarray(shifted), 0.5, "l2"))
    for b in range(3):  # reference on the float32-rounded input: measures the algorithm, not the input rounding
        np.testing.assert_allclose(got[b], soft_rank_ref(shifted[b].astype(np.float64), 0.5, "l2"), atol=1e-5)


def test_nan_row_propagates_only_in_its_row():
    x = np.random.default_rng(6).normal(size=(2, N)).astype(np.float32)
    x[0, 3] = np.nan
    for out in map(np.asarray, _both(jnp.asarray(x), 1.0, "l2")):
        assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_small_sizes():
    assert soft_rank(jnp.ones((0,))).shape == (0,) and soft_sort(jnp.ones((2, 0))).shape == (2, 0)
    rank, sort = jax.jit(lambda v: (soft_rank(v), soft_sort(v)))(jnp.array([4.0]))
    np.testing.assert_allclose(rank, [1.0])
    np.testing.assert_allclose(sort, [4.0])


def test_bad_input():
    with pytest.raises(ValueError, match="regularization"):
        soft_rank(jnp.ones(3), regularization="l1")
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_sort(jnp.ones(3), regularization_strength=0.0)
    with pytest.raises(ValueError, match="shape"):
        soft_rank(jnp.float32(1.0))
    with pytest.raises(ValueError, match="axis"):
        soft_rank(jnp.ones((2, 3)), axis=2)
    with pytest.raises(TypeError, match="real"):
        soft_rank(jnp.ones(3, jnp.complex64))
