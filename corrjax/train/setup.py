"""One setup for every driver: ``build(cfg, seed) -> Setup`` assembles a run from its composed config.

Tasks -> model -> shared mask -> ``(graphdef, params, rest)`` split -> optimiser -> task losses and regulariser ->
the pure train, eval, noise-scale and representation steps -> the initial state. :func:`corrjax.train.loop.run` jits
the steps with the mesh's shardings (:mod:`corrjax.train.sharding`) and steps one seed;
:func:`corrjax.train.ensemble.train_seeds` builds one Setup per seed and maps the first one's train step over their
stacked states, so seed ``s`` of an ensemble trains what the single run with ``seed=s`` trains.

Everything here is host-side construction; nothing is compiled and no array is placed on a mesh until
:meth:`Setup.init_state` is called.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from omegaconf import DictConfig, OmegaConf

from corrjax.data import TaskSpec
from corrjax.data.iterator import check_seed
from corrjax.models import shared_mask
from corrjax.train import builders, optimizer, precision, state, step, tasks

__all__ = ["Setup", "build", "with_seed"]

log = logging.getLogger(__name__)
_FLOAT32 = precision.Precision(np.float32, np.float32)


@dataclass(frozen=True)
class Setup:
    """Everything a driver needs to train one seed of a config.

    Attributes:
      cfg: the config, with ``seed`` set to this setup's seed (the data and ``${seed}`` interpolations follow it).
      seed: the seed.
      tasks: the trained tasks (the dataset's, restricted to ``cfg.tasks``).
      train_data, eval_data: the training split and the ``trainer.eval_split`` split.
      model_name: the model's class name.
      num_params: parameter count.
      graphdef, params, rest, mask: the split model (:func:`corrjax.train.state.split_model`) and its shared mask.
      tx: the optax chain (aggregator then optimiser).
      loss_fns: ``{task: loss(output, label)}``.
      regularizer, regularizer_weight: the representation regulariser (None: none) and its weight.
      train_step, eval_step, noise_step, representation_step: the pure steps of :mod:`corrjax.train.step`;
        ``noise_step`` is None unless ``trainer.noise_scale`` is on and the train step cannot estimate the noise
        scale itself (:func:`noise_scale_in_step`).
      reported_tasks: dataset tasks that the model predicts as extra outputs without training them (its
        ``reported_outputs``, e.g. ESMM's post-click CVR): evaluated, never in the loss.
      precision: the dtype policy (``parallel.compute_dtype`` / ``param_dtype``, :mod:`corrjax.train.precision`).
      loss_scale: dynamic loss scaling of a float16 run (None otherwise).
    """

    cfg: DictConfig
    seed: int
    tasks: tuple[TaskSpec, ...]
    train_data: Any
    eval_data: Any
    model_name: str
    num_params: int
    graphdef: nnx.GraphDef
    params: Any
    rest: Any
    mask: Any
    tx: optax.GradientTransformationExtraArgs
    loss_fns: Mapping[str, Callable]
    regularizer: Callable | None
    regularizer_weight: float
    train_step: Callable
    eval_step: Callable
    noise_step: Callable | None
    representation_step: Callable
    reported_tasks: tuple[TaskSpec, ...] = ()
    precision: precision.Precision = _FLOAT32
    loss_scale: precision.DynamicLossScale | None = None

    @property
    def names(self) -> list[str]:
        """The task names, in order."""
        return [t.name for t in self.tasks]

    def abstract_state(self) -> state.TrainState:
        """The step-0 state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves; nothing is computed or placed)."""
        return jax.eval_shape(lambda p, r: state.create_state(p, r, self.tx, self.seed), self.params, self.rest)

    def init_state(self, sharding: Any = None) -> state.TrainState:
        """The step-0 :class:`~corrjax.train.state.TrainState`, placed with ``sharding`` (one sharding, e.g.
        replicated on a mesh, or a ``TrainState`` of them from :func:`corrjax.train.sharding.state_shardings`) or on
        the default device (None)."""
        params, rest = self.params, self.rest
        if sharding is not None:
            from corrjax.train.sharding import to_global

            tree = isinstance(sharding, state.TrainState)
            params = to_global(params, sharding.params if tree else sharding)
            rest = to_global(rest, sharding.rest if tree else sharding)
        scale = None if self.loss_scale is None else self.loss_scale.init
        init = jax.jit(
            lambda p, r: state.create_state(p, r, self.tx, self.seed, None if scale is None else scale()),
            out_shardings=sharding,
        )
        return init(params, rest)


def with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    """A copy of ``cfg`` with ``seed`` replaced (interpolations such as ``data.seed: ${seed}`` follow it)."""
    out = cfg.copy()
    out.seed = int(seed)
    return out


def _reported_tasks(model: Any, available: Any, trained: Any) -> tuple[TaskSpec, ...]:
    """The dataset's tasks named by the model's ``reported_outputs`` (e.g. ESMM's CVR) that are not trained."""
    names = set(getattr(model, "reported_outputs", ())) - {t.name for t in trained}
    return tuple(t for t in available if t.name in names)


def _regularizer(cfg: DictConfig) -> tuple[Callable | None, float]:
    node = cfg.get("regularizer")
    if node is None or node.get("fn") is None:
        return None, 0.0
    return builders.instantiate_node(node.fn, "regularizer.fn"), float(node.weight)


def noise_scale_in_step(
    trainer: Any, per_example_means: bool, regularizer: Callable | None, loss_scaling: bool = False
) -> bool:
    """Whether the train step estimates the gradient noise scale from the two halves of its batch (per-example-mean
    task losses, no regulariser, an even ``trainer.batch_size``, no gradient accumulation and no float16 loss
    scaling); otherwise the noise-scale step runs at log steps (:func:`corrjax.train.step.make_train_step`)."""
    simple = int(trainer.get("grad_accum_steps", 1)) == 1 and not loss_scaling
    return (
        bool(trainer.noise_scale)
        and per_example_means
        and regularizer is None
        and trainer.batch_size % 2 == 0
        and simple
    )


def build(cfg: DictConfig, seed: int | None = None, *, task_grad_constraint: Callable | None = None) -> Setup:
    """Assembles the run of ``cfg`` for ``seed`` (default ``cfg.seed``); ``task_grad_constraint`` goes to
    :func:`corrjax.train.step.make_train_step` (:func:`corrjax.train.sharding.task_grad_constraint` of the mesh).

    Raises ``ValueError`` for a seed outside ``[0, 2**31)``, a ``tasks`` list naming no task of the dataset, and a
    ``task_losses`` entry naming an unknown task or loss (each naming the key)."""
    seed = check_seed(cfg.seed if seed is None else seed)
    cfg = with_seed(cfg, seed) if seed != cfg.seed else cfg
    train_data = builders.instantiate_node(cfg.data, "data", split="train")
    eval_data = builders.instantiate_node(cfg.data, "data", split=cfg.trainer.eval_split)
    run_tasks = tasks.select_tasks(train_data.tasks, cfg.get("tasks"))
    x0, features = train_data[0]["x"], getattr(train_data, "features", None)
    input_shape = None if isinstance(x0, Mapping) else np.shape(x0)
    policy = precision.resolve_precision(cfg.parallel)
    task_batch = optimizer.task_batch_size(cfg.mtl, len(run_tasks))
    model = builders.build_model(
        cfg.model,
        run_tasks,
        input_shape,
        seed,
        features=features,
        dtype=policy.compute_dtype,
        param_dtype=policy.param_dtype,
    )
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    tx = optimizer.build_optimizer(cfg.mtl, cfg.optim, mask, len(run_tasks))
    loss_scale = precision.DynamicLossScale() if policy.loss_scaling else None
    log.info(optimizer.task_jacobian_estimate(params, mask, len(run_tasks), task_batch))
    loss_fns = tasks.task_loss_fns(run_tasks, OmegaConf.to_container(cfg.task_losses))
    regularizer, weight = _regularizer(cfg)
    tc = cfg.trainer
    in_step = noise_scale_in_step(
        tc, tasks.per_example_means(run_tasks, cfg.task_losses), regularizer, loss_scale is not None
    )
    decay = float(tc.get("noise_scale_decay", 0.99))
    noise_step = None
    if tc.noise_scale and not in_step:
        # One estimate per log step: the EMA's decay per estimate spans the steps in between.
        noise_step = step.make_noise_scale_step(graphdef, run_tasks, loss_fns, decay=decay ** int(tc.log_every))
    return Setup(
        cfg=cfg,
        seed=seed,
        tasks=run_tasks,
        train_data=train_data,
        eval_data=eval_data,
        model_name=type(model).__name__,
        num_params=sum(int(np.size(x)) for x in jax.tree.leaves(params)),
        graphdef=graphdef,
        params=params,
        rest=rest,
        mask=mask,
        tx=tx,
        loss_fns=loss_fns,
        regularizer=regularizer,
        regularizer_weight=weight,
        train_step=step.make_train_step(
            graphdef,
            run_tasks,
            loss_fns,
            tx,
            mask,
            regularizer=regularizer,
            regularizer_weight=weight,
            task_grad_constraint=task_grad_constraint,
            task_batch_size=task_batch,
            grad_accum_steps=int(cfg.trainer.get("grad_accum_steps", 1)),
            loss_scale=loss_scale,
            noise_scale_decay=decay if in_step else None,
        ),
        eval_step=step.make_eval_step(graphdef),
        noise_step=noise_step,
        representation_step=step.make_representation_step(graphdef),
        reported_tasks=_reported_tasks(model, train_data.tasks, run_tasks),
        precision=policy,
        loss_scale=loss_scale,
    )
