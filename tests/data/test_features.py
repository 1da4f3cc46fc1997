"""FeatureSpec validation and the tabular batch contract: ``batch["x"]`` as a dict of arrays through the sources,
the batch iterator (one process and the multi-process path), the sharding helpers and the noise-scale step."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.data import (
    ArrayDataset,
    BatchIterator,
    FeatureSpec,
    RecordDataset,
    TaskSpec,
    check_feature_batch,
    check_features,
)
from corrjax.train.sharding import batch_sharding, global_batch

FEATURES = (
    FeatureSpec("user", "categorical", vocab_size=7),
    FeatureSpec("price", "numeric"),
    FeatureSpec("dense", "numeric", dim=3),
    FeatureSpec("tags", "multi_hot", vocab_size=5, max_len=4),
)
TASKS = (TaskSpec("click", "binary", 1), TaskSpec("buy", "binary", 1))


def tabular(n, seed=0):
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, 5, (n, 4)).astype(np.int32)
    tags[rng.random((n, 4)) < 0.4] = -1
    x = {
        "user": rng.integers(0, 7, n).astype(np.int32),
        "price": np.arange(n, dtype=np.float32),
        "dense": rng.normal(size=(n, 3)).astype(np.float32),
        "tags": tags,
    }
    return x, {"click": rng.integers(0, 2, n).astype(np.float32), "buy": rng.integers(0, 2, n).astype(np.float32)}


def test_feature_spec_shapes_dtypes_and_frozen():
    assert [f.shape for f in FEATURES] == [(), (), (3,), (4,)]
    assert [f.dtype for f in FEATURES] == [np.int32, np.float32, np.float32, np.int32]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FEATURES[0].vocab_size = 3
    assert check_features(list(FEATURES)) == FEATURES


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "categorical"}, "vocab_size"),
        ({"kind": "categorical", "vocab_size": 0}, "vocab_size"),
        ({"kind": "multi_hot", "vocab_size": True, "max_len": 2}, "vocab_size"),
        ({"kind": "multi_hot", "vocab_size": 3}, "max_len"),
        ({"kind": "multi_hot", "vocab_size": 3, "max_len": 0}, "max_len"),
        ({"kind": "numeric", "dim": 0}, "dim"),
        ({"kind": "numeric", "dim": 1.5}, "dim"),
        ({"kind": "dense"}, "kind"),
    ],
)
def test_feature_spec_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}`") as e:
        FeatureSpec("f", **kwargs)
    assert "'f'" in str(e.value)


def test_check_features_errors():
    with pytest.raises(ValueError, match="at least one"):
        check_features([])
    with pytest.raises(ValueError, match="duplicate"):
        check_features([FEATURES[0], FEATURES[0]])
    with pytest.raises(TypeError, match="FeatureSpec"):
        check_features([TASKS[0]])
    with pytest.raises(TypeError, match="sequence"):
        check_features(FEATURES[0])


def test_check_feature_batch():
    x, _ = tabular(6)
    check_feature_batch(FEATURES, x)
    bad = [
        ({**x, "user": x["user"] + 7}, r"ids must lie in \[0, 7\)"),
        ({**x, "tags": x["tags"] - 1}, r"ids must lie in \[-1, 5\)"),
        ({**x, "dense": x["dense"][:, :2]}, "shape"),
        ({**x, "price": x["price"].astype(np.int32)}, "floating"),
        ({**x, "user": x["user"].astype(np.float32)}, "integer ids"),
        ({k: v for k, v in x.items() if k != "tags"}, "keys"),
        ({**x, "price": x["price"][:5]}, "rows"),
    ]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            check_feature_batch(FEATURES, value)


def test_sources_gather_dict_inputs():
    x, labels = tabular(10)
    ds = ArrayDataset({"x": x, **labels}, TASKS)
    assert len(ds) == 10 and "x/tags: (10, 4) int32" in repr(ds)
    idx = np.array([3, 0, 9])
    batch = ds.get_batch(idx)
    check_feature_batch(FEATURES, batch["x"])
    for k in x:
        np.testing.assert_array_equal(batch["x"][k], x[k][idx])
    one = ds[4]
    assert one["x"]["tags"].shape == (4,) and one["x"]["user"] == x["user"][4]
    records = RecordDataset([ds[i] for i in range(10)], TASKS, lambda r: r, num_threads=1)
    got = records.get_batch(idx)
    for k in x:
        np.testing.assert_array_equal(got["x"][k], batch["x"][k])
    np.testing.assert_array_equal(got["buy"], batch["buy"])
    with pytest.raises(ValueError, match="leading example axis"):
        ArrayDataset({"x": {**x, "price": x["price"][:9]}, **labels}, TASKS)


@pytest.mark.parametrize("single_transfer", [True, False])
def test_iterator_shards_every_feature_over_the_mesh(mesh8, single_transfer):
    x, labels = tabular(40)
    ds = ArrayDataset({"x": x, **labels}, TASKS)
    it = BatchIterator(ds, 16, seed=3, mesh=mesh8, drop_remainder=False)
    it._single_transfer = single_transfer  # False: the multi-process path (make_array_from_process_local_data)
    ref = BatchIterator(ds, 16, seed=3, prefetch=0, drop_remainder=False)
    sharding = NamedSharding(mesh8, P("data"))
    for _ in range(3):
        got, want = next(it), next(ref)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert isinstance(g, jax.Array) and g.sharding.is_equivalent_to(sharding, g.ndim)
            assert g.addressable_shards[0].data.shape == (2, *w.shape[1:]) and g.dtype == w.dtype
            np.testing.assert_array_equal(np.asarray(g), w)
    it.close()


def test_global_batch_and_noise_step_take_dict_inputs():
    from flax import nnx

    from corrjax.train.state import create_state, split_model
    from corrjax.train.step import make_noise_scale_step

    # The training codebase's mesh (Auto axis type, corrjax.train.sharding.make_mesh): GSPMD resolves the sharding
    # of the embedding gather, which an Explicit mesh (jax.make_mesh's default) asks the caller to spell out.
    mesh8 = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, labels = tabular(16)
    b = global_batch({"x": x, **labels}, batch_sharding(mesh8))
    assert b["x"]["dense"].sharding.is_equivalent_to(batch_sharding(mesh8), 2)
    np.testing.assert_array_equal(np.asarray(b["x"]["tags"]), x["tags"])

    class Tiny(nnx.Module):  # a linear model over the numeric features and one embedding
        def __init__(self):
            self.emb = nnx.Embed(7, 3, rngs=nnx.Rngs(0))
            self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

        def __call__(self, x):
            z = self.lin(self.emb(x["user"]) + x["dense"] + x["price"][:, None])
            return {"click": z[:, 0], "buy": z[:, 1]}

    graphdef, params, rest = split_model(Tiny())
    loss = lambda out, y: ((out - y) ** 2).mean()
    step = make_noise_scale_step(graphdef, TASKS, {"click": loss, "buy": loss})
    state = create_state(params, rest, optax.sgd(0.1), 0)
    _, metrics = jax.jit(step)(state, b)
    assert np.isfinite(float(metrics["train/grad_sq_norm"])) and float(metrics["train/grad_sq_norm"]) > 0
