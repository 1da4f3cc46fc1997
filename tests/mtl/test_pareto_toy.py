"""The two-objective toy of the CAGrad and Nash-MTL papers (corrjax.mtl.toys) and scripts/toy_pareto.py.

f1, f2 on R^2 (Liu et al. 2021, Navon et al. 2022): log-shaped objectives on the upper half-plane with a nearly flat
ridge in x2, quadratic bowls below; the Pareto set is a curve close to x2 = -8.3552, x1 in [-7, 7]. Runs are one
``lax.scan`` over steps, vmapped over the papers' starting points.
"""

import importlib.util
import inspect
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import corrjax.mtl as mtl
from corrjax.mtl import toys

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
STARTS = jnp.asarray(toys.NASH_MTL_STARTS, jnp.float32)
# compiled once per shape: eager, the toy's thirty-odd primitives dispatch one by one (seconds on a loaded CPU)
toy_losses = jax.jit(toys.toy_losses)


def _load_script():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("_scripts_toy_pareto", SCRIPTS / "toy_pareto.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


# ------------------------------------------------------------------------------------------------- the problem


def test_toy_losses_known_values_and_scale():
    # x2 = 0: both weights c1 = c2 = 0, so both losses vanish
    np.testing.assert_allclose(toy_losses(jnp.array([3.0, 0.0])), [0.0, 0.0], atol=0)
    # (7, -8): f1's bowl is at its floor -20, f2's is at 14^2 / 10 - 20; both weighted by c2 = tanh(4). float32:
    # 19.6 - 20 cancels, so the bound is absolute, two ulps of 20
    c2 = np.tanh(4.0)
    ulp20 = float(np.spacing(np.float32(20.0)))
    np.testing.assert_allclose(toy_losses(jnp.array([7.0, -8.0])), [-20 * c2, -0.4 * c2], rtol=0, atol=2 * ulp20)
    np.testing.assert_allclose(toy_losses(jnp.array([7.0, -8.0]), 0.1), [-2 * c2, -0.4 * c2], rtol=0, atol=2 * ulp20)
    # upper half: f1 = c1 (log|-(x1 + 7)/2 - tanh(-x2)| + 6), here with x = (1, 2)
    x1, x2 = 1.0, 2.0
    c1 = np.tanh(1.0)
    f1 = c1 * (np.log(abs(-(x1 + 7) / 2 - np.tanh(-x2))) + 6)
    f2 = c1 * (np.log(abs(-(x1 - 3) / 2 + np.tanh(-x2) + 2)) + 6)
    np.testing.assert_allclose(toy_losses(jnp.array([x1, x2])), [f1, f2], rtol=1e-6)
    # batched
    assert toy_losses(jnp.zeros((4, 3, 2))).shape == (4, 3, 2)


def test_toy_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="`x`"):
        toys.toy_losses(jnp.zeros(3))
    with pytest.raises(ValueError, match="`x`"):
        toys.pareto_stationarity(jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match="`x`"):
        toys.toy_losses(jnp.zeros(2, jnp.complex64))
    np.testing.assert_array_equal(toys.toy_losses(jnp.array([3, 0])), [0.0, 0.0])  # integers are promoted
    with pytest.raises(ValueError, match="`num`"):
        toys.pareto_set(1)


def test_pareto_set_is_pareto_stationary_and_matches_the_papers_line():
    front = toys.pareto_set(41)
    assert front.shape == (41, 2)
    np.testing.assert_allclose(front[[0, -1], 0], [-7.0, 7.0])
    # the set, and the set moved 0.05 up and down in x2, in one compiled call per scale of f1
    points = jnp.concatenate([front, front + jnp.array([0.0, 0.05]), front - jnp.array([0.0, 0.05])])
    stationarity = jax.jit(jax.vmap(toys.pareto_stationarity, in_axes=(0, None)))
    for scale in (1.0, 0.1):  # the set does not depend on the scale of f1
        stat = np.asarray(stationarity(points, scale)).reshape(3, -1)
        assert np.max(stat[0]) < 1e-5, stat[0]
        assert np.min(stat[1:]) > 1e-4, stat[1:]  # off the set: not stationary, by more than an order of magnitude
    # the papers draw the segment x2 = -8.3552; the set is that line at x1 = 0 and bends down to -8.43 at the ends
    np.testing.assert_allclose(front[20], [0.0, toys.PAPERS_FRONT_X2], atol=5e-4)
    assert np.all(np.asarray(front[:, 1]) <= toys.PAPERS_FRONT_X2 + 5e-4)
    assert float(jnp.min(front[:, 1])) > -8.45
    # the ends are the minimisers of f2 (x1 = -7) and f1 (x1 = 7): one gradient vanishes there
    _, g = jax.jit(mtl.value_and_task_grad(toys.toy_losses))(front[-1])
    assert float(jnp.linalg.norm(g[0])) < 1e-4 < float(jnp.linalg.norm(g[1]))
    # the mean loss is smallest at the middle of the set (the CAGrad paper's star at (0, -8.3552))
    mean = np.asarray(toy_losses(front).mean(-1))
    assert np.argmin(mean) == 20


