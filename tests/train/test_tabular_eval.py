"""Evaluation of a tabular dataset with a user feature: dict inputs through the eval loop, AUC and GAUC per binary
task against scikit-learn (per-user roc_auc_score weighted by impressions)."""

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from corrjax.data import FeatureSpec, TabularDataset, TaskSpec
from corrjax.train import evaluate, sharding

TASKS = (TaskSpec("click", "binary", 1), TaskSpec("buy", "binary", 1))
FEATURES = (FeatureSpec("user", "categorical", vocab_size=6), FeatureSpec("price", "numeric"))


def _gauc(y, s, users):
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if len(np.unique(y[m])) == 2:
            num, den = num + m.sum() * roc_auc_score(y[m], s[m]), den + m.sum()
    return num / den


def test_evaluate_reports_auc_and_gauc_with_a_user_feature():
    rng = np.random.default_rng(0)
    n = 37  # batches of 16: the last holds 5 examples and 11 padded rows
    # scores exact in float32 (quarters), so ties are the same in the jitted step and in NumPy
    x = {"user": rng.integers(0, 6, n).astype(np.int32), "price": (rng.integers(-8, 8, n) / 4).astype(np.float32)}
    lab = {t.name: rng.integers(0, 2, n).astype(np.float32) for t in TASKS}
    data = TabularDataset({"x": x, **lab}, TASKS, FEATURES, user_feature="user")
    w = {"click": np.float32(1.5), "buy": np.float32(-0.5)}
    eval_step = jax.jit(lambda st, b: {k: b["x"]["price"] * v + 0.25 * b["x"]["user"] for k, v in st.items()})
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    got = evaluate.evaluate(eval_step, w, data, TASKS, sharding.batch_sharding(mesh), 16)
    for t in TASKS:
        s = x["price"] * w[t.name] + np.float32(0.25) * x["user"]
        np.testing.assert_allclose(got[f"eval/{t.name}/auc"], roc_auc_score(lab[t.name], s), rtol=1e-6)
        np.testing.assert_allclose(got[f"eval/{t.name}/gauc"], _gauc(lab[t.name], s, x["user"]), rtol=1e-6)
    with pytest.raises(ValueError, match="user_feature"):
        TabularDataset({"x": x, **lab}, TASKS, FEATURES, user_feature="price")
    data.user_feature = "price"
    with pytest.raises(ValueError, match="user_feature"):
        evaluate.user_groups(data)
    data.user_feature = None
    assert evaluate.user_groups(data) is None


def test_results_table_shows_auc_and_gauc():
    from corrjax.train.report import results_table

    summary = {"step": 3, "eval/loss": 1.0, **{f"eval/click/{m}": 0.5 for m in ("loss", "accuracy", "auc", "gauc")}}
    table = results_table(summary, TASKS[:1])
    assert [c.header for c in table.columns] == ["task", "loss", "accuracy", "auc", "gauc"]
