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
from corrjax.train import builders, optimizer, state, step, tasks

__all__ = ["Setup", "build", "with_seed"]


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

    @property
    def names(self) -> list[str]:
        """The task names, in order."""
        return [t.name for t in self.tasks]

    def init_state(self, sharding: jax.sharding.Sharding | None = None) -> state.TrainState:
        """The step-0 :class:`~corrjax.train.state.TrainState`, placed with ``sharding`` (replicated on a mesh) or
        on the default device (None)."""
        params, rest = self.params, self.rest
        if sharding is not None:
            from corrjax.train.sharding import to_global

            params, rest = to_global(params, sharding), to_global(rest, sharding)
        init = jax.jit(lambda p, r: state.create_state(p, r, self.tx, self.seed), out_shardings=sharding)
        return init(params, rest)


def with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    """A copy of ``cfg`` with ``seed`` replaced (interpolations such as ``data.seed: ${seed}`` follow it)."""
    out = cfg.copy()
    out.seed = int(seed)
    return out


def _regularizer(cfg: DictConfig) -> tuple[Callable | None, float]:
    node = cfg.get("regularizer")
    if node is None or node.get("fn") is None:
        return None, 0.0
    return builders.instantiate_node(node.fn, "regularizer.fn"), float(node.weight)


def noise_scale_in_step(trainer: Any, per_example_means: bool, regularizer: Callable | None) -> bool:
    """Whether the train step estimates the gradient noise scale from the two halves of its batch (per-example-mean
    task losses, no regulariser, an even ``trainer.batch_size``); otherwise the noise-scale step runs at log steps
    (:func:`corrjax.train.step.make_train_step`)."""
    return bool(trainer.noise_scale) and per_example_means and regularizer is None and trainer.batch_size % 2 == 0


def build(cfg: DictConfig, seed: int | None = None) -> Setup:
    """Assembles the run of ``cfg`` for ``seed`` (default ``cfg.seed``).

    Raises ``ValueError`` for a seed outside ``[0, 2**31)``, a ``tasks`` list naming no task of the dataset, and a
    ``task_losses`` entry naming an unknown task or loss (each naming the key)."""
    seed = check_seed(cfg.seed if seed is None else seed)
    cfg = with_seed(cfg, seed) if seed != cfg.seed else cfg
    train_data = builders.instantiate_node(cfg.data, "data", split="train")
    eval_data = builders.instantiate_node(cfg.data, "data", split=cfg.trainer.eval_split)
    run_tasks = tasks.select_tasks(train_data.tasks, cfg.get("tasks"))
    model = builders.build_model(cfg.model, run_tasks, np.shape(train_data[0]["x"]), seed)
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    tx = optimizer.build_optimizer(cfg.mtl, cfg.optim, mask, len(run_tasks))
    loss_fns = tasks.task_loss_fns(run_tasks, OmegaConf.to_container(cfg.task_losses))
    regularizer, weight = _regularizer(cfg)
    tc = cfg.trainer
    in_step = noise_scale_in_step(tc, tasks.per_example_means(run_tasks, cfg.task_losses), regularizer)
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
            noise_scale_decay=decay if in_step else None,
        ),
        eval_step=step.make_eval_step(graphdef),
        noise_step=noise_step,
        representation_step=step.make_representation_step(graphdef),
    )
