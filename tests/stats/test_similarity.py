"""CKA (linear, RBF, debiased, minibatch/streaming) against float64 transcriptions of the published formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.stats import cka_finalize, cka_init, cka_matrix, cka_merge, cka_update, linear_cka, rbf_cka
from corrjax.stats import similarity as sim

# ---------------------------------------------------------------------------------------------------------------
# References (float64): HSIC = tr(KHLH)/(n-1)^2 (Gretton et al. 2005); HSIC_1 as written in Song et al. (2012).


def hsic_biased(k, g):
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return np.trace(k @ h @ g @ h) / (n - 1) ** 2


def hsic_unbiased(k, g):
    n = k.shape[0]
    kt, gt = k.copy(), g.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(gt, 0)
    one = np.ones(n)
    trace_term = np.trace(kt @ gt)
    sums_term = (one @ kt @ one) * (one @ gt @ one) / ((n - 1) * (n - 2))
    cross_term = 2 / (n - 2) * one @ kt @ gt @ one
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def cka_ref(k, g, debiased=False):
    f = hsic_unbiased if debiased else hsic_biased
    with np.errstate(all="ignore"):
        return f(k, g) / np.sqrt(f(k, k) * f(g, g))


def linear_gram(x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x @ x.T


def rbf_gram(x, frac=0.8):
    x = np.asarray(x, np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    with np.errstate(all="ignore"):
        return np.exp(-d2 / (2 * frac**2 * np.median(d2)))


# ---------------------------------------------------------------------------------------------------------------

_linear = jax.jit(linear_cka, static_argnames=("debiased",))
_rbf = jax.jit(rbf_cka, static_argnames=("debiased",))
_forms = jax.jit(
    lambda x, y, debiased: (
        sim._gram_cka(sim._linear_gram(x - x.mean(0)), sim._linear_gram(y - y.mean(0)), debiased),
        sim._ratio(
            *(
                sim._feature_space_terms(a - a.mean(0), b - b.mean(0), x.shape[0], debiased, None)
                for a, b in ((x, y), (x, x), (y, y))
            )
        ),
    ),
    static_argnames=("debiased",),
)

# (n, d1, d2): the first takes the feature-space path, the second the Gram path (n small against the widths).
SHAPES = [(12, 3, 2), (6, 8, 9)]
elements = st.floats(-10, 10, allow_nan=False, width=64)


@st.composite
def pairs(draw):
    n, d1, d2 = draw(st.sampled_from(SHAPES))
    x = draw(hnp.arrays(np.float64, (n, d1), elements=elements))
    mix = draw(hnp.arrays(np.float64, (d1, d2), elements=st.floats(-1, 1, width=64)))
    noise = draw(hnp.arrays(np.float64, (n, d2), elements=elements))
    return x, x @ mix + noise


def _well_posed(x, y, debiased, gram=linear_gram):
    """Skips 0/0 cases (a constant representation, or a debiased self-HSIC that is zero in exact arithmetic, e.g.
    a single outlier), where the float64 reference is rounding noise. For the RBF kernel also a median pairwise
    distance below the rounding of the Gram-form distances ``|a|^2 + |b|^2 - 2 a.b`` that ``rbf_cka`` uses (most
    rows equal, e.g. a column of zeros with one 1e-77): the median, hence the bandwidth, rounds to 0 there and
    ``rbf_cka`` returns NaN as documented, while the reference's direct differences keep it."""
    if np.ptp(x, axis=0).max() < 1e-3 or np.ptp(y, axis=0).max() < 1e-3:
        return False
    if gram is rbf_gram:
        for a in (x, y):
            c = a - a.mean(0)
            d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
            if np.median(d2) <= 1e-10 * (c * c).sum(1).max():
                return False
    f = hsic_unbiased if debiased else hsic_biased
    return all(f(k, k) > 1e-6 * np.sum(k * k) / len(k) ** 2 for k in (gram(x), gram(y)))


@given(xy=pairs(), debiased=st.booleans())
def test_linear_cka_matches_reference(xy, debiased):
    x, y = xy
    if not _well_posed(x, y, debiased):
        return
    with jax.enable_x64(True):
        got = float(_linear(jnp.asarray(x), jnp.asarray(y), debiased=debiased))
        gram_form, feature_form = map(float, _forms(jnp.asarray(x), jnp.asarray(y), debiased))
    ref = cka_ref(linear_gram(x), linear_gram(y), debiased)
    np.testing.assert_allclose([got, gram_form, feature_form], ref, rtol=1e-8, atol=1e-10)


