"""Loss-based task weightings as Optax transformations over task-stacked gradients.

Each weighting here reads the current task losses (extra arg ``task_losses``, shape ``(T,)``) and the task-stacked
gradient pytree (every leaf has a leading task axis ``T``), computes task weights ``w`` of shape ``(T,)`` and returns
``sum_t w_t g_t`` (the gradient of the weighted loss ``sum_t w_t L_t``), so that::

    optax.chain(corrjax.mtl.dwa(num_tasks=3), optax.adam(1e-3))

is a complete multi-task optimiser driven by ``update(task_grads, state, params, task_losses=losses)``. With
``reduce=False`` a weighting keeps the task axis and returns ``w_t g_t`` stacked, so it can be chained in front of a
gradient aggregator (``optax.chain(uncertainty_weighting(T, reduce=False), corrjax.mtl.pcgrad(), optax.sgd(lr))``).

Weights are held constant for the step (they are not differentiated through); methods with learned parameters keep
them in their state and update them with their own objective's exact gradient by a small inner Optax optimiser, so
the whole thing stays one pure, jittable update. The weights of the last step are kept in ``state.weights`` for
logging. The task count ``num_tasks`` is static (pass it in ``static_args`` of ``optax.inject_hyperparams``).

Non-finite losses or gradients are not hidden: they make the weights (and with learned weightings, the state) NaN.

As for the aggregators, put a weighting outside ``optax.MultiSteps`` (whose accumulator has the shape of the
parameters, not of task-stacked gradients): ``optax.chain(dwa(T), optax.MultiSteps(opt, k).gradient_transformation())``.
The weighting then runs at every mini-step with that mini-step's losses, and learned weights advance every mini-step.
With ``shared_only(weighting, mask)`` only the shared leaves are reweighted; head leaves pass through with their own
task's (unweighted) gradient.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax._checks import as_float_array
from corrjax.mtl import _gramian

logger = logging.getLogger(__name__)

__all__ = [
    "DWAState",
    "FAMOState",
    "GeometricMeanState",
    "GradNormState",
    "UncertaintyWeightingState",
    "dwa",
    "famo",
    "geometric_mean",
    "gradnorm",
    "uncertainty_weighting",
]


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers.


def _check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(
            f"`num_tasks` must be a positive Python int (static; list it in `static_args` of "
            f"optax.inject_hyperparams), got {num_tasks!r}"
        )
    return num_tasks


def _task_losses(extra_args: dict[str, Any], name: str, num_tasks: int, updates: Any) -> jax.Array:
    """Validates the ``task_losses`` extra arg against ``num_tasks`` and the gradient's task axis."""
    if "task_losses" not in extra_args or extra_args["task_losses"] is None:
        raise ValueError(
            f"{name} needs the task losses: call update(task_grads, state, params, task_losses=losses) with "
            f"losses of shape ({num_tasks},)"
        )
    losses = as_float_array(extra_args["task_losses"], "task_losses")
    if losses.shape != (num_tasks,):
        raise ValueError(f"{name}: `task_losses` must have shape ({num_tasks},) (num_tasks,), got {losses.shape}")
    t = _gramian.num_tasks(updates, "updates")
    if t != num_tasks:
        raise ValueError(
            f"{name}: the gradient's leading task axis is {t} but num_tasks={num_tasks} "
            f"(task_losses shape {losses.shape})"
        )
    return losses


def _combine(weights: jax.Array, updates: Any, reduce: bool) -> Any:
    """``sum_t w_t g_t`` per leaf (``reduce``) or the stacked ``w_t g_t``; each leaf keeps its dtype."""
    if reduce:
        return _gramian.combine(weights, updates)

    def scale(g):
        w = weights.astype(jnp.promote_types(g.dtype, jnp.float32))
        return (w.reshape((-1,) + (1,) * (g.ndim - 1)) * g).astype(g.dtype)

    return jax.tree.map(scale, updates)


def _task_sq_norms(updates: Any) -> jax.Array:
    """``(T,)`` squared Euclidean norms of each task's gradient over all leaves (accumulated in float32 or wider)."""
    sq = [
        jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree.leaves(updates)
    ]
    return sum(sq[1:], sq[0])


def _float_dtype() -> Any:
    return jnp.result_type(float)


