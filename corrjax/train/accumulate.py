"""Gradient accumulation inside the train step (``trainer.grad_accum_steps``).

The batch of a step (``trainer.batch_size`` examples, the global batch) is split into ``k`` micro-batches of
``batch_size / k`` examples; :func:`accumulate` runs the per-micro-batch function over them with ``lax.scan`` and
averages what it returns, so the aggregator and the optimiser run once per step on the mean task-stacked gradient.
Accumulating the task-stacked gradients (not the aggregated updates) is what makes this exact: aggregators such as
PCGrad or MGDA are nonlinear in the task gradients, so averaging ``k`` aggregated updates (``optax.MultiSteps`` after
the aggregator) would not be the update of the whole batch. For losses that are means over examples (the task
losses of :mod:`corrjax.train.tasks`), ``k`` micro-batches give the gradient of the whole batch up to float
rounding; batch-level losses (the ``pearson``/``concordance``/``spearman`` task losses, representation regularisers)
are computed per micro-batch and averaged, which is what accumulation means for them.

Micro-batch ``j`` holds the examples ``j, j + k, j + 2k, ...`` of the batch: with the batch split over the mesh's data
axis in contiguous blocks, every device then holds ``batch_size / (k * devices)`` examples of every micro-batch, and
no example moves between devices (the batch size must be a multiple of ``k`` times the device count).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def split_micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """``{name: (n, ...)} -> {name: (k, n / k, ...)}``, micro-batch ``j`` the examples ``j, j + k, ...``.

    Raises ``ValueError`` naming ``trainer.grad_accum_steps`` when ``n`` is not a multiple of ``k``."""
    sizes = {name: jnp.shape(v)[0] for name, v in batch.items()}
    bad = {name: n for name, n in sizes.items() if n % k}
    if bad:
        raise ValueError(
            f"`trainer.grad_accum_steps`={k} must divide the batch size (`trainer.batch_size`); got batch leaves "
            f"of {bad} examples"
        )
    return {name: jnp.swapaxes(v.reshape(v.shape[0] // k, k, *v.shape[1:]), 0, 1) for name, v in batch.items()}


def _acc_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def accumulate(
    fn: Callable[[Any, Mapping[str, jax.Array]], tuple[Any, Any]],
    carry: Any,
    batch: Mapping[str, jax.Array],
    k: int,
) -> tuple[Any, Any]:
    """Runs ``fn(carry, micro_batch) -> (carry, values)`` over the ``k`` micro-batches of ``batch``
    (:func:`split_micro_batches`) with ``lax.scan``, threading ``carry`` (e.g. the model's non-parameter state), and
    returns ``(carry, mean of values)``; floating values are summed in at least float32 and returned in their dtype."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`trainer.grad_accum_steps` must be a positive int, got {k!r}")
    micro = split_micro_batches(batch, k)
    shapes = jax.eval_shape(fn, carry, jax.tree.map(lambda v: v[0], micro))[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _acc_dtype(s.dtype)), shapes)

    def body(state: tuple[Any, Any], mb: Mapping[str, jax.Array]) -> tuple[tuple[Any, Any], None]:
        c, total = state
        c, values = fn(c, mb)
        return (c, jax.tree.map(lambda t, v: t + v.astype(t.dtype), total, values)), None

    (carry, total), _ = jax.lax.scan(body, (carry, zeros), micro)
    mean = jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, shapes)
    return carry, mean
