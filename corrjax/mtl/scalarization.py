"""Smooth Tchebycheff scalarisation (STCH) as a loss weighting over task-stacked gradients.

Like the weightings of :mod:`corrjax.mtl.weighting`, :func:`stch` reads the task losses (extra arg ``task_losses``,
shape ``(T,)``) and returns ``sum_t w_t g_t``, the gradient of its scalarised loss at the current losses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax.mtl.aggregators import _tracked
from corrjax.mtl.weighting import _check_num_tasks, _combine, _float_dtype, _task_losses

__all__ = ["STCHState", "stch"]


class STCHState(NamedTuple):
    """State of :func:`stch`.

    Attributes:
      reference: ``(T,)`` the reference point ``z`` in use (the ideal point; after a warm-up, the mean warm-up loss).
      loss_sum: ``(T,)`` sum of the losses over the averaging steps of the warm-up.
      loss_count: number of losses summed into ``loss_sum``.
      weights: ``(T,)`` weights applied at the last step.
      count: number of updates so far.
    """

    reference: jax.Array
    loss_sum: jax.Array
    loss_count: jax.Array
    weights: jax.Array
    count: jax.Array


def _check_steps(value: Any, name: str) -> None:
    if isinstance(value, bool) or (isinstance(value, int | float) and (int(value) != value or value < 0)):
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")


def stch(
    num_tasks: int,
    mu: chex.Numeric = 1.0,
    *,
    warmup_steps: chex.Numeric = 0,
    average_steps: chex.Numeric | None = None,
    ideal_point: chex.Numeric | None = None,
    preference: chex.Numeric | None = None,
    log_transform: bool = True,
    eps: float = 1e-20,
    reduce: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Smooth Tchebycheff scalarisation: the gradient of ``T mu logsumexp(p_t (f_t - z_t) / mu)``.

    With ``log_transform=True`` (the authors' multi-task code) ``f_t - z_t = log(L_t / z_t + eps)``, the log losses
    measured from the reference point ``z``; with ``log_transform=False`` the paper's Eq. 5, ``f_t - z_t = L_t -
    z_t``. The update is the gradient of the scalarised loss,

    .. math::
        d = \sum_t w_t g_t, \qquad w_t = T\, \mathrm{softmax}\big(p \odot (f - z) / \mu\big)_t\, p_t\,
        \frac{\partial f_t}{\partial L_t}, \quad \frac{\partial f_t}{\partial L_t} = \frac{1}{L_t + \mathrm{eps}\, z_t}
        \ \text{(log)}, \ 1 \ \text{(linear)},

    a smooth maximum over the tasks (``mu -> 0``: the Tchebycheff scalarisation, all weight on the worst task;
    ``mu -> inf``: the sum of ``f``). Warm-up as in the authors' code: for the first ``warmup_steps`` updates the
    loss is ``sum_t log(L_t + eps)`` (weights ``1 / (L_t + eps)``; ``sum_t L_t`` without the log transform), and the
    reference point becomes the mean loss over the last ``average_steps`` warm-up steps (default: all of them).
    The authors' ``warmup_epoch = E`` is ``warmup_steps = (E + 1) * steps_per_epoch`` with ``average_steps =
    steps_per_epoch``. Without warm-up the reference is ``ideal_point`` (default 1 with the log transform, i.e.
    ``f = log L``, and 0 without). Stateful only through the warm-up; ``T = 1`` gives ``g / L`` (``g`` linear).

    Args:
      num_tasks: ``T`` (static).
      mu: smoothing ``mu > 0`` (LibMTL ``STCH_mu``; may be an array).
      warmup_steps: updates with the log-sum loss before STCH starts (int >= 0).
      average_steps: warm-up steps averaged into the reference point (int >= 1; default ``warmup_steps``).
      ideal_point: fixed reference ``z`` (scalar or ``(T,)``) when ``warmup_steps = 0``.
      preference: ``(T,)`` preference ``p > 0`` (default ones, as in the authors' code).
      log_transform: the authors' log losses (default) or the paper's raw losses.
      eps: added inside the log (the authors' 1e-20).
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    References:
      Lin, Zhang, Zhang, Fu, Liu & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML
      2024 (Eq. 5); the authors' STCH_MTL code and LibMTL ``STCH``.
    """
    num_tasks = _check_num_tasks(num_tasks)
    if isinstance(mu, int | float) and not isinstance(mu, bool) and not mu > 0:
        raise ValueError(f"`mu` must be positive, got {mu!r}")
    _check_steps(warmup_steps, "warmup_steps")
    if average_steps is not None:
        _check_steps(average_steps, "average_steps")
    for name, value in (("ideal_point", ideal_point), ("preference", preference)):
        if value is not None and (jnp.ndim(value) > 1 or (jnp.ndim(value) == 1 and jnp.shape(value) != (num_tasks,))):
            shape = jnp.shape(value)
            raise ValueError(f"`{name}` must be a scalar or have shape (num_tasks,) = ({num_tasks},), got {shape}")

    def init_fn(params: Any) -> STCHState:
        del params
        dtype = _float_dtype()
        default = 1.0 if log_transform else 0.0
        ref = jnp.broadcast_to(jnp.asarray(default if ideal_point is None else ideal_point, dtype), (num_tasks,))
        return STCHState(
            reference=jnp.array(ref),
            loss_sum=jnp.zeros((num_tasks,), dtype),
            loss_count=jnp.zeros([], jnp.int32),
            weights=jnp.ones((num_tasks,), dtype),
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates: Any, state: STCHState, params: Any = None, **extra_args: Any) -> tuple[Any, STCHState]:
        del params
        dtype = state.weights.dtype
        losses = _task_losses(extra_args, "stch", num_tasks, updates).astype(dtype)
        warm = jnp.asarray(warmup_steps)
        avg = warm if average_steps is None else jnp.asarray(average_steps)
        k = state.count
        in_warmup = k < warm
        averaging = in_warmup & (k >= warm - avg)
        loss_sum = state.loss_sum + jnp.where(averaging, losses, 0.0)
        loss_count = state.loss_count + averaging.astype(jnp.int32)
        # the warm-up's last step fixes the reference point
        ends = (k == warm - 1) & (loss_count > 0)
        ref = jnp.where(ends, loss_sum / jnp.maximum(loss_count, 1).astype(dtype), state.reference)
        pref = (
            jnp.ones((num_tasks,), dtype)
            if preference is None
            else jnp.broadcast_to(jnp.asarray(preference, dtype), (num_tasks,))
        )
        if log_transform:
            warm_w = 1.0 / (losses + eps)
            f = jnp.log(losses / state.reference + eps)
            df = 1.0 / (losses + eps * state.reference)
        else:
            warm_w = jnp.ones_like(losses)
            f = losses - state.reference
            df = jnp.ones_like(losses)
        soft = jax.nn.softmax(pref * f / jnp.asarray(mu, dtype))
        weights = jnp.where(in_warmup, warm_w, num_tasks * soft * pref * df)
        new_state = STCHState(
            reference=ref,
            loss_sum=loss_sum,
            loss_count=loss_count,
            weights=weights,
            count=optax.safe_increment(state.count),
        )
        return _combine(weights, updates, reduce), new_state

    return _tracked.checked(optax.GradientTransformationExtraArgs(init_fn, update_fn), "stch")
