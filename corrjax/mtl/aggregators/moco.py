"""MoCo: multi-objective gradient correction with tracked per-task gradients (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from corrjax.mtl import _gramian
from corrjax.mtl.aggregators import _tracked
from corrjax.mtl.weighting import _check_num_tasks, _task_losses

Array = jax.Array


class MoCoState(NamedTuple):
    """State of :func:`moco`.

    Attributes:
      tracked: the tracked task gradients ``y``: the parameter pytree with a leading task axis ``(T, ...)`` on every
        leaf (float32 or wider).
      weights: ``(T,)`` task weights ``lambda`` (on the simplex), applied at the last step.
      count: number of updates so far.
    """

    tracked: Any
    weights: Array
    count: Array


def moco(
    num_tasks: int,
    beta: chex.Numeric = 0.5,
    gamma: chex.Numeric = 0.1,
    rho: chex.Numeric = 0.0,
    *,
    beta_sigma: chex.Numeric = 0.5,
    gamma_sigma: chex.Numeric = 0.5,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""MoCo: MGDA-style weights on tracked (bias-corrected) task gradients.

    At step ``k = 1, 2, ...``, with ``beta_k = beta / k^{beta_sigma}`` and ``gamma_k = gamma / k^{gamma_sigma}``,
    the task gradients are normalised to the loss scale, ``h_t = L_t g_t / (|g_t| + eps)`` (the authors' code, via
    LibMTL), tracked, and the weights take one step on MGDA's objective:

    .. math::
        y_t \leftarrow y_t - \beta_k (y_t - h_t), \qquad
        \lambda \leftarrow \mathrm{softmax}\big(\lambda - \gamma_k (Y Y^\top + \rho I)\lambda\big), \qquad
        d = Y^\top \lambda .

    ``y`` starts at 0 (so the first update is ``beta_1 h``), ``lambda`` at ``1/T``; both live in the state, ``y`` as
    a task-stacked copy of the parameters (``T`` times the shared parameters' memory). The softmax instead of the
    paper's simplex projection and the loss-scale normalisation follow the code LibMTL got from the authors.
    Output scale: the weights sum to 1, on the tracked gradients' (loss) scale; the output keeps each leaf's dtype.

    Args:
      num_tasks: ``T`` (static).
      beta, beta_sigma: tracking rate ``beta_k`` of ``y`` (LibMTL ``MoCo_beta``, ``MoCo_beta_sigma``).
      gamma, gamma_sigma: step ``gamma_k`` of ``lambda`` (LibMTL ``MoCo_gamma``, ``MoCo_gamma_sigma``).
      rho: ``l2`` regularisation of the ``lambda`` step (LibMTL ``MoCo_rho``).
      eps: added to the gradient norms.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``init`` needs the parameters (arrays or ``ShapeDtypeStruct``),
      ``update`` the extra arg ``task_losses`` of shape ``(T,)``.

    Reference: Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach", ICLR 2023 (Algorithm 1); LibMTL ``MoCo``.
    """
    num_tasks = _check_num_tasks(num_tasks)

    def init_fn(params: Any) -> MoCoState:
        tracked = _tracked.stacked_zeros(params, num_tasks, "moco")
        w = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.result_type(float))
        return MoCoState(tracked=tracked, weights=w, count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: MoCoState, params: Any = None, **extra_args: Any) -> tuple[Any, MoCoState]:
        del params
        _tracked.check_buffers(updates, state.tracked, num_tasks, "moco")
        losses = _task_losses(extra_args, "moco", num_tasks, updates)
        lam = state.weights
        dtype = lam.dtype
        k = optax.safe_increment(state.count)
        kf = k.astype(dtype)
        beta_k = jnp.asarray(beta, dtype) / kf ** jnp.asarray(beta_sigma, dtype)
        gamma_k = jnp.asarray(gamma, dtype) / kf ** jnp.asarray(gamma_sigma, dtype)
        norms = jnp.sqrt(_tracked.task_sq_norms(updates)).astype(dtype)
        h = _tracked.scale_tasks(losses.astype(dtype) / (norms + eps), updates)
        tracked = jax.tree.map(lambda y, hh: y - beta_k.astype(y.dtype) * (y - hh.astype(y.dtype)), state.tracked, h)
        yy = _gramian.gramian(tracked).astype(dtype)
        step = (yy + jnp.asarray(rho, dtype) * jnp.eye(num_tasks, dtype=dtype)) @ lam
        lam = jax.nn.softmax(lam - gamma_k * step)
        out = _tracked.cast_like(_gramian.combine(lam, tracked), updates)
        return out, MoCoState(tracked=tracked, weights=lam, count=k)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
