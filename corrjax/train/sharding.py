"""Every sharding of the training codebase in one place: the mesh, global arrays and the jitted steps' shardings.

The loop runs data parallel on a 1-D mesh: the train state is replicated, batches are split along their leading
(example) axis over the mesh's data axis, and step outputs are replicated. Host values that every process holds
identically (initial parameters, an evaluation batch) become global arrays through
:func:`jax.make_array_from_callback`, so the same code serves one process or many. :mod:`corrjax.train.step` stays
pure: its functions know nothing of meshes, and :func:`jit_steps` attaches the shardings here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(parallel: Any) -> Mesh:
    """A 1-D mesh over ``parallel.data`` devices (-1: all), axis ``parallel.axis_name``, Auto axis type so GSPMD
    propagates shardings inside the model."""
    n = jax.device_count() if parallel.data in (-1, None) else int(parallel.data)
    if n < 1 or n > jax.device_count():
        raise ValueError(f"`parallel.data`={parallel.data} but {jax.device_count()} devices are available")
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((n,), (parallel.axis_name,), axis_types=auto, devices=jax.devices()[:n])


def batch_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
    """Leading (example) axis split over the mesh's data axis."""
    return NamedSharding(mesh, P(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def to_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host values identical on every process -> global arrays with ``sharding`` (any pytree)."""
    host = jax.device_get(tree)
    return jax.tree.map(
        lambda v: jax.make_array_from_callback(np.shape(v), sharding, lambda i, v=v: np.asarray(v)[i]), host
    )


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host arrays (identical on every process) -> global arrays split over ``sharding``'s data axis."""
    return dict(to_global(dict(local), sharding))


def jit_steps(
    train_step: Callable, eval_step: Callable, mesh: Mesh, axis_name: str = "data", *extra_steps: Callable
) -> tuple[Callable, ...]:
    """Jits the pure steps with explicit shardings: state replicated, batch split over ``axis_name``, outputs
    replicated; the train step donates its input state so XLA updates parameters and optimiser state in place.
    ``extra_steps`` (``(state, batch) -> metrics`` diagnostics) are jitted like ``eval_step`` and returned after it."""
    rep, data = replicated(mesh), batch_sharding(mesh, axis_name)
    train = jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    others = [jax.jit(f, in_shardings=(rep, data), out_shardings=rep) for f in (eval_step, *extra_steps)]
    return (train, *others)


def jit_replicated(fn: Callable, mesh: Mesh) -> Callable:
    """Jits ``fn(state, x)`` with every input and output replicated (the representation step on a small fixed eval
    subset, whose size need not divide the device count)."""
    rep = replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, rep), out_shardings=rep)


class JittedSteps(NamedTuple):
    """A :class:`corrjax.train.setup.Setup`'s steps jitted for a mesh (:func:`jit_setup_steps`)."""

    train: Callable
    eval: Callable
    noise: Callable | None
    representation: Callable


def jit_setup_steps(setup: Any, mesh: Mesh, axis_name: str = "data") -> JittedSteps:
    """The train, eval and noise-scale steps of ``setup`` with :func:`jit_steps`'s shardings and its representation
    step with :func:`jit_replicated`'s (``noise`` None when ``setup`` has no noise-scale step)."""
    train, evaluate = jit_steps(setup.train_step, setup.eval_step, mesh, axis_name)
    noise = None
    if setup.noise_step is not None:
        rep, data = replicated(mesh), batch_sharding(mesh, axis_name)
        noise = jax.jit(setup.noise_step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    return JittedSteps(train, evaluate, noise, jit_replicated(setup.representation_step, mesh))