@given(xy=pairs(), debiased=st.booleans())
def test_rbf_cka_matches_reference(xy, debiased):
    x, y = xy
    if not _well_posed(x, y, debiased, rbf_gram):
        return
    with jax.enable_x64(True):
        got = float(_rbf(jnp.asarray(x), jnp.asarray(y), debiased=debiased))
    np.testing.assert_allclose(got, cka_ref(rbf_gram(x), rbf_gram(y), debiased), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [12, 6])  # feature-space and Gram paths
def test_invariances_and_self_similarity(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, :5] @ rng.normal(size=(5, 8)) + rng.normal(size=(n, 8))).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = float(_linear(x, y, debiased=False))
    assert abs(float(_linear(x, x, debiased=False)) - 1) < 1e-6
    assert abs(float(_linear(x, x, debiased=True)) - 1) < 1e-6
    assert abs(float(_rbf(x, x, debiased=False)) - 1) < 1e-6
    np.testing.assert_allclose(float(_linear(x @ q.astype(np.float32), 3.5 * y, debiased=False)), base, rtol=1e-5)
    rbf = float(_rbf(x, y, debiased=True))  # the median bandwidth makes RBF CKA scale invariant too
    np.testing.assert_allclose(float(_rbf(2.0 * x @ q.astype(np.float32), y, debiased=True)), rbf, rtol=1e-4)


def test_float32_large_offset():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3))
    y = x @ rng.normal(size=(3, 2)) + rng.normal(size=(12, 2))
    x32, y32 = (x + 1e4).astype(np.float32), (y - 3e4).astype(np.float32)
    for debiased in (False, True):
        ref = cka_ref(linear_gram(x32 - x32.astype(np.float64).mean(0)), linear_gram(y32 - y32.mean(0)), debiased)
        np.testing.assert_allclose(float(_linear(x32, y32, debiased=debiased)), ref, rtol=1e-4)


def test_undefined_cases_give_nan():
    x = np.ones((12, 3), np.float32)
    y = np.random.default_rng(2).normal(size=(12, 2)).astype(np.float32)
    assert np.isnan(_linear(x, y, debiased=False))
    assert np.isnan(linear_cka(y[:3], y[:3], debiased=True))  # n < 4
    assert np.isnan(linear_cka(y[:1], y[:1]))


def test_grad_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x, y = jnp.asarray(rng.normal(size=(12, 3))), jnp.asarray(rng.normal(size=(12, 2)))
        f = jax.jit(lambda x: linear_cka(x, y, debiased=True))
        g = np.asarray(jax.grad(f)(x))
        fd = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            dx = np.zeros(x.shape)
            dx[idx] = 1e-6
            fd[idx] = (f(x + dx) - f(x - dx)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_vmap_over_problems():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 12, 3)).astype(np.float32)
    y = rng.normal(size=(3, 12, 2)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda a, b: linear_cka(a, b, debiased=True)))(x, y)
    np.testing.assert_allclose(
        got, [cka_ref(linear_gram(a), linear_gram(b), True) for a, b in zip(x, y, strict=True)], rtol=1e-4
    )