def test_distance_to_set():
    curve = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    d, nearest = toys.distance_to_set(np.array([[0.5, -2.0], [-1.0, 0.0], [2.0, 1.0]]), curve)
    np.testing.assert_allclose(d, [2.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(nearest, [[0.5, 0.0], [0.0, 0.0], [2.0, 1.0]], atol=1e-12)


# ---------------------------------------------------------------------------------------------- the script


def test_toy_pareto_script_short_run(tmp_path):
    """The script's run on the CAGrad toy with the paper's budget (100k Adam steps) for three methods: the table
    lands in a README copy, the PNG is written, the numbers are finite, and the runs agree with the paper's Fig. 1:
    the mean gradient stalls on the flat upper half from the two upper starts, PCGrad and MGDA (unregularised
    Frank-Wolfe) reach the Pareto set from every start, at different points, and MGDA stays where it lands."""
    script = _load_script()
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()
    out = tmp_path / "docs"
    args = ["--toys", "cagrad", "--methods", "mean,pcgrad,mgda[frank_wolfe]", "--records", "50"]
    results = script.main([*args, "--readme", str(readme), "--out-dir", str(out)])
    res = {r.name: r for r in results["cagrad"]}
    assert list(res) == ["mean", "mgda[frank_wolfe]", "pcgrad"]  # the script's order
    for r in res.values():
        assert r.traj.shape == (3, 51, 2)
        np.testing.assert_array_equal(r.traj[:, 0], toys.CAGRAD_STARTS)
        assert np.all(np.isfinite(r.traj)) and np.all(np.isfinite(r.losses)) and np.all(np.isfinite(r.distance))
    # the mean gradient: stuck far from the set from (-8.5, 7.5) and (9, 9), on it from (-8.5, -5)
    assert res["mean"].distance[0] > 5 and res["mean"].distance[2] > 5 and res["mean"].distance[1] < 1e-2
    assert np.all(res["mean"].final[[0, 2], 1] > 0), res["mean"].final
    for name in ("pcgrad", "mgda[frank_wolfe]"):
        r = res[name]
        assert np.all(r.distance < 1e-2) and np.all(r.stationarity < 1e-2), (name, r.final, r.stationarity)
        assert np.ptp(r.final[:, 0]) > 3.0, (name, r.final)  # different starts land at different Pareto points
    # exact MGDA's update vanishes on the set: it stays where it lands (PCGrad's does not quite, it slides on)
    assert np.all(res["mgda[frank_wolfe]"].drift < 0.5), res["mgda[frank_wolfe]"].drift
    text = readme.read_text()

    def section(name, doc):
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        assert doc.count(start) == 1 and doc.count(end) == 1, name
        return doc.index(start), doc.index(end) + len(end)

    # the intro and the cagrad table are rewritten, everything else (the nash_mtl table included) is untouched
    (i0, j0), (i1, j1) = section("toy-pareto", text), section("toy-pareto-cagrad", text)
    (b0, c0), (b1, c1) = section("toy-pareto", before), section("toy-pareto-cagrad", before)
    assert text[:i0] == before[:b0] and text[j0:i1] == before[c0:b1] and text[j1:] == before[c1:]
    assert "arXiv:2110.14048" in text[i0:j0]
    sec = text[i1:j1]
    for row in ("| `mean` | 1/3 |", "| `pcgrad` | 3/3 |", "| `mgda[frank_wolfe]` | 3/3 |"):
        line = next(ln for ln in sec.splitlines() if ln.startswith(row))
        assert line.rstrip().endswith("| yes |"), line  # agrees with the paper's figure
    assert "docs/toy_pareto_cagrad.png" in sec
    png = out / "toy_pareto_cagrad.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 500_000


def test_toy_pareto_discovers_every_method():
    """Every aggregator and loss weighting that corrjax.mtl exports is run or reported (none dropped silently), the
    ones listed with the papers' settings all run; unknown names are refused."""
    script = _load_script()
    for toy in script.TOYS.values():
        txs, skipped = script.methods(toy)
        listed = {name for name, (attr, _) in script.LISTED.items() if hasattr(mtl, attr)}
        assert listed <= set(txs) and not listed & set(skipped), (listed, skipped)
        exported = {n for n in mtl.__all__ if n not in script.NOT_METHODS and inspect.isfunction(getattr(mtl, n))}
        assert exported <= set(txs) | set(skipped), exported - set(txs) - set(skipped)
        assert all(why for why in skipped.values())
        for name in ("mean", "pcgrad", "mgda", "mgda[frank_wolfe]", "cagrad", "nash_mtl", "famo", "gradvac"):
            assert name in txs
    with pytest.raises(ValueError, match="`methods`"):
        script.methods(script.TOYS["cagrad"], ["no_such_method"])


def test_toy_pareto_picks_up_new_methods(monkeypatch):
    """A method that lands in corrjax.mtl later is run with its defaults (``num_tasks`` filled in when it takes one);
    one that needs other arguments is reported with the reason, not dropped silently."""
    script = _load_script()
    seen = {}

    def new_weighting(num_tasks, temperature=1.0):
        seen["num_tasks"] = num_tasks
        return mtl.mean()

    def needs_a_matrix(matrix):
        return mtl.mean()

    for name, fn in (("new_weighting", new_weighting), ("needs_a_matrix", needs_a_matrix)):
        monkeypatch.setattr(mtl, name, fn, raising=False)
    monkeypatch.setattr(mtl, "__all__", [*mtl.__all__, "new_weighting", "needs_a_matrix"])
    txs, skipped = script.methods(script.TOYS["nash_mtl"])
    assert "new_weighting" in txs and seen == {"num_tasks": 2}
    order = list(txs)  # discovered methods (sorted) come after the listed ones
    assert all(order.index(n) < order.index("new_weighting") for n in script.LISTED if n in txs)
    assert set(skipped) == {"needs_a_matrix"} and "matrix" in skipped["needs_a_matrix"]


# ------------------------------------------------------------------------------------------ short-budget checks


def _run(agg, opt, steps):
    """Final points and their Pareto-stationarity on the Nash-MTL toy's starts (unscaled losses)."""
    tx = optax.chain(agg, opt)
    vtg = mtl.value_and_task_grad(toys.toy_losses)

    def one(x0):
        def step(carry, _):
            x, s = carry
            _, g = vtg(x)
            u, s = tx.update(g, s, x)
            return (optax.apply_updates(x, u), s), None

        (x, _), _ = jax.lax.scan(step, (x0, tx.init(x0)), None, length=steps)
        return x, toys.pareto_stationarity(x)

    x, stat = jax.jit(jax.vmap(one))(STARTS)
    return np.asarray(x), np.asarray(stat)


def _on_front(x, stat):
    """Near the Pareto set (a box around it: plain SGD converges slowly in x2) and nearly Pareto-stationary."""
    return (np.abs(x[:, 0]) <= 7.05) & (x[:, 1] > -8.6) & (x[:, 1] < -8.0) & (stat < 1e-2)


@pytest.mark.slow
def test_nash_mtl_reaches_front_where_mean_stalls():
    """Plain gradient descent: the mean gradient stalls on the flat ridge from the upper starts; Nash-MTL does not."""
    x, stat = _run(mtl.mean(), optax.sgd(0.1), 1500)
    on = _on_front(x, stat)
    assert not on[0] and not on[2], x  # (-8.5, 7.5) and (9, 9): stuck (or diverging) far from the front
    assert x[2, 1] > 0, x
    x, stat = _run(mtl.nash_mtl(), optax.sgd(0.1), 1500)
    assert np.all(_on_front(x, stat)), (x, stat)
    # different starts reach different Pareto points (not one scalarisation optimum)
    assert np.ptp(x[:, 0]) > 4.0, x


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mgda", "pcgrad", "upgrad"])
def test_methods_reach_front_with_adam(name):
    x, stat = _run(getattr(mtl, name)(), optax.adam(0.05), 2000)
    assert np.all(_on_front(x, stat)), (x, stat)
