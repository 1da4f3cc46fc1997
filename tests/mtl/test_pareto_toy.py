"""The two-objective toy of the CAGrad and Nash-MTL papers: methods reach the Pareto front, the mean gradient stalls.

f1, f2 on R^2 (Liu et al. 2021, Navon et al. 2022): log-shaped objectives on the upper half-plane with a nearly flat
ridge in x2, quadratic bowls below; the Pareto set is close to the segment x2 ~ -8.4, x1 in [-7, 7]. Runs are one
``lax.scan`` over steps, vmapped over the papers' five starting points.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import corrjax.mtl as mtl

LOWER = 5e-6
STARTS = jnp.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]])


def toy(x):
    x1, x2 = x[0], x[1]
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
    return jnp.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2])


_vtg = mtl.value_and_task_grad(toy)


def _run(agg, opt, steps):
    """Final points and their Pareto-stationarity (norm of the min-norm convex combination of the gradients)."""
    tx = optax.chain(agg, opt)

    def one(x0):
        def step(carry, _):
            x, s = carry
            _, g = _vtg(x)
            u, s = tx.update(g, s, x)
            return (optax.apply_updates(x, u), s), None

        (x, _), _ = jax.lax.scan(step, (x0, tx.init(x0)), None, length=steps)
        _, g = _vtg(x)
        w = mtl.solvers.min_norm_simplex(g @ g.T)
        return x, jnp.linalg.norm(w @ g)

    x, stat = jax.jit(jax.vmap(one))(STARTS)
    return np.asarray(x), np.asarray(stat)


def _on_front(x, stat):
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