def test_bad_input():
    with pytest.raises(ValueError, match="same number of observations"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="observation axis"):
        rbf_cka(1.0, np.ones(3))
    with pytest.raises(TypeError, match="real"):
        linear_cka(np.ones((5, 2), np.complex64), np.ones((5, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Minibatch CKA.

_update = jax.jit(cka_update)


def _layers(rng, n, widths=(3, 5)):
    base = rng.normal(size=(n, 4))
    return [(base @ rng.normal(size=(4, d)) + 0.5 * rng.normal(size=(n, d))).astype(np.float32) for d in widths]


def test_minibatch_cka_is_ratio_of_summed_hsic1_unequal_batches():
    rng = np.random.default_rng(5)
    state = cka_init(2, 3)
    sums_xy, sums_xx, sums_yy = np.zeros((2, 3)), np.zeros(2), np.zeros(3)
    for n in (5, 9, 16):
        xs, ys = _layers(rng, n), _layers(rng, n, (2, 4, 6))
        state = _update(state, xs, ys)
        kx, ky = [linear_gram(a) for a in xs], [linear_gram(b) for b in ys]
        sums_xy += [[hsic_unbiased(k, g) for g in ky] for k in kx]
        sums_xx += [hsic_unbiased(k, k) for k in kx]
        sums_yy += [hsic_unbiased(g, g) for g in ky]
    assert int(state.count) == 3
    # The state holds the sums of the activations divided by 2**exp (per layer): multiply them back.
    ex, ey = np.asarray(state.exp_x), np.asarray(state.exp_y)
    unscaled = np.ldexp(np.asarray(state.hsic_xy, np.float64), 2 * ex[:, None] + 2 * ey[None, :])
    np.testing.assert_allclose(unscaled, sums_xy, rtol=1e-4, atol=1e-4)
    expect = sums_xy / np.sqrt(sums_xx[:, None] * sums_yy[None, :])
    np.testing.assert_allclose(cka_finalize(state), expect, rtol=1e-4, atol=1e-6)


def test_single_batch_equals_debiased_linear_cka_and_large_batches_approach_full():
    rng = np.random.default_rng(6)
    x, y = _layers(rng, 16, (3,))[0], _layers(rng, 16, (5,))[0]
    one = cka_finalize(_update(cka_init(1, 1), [x], [y]))[0, 0]
    np.testing.assert_allclose(one, float(_linear(x, y, debiased=True)), rtol=1e-5)
    # Nguyen et al. (2021): with large minibatches the estimate approaches the full-batch debiased CKA.
    base = rng.normal(size=(2000, 4))
    x = (base @ rng.normal(size=(4, 6)) + rng.normal(size=(2000, 6))).astype(np.float32)
    y = (np.tanh(base) @ rng.normal(size=(4, 5)) + rng.normal(size=(2000, 5))).astype(np.float32)
    full = float(_linear(x, y, debiased=True))
    errors = []
    for bs in (25, 500):
        state = cka_init(1, 1)
        for i in range(0, 2000, bs):
            state = _update(state, [x[i : i + bs]], [y[i : i + bs]])
        errors.append(abs(float(cka_finalize(state)[0, 0]) - full))
    assert errors[1] < 0.01, errors


def test_self_cka_matrix_and_merge():
    rng = np.random.default_rng(7)
    batches = [_layers(rng, 8, (3, 5, 2)) for _ in range(3)]
    mat = cka_matrix((xs, None) for xs in batches)
    assert mat.shape == (3, 3)
    np.testing.assert_allclose(np.diag(mat), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mat, mat.T, rtol=1e-6)
    update = functools.partial(sim._jit_update, ys=None, self_cka=True)  # shares cka_matrix's compiled update
    state = update(update(cka_init(3), batches[0]), batches[1])
    other = update(cka_init(3), batches[2])
    np.testing.assert_allclose(cka_finalize(cka_merge(state, other)), mat, rtol=1e-6)
    pair = cka_matrix((xs, xs[:2]) for xs in batches)
    np.testing.assert_allclose(pair, mat[:, :2], rtol=1e-6)


def test_cka_update_validation():
    xs = [np.ones((8, 2), np.float32)] * 2
    with pytest.raises(ValueError, match="at least 4"):
        cka_update(cka_init(1), [np.ones((3, 2))])
    with pytest.raises(ValueError, match="2 x-layers"):
        cka_update(cka_init(2, 1), xs[:1], xs[:1])
    with pytest.raises(ValueError, match="same number of observations"):
        cka_update(cka_init(2), [xs[0], np.ones((7, 2))])
    with pytest.raises(ValueError, match="num_x"):
        cka_init(0)
    with pytest.raises(ValueError, match="empty"):
        cka_matrix([])


# ---------------------------------------------------------------------------------------------------------------
# Sharded over the 8-device mesh: the statistics are those of the global batch.


def test_axis_name_on_mesh(mesh8):
    rng = np.random.default_rng(8)
    xs, ys = _layers(rng, 32, (3, 5)), _layers(rng, 32, (4,))
    shard = functools.partial(jax.shard_map, mesh=mesh8, in_specs=P("data"), out_specs=P())

    @jax.jit
    @shard
    def sharded(xs, ys):
        state = cka_update(cka_init(2, 1), xs, ys, axis_name="data")
        return (
            state,
            linear_cka(xs[0], ys[0], axis_name="data"),
            linear_cka(xs[1], ys[0], debiased=True, axis_name="data"),
            rbf_cka(xs[0], ys[0], debiased=True, axis_name="data"),
        )

    @jax.jit
    def unsharded(xs, ys):
        state = cka_update(cka_init(2, 1), xs, ys)
        return (
            state,
            linear_cka(xs[0], ys[0]),
            linear_cka(xs[1], ys[0], debiased=True),
            rbf_cka(xs[0], ys[0], debiased=True),
        )

    put = lambda arrays: [jax.device_put(a, NamedSharding(mesh8, P("data"))) for a in arrays]
    got, want = sharded(put(xs), put(ys)), unsharded(xs, ys)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_nan_or_the_documented_error():
    # (0, d) inputs used to crash in a reshape (ZeroDivisionError) instead of following the n < 2 rule.
    empty = np.zeros((0, 3), np.float32)
    assert np.isnan(linear_cka(empty, empty[:, :2]))
    assert np.isnan(linear_cka(empty, empty, debiased=True))
    assert np.isnan(rbf_cka(empty, empty[:, :2]))
    assert np.isnan(linear_cka(np.zeros((0, 2, 2), np.float32), empty))  # trailing axes flattened
    with pytest.raises(ValueError, match="at least 4 observations"):
        cka_update(cka_init(1), empty)
