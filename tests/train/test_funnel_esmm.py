"""ESMM on the funnel: missing binary labels, the selection-bias check, a tiny experiment=funnel_esmm run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from corrjax.data import TaskSpec, funnel
from corrjax.models import ESMM, EmbeddedModel, EmbeddingInput, SeparateTowers
from corrjax.train import loop, setup, tasks

BIN = TaskSpec("cvr", "binary", 1)


def test_binary_labels_below_zero_are_missing():
    out = jnp.array([0.3, -1.2, 2.0, 0.7, -0.4])
    y = jnp.array([1.0, -1.0, 0.0, -1.0, 1.0])
    labelled = np.array([0, 2, 4])
    bce = np.asarray(optax.sigmoid_binary_cross_entropy(out, jnp.maximum(y, 0)))
    loss = tasks.task_loss_fns([BIN])["cvr"](out, y)
    np.testing.assert_allclose(loss, bce[labelled].mean(), rtol=1e-6)
    m = tasks.task_metrics(BIN, out, y, jnp.array([True, True, True, True, False]))
    np.testing.assert_allclose(m["loss"], bce[[0, 2]].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], 0.5)  # example 0 right, example 2 wrong; 4 masked, 1 and 3 missing
    assert float(tasks.task_loss_fns([BIN])["cvr"](out, -jnp.ones(5))) == 0.0  # no label in the batch: zero loss


def test_esmm_removes_the_selection_bias_of_a_clicks_only_cvr_model():
    """A CVR model trained on clicked impressions overestimates the conversion rate of the (mostly unclicked)
    impression space, where clicks are sparse and the click and conversion utilities correlated; ESMM, trained on
    the CTR and CTCVR labels of every impression, is close to the ground truth on average and ranks it better."""
    train, test = funnel("train", seed=0), funnel("test", num_examples=20_000, seed=0)
    click_task, purchase_task = TaskSpec("click", "binary", 1), TaskSpec("purchase", "binary", 1)
    rngs = nnx.Rngs(0)
    naive = EmbeddedModel(
        emb := EmbeddingInput(train.features, 8, rngs=rngs),
        SeparateTowers((BIN,), in_features=emb.out_features, tower_hidden=(32,), rngs=rngs),
    )
    esmm = EmbeddedModel(
        emb := EmbeddingInput(train.features, 8, rngs=rngs),
        ESMM((click_task, purchase_task), in_features=emb.out_features, tower_hidden=(32,), rngs=rngs),
    )
    loss_fns = tasks.task_loss_fns([click_task, purchase_task, BIN])
    runs = {"naive": (naive, ["cvr"]), "esmm": (esmm, ["click", "purchase"])}
    split = {k: nnx.split(m, nnx.Param, ...) for k, (m, _) in runs.items()}
    data = jax.tree.map(jnp.asarray, train.arrays)
    tx = optax.adam(5e-3)

    @jax.jit
    def fit(params, key):
        def step(carry, k):
            ps, opts = carry
            batch = jax.tree.map(lambda a: a[jax.random.randint(k, (512,), 0, len(train))], data)
            new_ps, new_opts = {}, {}
            for name, (_, names) in runs.items():
                graphdef, _, rest = split[name]

                def loss(p, graphdef=graphdef, rest=rest, names=names):
                    out = nnx.merge(graphdef, p, rest)(batch["x"])
                    return sum(loss_fns[n](out[n], batch[n]) for n in names)

                updates, new_opts[name] = tx.update(jax.grad(loss)(ps[name]), opts[name], ps[name])
                new_ps[name] = optax.apply_updates(ps[name], updates)
            return (new_ps, new_opts), None

        opts = {k: tx.init(p) for k, p in params.items()}
        return jax.lax.scan(step, (params, opts), jax.random.split(key, 600))[0][0]

    params = fit({k: v[1] for k, v in split.items()}, jax.random.key(0))
    clicked = test.arrays["click"] > 0
    stats = {}
    for name in runs:
        graphdef, _, rest = split[name]
        p_cvr = np.asarray(jax.nn.sigmoid(nnx.merge(graphdef, params[name], rest)(test.arrays["x"])["cvr"]))
        err = p_cvr - test.true_cvr
        stats[name] = (err.mean(), err[~clicked].mean(), np.corrcoef(p_cvr, test.true_cvr)[0, 1])
    (naive_bias, naive_unclicked, naive_corr), (esmm_bias, esmm_unclicked, esmm_corr) = stats["naive"], stats["esmm"]
    # Measured (seed 0, 600 steps): naive +0.10 / +0.11 on unclicked, r = 0.54; ESMM +0.03 / +0.03, r = 0.66.
    assert naive_bias > 0.06 and naive_unclicked > 0.07, stats
    assert abs(esmm_bias) < 0.5 * naive_bias and abs(esmm_unclicked) < 0.5 * naive_unclicked, stats
    assert esmm_corr > naive_corr + 0.05, stats


def test_tiny_funnel_esmm_run(compose_fn, tmp_path):
    over = [
        "experiment=funnel_esmm",
        "data.num_examples=512",
        "data.num_users=50",
        "data.num_items=40",
        "trainer.max_steps=4",
        "trainer.batch_size=64",
        "trainer.eval_batch_size=256",
        "trainer.eval_every=2",
        "trainer.log_every=2",
        "trainer.checkpoint_every=0",
        "trainer.async_checkpointing=false",
    ]
    summary = loop.run(compose_fn(over), run_dir=tmp_path)
    assert summary["tasks"] == ["click", "purchase"] and summary["completed"]
    for key in ("eval/click/loss", "eval/purchase/loss", "eval/cvr/loss", "eval/cvr/accuracy"):
        assert np.isfinite(summary[key]), key
    # The reported CVR output is evaluated, never part of the summed eval loss.
    np.testing.assert_allclose(
        summary["eval/loss"], summary["eval/click/loss"] + summary["eval/purchase/loss"], rtol=1e-6
    )
    # Any model gets the embedding front on the tabular set, and a naive CVR model trains on the masked cvr labels.
    built = setup.build(compose_fn([*over, "model=mmoe", "tasks=[click,cvr]", "model.embed_dim=4"]))
    assert built.model_name == "EmbeddedModel" and built.names == ["click", "cvr"] and built.reported_tasks == ()


def test_experiment_script_scores_against_the_ground_truth(tmp_path):
    import importlib.util
    from pathlib import Path

    from sklearn.metrics import roc_auc_score

    path = Path(__file__).resolve().parents[2] / "scripts" / "run_experiment_funnel.py"
    spec = importlib.util.spec_from_file_location("_run_experiment_funnel", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = funnel("test", num_examples=4000, num_users=100, num_items=80, seed=2)
    logit = lambda p: np.log(p) - np.log1p(-p)
    out = {"click": logit(data.true_ctr), "cvr": logit(data.true_cvr)}
    auc = lambda s, y: roc_auc_score(np.asarray(y) > 0.5, s)
    m = script.score_run(out, data, auc, lambda s, y, g, k: 0.5)
    assert m["cvr_bias"] == pytest.approx(0.0, abs=1e-9) and m["cvr_rmse"] == pytest.approx(0.0, abs=1e-9)
    assert m["ctcvr_auc"] == pytest.approx(auc(data.true_ctcvr, data.arrays["purchase"]))
    assert m["cvr_auc_all"] == pytest.approx(auc(data.true_cvr, data.would_purchase))
    clicked = data.arrays["click"] > 0
    assert m["cvr_auc"] == pytest.approx(auc(data.true_cvr[clicked], data.arrays["purchase"][clicked]))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- funnel:models:start -->\nold\n<!-- funnel:models:end -->\nb\n")
    script.write_section(readme, "models", "| new |")
    assert readme.read_text() == "a\n<!-- funnel:models:start -->\n| new |\n<!-- funnel:models:end -->\nb\n"
