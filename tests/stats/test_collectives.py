"""``axis_name`` collectives: inside shard_map (8-device mesh) and pmap the results equal the global computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import corrjax.stats as cs

N, D = 48, 3  # 6 rows per device


def _data(seed=0, offset=1e4, nan_frac=0.0):
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal((N, D)) @ rng.standard_normal((D, D))).astype(np.float32)
    y = (x[:, :2] - offset + rng.standard_normal((N, 2))).astype(np.float32)
    if nan_frac:
        x[rng.random(x.shape) < nan_frac] = np.nan
    return x, y


def _put(mesh, *arrays):
    """Places the rows of each array across the mesh (the mesh has Explicit axes, so inputs carry shardings)."""
    sharding = NamedSharding(mesh, P("data"))
    return [jax.device_put(a, sharding) for a in arrays]


def _sharded(mesh, fn, n_in):
    specs = (P("data"),) * n_in
    mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P()))
    return lambda *args: mapped(*_put(mesh, *args))


CASES = {
    "cov": (lambda x, y, a: cs.cov(x, axis_name=a), 1e-5),
    "cov_xy_ddof0": (lambda x, y, a: cs.cov(x, y, ddof=0, axis_name=a), 1e-5),
    "corrcoef": (lambda x, y, a: cs.corrcoef(x, axis_name=a), 1e-5),
    "corrcoef_xy": (lambda x, y, a: cs.corrcoef(x, y, axis_name=a), 1e-5),
    "pearsonr": (lambda x, y, a: cs.pearsonr(x[:, :2], y, axis_name=a), 1e-5),
    "concordance": (lambda x, y, a: cs.concordance(x[:, :2] - 1e4, y, axis_name=a), 1e-5),
    "partial_corr": (lambda x, y, a: cs.partial_corr(x, axis_name=a), 1e-4),
    "ledoit_wolf": (lambda x, y, a: cs.ledoit_wolf(x, axis_name=a), 1e-5),
    "oas": (lambda x, y, a: cs.oas(x, axis_name=a), 1e-5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shard_map_equals_global(mesh8, name):
    fn, tol = CASES[name]
    x, y = _data()
    got = _sharded(mesh8, lambda a, b: fn(a, b, "data"), 2)(x, y)
    ref = jax.jit(lambda a, b: fn(a, b, None))(x, y)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * (1 + np.abs(np.asarray(r)).max()))


def test_shard_map_weights(mesh8):
    x, _ = _data(1)
    w = np.random.default_rng(1).uniform(0.0, 2.0, N).astype(np.float32)
    fw = np.random.default_rng(2).integers(0, 3, N)
    f = lambda a, aw, f_, name: cs.cov(a, ddof=1, aweights=aw, fweights=f_, axis_name=name)
    got = _sharded(mesh8, functools.partial(f, name="data"), 3)(x, w, fw)
    ref = np.cov(x.astype(np.float64), rowvar=False, aweights=w, fweights=fw)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_shard_map_missing_values(mesh8):
    x, y = _data(2, nan_frac=0.2)
    for fn in (
        lambda a, b, n: cs.nancorrcoef(a, axis_name=n),
        lambda a, b, n: cs.nancov(a, ddof=0, min_periods=20, axis_name=n),
        lambda a, b, n: cs.nancorrcoef(a, b, axis_name=n),
    ):
        got = _sharded(mesh8, lambda a, b: fn(a, b, "data"), 2)(x, y)
        ref = jax.jit(lambda a, b: fn(a, b, None))(x, y)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * (1 + np.nanmax(np.abs(np.asarray(ref)))))


def test_shard_map_missing_values_shift_from_a_later_shard(mesh8):
    """Columns with nothing observed on the first shards: every shard must agree on the shift (a head value of the
    first shard that has one, else the global smallest value), float32 with a large offset."""
    import pandas as pd

    x, _ = _data(4, nan_frac=0.1)
    x[:12, 0] = np.nan  # shards 0-1 see no value of column 0
    x[: N - 6, 1] = np.nan  # only the last shard sees column 1
    x[N - 6, 1] = 1e4 + 30.0  # an outlier-ish first value
    got = _sharded(mesh8, lambda a: cs.nancorrcoef(a, axis_name="data"), 1)(x)
    ref = pd.DataFrame(x.astype(np.float64)).corr().to_numpy()
    np.testing.assert_allclose(got, ref, atol=5e-5)
    np.testing.assert_allclose(got, jax.jit(cs.nancorrcoef)(x), atol=5e-5)


def test_shard_map_streaming_allreduce(mesh8):
    x, y = _data(3)
    w = np.ones(N, np.float32)
    w[:6] = 0.0  # the first shard contributes nothing: its (empty-state) reference values must not be used

    def local(a, b, ww):
        state = cs.cov_update(cs.cov_init(D, 2), a, b, ww)
        return cs.cov_allreduce(state, "data")

    got = _sharded(mesh8, local, 3)(x, y, w)
    keep = w > 0
    xd, yd = x[keep].astype(np.float64), y[keep].astype(np.float64)
    ref_c = np.cov(xd, yd, rowvar=False)[:D, D:]
    np.testing.assert_allclose(cs.cov_finalize(got), ref_c, rtol=2e-5, atol=2e-5 * np.abs(ref_c).max())
    np.testing.assert_allclose(cs.corr_finalize(got), np.corrcoef(xd, yd, rowvar=False)[:D, D:], atol=2e-5)
    np.testing.assert_allclose(got.mean_x, xd.mean(0), rtol=1e-6)
    assert float(got.weight) == keep.sum()


def _pmapped(fn):
    return jax.pmap(fn, axis_name="data")


def test_pmap_equals_global():
    x, y = _data(4)
    xs, ys = x.reshape(8, N // 8, D), y.reshape(8, N // 8, 2)
    r = _pmapped(lambda a, b: cs.corrcoef(a, b, axis_name="data"))(xs, ys)
    np.testing.assert_allclose(r, np.broadcast_to(jax.jit(cs.corrcoef)(x, y), r.shape), atol=1e-5)
    p = _pmapped(lambda a, b: cs.pearsonr(a[:, :2], b, axis_name="data"))(xs, ys)
    ref = jax.jit(cs.pearsonr)(x[:, :2], y)
    np.testing.assert_allclose(p.pvalue[3], ref.pvalue, rtol=1e-4, atol=1e-7)
    st = _pmapped(lambda a: cs.cov_allreduce(cs.cov_update(cs.cov_init(D), a), "data"))(xs)
    st5 = jax.tree_util.tree_map(lambda v: v[5], st)
    np.testing.assert_allclose(jax.jit(cs.cov_finalize)(st5), jax.jit(cs.cov)(x), rtol=2e-5)
    xn, _ = _data(5, nan_frac=0.25)
    got = _pmapped(lambda a: cs.nancorrcoef(a, axis_name="data"))(xn.reshape(8, N // 8, D))
    np.testing.assert_allclose(got[0], jax.jit(cs.nancorrcoef)(xn), atol=2e-5)


def test_grad_through_sharded_corrcoef(mesh8):
    x, _ = _data(6, offset=0.0)
    loss_sharded = jax.shard_map(
        lambda a: jnp.sum(cs.corrcoef(a, axis_name="data") ** 2), mesh=mesh8, in_specs=P("data"), out_specs=P()
    )
    g = jax.jit(jax.grad(loss_sharded))(*_put(mesh8, x))
    g_ref = jax.jit(jax.grad(lambda a: jnp.sum(cs.corrcoef(a) ** 2)))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


PLAIN_JIT_CASES = {
    **{name: fn for name, (fn, _) in CASES.items()},
    "cov_weights": lambda x, y, a: cs.cov(x, fweights=jnp.arange(N) % 3, aweights=jnp.linspace(0.5, 2.0, N)),
    "nancorrcoef": lambda x, y, a: cs.nancorrcoef(x, y, axis_name=a),
    "nancov": lambda x, y, a: cs.nancov(x, ddof=0, axis_name=a),
    "spearmanr": lambda x, y, a: cs.spearmanr(x, y, axis_name=a),
    "kendalltau": lambda x, y, a: cs.kendalltau(x[:, 0], y[:, 0], axis_name=a),
    "linear_cka": lambda x, y, a: cs.linear_cka(x, y, axis_name=a),
    "pearson_loss": lambda x, y, a: cs.pearson_loss(x[:, :2], y, axis_name=a),
    "decov_loss": lambda x, y, a: cs.decov_loss(x, axis_name=a),
}


@pytest.mark.parametrize("name", sorted(PLAIN_JIT_CASES))
def test_plain_jit_on_rows_sharded_over_an_explicit_mesh(mesh8, name):
    """jax.make_mesh gives Explicit axes: a batch sharded f32[n@data, d] under plain jit (no axis_name) is routed to
    the axis_name implementation inside a shard_map, and equals the unsharded computation."""
    fn = PLAIN_JIT_CASES[name]
    x, y = _data(6, nan_frac=0.1 if name.startswith("nan") else 0.0)
    xs, ys = _put(mesh8, x, y)
    assert jax.typeof(xs).sharding.spec[0] == "data"
    got = jax.jit(lambda a, b: fn(a, b, None))(xs, ys)
    ref = jax.jit(lambda a, b: fn(a, b, None))(x, y)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * (1 + np.nanmax(np.abs(np.asarray(r)))))
