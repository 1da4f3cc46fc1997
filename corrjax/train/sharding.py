"""Every sharding of the training codebase in one place: the mesh, global arrays and the jitted steps' shardings.

By default the loop runs data parallel on a 1-D mesh: the train state is replicated, batches are split along their
leading (example) axis over the mesh's data axis, and step outputs are replicated. ``parallel.mesh`` (e.g.
``configs/parallel/fsdp.yaml``: ``{data: -1, fsdp: 2}``) selects a 2-D ``(data, fsdp)`` mesh instead, with
FSDP-style (ZeRO-3) state sharding (:func:`state_shardings`): every parameter and optimiser-state leaf of at least
``parallel.fsdp_min_size`` elements is split along its largest dimension divisible by the ``fsdp`` axis size, smaller
leaves are replicated, and a task-stacked leaf ``(T, *shape)`` (an aggregator's state, the task gradients inside the
step: :func:`task_grad_constraint`) keeps its task axis replicated and splits ``shape`` as the parameter. Batches are
then split over both axes, so every device sees ``B / devices`` examples as in the 1-D case; GSPMD inserts the
parameter all-gathers and gradient reduce-scatters. Host values that every process holds
identically (initial parameters, an evaluation batch) become global arrays through
:func:`jax.make_array_from_callback`, so the same code serves one process or many. :mod:`corrjax.train.step` stays
pure: its functions know nothing of meshes, and :func:`jit_steps` attaches the shardings here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"  # the parameter-sharding axis of a 2-D mesh


def _mesh_shape(parallel: Any, num_devices: int) -> dict[str, int]:
    """``{axis: size}`` of ``parallel.mesh`` (or the 1-D ``{axis_name: data}``), the one ``-1`` resolved."""
    get = parallel.get if hasattr(parallel, "get") else lambda k, d=None: getattr(parallel, k, d)
    axis_name, spec = get("axis_name", "data") or "data", get("mesh")
    if spec is None:
        n = num_devices if get("data") in (-1, None) else int(get("data"))
        if n < 1 or n > num_devices:
            raise ValueError(f"`parallel.data`={get('data')} but {num_devices} devices are available")
        return {axis_name: n}
    spec = {str(k): (-1 if v is None else int(v)) for k, v in dict(spec).items()}
    unknown = sorted(set(spec) - {axis_name, FSDP})
    if unknown or axis_name not in spec:
        raise ValueError(
            f"`parallel.mesh`={spec} must name the data axis {axis_name!r} (`parallel.axis_name`) and optionally "
            f"{FSDP!r}; unknown axes {unknown}"
        )
    for k, v in spec.items():
        if v == 0 or v < -1:
            raise ValueError(f"`parallel.mesh.{k}`={v} must be a positive size or -1 (the remaining devices)")
    free = [k for k, v in spec.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"`parallel.mesh`={spec}: only one axis may be -1, got {free}")
    fixed = math.prod(v for v in spec.values() if v != -1)
    if free:
        if num_devices % fixed:
            key = next(k for k, v in spec.items() if v != -1 and num_devices % v) if fixed > 1 else free[0]
            raise ValueError(
                f"`parallel.mesh.{key}`={spec[key]}: the fixed axes ({fixed} devices) do not divide the "
                f"{num_devices} devices"
            )
        spec[free[0]] = num_devices // fixed
    elif fixed > num_devices:
        key = max(spec, key=lambda k: spec[k])
        raise ValueError(f"`parallel.mesh.{key}`={spec[key]}: the mesh {spec} needs {fixed} > {num_devices} devices")
    return spec


def make_mesh(parallel: Any) -> Mesh:
    """The run's mesh, Auto axis types so GSPMD propagates shardings inside the model.

    Without ``parallel.mesh``: a 1-D mesh over ``parallel.data`` devices (-1: all), axis ``parallel.axis_name``.
    With ``parallel.mesh`` (``{data: -1, fsdp: 2}``; ``parallel.data`` is then unused): a 2-D mesh with those axes,
    the data axis first (so a process's devices hold contiguous rows of the batch) and one size ``-1`` filled with
    the remaining devices. ``ValueError`` naming the key when the sizes do not factor the device count."""
    shape = _mesh_shape(parallel, jax.device_count())
    n = math.prod(shape.values())
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto, devices=jax.devices()[:n])


def data_axes(mesh: Mesh, axis_name: str = "data") -> str | tuple[str, ...]:
    """The mesh axes the batch is split over: ``axis_name`` alone, or ``(axis_name, "fsdp")`` on a 2-D mesh."""
    return (axis_name, FSDP) if FSDP in mesh.axis_names else axis_name


def batch_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
    """Leading (example) axis split over the mesh's data axes (:func:`data_axes`)."""
    return NamedSharding(mesh, P(data_axes(mesh, axis_name)))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The FSDP partition of one leaf: its largest dimension divisible by ``fsdp_size`` (the last of equals) over
    ``"fsdp"``; replicated (``P()``) when the leaf has fewer than ``min_size`` elements, ``fsdp_size`` is 1, or no
    dimension divides."""
    if fsdp_size <= 1 or math.prod(shape) < max(min_size, 1):
        return P()
    dims = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], i))
    return P(*(FSDP if i == best else None for i in range(len(shape))))


def _leaf_spec(shape: tuple[int, ...], param_shapes: set[tuple[int, ...]], fsdp_size: int, min_size: int) -> P:
    """A parameter-shaped leaf is split like the parameter; a task-stacked one ``(T, *param_shape)`` keeps its
    leading task axis replicated and splits the rest like the parameter; anything else by its own shape."""
    if shape not in param_shapes and len(shape) >= 2 and shape[1:] in param_shapes:
        inner = fsdp_spec(shape[1:], fsdp_size, min_size)
        return P(None, *inner) if len(inner) else P()
    return fsdp_spec(shape, fsdp_size, min_size)


def state_shardings(state: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """Shardings of a train state (arrays or ``jax.ShapeDtypeStruct``): FSDP over the mesh's ``"fsdp"`` axis
    (:func:`fsdp_spec` for the parameters, optimiser-state leaves shaped like a parameter split the same way,
    task-stacked ones with the task axis replicated), replicated on a mesh without one. Leaves that are not arrays
    (None, Python scalars) are left as they are."""
    size = int(mesh.shape.get(FSDP, 1))
    params = getattr(state, "params", state)
    param_shapes = {tuple(np.shape(p)) for p in jax.tree.leaves(params)}

    def leaf(x: Any) -> Any:
        if not hasattr(x, "shape"):
            return replicated(mesh)
        return NamedSharding(mesh, _leaf_spec(tuple(x.shape), param_shapes, size, min_size))

    return jax.tree.map(leaf, state)


def task_grad_constraint(mesh: Mesh, min_size: int = 2**14) -> Callable[[Any, Any], Any] | None:
    """``(task_grads, params) -> task_grads`` constrained like the state (:func:`state_shardings`): a task-stacked
    leaf ``(T, *p.shape)`` with its task axis replicated and the rest split like ``p``, an unstacked (task-specific)
    leaf like ``p``. None on a mesh without an ``"fsdp"`` axis (nothing to constrain). Passed to
    :func:`corrjax.train.step.make_train_step` so the ``T`` gradients are never gathered on one device."""
    size = int(mesh.shape.get(FSDP, 1))
    if size <= 1:
        return None

    def constrain(grads: Any, params: Any) -> Any:
        def leaf(g: jax.Array, p: jax.Array) -> jax.Array:
            spec = fsdp_spec(tuple(p.shape), size, min_size)
            if g.ndim == p.ndim + 1:
                spec = P(None, *spec) if len(spec) else P()
            return jax.lax.with_sharding_constraint(g, NamedSharding(mesh, spec))

        return jax.tree.map(leaf, grads, params)

    return constrain


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def to_global(tree: Any, sharding: Any) -> Any:
    """Host values identical on every process -> global arrays with ``sharding`` (any pytree; ``sharding`` one
    sharding for every leaf or a pytree of them with ``tree``'s structure)."""
    host = jax.device_get(tree)
    place = lambda v, s: jax.make_array_from_callback(np.shape(v), s, lambda i, v=v: np.asarray(v)[i])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda v: place(v, sharding), host)
    return jax.tree.map(place, host, sharding)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host arrays (identical on every process) -> global arrays split over ``sharding``'s data axis."""
    return dict(to_global(dict(local), sharding))


def jit_steps(
    train_step: Callable,
    eval_step: Callable,
    mesh: Mesh,
    axis_name: str = "data",
    *extra_steps: Callable,
    state_sharding: Any = None,
) -> tuple[Callable, ...]:
    """Jits the pure steps with explicit shardings: state as ``state_sharding`` (a sharding or a pytree of them,
    :func:`state_shardings`; default replicated), batch split over the data axes, metrics and outputs replicated;
    the train step returns its state with the same shardings and donates its input state so XLA updates parameters
    and optimiser state in place. ``extra_steps`` (``(state, batch) -> metrics`` diagnostics) are jitted like
    ``eval_step`` and returned after it."""
    rep, data = replicated(mesh), batch_sharding(mesh, axis_name)
    st = rep if state_sharding is None else state_sharding
    train = jax.jit(train_step, in_shardings=(st, data), out_shardings=(st, rep), donate_argnums=0)
    others = [jax.jit(f, in_shardings=(st, data), out_shardings=rep) for f in (eval_step, *extra_steps)]
    return (train, *others)


def jit_replicated(fn: Callable, mesh: Mesh, state_sharding: Any = None) -> Callable:
    """Jits ``fn(state, x)`` with ``x`` and the output replicated (the representation step on a small fixed eval
    subset, whose size need not divide the device count), the state as ``state_sharding`` (default replicated)."""
    rep = replicated(mesh)
    return jax.jit(fn, in_shardings=(rep if state_sharding is None else state_sharding, rep), out_shardings=rep)


class JittedSteps(NamedTuple):
    """A :class:`corrjax.train.setup.Setup`'s steps jitted for a mesh (:func:`jit_setup_steps`)."""

    train: Callable
    eval: Callable
    noise: Callable | None
    representation: Callable


def jit_setup_steps(setup: Any, mesh: Mesh, axis_name: str = "data", state_sharding: Any = None) -> JittedSteps:
    """The train, eval and noise-scale steps of ``setup`` with :func:`jit_steps`'s shardings and its representation
    step with :func:`jit_replicated`'s, the state as ``state_sharding`` (default replicated; ``noise`` None when
    ``setup`` has no noise-scale step, which returns the state with its noise-scale EMA and donates the old one)."""
    train, evaluate = jit_steps(setup.train_step, setup.eval_step, mesh, axis_name, state_sharding=state_sharding)
    noise = None
    if setup.noise_step is not None:
        rep, data = replicated(mesh), batch_sharding(mesh, axis_name)
        st = rep if state_sharding is None else state_sharding
        noise = jax.jit(setup.noise_step, in_shardings=(st, data), out_shardings=(st, rep), donate_argnums=0)
    return JittedSteps(train, evaluate, noise, jit_replicated(setup.representation_step, mesh, state_sharding))
