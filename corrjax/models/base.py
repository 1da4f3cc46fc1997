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


def make_heads(
    in_features: int,
    tasks: Sequence[TaskSpec],
    hidden: Sequence[int],
    rngs: nnx.Rngs,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Dict:
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    return nnx.Dict({t.name: TaskHead(in_features, t, hidden, **kw) for t in tasks})


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
