"""The multi-task model interface shared by every corrjax architecture, task heads, and the shared/task split.

A multi-task model is an NNX module with ``tasks: tuple[TaskSpec, ...]`` and

- ``features(x)``: the shared representation (what representation-gradient methods differentiate through);
- ``from_features(z, x) -> {task: output}``: the task-specific part (``x`` feeds MoE gates);
- ``model(x) == model.from_features(model.features(x), x)``.

Parameters are split into *shared* ones (receiving gradient from several tasks: trunks, experts, cross-stitch
units) and *task-specific* ones (reached by one task's loss only: heads, towers, per-task gates). Each model lists
the top-level attributes holding task-specific parameters in ``task_specific``; :func:`shared_mask` turns that into
a boolean pytree that corrjax.mtl uses to route leaves around the aggregator.

Every model takes Flax's mixed-precision pair ``dtype`` (computation; None: from inputs and parameters) and
``param_dtype`` (storage, float32 by default) and hands them to its heads, gates and, through
:func:`build_backbone`, to its backbone factories.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from corrjax.data.spec import TaskSpec, check_tasks
from corrjax.models.backbones import MLP

BackboneFactory = Callable[..., nnx.Module]  # called as factory(rngs=rngs)


def _accepts(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_backbone(
    factory: BackboneFactory,
    rngs: nnx.Rngs,
    name: str = "factory",
    *,
    dtype: Any = None,
    param_dtype: Any = None,
) -> nnx.Module:
    """Calls ``factory(rngs=rngs)`` and checks the result exposes an int ``out_features``.

    ``dtype`` / ``param_dtype`` (when not None) are passed on when the factory accepts them and does not already
    fix them (a ``functools.partial`` keyword, e.g. from the config, wins)."""
    fixed = getattr(factory, "keywords", None) or {}
    kwargs = {
        key: value
        for key, value in (("dtype", dtype), ("param_dtype", param_dtype))
        if value is not None and key not in fixed and _accepts(factory, key)
    }
    module = factory(rngs=rngs, **kwargs)
    if not isinstance(getattr(module, "out_features", None), int):
        raise TypeError(f"`{name}` must build a module with an int `out_features`, got {type(module).__name__}")
    return module


class TaskHead(nnx.Module):
    """A task's tower and output layer: ``(n, in_features) -> (n, *spec.output_shape)``.

    ``hidden`` adds ReLU Dense layers before the output layer (the MMoE/PLE "towers").
    """

    def __init__(
        self,
        in_features: int,
        spec: TaskSpec,
        hidden: Sequence[int] = (),
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.tower = MLP(in_features, hidden, **kw) if hidden else None
        width = self.tower.out_features if hidden else in_features
        self.out = nnx.Linear(width, spec.num_outputs, **kw)
        self.output_shape = spec.output_shape

    def __call__(self, z: jax.Array) -> jax.Array:
        if self.tower is not None:
            z = self.tower(z)
        y = self.out(z)
        return y.reshape(y.shape[0], *self.output_shape)


def _stack_create(factory: Callable[..., nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` calls of ``factory(rngs=...)`` as one module whose variables have a leading axis of ``count``:
    created once under ``nnx.vmap`` with ``rngs`` split ``count`` ways (``nnx.split_rngs``), so every copy draws its
    own initialisation and the trace holds one copy, whatever ``count``."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return factory(rngs=rngs)

    return create(rngs)


class Stacked(nnx.Module):
    """``count`` modules of one structure as a single module with a leading (expert or task) axis on every variable.

    Built with :func:`flax.nnx.vmap` and :func:`flax.nnx.split_rngs`; applied with ``jax.vmap``, so tracing and
    compiling cost the same for 2 or 64 copies (a Python list of modules is traced once per copy). ``module[i]`` is
    copy ``i`` as an ordinary module (a view for inspection and tests; the stacked parameters are the trained ones).

    Args:
      factory: called as ``factory(rngs=rngs)``.
      count: number of copies (>= 1).
      rngs: the model's ``nnx.Rngs``.
      name: with a name, ``factory`` must build modules with an int ``out_features`` (backbones, experts;
        :func:`build_backbone`, which also hands them ``dtype`` / ``param_dtype``), and errors name this argument.
    """

    def __init__(
        self,
        factory: Callable[..., nnx.Module],
        count: int,
        *,
        rngs: nnx.Rngs,
        name: str | None = None,
        dtype: Any = None,
        param_dtype: Any = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"`{name or 'count'}`: a stack needs at least one copy, got {count}")
        dtypes = {"dtype": dtype, "param_dtype": param_dtype}
        make = factory if name is None else (lambda rngs: build_backbone(factory, rngs, name, **dtypes))
        self.stack = _stack_create(make, count, rngs)
        self.count = int(count)
        self.out_features = getattr(self.stack, "out_features", None)

    def __len__(self) -> int:
        return self.count

    def __call__(self, x: jax.Array, *, stacked_input: bool = False) -> jax.Array:
        """``(count, n, ...)``: every copy applied to ``x`` (``(n, ...)``, the same for all) or, with
        ``stacked_input``, copy ``i`` to ``x[i]`` (``x`` of shape ``(count, n, ...)``)."""
        # Functional split/merge under jax.vmap rather than nnx.vmap on the module: the train step of a seed
        # ensemble (corrjax.train.ensemble) merges the model from jax.vmap tracers, whose Variables nnx.vmap refuses
        # to extract ("different trace level"). The copies hold only parameters (the backbones' contract), so
        # nothing the forward pass would update is lost.
        graphdef, state = nnx.split(self.stack)
        apply = lambda s, x: nnx.merge(graphdef, s)(x)
        return jax.vmap(apply, in_axes=(0, 0 if stacked_input else None), out_axes=0)(state, x)

    def __getitem__(self, i: int) -> nnx.Module:
        if not -self.count <= i < self.count:
            raise IndexError(f"copy {i} of a stack of {self.count}")
        graphdef, state = nnx.split(self.stack)
        return nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))


def _group_name(shape: tuple[int, ...]) -> str:
    return "out_" + ("x".join(str(d) for d in shape) or "scalar")


class TaskHeads(nnx.Module):
    """Every task's :class:`TaskHead`, stacked: one :class:`Stacked` head per output shape, holding the heads of the
    tasks with that shape (in task order) along a leading axis, applied with one ``nnx.vmap``.

    Tasks of different output shapes cannot share one stacked kernel (their output layers differ in size), so they
    form separate groups under ``groups[<"out_4" | "out_scalar" | ...>]``; with every task of one shape (the
    synthetic and CelebA presets) there is a single group. ``heads[name]`` is task ``name``'s head as a module (a
    view), so ``heads[name](z)`` equals that task's entry of ``heads(z)``.
    """

    def __init__(
        self,
        in_features: int,
        tasks: Sequence[TaskSpec],
        hidden: Sequence[int],
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        by_shape: dict[tuple[int, ...], list[TaskSpec]] = {}
        for t in tasks:
            by_shape.setdefault(tuple(t.output_shape), []).append(t)
        self.task_names = tuple(t.name for t in tasks)
        self.slots = {t.name: (_group_name(shape), i) for shape, ts in by_shape.items() for i, t in enumerate(ts)}
        self.members = {_group_name(shape): tuple(t.name for t in ts) for shape, ts in by_shape.items()}
        self.groups = nnx.Dict(
            {
                _group_name(shape): Stacked(
                    partial(TaskHead, in_features, ts[0], hidden, dtype=dtype, param_dtype=param_dtype),
                    len(ts),
                    rngs=rngs,
                )
                for shape, ts in by_shape.items()
            }
        )

    def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
        """``{task: output}`` of every head reading the same ``z (n, in_features)``."""
        out = {}
        for g, names in self.members.items():
            ys = self.groups[g](z)
            out.update({n: ys[i] for i, n in enumerate(names)})
        return {n: out[n] for n in self.task_names}

    def per_task(self, zs: jax.Array | Sequence[jax.Array]) -> dict[str, jax.Array]:
        """``{task: output}`` with head ``t`` reading ``zs[t]`` (``(T, n, in_features)`` or a sequence, task order)."""
        if not isinstance(zs, jax.Array):
            zs = jnp.stack(list(zs))
        out, index = {}, {n: k for k, n in enumerate(self.task_names)}
        for g, names in self.members.items():
            rows = [index[n] for n in names]
            part = zs if rows == list(range(len(self.task_names))) else zs[np.asarray(rows)]
            ys = self.groups[g](part, stacked_input=True)
            out.update({n: ys[i] for i, n in enumerate(names)})
        return {n: out[n] for n in self.task_names}

    def __getitem__(self, name: str) -> nnx.Module:
        group, i = self.slots[name]
        return self.groups[group][i]


def make_heads(
    in_features: int,
    tasks: Sequence[TaskSpec],
    hidden: Sequence[int],
    rngs: nnx.Rngs,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> TaskHeads:
    return TaskHeads(in_features, tasks, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class MultiTaskModel(nnx.Module):
    """Base class: subclasses set ``tasks`` and ``task_specific`` and implement ``features``/``from_features``."""

    tasks: tuple[TaskSpec, ...]
    task_specific: tuple[str, ...] = ("heads",)

    def _init_tasks(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = check_tasks(tasks)
        self.task_names = tuple(t.name for t in self.tasks)

    def is_task_specific(self, path: tuple[str | int, ...]) -> bool:
        """Whether the parameter at ``path`` (keys into ``nnx.state(model, nnx.Param)``) is task-specific."""
        return bool(path) and path[0] in self.task_specific

    def features(self, x: jax.Array) -> Any:
        raise NotImplementedError

    def from_features(self, z: Any, x: jax.Array) -> dict[str, jax.Array]:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        return self.from_features(self.features(x), x)


def shared_mask(model: nnx.Module) -> Any:
    """A pytree of Python bools with the structure of ``nnx.state(model, nnx.Param)``: True for shared parameters.

    Shared means reached by the losses of several tasks (trunk, experts, cross-stitch units); task-specific
    parameters (heads, towers, per-task gates and attention) are False.
    """
    params = nnx.state(model, nnx.Param)
    # A plain module (not a MultiTaskModel) is all shared.
    is_specific = model.is_task_specific if isinstance(model, MultiTaskModel) else lambda path: False

    def key(k: Any) -> Any:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return getattr(k, attr)
        return k

    def leaf(path: tuple[Any, ...], _: Any) -> bool:
        return not is_specific(tuple(key(k) for k in path))

    return jax.tree_util.tree_map_with_path(leaf, params)


def count_params(model: nnx.Module, mask: Any = None) -> dict[str, int]:
    """Parameter counts: ``{"total", "shared", "task_specific"}`` (from :func:`shared_mask` unless given)."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    flags = jax.tree.leaves(shared_mask(model) if mask is None else mask)
    sizes = [int(np.prod(p.shape)) for p in params]
    shared = sum(s for s, f in zip(sizes, flags, strict=True) if f)
    return {"total": sum(sizes), "shared": shared, "task_specific": sum(sizes) - shared}
