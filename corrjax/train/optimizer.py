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
from hydra.utils import get_method

import corrjax.mtl
from corrjax.train.builders import instantiate_node

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
    aggregator = instantiate_node(mtl_cfg, "mtl", **extra)
    optimiser = instantiate_node(optim_cfg, "optim")
    if not isinstance(optimiser, optax.GradientTransformation):
        raise TypeError(f"`optim` must instantiate to an optax GradientTransformation, got {type(optimiser).__name__}")
    if shared is not None and not any(jax.tree.leaves(shared)):
        # No parameter is reached by two tasks (e.g. PLE/CGC without shared experts): every leaf already holds its
        # own task's gradient, and shared_only passes them through.
        log.warning("the model has no shared parameters: `mtl` (%s) has nothing to aggregate", mtl_cfg._target_)
    return optax.chain(corrjax.mtl.shared_only(aggregator, shared), optimiser)


def warmup_cosine_schedule(
    peak_value: float,
    decay_steps: int,
    *,
    warmup_fraction: float = 0.1,
    warmup_steps: int | None = None,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> optax.Schedule:
    """``optax.warmup_cosine_decay_schedule`` over a run of ``decay_steps`` steps (``${trainer.max_steps}`` in
    ``configs/optim/adam_cosine.yaml``), its linear warmup a ``warmup_fraction`` of them (rounded down), or
    ``warmup_steps`` when given: any run length works, ``trainer=tiny``'s 4 steps included (a fixed 50-step warmup
    made optax fail with ``decay_steps=-46`` there). A run of 0 steps gets a 1-step schedule.

    Raises ``ValueError`` naming the argument for a negative ``peak_value``/``init_value``/``end_value``, a
    ``warmup_fraction`` outside [0, 1], and a ``warmup_steps`` outside [0, ``decay_steps``]."""
    for name, value in (("peak_value", peak_value), ("init_value", init_value), ("end_value", end_value)):
        if not value >= 0:
            raise ValueError(f"`{name}`={value} must be >= 0 (a learning rate)")
    if not 0 <= warmup_fraction <= 1:
        raise ValueError(f"`warmup_fraction`={warmup_fraction} must be in [0, 1]")
    total = max(int(decay_steps), 1)
    warmup = int(warmup_fraction * total) if warmup_steps is None else int(warmup_steps)
    if not 0 <= warmup <= total:
        raise ValueError(
            f"`warmup_steps`={warmup_steps} must be in [0, `decay_steps`={decay_steps}] (`trainer.max_steps` in "
            "configs/optim/adam_cosine.yaml): lower it or use `warmup_fraction`"
        )
    if warmup == total:  # optax's cosine part needs at least one step
        return optax.linear_schedule(init_value, peak_value, total)
    return optax.warmup_cosine_decay_schedule(init_value, peak_value, warmup, total, end_value)
