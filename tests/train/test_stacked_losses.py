"""The per-task losses vectorised per (kind, loss, shape) group equal the task-by-task loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from corrjax.data import TaskSpec
from corrjax.train import tasks

SPECS = (
    TaskSpec("r0", "regression", 1),
    TaskSpec("c0", "classification", 3),
    TaskSpec("r1", "regression", 1),
    TaskSpec("b0", "binary", 1),
    TaskSpec("r2", "regression", 1),
    TaskSpec("c1", "classification", 3),
    TaskSpec("r3", "regression", 2),
)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    outs, labels = {}, {}
    for t in SPECS:
        shape = (n, t.num_outputs) if t.kind == "classification" or t.num_outputs > 1 else (n,)
        outs[t.name] = jnp.asarray(rng.normal(size=shape), jnp.float32)
        if t.kind == "classification":
            labels[t.name] = jnp.asarray(rng.integers(0, t.num_outputs, n), jnp.int32)
        elif t.kind == "binary":
            labels[t.name] = jnp.asarray(rng.integers(0, 2, n), jnp.float32)
        else:
            labels[t.name] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return outs, labels


def test_stacked_losses_equal_the_loop():
    fns = tasks.task_loss_fns(SPECS, {"r2": "pearson"})
    fns["r1"] = lambda out, y: jnp.abs(out - y).mean()  # a plain function: computed alone
    names = [t.name for t in SPECS]
    outs, labels = _data()
    loop = np.asarray([fns[n](outs[n], labels[n]) for n in names])
    got = np.asarray(jax.jit(lambda o, y: tasks.stacked_losses(fns, names, o, y))(outs, labels))
    np.testing.assert_allclose(got, loop, rtol=1e-6, atol=1e-7)
    assert fns["r0"].group == ("regression", "mse") and fns["r2"].group == ("regression", "pearson")
    assert fns["c0"].fn is fns["c1"].fn  # one function per group: the tasks are vmapped together


def test_one_group_traces_the_loss_once():
    """T regression tasks of one shape: one vmapped loss in the jaxpr, not T."""
    specs = tuple(TaskSpec(f"t{i}", "regression", 1) for i in range(16))
    fns = tasks.task_loss_fns(specs)
    names = [t.name for t in specs]
    o = {n: jnp.ones(8) for n in names}
    jaxpr = jax.make_jaxpr(lambda o, y: tasks.stacked_losses(fns, names, o, y))(o, o)
    n_sub = sum(1 for e in jaxpr.jaxpr.eqns if e.primitive.name == "sub")
    assert n_sub == 1, jaxpr
