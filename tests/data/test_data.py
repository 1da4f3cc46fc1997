"""Built-in datasets: the synthetic generator's correlations and reproducibility; multidigits labels and splits."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from corrjax.data import ArrayDataset, TaskSpec, multidigits, synthetic
from corrjax.data.multidigits import CANVAS, MAX_SHIFT
from corrjax.data.synthetic import correlation_matrix, make_problem, psd_cholesky, sample


@st.composite
def correlations(draw):
    t = draw(st.integers(1, 4))
    # A random correlation matrix: normalised Gram matrix of t vectors in a space of rank k (possibly singular).
    k = draw(st.integers(1, t))
    a = np.asarray(draw(st.lists(st.floats(-2, 2), min_size=t * k, max_size=t * k))).reshape(t, k)
    a[np.linalg.norm(a, axis=1) < 1e-3] = 1.0
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    r = np.clip(a @ a.T, -1, 1)
    np.fill_diagonal(r, 1.0)
    return r


@settings(max_examples=15)
@given(r=correlations(), d=st.just(7), seed=st.integers(0, 2**16))
def test_task_weights_have_target_correlation(r, d, seed):
    t = r.shape[0]
    lower = psd_cholesky(r)
    np.testing.assert_allclose(lower @ lower.T, r, atol=1e-9)
    problem = make_problem(jax.random.key(seed), r, num_tasks=t, num_features=d, scale=0.3)
    w = np.asarray(problem.weights, np.float64)
    assert w.shape == (t, d)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 0.3, rtol=1e-5)
    cos = (w @ w.T) / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
    np.testing.assert_allclose(cos, r, atol=1e-5)


def test_two_task_case_is_the_papers_construction():
    """T=2: w1 = c u1 and w2 = c (p u1 + sqrt(1-p^2) u2), with u1 ⟂ u2 unit vectors."""
    p = 0.3
    w = np.asarray(make_problem(jax.random.key(0), p, num_tasks=2, num_features=100).weights, np.float64)
    u1 = w[0] / 0.3
    u2 = (w[1] / 0.3 - p * u1) / np.sqrt(1 - p**2)
    np.testing.assert_allclose([u1 @ u1, u2 @ u2, u1 @ u2], [1, 1, 0], atol=1e-5)


def test_label_correlation_monotone_in_p():
    """As the paper reports: label correlation grows with p, ~0 at p=0, below p in between; without noise it is 1
    at p=1 (the two tasks coincide), with noise it is var(signal) / (var(signal) + noise^2)."""
    corr = []
    for p in (0.0, 0.5, 0.9, 1.0):
        ds = synthetic(num_examples=20000, correlation=p, seed=1)
        corr.append(ds.info["label_correlation"][0, 1])
        np.testing.assert_allclose(corr[-1], np.corrcoef(ds.arrays["task0"], ds.arrays["task1"])[0, 1], rtol=1e-6)
    assert abs(corr[0]) < 0.05
    assert corr[0] < corr[1] < corr[2] < corr[3]
    assert corr[1] < 0.5 + 0.05
    clean = synthetic(num_examples=20000, correlation=1.0, noise_std=0.0, seed=1)
    np.testing.assert_allclose(clean.info["label_correlation"][0, 1], 1.0, atol=1e-6)
    signal_var = clean.arrays["task0"].astype(np.float64).var()
    np.testing.assert_allclose(corr[3], signal_var / (signal_var + 0.1**2), atol=0.02)


def test_synthetic_sample_matches_formula_and_is_reproducible():
    problem = make_problem(jax.random.key(3), 0.5, num_tasks=2, num_features=10, num_sin=5)
    x, y = sample(problem, jax.random.key(4), 64, noise_std=0.0)
    w, a, b = (np.asarray(v, np.float64) for v in problem)
    lin = np.asarray(x, np.float64) @ w.T
    ref = lin + np.sin(lin[..., None] * a + b).sum(-1)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
    _, yv = jax.vmap(lambda k: sample(problem, k, 64, 0.0))(jax.random.split(jax.random.key(4), 2))
    assert yv.shape == (2, 64, 2) and not np.array_equal(np.asarray(yv[0]), np.asarray(yv[1]))
    a1, a2 = synthetic("val", num_examples=50, seed=7), synthetic("val", num_examples=50, seed=7)
    for k in a1.arrays:
        np.testing.assert_array_equal(a1.arrays[k], a2.arrays[k])
    tr = synthetic("train", num_examples=50, seed=7)
    assert not np.array_equal(tr.arrays["x"], a1.arrays["x"])  # splits draw different examples...
    np.testing.assert_array_equal(tr.info["problem"].weights, a1.info["problem"].weights)  # ...of one problem
    assert tr.arrays["x"].dtype == np.float32 and tr.arrays["x"].shape == (50, 100)
    assert [t.name for t in tr.tasks] == ["task0", "task1"] and tr.tasks[0].kind == "regression"


def test_synthetic_bad_input():
    with pytest.raises(ValueError, match="correlation"):
        correlation_matrix([[1, 0.5], [0.4, 1]], 2)
    with pytest.raises(ValueError, match="semi-definite"):
        correlation_matrix(-0.9, 3)
    with pytest.raises(ValueError, match="shape"):
        correlation_matrix(np.eye(3), 2)
    with pytest.raises(ValueError, match="split"):
        synthetic("dev")
    with pytest.raises(ValueError, match="num_features"):
        make_problem(jax.random.key(0), 0.1, num_tasks=5, num_features=3)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target


def test_multidigits_labels_images_and_disjoint_splits(digits):
    images, target = digits
    extra = ("sum", "same")
    splits = {s: multidigits(s, num_examples=300, seed=5, extra_tasks=extra) for s in ("train", "val", "test")}
    pools = {}
    for s, ds in splits.items():
        src, off = ds.info["source_index"], ds.info["offsets"]
        np.testing.assert_array_equal(ds.arrays["left"], target[src[:, 0]])
        np.testing.assert_array_equal(ds.arrays["right"], target[src[:, 1]])
        np.testing.assert_array_equal(ds.arrays["sum"], target[src[:, 0]] + target[src[:, 1]])
        np.testing.assert_array_equal(ds.arrays["same"], (target[src[:, 0]] == target[src[:, 1]]).astype(np.float32))
        assert ds.arrays["x"].shape == (300, CANVAS, CANVAS, 1) and ds.arrays["x"].dtype == np.float32
        assert off.min() >= 0 and off.max() <= MAX_SHIFT
        for i in range(0, 300, 37):  # brute-force overlay of the two source digits
            ref = np.zeros((CANVAS, CANVAS), np.float32)
            rl, cl, rr, cr = off[i]
            ref[rl : rl + 8, cl : cl + 8] = images[src[i, 0]]
            r0, c0 = CANVAS - 8 - rr, CANVAS - 8 - cr
            ref[r0 : r0 + 8, c0 : c0 + 8] = np.maximum(ref[r0 : r0 + 8, c0 : c0 + 8], images[src[i, 1]])
            np.testing.assert_array_equal(ds.arrays["x"][i, ..., 0], ref)
        pools[s] = set(ds.info["pool"].tolist())
        assert set(src.ravel().tolist()) <= pools[s]
    assert not (pools["train"] & pools["val"]) and not (pools["train"] & pools["test"])
    assert not (pools["val"] & pools["test"])
    assert len(pools["train"] | pools["val"] | pools["test"]) == len(target)
    again = multidigits("val", num_examples=300, seed=5, extra_tasks=("sum", "same"))
    np.testing.assert_array_equal(again.arrays["x"], splits["val"].arrays["x"])
    assert not np.array_equal(multidigits("val", num_examples=300, seed=6).arrays["x"], again.arrays["x"])
    assert [t.name for t in again.tasks] == ["left", "right", "sum", "same"]


def test_array_dataset_protocol_and_errors():
    ds = ArrayDataset({"x": np.arange(12.0).reshape(6, 2), "y": np.arange(6)}, [TaskSpec("y", "classification", 6)])
    assert len(ds) == 6 and ds[2]["y"] == 2
    np.testing.assert_array_equal(ds.get_batch(np.array([5, 0]))["x"], [[10, 11], [0, 1]])
    with pytest.raises(ValueError, match="lacks labels"):
        ArrayDataset({"x": np.zeros((2, 1))}, [TaskSpec("y", "regression", 1)])
    with pytest.raises(ValueError, match="leading example axis"):
        ArrayDataset({"x": np.zeros((2, 1)), "y": np.zeros(3)}, [TaskSpec("y", "regression", 1)])
    with pytest.raises(ValueError, match="1-D integer"):
        ds.get_batch(np.array([[1]]))
    with pytest.raises(ValueError, match="split"):
        multidigits("dev")
    with pytest.raises(ValueError, match="extra_tasks"):
        multidigits("train", extra_tasks=("product",))


def test_load_by_name():
    from corrjax.data import DATASETS, load

    ds = load("synthetic", "test", num_examples=10, num_tasks=3, correlation=0.2)
    assert len(ds) == 10 and len(ds.tasks) == 3
    assert set(DATASETS) == {
        "synthetic",
        "multidigits",
        "multimnist",
        "celeba",
        "cifar10",
        "census_income",
        "ali_ccp",
        "funnel",
    }
    with pytest.raises(ValueError, match="mnist"):
        load("mnist")


@pytest.mark.parametrize("make", [multidigits, synthetic])
def test_bad_seeds_name_the_argument(make):
    for seed in (-1, 2**31, 0.5):
        with pytest.raises(ValueError, match=r"`seed`.*\[0, 2\*\*31\)"):
            make("train", num_examples=4, seed=seed)
