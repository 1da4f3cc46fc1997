"""DB-MTL: dual balancing of loss scales (log losses) and gradient magnitudes (Lin et al., 2023)."""

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


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl`.

    Attributes:
      ema: the EMA of the log-loss gradients, the parameter pytree with a leading task axis ``(T, ...)`` on every
        leaf (float32 or wider).
      weights: ``(T,)`` the magnitude weights ``alpha_t = max_s |ema_s| / |ema_t|`` applied at the last step.
      count: number of updates so far.
    """

    ema: Any
    weights: Array
    count: Array


def db_mtl(
    num_tasks: int, beta: chex.Numeric = 0.9, beta_sigma: chex.Numeric = 0.0, *, eps: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL: gradients of the log losses, averaged over steps, rescaled to the largest task's magnitude.

    Loss-scale balancing: task ``t``'s gradient is that of ``log(L_t + eps)``, ``h_t = g_t / (L_t + eps)``.
    Gradient-magnitude balancing: an EMA of ``h`` with rate ``beta_k = beta / k^{beta_sigma}`` at step ``k``, each
    task's EMA rescaled to the largest norm:

    .. math::
        \hat g_t \leftarrow h_t + \beta_k(\hat g_t - h_t), \qquad
        d = \sum_t \frac{\max_s |\hat g_s|}{|\hat g_t|}\, \hat g_t .

    The EMA starts at 0 (the first update is ``(1 - beta) h`` rescaled), as in LibMTL; it lives in the state as a
    task-stacked copy of the parameters. Departure from LibMTL: ``alpha_t = max |g| / |g_t|`` exactly (LibMTL adds
    ``1e-8`` to the denominator, which shrinks tasks whose EMA norm is below ~1e-6), so the update is invariant to
    rescaling any one task's gradient; a task whose EMA is exactly 0 gets weight 0. Output scale: every task
    contributes a vector of the largest norm; ``T = 1`` gives the EMA of ``g / L``.

    Args:
      num_tasks: ``T`` (static).
      beta, beta_sigma: EMA rate (LibMTL ``DB_beta`` 0.9 and ``DB_beta_sigma`` 0).
      eps: added to the losses inside the log.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``init`` needs the parameters (arrays or ``ShapeDtypeStruct``),
      ``update`` the extra arg ``task_losses`` of shape ``(T,)``.

    Reference: Lin, Jiang, Ye, Zhang, Chen, Zhang, Kwok & Zhang, "Dual-Balancing for Multi-Task Learning", arXiv
    2308.12029, 2023 (Algorithm 1); LibMTL ``DB_MTL``.
    """
    num_tasks = _check_num_tasks(num_tasks)

    def init_fn(params: Any) -> DBMTLState:
        ema = _tracked.stacked_zeros(params, num_tasks, "db_mtl")
        w = jnp.ones((num_tasks,), jnp.result_type(float))
        return DBMTLState(ema=ema, weights=w, count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: DBMTLState, params: Any = None, **extra_args: Any) -> tuple[Any, DBMTLState]:
        del params
        _tracked.check_buffers(updates, state.ema, num_tasks, "db_mtl")
        losses = _task_losses(extra_args, "db_mtl", num_tasks, updates)
        dtype = state.weights.dtype
        k = optax.safe_increment(state.count)
        beta_k = jnp.asarray(beta, dtype) / k.astype(dtype) ** jnp.asarray(beta_sigma, dtype)
        h = _tracked.scale_tasks(1.0 / (losses.astype(dtype) + eps), updates)
        ema = jax.tree.map(lambda m, hh: hh + beta_k.astype(m.dtype) * (m - hh), state.ema, h)
        norms = jnp.sqrt(_tracked.task_sq_norms(ema)).astype(dtype)
        live = norms > 0
        alpha = jnp.where(live, jnp.max(norms) / jnp.where(live, norms, 1.0), 0.0)
        alpha = jnp.where(jnp.all(jnp.isfinite(norms)), alpha, jnp.nan)
        out = _tracked.cast_like(_gramian.combine(alpha, ema), updates)
        return out, DBMTLState(ema=ema, weights=alpha, count=k)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
