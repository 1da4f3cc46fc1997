"""ROC AUC and GAUC against scikit-learn's roc_auc_score: ties, sample weights, one-class splits, float32 offsets,
the streaming buffer and histogram states, and rows sharded over a mapped axis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.metrics import roc_auc_score

import corrjax.stats as cs

N = 48  # every drawn sample is padded to N rows of zero weight, so each function compiles once


def _pad(n, *arrays):
    return [np.concatenate([a, np.zeros(N - n, a.dtype)]) for a in arrays]


def sk_auc(y, s, w=None):
    y = np.asarray(y) > 0.5
    keep = np.ones(len(y), bool) if w is None else np.asarray(w) > 0
    if len(np.unique(y[keep])) < 2:
        return np.nan
    return roc_auc_score(y[keep], np.asarray(s, np.float64)[keep], sample_weight=None if w is None else w[keep])


def sk_gauc(y, s, g, w, mode="impressions"):
    num, den = 0.0, 0.0
    for u in np.unique(g):
        m = (g == u) & (w > 0)
        a = sk_auc(y[m], s[m], w[m])
        if np.isnan(a):
            continue
        v = {"impressions": w[m].sum(), "positives": w[m][y[m] > 0.5].sum(), "uniform": 1.0}[mode]
        num, den = num + v * a, den + v
    return num / den if den > 0 else np.nan


samples = st.integers(1, N).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.integers(0, 5), min_size=n, max_size=n),  # few distinct scores: many ties
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.integers(0, 4), min_size=n, max_size=n),  # integer weights, zeros included
        st.lists(st.integers(0, 3), min_size=n, max_size=n),  # user ids
    )
)

MODES = ("impressions", "positives", "uniform")


@jax.jit
def all_metrics(s, y, w, g):
    """roc_auc, the per-group AUCs and GAUC in every weighting of ``(N,)`` rows and 4 groups: one compilation per
    weight dtype serves every test below."""
    return {
        "auc": cs.roc_auc(s, y, w),
        "grouped": cs.grouped_roc_auc(s, y, g, 4, w),
        **{m: cs.gauc(s, y, g, 4, w, group_weights=m) for m in MODES},
    }


def padded_metrics(s, y, w, g):
    n = len(s)
    return jax.device_get(all_metrics(*_pad(n, np.asarray(s, np.float32), np.asarray(y, np.float32), w, g)))


@given(samples, st.sampled_from(["int", "float"]), st.sampled_from([0.0, 1e4]))
def test_roc_auc_and_gauc_match_sklearn(sample, weighting, offset):
    _, levels, y, wi, g = sample
    # float32 scores with a large common offset: 1e4 + k/512 are distinct float32 values (the ulp at 1e4 is 2**-10),
    # ranked exactly as given (a centring or a float32 difference would merge them).
    s = (np.float32(offset) + np.asarray(levels, np.float32) / np.float32(512)).astype(np.float32)
    y, g = np.asarray(y, np.float32), np.asarray(g, np.int32)
    w = np.asarray(wi, np.int32) if weighting == "int" else np.asarray(wi, np.float32) * np.float32(0.37)
    got = padded_metrics(s, y, w, g)
    np.testing.assert_allclose(got["auc"], sk_auc(y, s, w), rtol=2e-6, atol=1e-7, equal_nan=True)
    for k in range(4):
        m = g == k
        np.testing.assert_allclose(got["grouped"].auc[k], sk_auc(y[m], s[m], w[m]), rtol=2e-6, equal_nan=True)
        np.testing.assert_allclose(got["grouped"].impressions[k], w[m].sum(), rtol=1e-6)
        np.testing.assert_allclose(got["grouped"].positives[k], w[m][y[m] > 0].sum(), rtol=1e-6)
    for mode in MODES:
        np.testing.assert_allclose(got[mode], sk_gauc(y, s, g, w, mode), rtol=2e-6, equal_nan=True)


def test_float64_under_x64_matches_sklearn_to_rounding(x64):
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)
    y = rng.integers(0, 2, 300)
    w = rng.random(300)
    got, grouped = jax.jit(lambda s, y, w: (cs.roc_auc(s, y, w), cs.grouped_roc_auc(s, y, np.arange(300) % 7, 7, w)))(
        s, y, w
    )
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), roc_auc_score(y, s, sample_weight=w), rtol=1e-12)
    for k in range(7):
        m = np.arange(300) % 7 == k
        np.testing.assert_allclose(float(grouped.auc[k]), roc_auc_score(y[m], s[m], sample_weight=w[m]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grouped.impressions), [w[np.arange(300) % 7 == k].sum() for k in range(7)])


def test_undefined_cases_give_nan():
    s, one = np.asarray([0.1, 0.5, 0.3], np.float32), np.ones(3, np.int32)
    g = np.asarray([0, 1, 1], np.int32)
    assert np.isnan(padded_metrics(s, np.ones(3), one, g)["auc"])  # one class
    assert np.isnan(padded_metrics(s, np.zeros(3), one, g)["auc"])
    assert np.isnan(padded_metrics(s, [0, 1, 1], np.asarray([0, 1, 1], np.int32), g)["auc"])  # negatives masked
    nan_s = np.asarray([0.1, np.nan, 0.3], np.float32)
    got = padded_metrics(nan_s, [0, 1, 1], one, g)
    assert np.isnan(got["auc"]) and np.isnan(got["grouped"].auc[1]) and np.isnan(got["uniform"])
    # a NaN score with zero weight is ignored
    assert padded_metrics(nan_s, [0, 1, 1], np.asarray([1, 0, 1], np.int32), g)["auc"] == 1.0
    # every user one-class: GAUC undefined; group ids outside [0, num_groups) are dropped
    assert np.isnan(padded_metrics(s, [0, 1, 1], one, g)["impressions"])
    got = padded_metrics(s, [0, 1, 1], one, np.asarray([0, 0, 7], np.int32))
    assert got["impressions"] == 1.0 and got["grouped"].impressions.sum() == 2


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="`labels`"):
        cs.roc_auc(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="`weights`"):
        cs.roc_auc(jnp.zeros(3), jnp.zeros(3), jnp.ones(2))
    with pytest.raises(ValueError, match="`scores`"):
        cs.roc_auc(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="`groups`"):
        cs.gauc(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), 2)
    with pytest.raises(ValueError, match="`num_groups`"):
        cs.gauc(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3, jnp.int32), 0)
    with pytest.raises(ValueError, match="`group_weights`"):
        cs.gauc(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3, jnp.int32), 2, group_weights="clicks")
    with pytest.raises(ValueError, match="`capacity`"):
        cs.auc_init(0)
    with pytest.raises(ValueError, match="`high`"):
        cs.auc_histogram_init(8, low=1.0, high=1.0)


def test_vmap_over_tasks_and_grad_is_zero():
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=(3, 40)).astype(np.float32), rng.integers(0, 2, (3, 40))
    got, grad = jax.jit(lambda s, y: (jax.vmap(cs.roc_auc)(s, y), jax.grad(cs.roc_auc)(s[0], y[0])))(s, y)
    np.testing.assert_allclose(np.asarray(got), [roc_auc_score(y[i], s[i]) for i in range(3)], rtol=1e-6)
    assert np.all(np.asarray(grad) == 0)


def test_streaming_buffer_is_exact_and_flags_overflow():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=90), 1).astype(np.float32)
    y, w, g = rng.integers(0, 2, 90), rng.integers(0, 3, 90).astype(np.float32), rng.integers(0, 5, 90)
    update, merge = jax.jit(cs.auc_update), jax.jit(cs.auc_merge)
    results = jax.jit(lambda st: (cs.auc_result(st), cs.gauc_result(st, 5)))
    a = b = cs.auc_init(96)
    for lo in (0, 30):  # two batches into `a`, one into `b`
        a = update(a, s[lo : lo + 30], y[lo : lo + 30], w[lo : lo + 30], g[lo : lo + 30])
    b = update(b, s[60:], y[60:], w[60:], g[60:])
    merged = merge(a, b)
    assert int(merged.count) == 90 and not bool(merged.overflow)
    auc, gauc = results(merged)
    np.testing.assert_allclose(float(auc), sk_auc(y, s, w), rtol=1e-6)
    np.testing.assert_allclose(float(gauc), sk_gauc(y, s, g, w), rtol=1e-6)
    full = merge(merged, b)  # 120 rows in a 96-row buffer
    assert bool(full.overflow) and int(full.count) == 96
    assert all(np.isnan(float(v)) for v in results(full))
    assert bool(merge(b, full).overflow)  # an overflowed part makes the merge overflow


def test_histogram_estimate_is_within_its_bound():
    rng = np.random.default_rng(3)
    p = jax.nn.sigmoid(rng.normal(size=500)).astype(np.float32)
    y = (rng.random(500) < p).astype(np.int32)
    exact = sk_auc(y, p)
    update, result = jax.jit(cs.auc_histogram_update), jax.jit(cs.auc_histogram_result)
    for bins in (4, 4096):
        est = result(update(cs.auc_histogram_init(bins), p, y))
        assert abs(float(est.auc) - exact) <= float(est.error_bound) + 1e-6
    assert float(est.error_bound) < 1e-3
    # scores on distinct bins: the estimate is exact and the bound is 0; merging two halves equals the whole
    s = ((np.arange(500) + 0.5) / 500).astype(np.float32)
    h = cs.auc_histogram_init(500)
    halves = [update(h, s[:250], y[:250]), update(h, s[250:], y[250:])]
    est = result(cs.auc_histogram_merge(*halves))
    assert float(est.error_bound) == 0.0
    np.testing.assert_allclose(float(est.auc), roc_auc_score(y, s), rtol=1e-6)
    # one bin: everything ties, AUC 1/2 with the worst-case bound 1/2
    one = result(update(cs.auc_histogram_init(1), s, y))
    assert float(one.auc) == 0.5 and float(one.error_bound) == 0.5
    assert np.isnan(float(result(cs.auc_histogram_init(4)).auc))


def test_sharded_rows_equal_the_global_result(mesh8):
    rng = np.random.default_rng(4)
    s = np.round(rng.normal(size=64), 1).astype(np.float32)
    y, g = rng.integers(0, 2, 64), rng.integers(0, 6, 64)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh8, in_specs=P("data"), out_specs=P())
    def sharded(s, y, g):
        h = cs.auc_histogram_update(cs.auc_histogram_init(16, -4.0, 4.0), s, y, axis_name="data")
        return (
            cs.roc_auc(s, y, axis_name="data"),
            cs.gauc(s, y, g, 6, axis_name="data"),
            cs.auc_histogram_result(h).auc,
        )

    auc, gauc, hist = sharded(*(jax.device_put(a, NamedSharding(mesh8, P("data"))) for a in (s, y, g)))
    np.testing.assert_allclose(float(auc), roc_auc_score(y, s), rtol=1e-6)
    np.testing.assert_allclose(float(gauc), sk_gauc(y, s, g, np.ones(64)), rtol=1e-6)
    whole = cs.auc_histogram_result(cs.auc_histogram_update(cs.auc_histogram_init(16, -4.0, 4.0), s, y))
    np.testing.assert_allclose(float(hist), float(whole.auc), rtol=1e-6)
