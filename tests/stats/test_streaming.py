"""Streaming CovState: random chunkings, orders and merge trees equal the one-shot numpy statistics."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corrjax.stats as cs

_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
X64 = settings(suppress_health_check=_SUPPRESS)

_update = jax.jit(cs.cov_update)
_merge = jax.jit(cs.cov_merge)
_cov_fin = jax.jit(cs.cov_finalize, static_argnames=("ddof",))
_corr_fin = jax.jit(cs.corr_finalize)

CHUNKS = (1, 2, 3, 5)  # few distinct chunk shapes, so the jitted update compiles a handful of times


@st.composite
def chunked(draw, d=3):
    sizes = draw(st.lists(st.sampled_from(CHUNKS), min_size=1, max_size=8))
    n = sum(sizes)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((n, d)) * np.array([1.0, 3.0, 0.1]) + draw(st.sampled_from([0.0, 1e4]))
    if draw(st.booleans()):
        x = np.round(x)  # ties
    bounds = np.cumsum([0, *sizes])
    chunks = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    order = draw(st.permutations(range(len(chunks))))
    return x, [chunks[i] for i in order]


def _ref_cov(x, **kw):
    # W - ddof <= 0 is a case the tests mean to cover: numpy warns, the state gives NaN.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Degrees of freedom <= 0", category=RuntimeWarning)
        c = np.cov(x.T, **kw)  # not rowvar=False: numpy < 2.1 reads one observation as one variable
    return np.where(np.isfinite(c), c, np.nan)


@X64
@given(data=chunked(), weighted=st.booleans(), ddof=st.sampled_from([0, 1]))
def test_any_chunking_and_order_equals_numpy(x64, data, weighted, ddof):
    x, chunks = data
    w = np.random.default_rng(len(x)).integers(0, 3, len(x)).astype(np.float64) if weighted else None
    state = cs.cov_init(3, dtype=jnp.float64)
    for a, b in chunks:
        state = _update(state, x[a:b], None, None if w is None else w[a:b])
    ref = _ref_cov(x, ddof=ddof, fweights=None if w is None else w.astype(int))
    np.testing.assert_allclose(_cov_fin(state, ddof=ddof), ref, rtol=1e-9, atol=1e-9)
    with np.errstate(all="ignore"):
        xr = x if w is None else np.repeat(x, w.astype(int), axis=0)
        rref = np.corrcoef(xr, rowvar=False) if len(xr) > 1 else np.full((3, 3), np.nan)
    np.testing.assert_allclose(_corr_fin(state), rref, rtol=1e-9, atol=1e-9)


@X64
@given(data=chunked(), picks=st.lists(st.integers(0, 10**6), min_size=8, max_size=8))
def test_any_merge_tree_equals_numpy(x64, data, picks):
    x, chunks = data
    empty = cs.cov_init(3, dtype=jnp.float64)
    states = [_update(empty, x[a:b]) for a, b in chunks] + [empty]  # an empty part must be harmless too
    k = 0
    while len(states) > 1:  # merge two randomly chosen states, in a random order, until one is left
        i = picks[k % len(picks)] % len(states)
        a = states.pop(i)
        j = picks[(k + 1) % len(picks)] % len(states)
        b = states.pop(j)
        states.append(_merge(a, b) if k % 2 else _merge(b, a))
        k += 1
    np.testing.assert_allclose(_cov_fin(states[0]), _ref_cov(x), rtol=1e-9, atol=1e-9)
    assert float(states[0].weight) == len(x)


def test_cross_state_and_scan_in_float32_with_offset():
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((4000, 3))).astype(np.float32)
    y = (x[:, :2] - 1e4) * np.float32(2.0) + rng.standard_normal((4000, 2)).astype(np.float32) - 3e3
    y = y.astype(np.float32)

    def step(state, xy):
        return cs.cov_update(state, xy[0], xy[1]), None

    state, _ = jax.jit(lambda s, a, b: jax.lax.scan(step, s, (a, b)))(
        cs.cov_init(3, 2), x.reshape(40, 100, 3), y.reshape(40, 100, 2)
    )
    assert state.comoment.dtype == jnp.float32 and state.cross
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    ref_c = np.cov(xd, yd, rowvar=False)[:3, 3:]
    ref_r = np.corrcoef(xd, yd, rowvar=False)[:3, 3:]
    np.testing.assert_allclose(cs.cov_finalize(state), ref_c, rtol=2e-5, atol=2e-5 * np.abs(ref_c).max())
    np.testing.assert_allclose(cs.corr_finalize(state), ref_r, atol=2e-5)
    np.testing.assert_allclose(state.mean_x, xd.mean(0), rtol=1e-6)


def test_empty_and_degenerate_states():
    empty = cs.cov_init(2)
    assert np.isnan(_cov_fin(empty)).all() and np.isnan(_corr_fin(empty)).all()
    one = _update(empty, jnp.array([[1.0, 2.0]]))
    assert np.isnan(_cov_fin(one)).all()
    np.testing.assert_array_equal(_cov_fin(one, ddof=0), np.zeros((2, 2)))
    zero_w = _update(one, jnp.array([[5.0, 7.0], [1.0, 0.0]]), None, jnp.zeros(2))
    np.testing.assert_array_equal(zero_w.mean_x, one.mean_x)
    assert float(zero_w.weight) == 1.0
    const = cs.cov_update(_update(empty, jnp.array([[3.0, 1.0], [3.0, 2.0]])), jnp.array([[3.0, 5.0]]))
    r = _corr_fin(const)
    assert np.isnan(r[0, 0]) and np.isnan(r[0, 1]) and r[1, 1] == 1.0
    assert cs.cov_update(one, jnp.zeros((0, 2))) is one


def test_state_is_a_pytree_that_vmaps():
    xb = jnp.asarray(np.random.default_rng(1).standard_normal((5, 7, 2)), jnp.float32)
    states = jax.vmap(lambda a: cs.cov_update(cs.cov_init(2), a))(xb)
    assert states.comoment.shape == (5, 2, 2)
    out = jax.vmap(cs.cov_finalize)(states)
    for b in range(5):
        np.testing.assert_allclose(out[b], np.cov(np.asarray(xb[b]), rowvar=False), rtol=1e-5, atol=1e-6)
    leaves = jax.tree_util.tree_leaves(cs.cov_init(2, 3))
    assert len(leaves) == 10  # 8 statistics and the two per-column scale exponents


def test_cross_state_correlation_of_affine_float32_columns_is_clipped():
    # Rounding puts c / sqrt(m2_x m2_y) of exactly affinely related float32 columns one ulp beyond +-1 for most
    # seeds; a cross state has no unit-diagonal rule, so only the clip keeps it in [-1, 1].
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((50, 4)).astype(np.float32)
        y = np.concatenate([3 * x - 1, 1 - 3 * x], axis=1).astype(np.float32)
        state = _update(_update(cs.cov_init(4, 8), x[:20], y[:20]), x[20:], y[20:])
        got = np.asarray(_corr_fin(state))
        ref = np.corrcoef(x.astype(np.float64), y.astype(np.float64), rowvar=False)[:4, 4:]
        assert got.dtype == np.float32
        assert np.all(np.abs(got) <= 1.0), np.abs(got).max() - 1
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_float32_states_from_empty_keep_the_chunk_means_exact():
    # Folding a chunk into an empty state must take its mean as is: re-expressing it through the (zero) frame of the
    # empty state rounds it at the offset's ulp, and the next merge's Chan term then carries that error.
    rng = np.random.default_rng(3)
    x = (1e5 + rng.standard_normal((2000, 2)) + np.repeat([[0.0, 0.0], [1.0, -2.0]], 1000, axis=0)).astype(np.float32)
    ref = np.cov(x.astype(np.float64), rowvar=False)
    empty = cs.cov_init(2)
    for state in (
        _update(_update(empty, x[:1000]), x[1000:]),
        _merge(_update(empty, x[:1000]), _update(empty, x[1000:])),
        _merge(empty, _merge(_update(empty, x[:1000]), _merge(empty, _update(empty, x[1000:])))),
    ):
        np.testing.assert_allclose(_cov_fin(state), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
