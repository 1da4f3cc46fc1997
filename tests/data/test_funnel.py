"""The synthetic purchase funnel: determinism, the label structure, and agreement with its ground truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from corrjax.data import check_feature_batch, funnel, load

SMALL = {"num_users": 300, "num_items": 200}


def _arrays(ds):
    return {"x": ds.arrays["x"], **{t.name: ds.arrays[t.name] for t in ds.tasks}}


def test_deterministic_by_seed_and_splits_share_the_world():
    a, b = funnel("train", num_examples=3000, seed=3, **SMALL), funnel("train", num_examples=3000, seed=3, **SMALL)
    for k, v in _arrays(a).items():
        if k == "x":
            for f, arr in v.items():
                np.testing.assert_array_equal(arr, b.arrays["x"][f])
        else:
            np.testing.assert_array_equal(v, b.arrays[k])
    np.testing.assert_array_equal(a.true_cvr, b.true_cvr)
    c = funnel("train", num_examples=3000, seed=4, **SMALL)
    assert not np.array_equal(a.arrays["x"]["item_id"], c.arrays["x"]["item_id"])
    test = funnel("test", num_examples=3000, seed=3, **SMALL)
    assert not np.array_equal(a.arrays["x"]["user_id"], test.arrays["x"]["user_id"])
    # One world: an item's category and price, a user's segment and history are the same in every split.
    for split in (a, test):
        x = split.arrays["x"]
        cat = np.full(200, -1)
        cat[x["item_id"]] = x["category"]
        seg = np.full(300, -1)
        seg[x["user_id"]] = x["segment"]
        split.maps = (cat, seg)
    for m_train, m_test in zip(a.maps, test.maps, strict=True):
        both = (m_train >= 0) & (m_test >= 0)
        assert both.sum() > 50
        np.testing.assert_array_equal(m_train[both], m_test[both])


def test_labels_features_and_ground_truth():
    ds = funnel("train", num_examples=60_000, seed=0)
    assert [t.name for t in ds.tasks] == ["click", "cart", "purchase", "cvr"]
    check_feature_batch(ds.features, ds.arrays["x"])
    assert len(ds) == 60_000 and ds[0]["x"]["history"].shape == (5,)
    click, cart, purchase, cvr = (ds.arrays[k] for k in ("click", "cart", "purchase", "cvr"))
    assert np.all(cart <= click) and np.all(purchase <= cart)
    np.testing.assert_array_equal(cvr, np.where(click > 0, purchase, -1.0))
    np.testing.assert_array_equal(purchase > 0, (click > 0) & ds.would_purchase)
    np.testing.assert_allclose(ds.true_ctcvr, ds.true_ctr * ds.true_cvr)

    # The labels are Bernoulli draws of the ground truth: empirical rates agree within 4 standard errors, overall
    # and in deciles of the true probability.
    def agrees(labels, probs):
        se = np.sqrt(np.sum(probs * (1 - probs))) / probs.size
        assert abs(labels.mean() - probs.mean()) < 4 * se + 1e-12, (labels.mean(), probs.mean(), se)

    clicked = click > 0
    agrees(click, ds.true_ctr)
    agrees(ds.would_purchase.astype(float), ds.true_cvr)
    agrees(purchase[clicked], ds.true_cvr[clicked])
    agrees(purchase, ds.true_ctcvr)
    edges = np.quantile(ds.true_cvr, np.linspace(0, 1, 11))
    for lo, hi in itertools.pairwise(edges):
        sel = (ds.true_cvr >= lo) & (ds.true_cvr <= hi)
        agrees(ds.would_purchase[sel].astype(float), ds.true_cvr[sel])
    # Selection bias: with correlated utilities the clicked impressions convert more than the whole space does.
    assert ds.info["selection_bias"] == pytest.approx(ds.true_cvr[clicked].mean() - ds.true_cvr.mean())
    assert ds.info["selection_bias"] > 0.1


def test_correlation_controls_the_selection_bias():
    bias = {
        rho: funnel("train", num_examples=20_000, correlation=rho, seed=1, **SMALL).info["selection_bias"]
        for rho in (-0.8, 0.0, 0.8)
    }
    assert bias[-0.8] < -0.05 and abs(bias[0.0]) < 0.03 and bias[0.8] > 0.05, bias
    ds = funnel("val", num_examples=20_000, correlation=0.8, seed=1, **SMALL)
    assert ds.info["logit_correlation"] == pytest.approx(0.8, abs=0.15)


def test_registry_and_bad_arguments():
    assert len(load("funnel", "val", num_examples=10, **SMALL)) == 10
    with pytest.raises(ValueError, match="split"):
        funnel("dev")
    with pytest.raises(ValueError, match="correlation"):
        funnel(num_examples=10, correlation=1.5)
    with pytest.raises(ValueError, match="num_users"):
        funnel(num_examples=10, num_users=0)
    with pytest.raises(ValueError, match="seed"):
        funnel(num_examples=10, seed=-1)
