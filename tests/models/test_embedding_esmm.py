"""EmbeddingInput / EmbeddedModel (tabular inputs) and ESMM: shapes, padding, gradients, the shared split."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from corrjax.data import FeatureSpec, TaskSpec
from corrjax.models import ESMM, MLP, EmbeddedModel, EmbeddingInput, MMoE, SeparateTowers, shared_mask
from corrjax.models.esmm import ctcvr_logit

FEATURES = (
    FeatureSpec("user", "categorical", 6),
    FeatureSpec("hist", "multi_hot", 5, max_len=3),
    FeatureSpec("price", "numeric"),
    FeatureSpec("dense", "numeric", dim=2),
)
X = {
    "user": np.array([1, 2, 5, 1], np.int32),
    "hist": np.array([[0, 1, -1], [-1, -1, -1], [4, 4, 2], [3, -1, -1]], np.int32),
    "price": np.array([0.5, -1.0, 2.0, 0.0], np.float32),
    "dense": np.arange(8, dtype=np.float32).reshape(4, 2),
}
ESMM_TASKS = (TaskSpec("click", "binary", 1), TaskSpec("purchase", "binary", 1))


def _tables(emb: EmbeddingInput) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.embedding[...]) for k, v in emb.tables.items()}


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_embedding_input_values_and_padding(pooling):
    emb = EmbeddingInput(FEATURES, {"user": 3, "hist": 4}, pooling=pooling, rngs=nnx.Rngs(0))
    assert emb.out_features == 3 + 4 + 1 + 2 and emb.widths == (3, 4, 1, 2)
    out = np.asarray(emb(X))
    assert out.shape == (4, emb.out_features) and out.dtype == np.float32
    t = _tables(emb)
    np.testing.assert_array_equal(out[:, :3], t["user"][X["user"]])
    for i, bag in enumerate(X["hist"]):
        ids = bag[bag >= 0]
        want = t["hist"][ids].sum(0) if ids.size else np.zeros(4, np.float32)
        if pooling == "mean" and ids.size:
            want = want / ids.size
        np.testing.assert_allclose(out[i, 3:7], want, rtol=1e-6)
    np.testing.assert_array_equal(out[1, 3:7], 0.0)  # an empty bag is zeros
    np.testing.assert_array_equal(out[:, 7], X["price"])
    np.testing.assert_array_equal(out[:, 8:], X["dense"])


def test_embedding_gradients_skip_padding():
    emb = EmbeddingInput(FEATURES, 4, pooling="mean", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(emb, nnx.Param)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p)(X).sum())(params)
    g_hist = np.asarray(grads["tables"]["hist"]["embedding"][...])
    # Mean pooling: each id of a bag of size k gets 1/k per output unit; padding (-1, looked up as row 0) nothing.
    want = np.zeros(5)
    for bag in X["hist"]:
        ids = bag[bag >= 0]
        for i in ids:
            want[i] += 1.0 / ids.size
    np.testing.assert_allclose(g_hist, np.repeat(want[:, None], 4, 1), rtol=1e-6)
    g_user = np.asarray(grads["tables"]["user"]["embedding"][...])
    np.testing.assert_array_equal(g_user[:, 0], np.bincount(X["user"], minlength=6))


def test_embedding_input_errors_and_row_axis():
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingInput(FEATURES, pooling="max", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown features"):
        EmbeddingInput(FEATURES, {"nope": 2}, rngs=nnx.Rngs(0))
    emb = EmbeddingInput(FEATURES, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lacks features"):
        emb({"user": X["user"]})
    with pytest.raises(TypeError, match="dict"):
        emb(np.zeros((4, 3)))
    specs = nnx.get_partition_spec(nnx.state(EmbeddingInput(FEATURES, 4, row_axis="model", rngs=nnx.Rngs(0))))
    assert specs["tables"]["user"]["embedding"].get_value() == P("model", None)


def test_embedded_model_shared_mask_and_outputs():
    emb = EmbeddingInput(FEATURES, 4, rngs=nnx.Rngs(0))
    tasks = (TaskSpec("a", "binary", 1), TaskSpec("b", "regression", 1))
    inner = MMoE(
        functools.partial(MLP, emb.out_features, (8,)),
        tasks,
        num_experts=3,
        gate_in_features=emb.out_features,
        tower_hidden=(4,),
        rngs=nnx.Rngs(1),
    )
    model = EmbeddedModel(emb, inner)
    out = model(X)
    assert set(out) == {"a", "b"} and out["a"].shape == (4,)
    z = model.features(X)
    np.testing.assert_allclose(np.asarray(model.from_features(z, X)["b"]), np.asarray(out["b"]), rtol=1e-6)
    mask = shared_mask(model)
    assert all(jax.tree.leaves(mask["input"]))
    assert not any(jax.tree.leaves(mask["inner"]["gates"])) and not any(jax.tree.leaves(mask["inner"]["heads"]))
    assert all(jax.tree.leaves(mask["inner"]["experts"]))
    gates = model.gate_weights(X)
    np.testing.assert_allclose(np.asarray(gates["a"]).sum(1), 1.0, rtol=1e-6)


def test_ctcvr_logit_matches_float64():
    a = np.array([-40.0, -8.0, -1.0, 0.0, 2.5, 9.0, 30.0, 80.0], np.float32)
    aa, bb = np.meshgrid(a, a)
    got = np.asarray(ctcvr_logit(jnp.asarray(aa), jnp.asarray(bb)))
    sig = lambda v: 1.0 / (1.0 + np.exp(-v.astype(np.float64)))
    p = sig(aa) * sig(bb)
    with np.errstate(divide="ignore"):
        want = np.log(p) - np.log1p(-p)
    assert np.all(np.isfinite(got))
    mid = np.abs(want) < 15  # where float64 itself is accurate and float32 has digits to spare
    np.testing.assert_allclose(got[mid], want[mid], rtol=2e-5, atol=2e-5)
    # Both large: p -> 1, the logit is about -log(exp(-a) + exp(-b)).
    np.testing.assert_allclose(got[-1, -1], 80.0 - np.log(2.0), rtol=1e-3)


@pytest.mark.parametrize("body", ["towers", "mmoe"])
def test_esmm_product_structure_and_split(body):
    emb = EmbeddingInput(FEATURES, 4, rngs=nnx.Rngs(0))
    d = emb.out_features
    factory = None
    if body == "mmoe":
        factory = functools.partial(
            MMoE, functools.partial(MLP, d, (8,)), num_experts=2, gate_in_features=d, tower_hidden=(4,)
        )
    model = EmbeddedModel(emb, ESMM(ESMM_TASKS, in_features=d, tower_hidden=(8,), body=factory, rngs=nnx.Rngs(1)))
    out = model(X)
    assert set(out) == {"click", "purchase", "cvr"} and model.reported_outputs == ("cvr",)
    sig = jax.nn.sigmoid
    np.testing.assert_allclose(sig(out["purchase"]), sig(out["click"]) * sig(out["cvr"]), rtol=1e-5)
    # The CVR network is reached by the CTCVR loss alone (task-specific); the CTR network by both (shared).
    mask = shared_mask(model)["inner"]["body"]
    if body == "towers":
        assert not any(jax.tree.leaves(mask["heads"]["cvr"])) and all(jax.tree.leaves(mask["heads"]["ctr"]))
    else:  # MMoE's stacked heads hold the CTR and CVR towers in the same leaves, which both losses reach: shared
        assert all(jax.tree.leaves(mask["heads"]))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    y = {"click": jnp.array([1.0, 0, 1, 0]), "purchase": jnp.array([1.0, 0, 0, 0])}

    def losses(p):
        o = nnx.merge(graphdef, p, rest)(X)
        bce = lambda z, t: jnp.mean(jnp.logaddexp(0.0, z) - t * z)
        return jnp.stack([bce(o["click"], y["click"]), bce(o["purchase"], y["purchase"])])

    jac = jax.jacrev(losses)(params)
    heads = jac["inner"]["body"]["heads"]
    if body == "towers":
        cvr, ctr_out = jax.tree.leaves(heads["cvr"]), jax.tree.leaves(heads["ctr"]["out"])
    else:  # stacked: leaves (loss, head, ...) with the heads in BODY_TASKS order (ctr, cvr)
        stack = heads["groups"]["out_scalar"]["stack"]
        cvr = [g[:, 1] for g in jax.tree.leaves(stack)]
        ctr_out = [g[:, 0] for g in jax.tree.leaves(stack["out"])]
    assert all(np.all(np.asarray(g[0]) == 0) for g in cvr)  # no CTR-loss gradient
    assert all(np.any(np.asarray(g[1]) != 0) for g in ctr_out)  # CTCVR reaches CTR


def test_esmm_checks_tasks():
    with pytest.raises(ValueError, match="exactly the tasks"):
        ESMM((TaskSpec("click", "binary", 1),), in_features=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="binary"):
        ESMM((TaskSpec("click", "binary", 1), TaskSpec("purchase", "regression", 1)), in_features=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        ESMM(ESMM_TASKS, rngs=nnx.Rngs(0))
    towers = SeparateTowers(ESMM_TASKS, in_features=3, tower_hidden=(2,), rngs=nnx.Rngs(0))
    assert not any(jax.tree.leaves(shared_mask(towers)))
