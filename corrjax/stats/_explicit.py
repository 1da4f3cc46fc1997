"""Inputs whose rows are sharded over an Explicit mesh axis, under plain ``jit`` (no ``axis_name`` given).

``jax.make_mesh`` creates Explicit axes by default, so a user's batch often arrives as ``f32[n@data, d]``. Static
row slices, sorts along the rows and matrix products that contract over them are then rejected at trace time
(Explicit sharding refuses to guess an output sharding). Every observation-reducing function already has an exact
sharded implementation behind ``axis_name``; :func:`shard_rows` routes such calls to it: it wraps the function in a
``jax.shard_map`` over the mesh axes that shard the rows, passes those axes as ``axis_name``, and returns the
replicated global result. Inputs that are not row-sharded take the ordinary path unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _row_axes(x: Any) -> tuple[Any, Any] | None:
    """``(mesh, axes)`` when axis 0 of ``x`` is sharded over Explicit mesh axes, else ``None``."""
    if not isinstance(x, jax.Array) or x.ndim == 0:
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return None
    return sharding.mesh, spec[0]


def shard_rows(*row_args: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates a function with an ``axis_name`` keyword whose arguments ``row_args`` share the observation axis 0.

    When ``axis_name`` is None and the first row argument has its rows sharded over Explicit mesh axes, every row
    argument given (not None) is resharded to that row sharding (columns replicated) and the function runs inside
    ``jax.shard_map`` with ``axis_name`` set to those axes; its output is replicated (``out_specs=P()``).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            if bound.arguments.get("axis_name") is not None or bound.arguments.get("axis", 0) != 0:
                return fn(*args, **kwargs)
            found = _row_axes(bound.arguments.get(row_args[0]))
            if found is None:
                return fn(*args, **kwargs)
            mesh, axes = found
            names = [a for a in row_args if bound.arguments.get(a) is not None]
            values = [
                jax.sharding.reshard(jnp.asarray(bound.arguments[a]), NamedSharding(mesh, P(axes))) for a in names
            ]

            def local(*blocks: Any) -> Any:
                call = dict(bound.arguments)
                call.update(zip(names, blocks, strict=True))
                call["axis_name"] = axes
                return fn(**call)

            specs = tuple(P(axes) for _ in names)
            return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*values)

        return wrapper

    return decorate
