"""ExcessMTL: task weights from excess-risk estimates (He et al., ICML 2024)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import _gramian
from corrjax.mtl.aggregators import _tracked
from corrjax.mtl.weighting import _check_num_tasks

Array = jax.Array


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`.

    Attributes:
      sq_sum: running sums of the squared task gradients (AdaGrad's accumulator), the parameter pytree with a
        leading task axis ``(T, ...)`` on every leaf (float32 or wider).
      initial_risk: ``(T,)`` the excess-risk estimates of the first step (the normalisers).
      weights: ``(T,)`` the loss weights (sum ``T``) applied at the last step.
      count: number of updates so far.
    """

    sq_sum: Any
    initial_risk: Array
    weights: Array
    count: Array


def excess_mtl(
    num_tasks: int, robust_step_size: chex.Numeric = 1e-2, *, eps: float = 1e-7
) -> optax.GradientTransformationExtraArgs:
    r"""ExcessMTL: exponentiated-gradient weights on each task's estimated excess risk.

    The excess risk of task ``t`` is estimated by a diagonal (AdaGrad) second-order model, with ``H_t =
    diag(sqrt(sum_{s<=k} g_t^{(s)2} + eps))`` accumulated over the steps:

    .. math::
        r_t = g_t^\top H_t^{-1} g_t, \qquad
        w \leftarrow T\, \frac{w \odot \exp(\eta\, r / r^{(1)})}{\sum_s w_s \exp(\eta\, r_s / r^{(1)}_s)}, \qquad
        d = \sum_t w_t g_t ,

    ``r^{(1)}`` the estimates of the first step, where ``w`` stays at 1 (as in the authors' code). Tasks far from
    their optimum (large excess risk) gain weight; unlike loss-based robust weightings, noise in a task's loss does
    not. The weights are updated in log space (the same result, no overflow). The estimates use the gradients only:
    ``task_losses`` is not needed (accepted and ignored). A task whose first-step estimate is 0 (a zero gradient)
    keeps its relative weight (LibMTL divides by 0). ``eps`` is absolute, as in AdaGrad: for gradients much smaller
    than ``sqrt(eps)`` the estimate becomes ``|g_t|^2 / sqrt(eps)``. The accumulator lives in the state as a
    task-stacked copy of the parameters. Output scale: weights sum to ``T`` (the summed loss); ``T = 1`` gives ``g``.

    Args:
      num_tasks: ``T`` (static).
      robust_step_size: the exponentiated-gradient step ``eta`` (LibMTL ``robust_step_size``).
      eps: added to the accumulated squares.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``init`` needs the parameters (arrays or ``ShapeDtypeStruct``).

    Reference: He, Zhou, Zhao & Wu, "Robust Multi-Task Learning with Excess Risks", ICML 2024 (Algorithm 1);
    LibMTL ``ExcessMTL``.
    """
    num_tasks = _check_num_tasks(num_tasks)

    def init_fn(params: Any) -> ExcessMTLState:
        sq_sum = _tracked.stacked_zeros(params, num_tasks, "excess_mtl")
        ones = jnp.ones((num_tasks,), jnp.result_type(float))
        return ExcessMTLState(sq_sum=sq_sum, initial_risk=ones, weights=jnp.array(ones), count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Any, state: ExcessMTLState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ExcessMTLState]:
        del params, extra_args
        _tracked.check_buffers(updates, state.sq_sum, num_tasks, "excess_mtl")
        dtype = state.weights.dtype
        sq_sum = jax.tree.map(lambda a, g: a + jnp.square(g.astype(a.dtype)), state.sq_sum, updates)

        def leaf_risk(a: Array, g: Array) -> Array:
            g = g.astype(a.dtype)
            return jnp.sum((jnp.square(g) / jnp.sqrt(a + eps)).reshape(g.shape[0], -1), axis=1)

        risks = [leaf_risk(a, g) for a, g in zip(jax.tree.leaves(sq_sum), jax.tree.leaves(updates), strict=True)]
        risk = sum(risks[1:], risks[0]).astype(dtype)
        first = state.count == 0
        initial = jnp.where(first, risk, state.initial_risk)
        ratio = jnp.where(initial > 0, risk / jnp.where(initial > 0, initial, 1.0), 0.0)
        logits = jnp.log(state.weights) + jnp.asarray(robust_step_size, dtype) * ratio
        stepped = num_tasks * jax.nn.softmax(logits)
        weights = jnp.where(first, state.weights, stepped)
        weights = jnp.where(jnp.all(jnp.isfinite(risk)), weights, jnp.nan)
        out = _gramian.combine(weights, updates)
        new_state = ExcessMTLState(
            sq_sum=sq_sum, initial_risk=initial, weights=weights, count=optax.safe_increment(state.count)
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
