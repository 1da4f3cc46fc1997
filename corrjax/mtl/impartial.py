"""Impartial multi-task learning: IMTL-L (learned loss scales) and full IMTL (IMTL-G on the IMTL-L-scaled losses).

:func:`imtl_l` is a loss weighting like those of :mod:`corrjax.mtl.weighting` (extra arg ``task_losses``, shape
``(T,)``); :func:`imtl` chains it, with the task axis kept, in front of :func:`corrjax.mtl.imtl_g`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators import _tracked
from corrjax.mtl.aggregators.imtl import imtl_g
from corrjax.mtl.weighting import _check_num_tasks, _combine, _float_dtype, _task_losses

__all__ = ["IMTLLState", "IMTLState", "imtl", "imtl_l"]


class IMTLLState(NamedTuple):
    """State of :func:`imtl_l`.

    Attributes:
      log_scales: ``(T,)`` learned loss scales ``s_t`` (the loss is ``e^{s_t} L_t - s_t``).
      inner_state: state of the inner optimiser that updates ``log_scales``.
      weights: ``(T,)`` weights ``e^{s_t}`` applied at the last step.
      count: number of updates so far.
    """

    log_scales: jax.Array
    inner_state: optax.OptState
    weights: jax.Array
    count: jax.Array


class IMTLState(NamedTuple):
    """State of :func:`imtl`.

    Attributes:
      scaling: the :class:`IMTLLState` of the loss scales.
      gradient: the state of :func:`corrjax.mtl.imtl_g` (empty).
    """

    scaling: IMTLLState
    gradient: optax.OptState


def imtl_l(
    num_tasks: int,
    learning_rate: chex.Numeric = 1e-2,
    *,
    init_log_scales: chex.Numeric = 0.0,
    optimizer: optax.GradientTransformation | None = None,
    reduce: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL-L: learned loss scales that make every scaled loss equal to 1.

    The scaled loss of task ``t`` is ``e^{s_t} L_t - s_t``: its gradient in the network parameters is ``e^{s_t}
    g_t`` and in ``s_t`` it is ``e^{s_t} L_t - 1``, which vanishes at ``e^{s_t} L_t = 1`` (every task's scaled loss
    is 1 at the optimum of ``s``, whatever the loss's scale). The returned update is ``sum_t e^{s_t} g_t``; then
    ``s`` takes one step of ``optimizer`` (default ``optax.sgd(learning_rate)``) on that exact gradient, the same
    simultaneous step as training ``s`` with the network. ``s`` starts at ``init_log_scales`` (0: the summed loss).
    ``T = 1`` gives ``e^{s} g``.

    Args:
      num_tasks: ``T`` (static).
      learning_rate: step size of the default inner SGD on ``s`` (ignored if ``optimizer`` is given).
      init_log_scales: initial ``s`` (scalar or ``(T,)``).
      optimizer: inner Optax transformation for ``s``.
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    Reference: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
    (Sec. 3.1, loss balance); LibMTL ``IMTL`` (its ``loss_scale``).
    """
    num_tasks = _check_num_tasks(num_tasks)
    inner = optimizer if optimizer is not None else optax.sgd(learning_rate)

    def init_fn(params: Any) -> IMTLLState:
        del params
        s = jnp.broadcast_to(jnp.asarray(init_log_scales, _float_dtype()), (num_tasks,))
        return IMTLLState(log_scales=s, inner_state=inner.init(s), weights=jnp.exp(s), count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: IMTLLState, params: Any = None, **extra_args: Any) -> tuple[Any, IMTLLState]:
        del params
        losses = _task_losses(extra_args, "imtl_l", num_tasks, updates)
        s = state.log_scales
        weights = jnp.exp(s)
        grad_s = weights * losses.astype(s.dtype) - 1.0
        step, inner_state = inner.update(grad_s, state.inner_state, s)
        new_state = IMTLLState(
            log_scales=optax.apply_updates(s, step),
            inner_state=inner_state,
            weights=weights,
            count=optax.safe_increment(state.count),
        )
        return _combine(weights, updates, reduce), new_state

    return _tracked.checked(optax.GradientTransformationExtraArgs(init_fn, update_fn), "imtl_l")


def imtl(
    num_tasks: int,
    learning_rate: chex.Numeric = 1e-2,
    *,
    init_log_scales: chex.Numeric = 0.0,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL: IMTL-G's combination of the gradients of the IMTL-L-scaled losses.

    The task gradients are first scaled by the learned loss scales (:func:`imtl_l` with the task axis kept:
    ``e^{s_t} g_t``), then combined by :func:`corrjax.mtl.imtl_g` (weights summing to 1, equal projections on every
    unit gradient), as in the paper's Algorithm 1 and LibMTL's ``IMTL``. The unit gradients do not depend on the
    scales, but the combination's weights (which sum to 1 over the scaled gradients) do, so the update's length
    follows the balanced losses. ``s`` is updated as in :func:`imtl_l`. In a shared-trunk model
    (:func:`corrjax.mtl.shared_only`) the heads get their own task's unscaled gradient, as with every weighting here.

    Args:
      num_tasks: ``T`` (static).
      learning_rate, init_log_scales, optimizer: see :func:`imtl_l`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`IMTLState`; ``update`` needs the extra arg
      ``task_losses`` of shape ``(T,)``.

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Sec. 3.3 and Algorithm 1).
    """
    scaling = imtl_l(num_tasks, learning_rate, init_log_scales=init_log_scales, optimizer=optimizer, reduce=False)
    gradient = imtl_g()

    def init_fn(params: Any) -> IMTLState:
        return IMTLState(scaling=scaling.init(params), gradient=gradient.init(params))

    def update_fn(updates: Any, state: IMTLState, params: Any = None, **extra_args: Any) -> tuple[Any, IMTLState]:
        scaled, scaling_state = scaling.update(updates, state.scaling, params, **extra_args)
        out, gradient_state = gradient.update(scaled, state.gradient, params, **extra_args)
        return out, IMTLState(scaling=scaling_state, gradient=gradient_state)

    return _tracked.checked(optax.GradientTransformationExtraArgs(init_fn, update_fn), "imtl")
