"""Every public function of corrjax.stats, corrjax.optim and corrjax.mtl under bfloat16 inputs.

Each case runs once on bfloat16 data and once on the same values in float32 (the bfloat16 data upcast, so both see
identical inputs) and compares: a function that accumulates in float32 (the convention, DESIGN.md) differs from the
float32 run by the final rounding to bfloat16 only (relative 2^-8), while one that sums ``n = 512`` observations in
bfloat16 misses by far more (the data have a mean 8 times their spread, which also catches one-pass moments). Results
are floating arrays of the input's dtype or float32 (statistics and p-values); solvers fed a bfloat16 Gramian solve in
float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import corrjax.mtl as mtl
import corrjax.optim as co
import corrjax.stats as cs

N, D, T = 512, 4, 3
BF16 = jnp.bfloat16


@functools.cache
def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, D))
    x = 8.0 + z @ np.linalg.cholesky(0.5 * np.eye(D) + 0.5).T  # correlated columns, mean 8 x spread
    y = 0.6 * x[:, :2] + 0.8 * rng.normal(size=(N, 2)) - 3.0
    nanx = x.copy()
    nanx[rng.random(x.shape) < 0.1] = np.nan
    grads = {"w": rng.normal(size=(T, 6, 5)), "b": rng.normal(size=(T, 5)) + 0.3}
    return {
        "x": x,
        "y": y,
        "x1": x[:, 0],
        "y1": y[:, 0],
        "nanx": nanx,
        "losses": np.abs(rng.normal(size=T)) + 0.5,
        **{f"g_{k}": v for k, v in grads.items()},
    }


def _inputs(dtype) -> dict:
    """The data rounded to bfloat16, in ``dtype``."""
    return {k: jnp.asarray(jnp.asarray(v, BF16), dtype) for k, v in _data().items()}


def _grads(d) -> dict:
    return {"w": d["g_w"], "b": d["g_b"]}


def _auc_args(d):
    labels = d["y1"] > 1.8
    groups = jnp.arange(N) % 8
    return d["x1"], labels, groups


def _auc_stream(d):
    scores, labels, groups = _auc_args(d)
    half = N // 2
    a = cs.auc_update(cs.auc_init(N), scores[:half], labels[:half], groups=groups[:half])
    b = cs.auc_update(cs.auc_init(N), scores[half:], labels[half:], groups=groups[half:])
    merged = cs.auc_merge(a, b)
    return cs.auc_result(merged), cs.gauc_result(merged, 8)


def _auc_histogram(d):
    scores, labels, _ = _auc_args(d)
    h = cs.auc_histogram_update(cs.auc_histogram_init(256, 4.0, 12.0), scores, labels)
    return cs.auc_histogram_result(cs.auc_histogram_merge(h, cs.auc_histogram_init(256, 4.0, 12.0)))[0]


def _gramian(d):
    return mtl.task_gramian(_grads(d)).astype(d["x"].dtype)


def _run_tx(tx, d, steps=3, **extra):
    """``steps`` updates of ``tx`` on the task-stacked (or, without a task axis, plain) gradients of ``d``."""
    g = _grads(d)
    params = jax.tree.map(lambda v: v[0], g)
    state = tx.init(params)
    out = None
    for _ in range(steps):
        out, state = tx.update(g, state, params, **extra)
    return out


def _run_plain_tx(tx, d, steps=3, **extra):
    g = jax.tree.map(lambda v: v[0], _grads(d))
    state = tx.init(g)
    out = None
    for _ in range(steps):
        out, state = tx.update(g, state, g, **extra)
    return out


def _cov_stream(d):
    s = cs.cov_init(D, 2, dtype=d["x"].dtype)
    a = cs.cov_update(s, d["x"][:200], d["y"][:200])
    b = cs.cov_update(s, d["x"][200:], d["y"][200:])
    m = cs.cov_merge(a, b)
    red = jax.vmap(lambda st: cs.cov_allreduce(st, "i"), axis_name="i")(jax.tree.map(lambda v: v[None], m))
    return cs.cov_finalize(m), cs.corr_finalize(m), cs.cov_finalize(jax.tree.map(lambda v: v[0], red))


def _cka_stream(d):
    s = cs.cka_init(1, 1, dtype=d["x"].dtype)
    a = cs.cka_update(s, [d["x"][:256]], [d["y"][:256]])
    b = cs.cka_update(s, [d["x"][256:]], [d["y"][256:]])
    return cs.cka_finalize(cs.cka_merge(a, b)), cs.cka_matrix([([d["x"][:256]], [d["y"][:256]])])


def _per_example(d):
    def loss(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    params = {"w": d["g_w"][0, :D, :2], "b": d["g_b"][0, :2]}
    mean, ssd, n = co.per_example_moments(loss, params, d["x"][:64] - 8.0, d["y"][:64, :2], microbatch_size=16)
    return mean, ssd, co.noise_terms_from_moments(mean, ssd, n), co.fast_path_mask(loss, params, d["x"][:4], d["y"][:4])


def _task_grad(d):
    def losses(p, x):
        h = jnp.tanh(x @ p["w"][:D])
        return jnp.stack([jnp.mean((h @ p["b"][:, None]) ** 2), jnp.mean(h**2), jnp.mean(h)])

    p = {"w": d["g_w"][0], "b": d["g_b"][0]}
    vals, grads = mtl.value_and_task_grad(losses, shared={"w": True, "b": True})(p, d["x"][:64] - 8.0)
    return vals, grads


def _rep_grad(d):
    def trunk(p, x):
        return jnp.tanh(x @ p)

    def heads(hp, z, x):
        return jnp.stack([jnp.mean((z @ hp) ** 2), jnp.mean(z)])

    value, rg = mtl.value_and_rep_grad(trunk, heads)(d["g_w"][0, :D], d["g_b"][0], d["x"][:64] - 8.0)
    return value, rg.rep, rg.heads, rg.pullback(rg.rep.mean(0))


def _tag(d):
    def loss(p, x):
        return jnp.stack([jnp.mean((x @ p["w"][:D]) ** 2), jnp.mean(x @ p["w"][:D])])

    p = {"w": d["g_w"][0]}
    g = {"w": d["g_w"][:2]}
    return mtl.tag_affinity(loss, p, g, d["x"][:32] - 8.0, learning_rate=0.01)


def _weighted_losses(tx_fn):
    return lambda d: _run_tx(tx_fn(), d, task_losses=d["losses"])


STATS: dict[str, Callable] = {
    "cov": lambda d: cs.cov(d["x"]),
    "cov_xy_weighted": lambda d: cs.cov(d["x"], d["y"], aweights=jnp.abs(d["x1"] - 8.0) + 0.5),
    "corrcoef": lambda d: cs.corrcoef(d["x"]),
    "corrcoef_xy": lambda d: cs.corrcoef(d["x"], d["y"]),
    "pearsonr": lambda d: tuple(cs.pearsonr(d["x1"], d["y1"])[:2]),
    "concordance": lambda d: cs.concordance(d["x1"], d["y1"]),
    "partial_corr": lambda d: cs.partial_corr(d["x"]),
    "partial_corr_test": lambda d: tuple(cs.partial_corr_test(d["x"])[:2]),
    "nancov": lambda d: cs.nancov(d["nanx"]),
    "nancorrcoef": lambda d: cs.nancorrcoef(d["nanx"]),
    "nancorrcoef_spearman": lambda d: cs.nancorrcoef(d["nanx"], method="spearman"),
    "spearmanr": lambda d: tuple(cs.spearmanr(d["x"], d["y"])[:2]),
    "kendalltau": lambda d: tuple(cs.kendalltau(d["x1"], d["y1"])[:2]),
    "weightedtau": lambda d: cs.weightedtau(d["x1"], d["y1"])[0],
    "rankdata": lambda d: cs.rankdata(d["x"]),
    "ledoit_wolf": lambda d: tuple(cs.ledoit_wolf(d["x"])),
    "oas": lambda d: tuple(cs.oas(d["x"])),
    "shrunk_covariance": lambda d: tuple(cs.shrunk_covariance(d["x"])),
    "fisher_z_ci": lambda d: tuple(cs.fisher_z_ci(cs.pearsonr(d["x1"], d["y1"])[0], N)),
    "linear_cka": lambda d: cs.linear_cka(d["x"], d["y"]),
    "rbf_cka": lambda d: cs.rbf_cka(d["x"][:128], d["y"][:128]),
    "cka_stream": _cka_stream,
    "cov_stream": _cov_stream,
    "soft_rank": lambda d: cs.soft_rank(d["x1"][:64], regularization_strength=0.1),
    "soft_sort": lambda d: cs.soft_sort(d["x1"][:64], regularization_strength=0.1),
    "pearson_loss": lambda d: cs.pearson_loss(d["x1"], d["y1"]),
    "concordance_loss": lambda d: cs.concordance_loss(d["x1"], d["y1"]),
    "spearman_loss": lambda d: cs.spearman_loss(d["x1"][:128], d["y1"][:128], regularization_strength=0.1),
    "barlow_twins_loss": lambda d: cs.barlow_twins_loss(d["x"][:, :2], d["y"]),
    "vicreg_loss": lambda d: cs.vicreg_loss(d["x"][:, :2], d["y"]),
    "decov_loss": lambda d: cs.decov_loss(d["x"]),
    "roc_auc": lambda d: cs.roc_auc(*_auc_args(d)[:2]),
    "grouped_roc_auc": lambda d: cs.grouped_roc_auc(*_auc_args(d), 8).auc,
    "gauc": lambda d: cs.gauc(*_auc_args(d), 8),
    "auc_stream": _auc_stream,
    "noise_scale_ema": lambda d: tuple(
        co.noise_scale_ema(
            co.GradientNoiseScaleState(*(jnp.zeros((), t) for t in (jnp.int32, jnp.float32, jnp.float32, jnp.float32))),
            jnp.sum(d["x1"].astype(jnp.float32) ** 2),
            jnp.sum(d["y1"].astype(jnp.float32) ** 2),
        )[1:]
    ),
    "auc_histogram": _auc_histogram,
}

OPTIM: dict[str, Callable] = {
    "per_example_moments+noise_terms+fast_path_mask": _per_example,
    "noise_terms_from_two_batches": lambda d: co.noise_terms_from_two_batches(d["losses"][0], d["losses"][1], 16, 64),
    "rho": lambda d: co.rho(d["losses"][0] / 2, 7),
    "msvag": lambda d: _run_plain_tx(co.msvag(0.1, source="ema"), d),
    "svag": lambda d: _run_plain_tx(co.svag(0.1, source="ema"), d),
    "scale_by_grad_variance": lambda d: _run_plain_tx(co.scale_by_grad_variance(source="ema"), d),
    "gradient_noise_scale": lambda d: _run_plain_tx(
        co.gradient_noise_scale(), d, small_batch_sq_norm=d["losses"][0], small_batch_size=8, sample_size=32
    ),
}

MTL: dict[str, Callable] = {
    "task_gramian": lambda d: mtl.task_gramian(_grads(d)),
    "combine_tasks": lambda d: mtl.combine_tasks(d["losses"], _grads(d)),
    "task_gradient_cosine": lambda d: mtl.task_gradient_cosine(_grads(d)),
    "cosine_from_gramian": lambda d: mtl.cosine_from_gramian(_gramian(d)),
    "conflict_fraction": lambda d: mtl.conflict_fraction(_grads(d)),
    "task_gradient_norms": lambda d: mtl.task_gradient_norms(_grads(d)),
    "gradient_norm_ratios": lambda d: mtl.gradient_norm_ratios(_grads(d)),
    "gradient_magnitude_similarity": lambda d: mtl.gradient_magnitude_similarity(_grads(d)),
    "gradient_diagnostics": lambda d: mtl.gradient_diagnostics(_grads(d)),
    "tag_affinity": _tag,
    "value_and_task_grad": _task_grad,
    "value_and_rep_grad": _rep_grad,
    "shared_only": lambda d: _run_tx(mtl.shared_only(mtl.upgrad(), {"w": True, "b": False}), d),
    "solvers.project_simplex": lambda d: mtl.solvers.project_simplex(d["losses"]),
    "solvers.min_norm_simplex": lambda d: mtl.solvers.min_norm_simplex(_gramian(d)),
    "solvers.min_norm_simplex_fw": lambda d: mtl.solvers.min_norm_simplex(_gramian(d), method="frank_wolfe"),
    "solvers.nonneg_qp": lambda d: mtl.solvers.nonneg_qp(_gramian(d) + jnp.eye(T, dtype=d["x"].dtype), d["losses"]),
    "solvers.project_dual_cone": lambda d: mtl.solvers.project_dual_cone(_gramian(d), d["losses"] / 3),
    "solvers.nash_bargaining": lambda d: mtl.solvers.nash_bargaining(_gramian(d)),
    **{
        name: (lambda d, f=f: _run_tx(f(), d))
        for name, f in {
            "mean": mtl.mean,
            "sum": mtl.sum,
            "weighted": lambda: mtl.weighted([0.2, 0.3, 0.5]),
            "rlw": mtl.rlw,
            "pcgrad": mtl.pcgrad,
            "gradvac": lambda: mtl.gradvac(num_tasks=T),
            "cagrad": mtl.cagrad,
            "mgda": mtl.mgda,
            "imtl_g": mtl.imtl_g,
            "nash_mtl": mtl.nash_mtl,
            "aligned_mtl": mtl.aligned_mtl,
            "upgrad": mtl.upgrad,
            "dualproj": mtl.dualproj,
            "graddrop": mtl.graddrop,
            "fairgrad": mtl.fairgrad,
            "config_grad": mtl.config_grad,
            "sdmgrad": lambda: mtl.sdmgrad(T),
            "from_weighting": lambda: mtl.from_weighting(mtl.aggregators.mgda.mgda_weighting()),
        }.items()
    },
    **{
        name: _weighted_losses(f)
        for name, f in {
            "excess_mtl": lambda: mtl.excess_mtl(T),
            "moco": lambda: mtl.moco(T),
            "db_mtl": lambda: mtl.db_mtl(T),
            "uncertainty_weighting": lambda: mtl.uncertainty_weighting(T),
            "dwa": lambda: mtl.dwa(T),
            "gradnorm": lambda: mtl.gradnorm(T),
            "famo": lambda: mtl.famo(T),
            "geometric_mean": lambda: mtl.geometric_mean(T),
            "stch": lambda: mtl.stch(T),
            "imtl_l": lambda: mtl.imtl_l(T),
            "imtl": lambda: mtl.imtl(T),
        }.items()
    },
}

CASES = {**{f"stats.{k}": v for k, v in STATS.items()}, **{f"optim.{k}": v for k, v in OPTIM.items()}}
CASES.update({f"mtl.{k}": v for k, v in MTL.items()})


def _leaves(out):
    return [np.asarray(x) for x in jax.tree.leaves(out)]


def test_the_cases_cover_the_public_api():
    import inspect

    covered = " ".join(CASES) + " " + " ".join(inspect.getsource(f) for f in CASES.values() if callable(f))
    for mod in (cs, co, mtl):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) and name not in covered:
                raise AssertionError(f"{mod.__name__}.{name} has no bfloat16 case")


# Run by default (a few seconds); the rest are `slow` (their float32 and bfloat16 compilations take minutes in all).
FAST = {"stats.cov", "stats.corrcoef_xy", "stats.pearsonr", "stats.partial_corr_test", "optim.msvag"}
FAST |= {"mtl.task_gramian", "mtl.mean", "mtl.solvers.project_dual_cone", "mtl.tag_affinity"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_bfloat16_input_matches_float32(name):
    fn = CASES[name]
    ref = _leaves(fn(_inputs(jnp.float32)))
    got = fn(_inputs(BF16))
    got_leaves = _leaves(got)
    assert len(got_leaves) == len(ref) > 0
    for g, r in zip(got_leaves, ref, strict=True):
        assert g.shape == r.shape, name
        if not np.issubdtype(r.dtype, np.floating):
            np.testing.assert_array_equal(g, r, err_msg=name)
            continue
        assert g.dtype in (BF16, np.float32), (name, g.dtype)
        g = g.astype(np.float32)
        finite = np.isfinite(r)
        np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=name)
        scale = float(np.max(np.abs(r[finite]), initial=0.0)) or 1.0
        np.testing.assert_allclose(g[finite], r[finite], rtol=2e-2, atol=2e-2 * scale, err_msg=name)
