"""The optimiser of a run: the multi-task aggregator (``mtl=``) chained before the optimiser (``optim=``).

Both config nodes are ``_target_`` nodes instantiated by Hydra to optax transformations. The aggregator sees the
task-stacked gradients of the shared parameters (task-specific parameters go around it with their own task's
gradient, see :func:`corrjax.mtl.value_and_task_grad`'s ``shared``); the optimiser then sees one ordinary gradient
pytree, so any optax chain (``optax.adam``, ``corrjax.optim.msvag``, ...) works unchanged.

The ``mtl`` node's ``task_batch_size`` key is not the aggregator's: it is how many task gradients the step pulls back
at a time (:func:`task_batch_size`, :func:`corrjax.mtl.value_and_task_grad`), removed before instantiation, and
:func:`task_jacobian_estimate` says what the task Jacobian costs in memory.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import jax
import numpy as np
import optax
from hydra.utils import get_method
from omegaconf import DictConfig, open_dict

import corrjax.mtl
from corrjax.train.builders import instantiate_node

log = logging.getLogger(__name__)


def _accepts(target: str, name: str) -> bool:
    try:
        return name in inspect.signature(get_method(target)).parameters
    except (TypeError, ValueError):
        return False


# Keys of the `mtl` node that configure the step, not the aggregator.
STEP_KEYS = ("task_batch_size",)


def aggregator_config(mtl_cfg: Any) -> Any:
    """``mtl_cfg`` without the step's keys (:data:`STEP_KEYS`): what ``instantiate`` builds the aggregator from."""
    if not any(k in mtl_cfg for k in STEP_KEYS):
        return mtl_cfg
    if not isinstance(mtl_cfg, DictConfig):
        return {k: v for k, v in mtl_cfg.items() if k not in STEP_KEYS}
    out = mtl_cfg.copy()  # keeps the parent, so interpolations such as ${seed} still resolve
    with open_dict(out):
        for k in STEP_KEYS:
            out.pop(k, None)
    return out


def task_batch_size(mtl_cfg: Any, num_tasks: int) -> int | None:
    """The validated ``mtl.task_batch_size``: None (by backend) or an int in ``[1, T]``; ``ValueError`` naming the
    key otherwise."""
    value = mtl_cfg.get("task_batch_size") if hasattr(mtl_cfg, "get") else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_tasks:
        raise ValueError(f"`mtl.task_batch_size`={value!r} must be null or an int in [1, T={num_tasks}]")
    return value


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def task_jacobian_estimate(params: Any, shared: Any, num_tasks: int, batch_size: int | None) -> str:
    """A one-line memory estimate of the task Jacobian: ``T x shared parameters x bytes per parameter``, the
    task-stacked gradient the step holds per device (the state is replicated), and how many tasks each pullback
    handles (``batch_size``, the resolved ``mtl.task_batch_size``: each vmapped group also holds that many
    cotangents of every activation of the backward pass, not counted here)."""
    leaves = jax.tree.leaves(params)
    flags = [True] * len(leaves) if shared is None else [bool(f) for f in jax.tree.leaves(shared)]
    count = sum(int(np.size(p)) for p, f in zip(leaves, flags, strict=True) if f)
    itemsize = max((np.dtype(p.dtype).itemsize for p, f in zip(leaves, flags, strict=True) if f), default=4)
    total = num_tasks * count * itemsize
    if batch_size is None:
        group = 1 if jax.default_backend() == "cpu" else num_tasks
        how = f"mtl.task_batch_size=null pulls back {group} at a time on {jax.default_backend()}"
    else:
        how = f"mtl.task_batch_size={batch_size} pulls back {min(batch_size, num_tasks)} at a time"
    return (
        f"task Jacobian: T={num_tasks} x {_human(count)} shared params x {itemsize} B = {_human(total, 'B')} per "
        f"device; {how}"
    )


def build_optimizer(mtl_cfg: Any, optim_cfg: Any, shared: Any, num_tasks: int) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(shared_only(aggregator, shared), optimiser)`` from the two config nodes (with no shared
    parameter, ``shared_only`` passes the task-specific gradients through: there is nothing to aggregate).

    Loss weightings that need the number of tasks (``uw``, ``dwa``, ``gradnorm``, ``famo``, ``geometric_mean``)
    get ``num_tasks`` from the data unless the config sets it.
    """
    task_batch_size(mtl_cfg, num_tasks)  # validated here too, so a bad value fails before anything is built
    mtl_cfg = aggregator_config(mtl_cfg)
    extra = {}
    if "num_tasks" not in mtl_cfg and _accepts(mtl_cfg.get("_target_"), "num_tasks"):
        extra["num_tasks"] = num_tasks
    aggregator = instantiate_node(mtl_cfg, "mtl", **extra)
    optimiser = instantiate_node(optim_cfg, "optim")
    if not isinstance(optimiser, optax.GradientTransformation):
        raise TypeError(f"`optim` must instantiate to an optax GradientTransformation, got {type(optimiser).__name__}")
    if shared is not None and not any(jax.tree.leaves(shared)):
        # No parameter is reached by two tasks (e.g. PLE/CGC without shared experts): every leaf already holds its
        # own task's gradient, and shared_only passes them through.
        log.warning("the model has no shared parameters: `mtl` (%s) has nothing to aggregate", mtl_cfg.get("_target_"))
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