# --------------------------------------------------------------------------------------------------------------------
# Uncertainty weighting (Kendall et al. 2018).


class UncertaintyWeightingState(NamedTuple):
    """State of :func:`uncertainty_weighting`.

    Attributes:
      log_vars: ``(T,)`` learned log-variances ``s_t = log sigma_t^2``.
      inner_state: state of the inner optimiser that updates ``log_vars``.
      weights: ``(T,)`` weights ``exp(-s_t) / 2`` applied at the last step.
      count: number of updates so far.
    """

    log_vars: jax.Array
    inner_state: optax.OptState
    weights: jax.Array
    count: jax.Array


def uncertainty_weighting(
    num_tasks: int,
    learning_rate: chex.Numeric = 1e-2,
    *,
    init_log_vars: chex.Numeric = 0.0,
    optimizer: optax.GradientTransformation | None = None,
    reduce: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Homoscedastic-uncertainty loss weighting with learned log-variances.

    The objective is Kendall et al.'s, in LibMTL's parameterisation ``s_t = log sigma_t^2``:

    .. math:: \mathcal{L}(\theta, s) = \sum_t \tfrac12 e^{-s_t} L_t(\theta) + \tfrac12 s_t .

    The returned update is its gradient in the network parameters, ``sum_t w_t g_t`` with ``w_t = exp(-s_t) / 2``
    (so ``1/2`` the summed-loss gradient at initialisation with ``s = 0``; the optimum of ``s_t`` is ``log L_t``,
    where the weight is ``1 / (2 L_t)``). The log-variances live in the state and are updated each step, after the
    weights for this step are taken, by ``optimizer`` (default ``optax.sgd(learning_rate)``) applied to their exact
    gradient ``dL/ds_t = (1 - e^{-s_t} L_t) / 2``: the same simultaneous gradient step as training ``s`` jointly
    with the network. With ``T = 1`` the result is ``w_1 g_1``, not ``g_1``.

    Args:
      num_tasks: ``T`` (static).
      learning_rate: step size of the default inner SGD on the log-variances (ignored if ``optimizer`` is given).
      init_log_vars: initial ``s`` (scalar or ``(T,)``).
      optimizer: inner Optax transformation for the log-variances.
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    References:
      Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
      Semantics*, CVPR 2018. LibMTL ``UW`` (same parameterisation).
    """
    num_tasks = _check_num_tasks(num_tasks)
    inner = optimizer if optimizer is not None else optax.sgd(learning_rate)

    def init_fn(params):
        del params
        s = jnp.broadcast_to(jnp.asarray(init_log_vars, _float_dtype()), (num_tasks,))
        return UncertaintyWeightingState(
            log_vars=s, inner_state=inner.init(s), weights=0.5 * jnp.exp(-s), count=jnp.zeros([], jnp.int32)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        losses = _task_losses(extra_args, "uncertainty_weighting", num_tasks, updates)
        s = state.log_vars
        weights = 0.5 * jnp.exp(-s)
        grad_s = 0.5 - weights * losses.astype(s.dtype)
        step, inner_state = inner.update(grad_s, state.inner_state, s)
        new_s = optax.apply_updates(s, step)
        new_state = UncertaintyWeightingState(
            log_vars=new_s, inner_state=inner_state, weights=weights, count=optax.safe_increment(state.count)
        )
        return _combine(weights, updates, reduce), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------------------------
# Dynamic weight average (Liu et al. 2019).


class DWAState(NamedTuple):
    """State of :func:`dwa`.

    Attributes:
      window_sum: ``(T,)`` sum of the losses of the current (incomplete) averaging window.
      window_count: steps accumulated in the current window.
      last: ``(T,)`` mean losses of the last complete window, ``L(k-1)``.
      before_last: ``(T,)`` mean losses of the window before, ``L(k-2)``.
      windows: number of complete windows so far.
      weights: ``(T,)`` weights applied at the last step.
    """

    window_sum: jax.Array
    window_count: jax.Array
    last: jax.Array
    before_last: jax.Array
    windows: jax.Array
    weights: jax.Array


def dwa(
    num_tasks: int, temperature: chex.Numeric = 2.0, *, period: int = 1, reduce: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic Weight Average: weights from the relative descent rate of each task's loss.

    .. math:: r_t = \bar L_t(k-1) / \bar L_t(k-2), \qquad w_t = T \,\mathrm{softmax}(r / \tau)_t ,

    where ``\bar L(k)`` is the mean loss over the ``k``-th window of ``period`` steps (``period=1``: the previous two
    steps' losses; ``period=steps_per_epoch`` reproduces the paper's and LibMTL's epoch averages). Until two windows
    are complete the weights are all 1. The weights sum to ``T`` (the summed-loss scale); they do not depend on the
    current step's losses, which only enter the history. Deterministic, permutation-equivariant; ``T = 1`` gives
    ``g_1``. A zero loss in the history gives ``inf``/``NaN`` ratios (as in the paper's formula).

    Args:
      num_tasks: ``T`` (static).
      temperature: ``tau`` > 0; larger is closer to uniform weights.
      period: steps per averaging window (int >= 1; may be an integer array under ``inject_hyperparams``).
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    References:
      Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019 (Eq. 7). LibMTL ``DWA``.
    """
    num_tasks = _check_num_tasks(num_tasks)
    if isinstance(period, bool) or (isinstance(period, int | float) and (int(period) != period or period < 1)):
        raise ValueError(f"`period` must be a positive int, got {period!r}")

    def init_fn(params):
        del params
        # Distinct buffers for every field, so the state can be donated to a jitted step.
        ones = lambda: jnp.ones((num_tasks,), _float_dtype())
        return DWAState(
            window_sum=jnp.zeros((num_tasks,), _float_dtype()),
            window_count=jnp.zeros([], jnp.int32),
            last=ones(),
            before_last=ones(),
            windows=jnp.zeros([], jnp.int32),
            weights=ones(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        losses = _task_losses(extra_args, "dwa", num_tasks, updates).astype(state.last.dtype)
        ratio = state.last / state.before_last
        soft = num_tasks * jax.nn.softmax(ratio / jnp.asarray(temperature, ratio.dtype))
        weights = jnp.where(state.windows >= 2, soft, jnp.ones_like(soft))
        window_sum = state.window_sum + losses
        window_count = state.window_count + 1
        done = window_count >= period
        mean = window_sum / window_count.astype(window_sum.dtype)
        new_state = DWAState(
            window_sum=jnp.where(done, jnp.zeros_like(window_sum), window_sum),
            window_count=jnp.where(done, 0, window_count),
            last=jnp.where(done, mean, state.last),
            before_last=jnp.where(done, state.last, state.before_last),
            windows=jnp.where(done, optax.safe_increment(state.windows), state.windows),
            weights=weights,
        )
        return _combine(weights, updates, reduce), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------------------------
# GradNorm (Chen et al. 2018).


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`.

    Attributes:
      task_weights: ``(T,)`` learned weights, positive and summing to ``T``.
      initial_losses: ``(T,)`` losses at the first step, ``L_t(0)``.
      inner_state: state of the inner optimiser that updates ``task_weights``.
      weights: ``(T,)`` weights applied at the last step.
      count: number of updates so far.
    """

    task_weights: jax.Array
    initial_losses: jax.Array
    inner_state: optax.OptState
    weights: jax.Array
    count: jax.Array


def gradnorm(
    num_tasks: int,
    alpha: chex.Numeric = 1.5,
    learning_rate: chex.Numeric = 0.025,
    *,
    optimizer: optax.GradientTransformation | None = None,
    reduce: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""GradNorm: learned weights that equalise the task-gradient norms at rates set by the training progress.

    With ``n_t = ||g_t||`` the norm of task ``t``'s gradient over the whole (shared) task-stacked pytree given to
    this transformation (the paper uses the last shared layer; pass only that subtree, or the whole shared trunk),
    ``G_t = w_t n_t``, ``\tilde L_t = L_t / L_t(0)`` and ``r_t = \tilde L_t / \mathrm{mean}(\tilde L)``:

    .. math:: \mathcal{L}_{grad}(w) = \sum_t \big| w_t n_t - \mathrm{sg}[\bar G \, r_t^{\alpha}] \big| .

    The returned update is ``sum_t w_t g_t`` with the current weights. Then, as in the paper, ``w`` takes one step
    of ``optimizer`` (default ``optax.sgd(learning_rate)``) on the exact gradient ``sign(G_t - target_t) n_t`` of
    ``L_grad`` (the target is a constant), is clipped below at machine epsilon (weights stay positive) and is
    renormalised to sum to ``T``. ``L_t(0)`` is the first step's losses. Weights start at 1, so ``T = 1`` always
    gives ``g_1``.

    Args:
      num_tasks: ``T`` (static).
      alpha: asymmetry ``alpha >= 0``; 0 pulls all ``G_t`` to their mean.
      learning_rate: step size of the default inner SGD on the weights (ignored if ``optimizer`` is given).
      optimizer: inner Optax transformation for the weights.
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
      Multitask Networks*, ICML 2018 (Eq. 2 and Algorithm 1).
    """
    num_tasks = _check_num_tasks(num_tasks)
    inner = optimizer if optimizer is not None else optax.sgd(learning_rate)

    def init_fn(params):
        del params
        w = jnp.ones((num_tasks,), _float_dtype())
        return GradNormState(
            task_weights=w,
            initial_losses=jnp.ones_like(w),
            inner_state=inner.init(w),
            weights=jnp.ones_like(w),
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        w = state.task_weights
        losses = _task_losses(extra_args, "gradnorm", num_tasks, updates).astype(w.dtype)
        initial = jnp.where(state.count == 0, losses, state.initial_losses)
        norms = jnp.sqrt(_task_sq_norms(updates)).astype(w.dtype)
        g_w = w * norms
        relative = losses / initial
        rate = relative / jnp.mean(relative)
        target = jax.lax.stop_gradient(jnp.mean(g_w) * rate ** jnp.asarray(alpha, w.dtype))
        grad_w = jnp.sign(g_w - target) * norms
        step, inner_state = inner.update(grad_w, state.inner_state, w)
        new_w = jnp.maximum(optax.apply_updates(w, step), jnp.finfo(w.dtype).eps)
        new_w = num_tasks * new_w / jnp.sum(new_w)
        new_state = GradNormState(
            task_weights=new_w,
            initial_losses=initial,
            inner_state=inner_state,
            weights=w,
            count=optax.safe_increment(state.count),
        )
        return _combine(w, updates, reduce), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------------------------
# FAMO (Liu et al. 2023).


class FAMOState(NamedTuple):
    """State of :func:`famo`.

    Attributes:
      logits: ``(T,)`` task logits ``xi``; ``z = softmax(xi)``.
      inner_state: state of the inner optimiser that updates ``logits``.
      prev_losses: ``(T,)`` the losses seen at the previous step.
      weights: ``(T,)`` effective gradient weights applied at the last step (they sum to 1).
      count: number of updates so far.
    """

    logits: jax.Array
    inner_state: optax.OptState
    prev_losses: jax.Array
    weights: jax.Array
    count: jax.Array


def famo(
    num_tasks: int,
    learning_rate: chex.Numeric = 0.025,
    gamma: chex.Numeric = 0.01,
    *,
    min_losses: chex.Numeric = 0.0,
    eps: float = 1e-8,
    optimizer: optax.GradientTransformation | None = None,
    reduce: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""FAMO: fast adaptive multitask optimisation, balancing the rates of decrease of the log-losses.

    With ``z = softmax(xi)`` and ``D_t = L_t - min_t + eps``, the update is the gradient of
    ``sum_t z_t log D_t / c`` with ``c = sum_t z_t / D_t`` held constant:

    .. math:: d = \sum_t w_t g_t, \qquad w_t = \frac{z_t / D_t}{\sum_s z_s / D_s} ,

    a convex combination of the task gradients (the weights sum to 1; ``T = 1`` gives ``g_1``). The logits follow
    the observed decrease ``delta_t = log D_t(prev) - log D_t(now)``: their gradient is
    ``J_softmax(xi)^T delta``, applied by ``optimizer`` (default, as in the paper's code: Adam with learning rate
    ``learning_rate`` and L2 weight decay ``gamma``). FAMO measures ``L(now)`` on the same batch after the step,
    which costs an extra forward pass; inside an Optax transformation we use the next step's losses instead, so the
    logit update for step ``k`` is applied at the start of step ``k + 1`` (one step of delay, on a new batch). The
    paper's model-gradient clipping (``max_norm``) belongs in the chain: ``optax.clip_by_global_norm``.

    Args:
      num_tasks: ``T`` (static).
      learning_rate: Adam step size for the logits (ignored if ``optimizer`` is given).
      gamma: L2 weight decay on the logits (ignored if ``optimizer`` is given).
      min_losses: known lower bound of each loss (scalar or ``(T,)``), 0 for the usual losses.
      eps: added to ``L - min_losses`` before the log and the division.
      optimizer: inner Optax transformation for the logits.
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    References:
      Liu, Liang, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023 (Algorithm 1).
    """
    num_tasks = _check_num_tasks(num_tasks)
    default = optax.chain(optax.add_decayed_weights(gamma), optax.adam(learning_rate))
    inner = default if optimizer is None else optimizer

    def init_fn(params):
        del params
        xi = jnp.zeros((num_tasks,), _float_dtype())
        return FAMOState(
            logits=xi,
            inner_state=inner.init(xi),
            prev_losses=jnp.ones_like(xi),
            weights=jnp.full_like(xi, 1.0 / num_tasks),
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        xi = state.logits
        losses = _task_losses(extra_args, "famo", num_tasks, updates).astype(xi.dtype)
        lower = jnp.asarray(min_losses, xi.dtype)
        d_now = losses - lower + eps
        delta = jnp.log(state.prev_losses - lower + eps) - jnp.log(d_now)
        z = jax.nn.softmax(xi)
        grad_xi = z * (delta - jnp.dot(z, delta))  # J_softmax(xi)^T delta; J is symmetric.
        step, inner_state = inner.update(grad_xi, state.inner_state, xi)
        stepped = optax.apply_updates(xi, step)
        first = state.count == 0
        new_xi = jnp.where(first, xi, stepped)
        inner_state = jax.tree.map(lambda new, old: jnp.where(first, old, new), inner_state, state.inner_state)
        z = jax.nn.softmax(new_xi)
        ratio = z / d_now
        weights = ratio / jnp.sum(ratio)
        new_state = FAMOState(
            logits=new_xi,
            inner_state=inner_state,
            prev_losses=losses,
            weights=weights,
            count=optax.safe_increment(state.count),
        )
        return _combine(weights, updates, reduce), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------------------------
# Geometric mean of the losses (Chennupati et al. 2019).


class GeometricMeanState(NamedTuple):
    """State of :func:`geometric_mean`.

    Attributes:
      weights: ``(T,)`` weights applied at the last step.
    """

    weights: jax.Array


def geometric_mean(num_tasks: int, *, reduce: bool = True) -> optax.GradientTransformationExtraArgs:
    r"""Geometric-mean loss: the gradient of ``(prod_t L_t)^{1/T}``.

    .. math:: \nabla \Big(\prod_t L_t\Big)^{1/T} = \sum_t w_t g_t, \qquad w_t = \frac{\mathrm{GM}(L)}{T\, L_t},

    computed as ``exp(mean(log L) - log L_t) / T``. Scale-invariant in each loss (multiplying ``L_t`` by ``c``
    multiplies the update by ``c^{1/T}``), permutation-equivariant, stateless; ``T = 1`` gives ``g_1``. The losses
    must be positive: a zero or negative loss makes the weights ``NaN``/``inf`` (the objective is undefined).

    Args:
      num_tasks: ``T`` (static).
      reduce: return ``sum_t w_t g_t`` (default) or the task-stacked ``w_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the extra arg ``task_losses`` of shape ``(T,)``.

    References:
      Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
      Strategy for Multi-Task Learning*, CVPR Workshops 2019. LibMTL ``GLS``.
    """
    num_tasks = _check_num_tasks(num_tasks)

    def init_fn(params):
        del params
        return GeometricMeanState(weights=jnp.ones((num_tasks,), _float_dtype()))

    def update_fn(updates, state, params=None, **extra_args):
        del params
        losses = _task_losses(extra_args, "geometric_mean", num_tasks, updates).astype(state.weights.dtype)
        log_l = jnp.log(losses)
        weights = jnp.exp(jnp.mean(log_l) - log_l) / num_tasks
        return _combine(weights, updates, reduce), GeometricMeanState(weights=weights)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
