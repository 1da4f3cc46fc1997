"""Trace-time argument validation shared by every corrjax transform.

Everything here inspects only static information (ranks, shapes, dtypes, Python values), so it runs once while
``jit`` traces and raises a clear ``ValueError``/``TypeError`` naming the argument and its shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


def as_array(x: Any, name: str) -> Array:
    """Returns ``x`` as a real JAX array, keeping its dtype (integers stay integers); complex input is rejected."""
    try:
        arr = jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"`{name}` must be array-like, got {type(x).__name__}") from e
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {arr.dtype}")
    return arr


def as_float_array(x: Any, name: str) -> Array:
    """Returns ``x`` as a JAX array of floating dtype.

    Integer and boolean input is promoted to the default float dtype (float32, or float64 under x64); floating input
    keeps its dtype (float32 stays float32, bf16 stays bf16). Complex input is rejected.
    """
    arr = as_array(x, name)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    return arr


def as_columns(x: Any, name: str) -> tuple[Array, bool]:
    """Returns ``(x2d, was_1d)``: ``x`` as an ``(n, d)`` float array; a 1-D ``(n,)`` input becomes ``(n, 1)``."""
    arr = as_float_array(x, name)
    if arr.ndim == 1:
        return arr[:, None], True
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be 1-D (n,) or 2-D (n, d) with observations in rows, got shape {arr.shape}")
    return arr, False


def check_same_n(x: Array, y: Array, xname: str = "x", yname: str = "y", axis: int = 0) -> None:
    """Raises ``ValueError`` unless ``x`` and ``y`` have the same number of observations along ``axis``."""
    if x.shape[axis] != y.shape[axis]:
        raise ValueError(
            f"`{xname}` and `{yname}` must have the same number of observations (axis {axis}): "
            f"got {xname}.shape={tuple(x.shape)} and {yname}.shape={tuple(y.shape)}"
        )


def check_ddof(ddof: Any, name: str = "ddof") -> None:
    """Raises unless ``ddof`` is a non-negative Python/NumPy integer (static, as numpy requires)."""
    if isinstance(ddof, bool) or not isinstance(ddof, int | np.integer):
        raise TypeError(f"`{name}` must be a non-negative int, got {ddof!r}")
    if ddof < 0:
        raise ValueError(f"`{name}` must be non-negative, got {ddof}")


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """Returns ``value`` if it is one of ``choices``; otherwise raises ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown `{name}`={value!r}; expected one of {', '.join(map(repr, choices))}")
    return value
