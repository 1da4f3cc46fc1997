"""The optimiser of a run: the multi-task aggregator (``mtl=``) chained before the optimiser (``optim=``).

Both config nodes are ``_target_`` nodes instantiated by Hydra to optax transformations. The aggregator sees the
task-stacked gradients of the shared parameters (task-specific parameters go around it with their own task's
gradient, see :func:`corrjax.mtl.value_and_task_grad`'s ``shared``); the optimiser then sees one ordinary gradient
pytree, so any optax chain (``optax.adam``, ``corrjax.optim.msvag``, ...) works unchanged.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import jax
import optax
from hydra.utils import get_method, instantiate

import corrjax.mtl

log = logging.getLogger(__name__)


def _accepts(target: str, name: str) -> bool:
    try:
        return name in inspect.signature(get_method(target)).parameters
    except (TypeError, ValueError):
        return False


def build_optimizer(mtl_cfg: Any, optim_cfg: Any, shared: Any, num_tasks: int) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(shared_only(aggregator, shared), optimiser)`` from the two config nodes (with no shared
    parameter, ``shared_only`` passes the task-specific gradients through: there is nothing to aggregate).

    Loss weightings that need the number of tasks (``uw``, ``dwa``, ``gradnorm``, ``famo``, ``geometric_mean``)
    get ``num_tasks`` from the data unless the config sets it.
    """
    extra = {}
    if "num_tasks" not in mtl_cfg and _accepts(mtl_cfg._target_, "num_tasks"):
        extra["num_tasks"] = num_tasks
    aggregator = instantiate(mtl_cfg, **extra)
    optimiser = instantiate(optim_cfg)
    if not isinstance(optimiser, optax.GradientTransformation):
        raise TypeError(f"`optim` must instantiate to an optax GradientTransformation, got {type(optimiser).__name__}")
    if shared is not None and not any(jax.tree.leaves(shared)):
        # No parameter is reached by two tasks (e.g. PLE/CGC without shared experts): every leaf already holds its
        # own task's gradient, and shared_only passes them through.
        log.warning("the model has no shared parameters: `mtl` (%s) has nothing to aggregate", mtl_cfg._target_)
    return optax.chain(corrjax.mtl.shared_only(aggregator, shared), optimiser)
