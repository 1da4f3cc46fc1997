"""Evaluation over a whole split: per-task metrics, the summed loss, and correlation matrices between tasks.

The split is read in order in global batches (the last one padded and masked) by a
:class:`~corrjax.data.BatchIterator` (:func:`eval_batches`): each process reads, decodes and transfers only its rows
of each batch (its shard of the split), in grain worker processes when asked, while a background thread prefetches
the next batches. The jitted eval step returns replicated per-task outputs and the labels and mask are replicated
the same way (the cross-process all-gather), then gathered on the host and scored by one jitted function. Besides
each task's ``loss`` and ``accuracy``/``auc``/``rmse``/``pearson`` (and ``gauc`` of binary tasks when the dataset
names a ``user_feature``, see :func:`user_groups`), it reports ``eval/loss`` (sum of task losses),
``eval/pred_corr`` (the ``(T, T)`` correlation of per-example task predictions, see
:func:`corrjax.train.tasks.score`) and ``eval/error_corr`` (the correlation of per-example task losses), both from
:func:`corrjax.stats.corrcoef`. :func:`representation_diagnostics` turns the outputs of
:func:`corrjax.train.step.make_representation_step` into the CKA diagnostics; :class:`Evaluator` does both at an
evaluation step of the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import corrjax.stats
from corrjax.data import BatchIterator, TaskSpec
from corrjax.train import tasks as task_table


def eval_batches(
    dataset: Any,
    batch_size: int,
    sharding: NamedSharding,
    *,
    num_epochs: int | None = None,
    prefetch: int = 2,
    workers: int = 0,
) -> BatchIterator:
    """The split in order, in global batches of ``batch_size`` rounded up to a multiple of the mesh's devices, the
    last one padded and masked (``"mask"``); each process reads only its rows. One epoch is one evaluation; with
    ``num_epochs=None`` the iterator (and its prefetch thread and worker processes) serves every evaluation."""
    multiple = sharding.mesh.devices.size
    rounded = -(-batch_size // multiple) * multiple
    return BatchIterator(
        dataset,
        rounded,
        shuffle=False,
        drop_remainder=False,
        num_epochs=num_epochs,
        sharding=sharding,
        prefetch=prefetch,
        workers=workers,
    )


_USERS = "__user__"  # the key of GAUC's user ids among an eval batch's host values


@functools.cache
def _replicate(mesh: jax.sharding.Mesh) -> Callable:
    """Jitted identity whose outputs are replicated: an all-gather of batch-sharded arrays over every process."""
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))


def score_outputs(
    tasks: Sequence[TaskSpec], outputs: dict, labels: dict, mask: jax.Array, reported: Sequence[TaskSpec] = ()
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """``(metrics, scores (n, T), errors (n, T))`` of a split's outputs: each task's masked metrics under
    ``eval/<task>/<metric>`` and their summed ``eval/loss``, with the per-example prediction scores and losses that
    the correlation matrices are computed from. ``reported`` tasks (untrained extra outputs, e.g. ESMM's CVR) get
    their metrics too, outside ``eval/loss`` and the correlations. Pure; the tasks are static under ``jit``."""
    metrics: dict[str, jax.Array] = {}
    for t in reported:
        m = task_table.task_metrics(t, outputs[t.name], labels[t.name], mask)
        metrics.update({f"eval/{t.name}/{k}": v for k, v in m.items()})
    total = jnp.zeros(())
    scores, errors = [], []
    for t in tasks:
        m = task_table.task_metrics(t, outputs[t.name], labels[t.name], mask)
        total = total + m["loss"]
        metrics.update({f"eval/{t.name}/{k}": v for k, v in m.items()})
        scores.append(task_table.score(t, outputs[t.name], labels[t.name]))
        errors.append(task_table.per_example_loss(t, outputs[t.name], labels[t.name]))
    metrics["eval/loss"] = total
    return metrics, jnp.stack(scores, 1), jnp.stack(errors, 1)


_score = jax.jit(score_outputs, static_argnums=(0, 4))


def user_groups(dataset: Any) -> tuple[str, int] | None:
    """``(feature name, number of users)`` when ``dataset`` names a categorical user feature in ``user_feature``
    (tabular datasets with user ids, :mod:`corrjax.data.features`), else None."""
    name = getattr(dataset, "user_feature", None)
    if name is None:
        return None
    spec = {f.name: f for f in getattr(dataset, "features", ())}.get(name)
    if spec is None or spec.kind != "categorical":
        raise ValueError(f"`user_feature`={name!r} must name a categorical feature of the dataset")
    return name, spec.vocab_size


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gauc(tasks: tuple[TaskSpec, ...], num_users: int, outputs: dict, labels: dict, users: jax.Array, mask: jax.Array):
    """``eval/<task>/gauc`` of every single-output binary task (:func:`corrjax.stats.gauc`, DIN's impression-weighted
    per-user AUC; masked rows and missing labels, those below 0, dropped)."""
    return {
        f"eval/{t.name}/gauc": corrjax.stats.gauc(
            outputs[t.name], labels[t.name], users, num_users, mask & (labels[t.name] >= 0)
        )
        for t in tasks
        if t.kind == "binary" and t.num_outputs == 1
    }


def evaluate(
    eval_step: Callable,
    state: Any,
    dataset: Any,
    tasks: Sequence[TaskSpec],
    sharding: NamedSharding,
    batch_size: int,
    reported: Sequence[TaskSpec] = (),
    *,
    batches: BatchIterator | None = None,
) -> dict[str, Any]:
    """Runs ``eval_step`` over ``dataset`` and returns the metrics dict (host values); ``reported``: see
    :func:`score_outputs`.

    ``batches``: an :func:`eval_batches` iterator at the start of an epoch (an :class:`Evaluator` keeps one across
    evaluations); None makes a one-epoch one here."""
    reported = tuple(reported)
    groups = user_groups(dataset)
    own = batches is None
    if own:
        batches = eval_batches(dataset, batch_size, sharding, num_epochs=1)
    position = batches.get_state()
    if position["step"] not in (0, batches.steps_per_epoch):
        raise ValueError(f"`batches` must be at the start of an epoch of the split, got position {position}")
    replicate = _replicate(sharding.mesh)
    outputs, labels = [], []
    try:
        for _ in range(batches.steps_per_epoch):  # dispatched asynchronously; fetched once at the end
            batch = next(batches)
            outputs.append(eval_step(state, {"x": batch["x"]}))
            host = {"mask": batch["mask"], **{t.name: batch[t.name] for t in (*tasks, *reported)}}
            if groups is not None:  # the user ids of GAUC, replicated like the labels
                host[_USERS] = batch["x"][groups[0]]
            labels.append(replicate(host))
    finally:
        if own:
            batches.close()
    outputs, labels = jax.device_get((outputs, labels))
    mask = np.concatenate([lab.pop("mask") for lab in labels])
    users = np.concatenate([lab.pop(_USERS) for lab in labels]) if groups is not None else None
    cat = lambda parts: jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    out, lab = cat(outputs), cat(labels)
    metrics, scores, errors = _score(tuple(tasks), out, lab, jnp.asarray(mask), tuple(reported))
    if groups is not None:
        metrics.update(_gauc((*tasks, *reported), groups[1], out, lab, users, jnp.asarray(mask)))
    metrics = jax.device_get(metrics)
    valid = np.asarray(mask)
    if len(tasks) > 1:
        metrics["eval/pred_corr"] = np.asarray(corrjax.stats.corrcoef(np.asarray(scores)[valid]))
        metrics["eval/error_corr"] = np.asarray(corrjax.stats.corrcoef(np.asarray(errors)[valid]))
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in metrics.items()}


def representation_diagnostics(reps: dict[str, Any]) -> dict[str, Any]:
    """CKA diagnostics (debiased minibatch linear CKA, :func:`corrjax.stats.cka_matrix`) from the host outputs of
    :func:`corrjax.train.step.make_representation_step` on a fixed eval subset: ``eval/task_rep_cka`` (T, T)
    between the tasks' gated representations, ``eval/expert_cka`` (E, E) between experts, ``eval/gate_usage``
    (T, E); returns also the shared representation under ``"shared"`` for the CKA-over-training matrix."""
    out: dict[str, Any] = {"shared": np.asarray(reps["shared"])}
    if "gate_usage" in reps:
        out["eval/gate_usage"] = np.asarray(reps["gate_usage"])
    if "task_reps" in reps and reps["task_reps"].shape[0] > 1:
        out["eval/task_rep_cka"] = np.asarray(corrjax.stats.cka_matrix([(list(reps["task_reps"]), None)]))
    if "experts" in reps and reps["experts"].shape[0] > 1:
        out["eval/expert_cka"] = np.asarray(corrjax.stats.cka_matrix([(list(reps["experts"]), None)]))
    return out


def cka_over_training(shared: Sequence[np.ndarray]) -> np.ndarray:
    """``(K, K)`` CKA between the shared representations of the same examples at K evaluation points."""
    return np.asarray(corrjax.stats.cka_matrix([(list(shared), None)]))


class Evaluator:
    """Evaluates a state at a step: the whole split (:func:`evaluate`) and, when the split has at least 4 examples,
    the representation diagnostics on its first ``max_examples`` (:func:`representation_diagnostics`), whose
    shared representation goes to ``tracker`` (a :class:`corrjax.train.tracking.RepresentationTracker`).

    Args:
      eval_step, representation_step: jitted steps (:mod:`corrjax.train.sharding`).
      dataset, tasks: the eval split and the run's tasks.
      sharding: the batch sharding (its mesh places the representation subset, replicated).
      batch_size: the evaluation batch size.
      reported: untrained extra outputs to evaluate (:func:`score_outputs`).
      tracker: receives the shared representation at every evaluation.
      workers, prefetch: the eval iterator's grain worker processes and prefetched batches (:func:`eval_batches`);
        the iterator is made at the first evaluation and kept until :meth:`close`, so the next evaluation's first
        batches are read while training goes on.
    """

    def __init__(
        self,
        eval_step: Callable,
        representation_step: Callable,
        dataset: Any,
        tasks: Sequence[TaskSpec],
        sharding: NamedSharding,
        batch_size: int,
        tracker: Any,
        max_examples: int = 256,
        reported: Sequence[TaskSpec] = (),
        *,
        workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        from corrjax.train.sharding import replicated, to_global

        self.eval_step, self.representation_step = eval_step, representation_step
        self.dataset, self.tasks, self.sharding, self.batch_size = dataset, tuple(tasks), sharding, batch_size
        self.tracker = tracker
        self.reported = tuple(reported)
        self.workers, self.prefetch = int(workers), int(prefetch)
        self._batches: BatchIterator | None = None
        n = min(len(dataset), max_examples)
        self._x = to_global(dataset.get_batch(np.arange(n))["x"], replicated(sharding.mesh)) if n >= 4 else None
        self.last_step: int | None = None

    def __call__(self, state: Any, step: int) -> dict[str, Any]:
        if self._batches is None:
            self._batches = eval_batches(
                self.dataset, self.batch_size, self.sharding, prefetch=self.prefetch, workers=self.workers
            )
        out = evaluate(
            self.eval_step,
            state,
            self.dataset,
            self.tasks,
            self.sharding,
            self.batch_size,
            self.reported,
            batches=self._batches,
        )
        if self._x is not None:
            diag = representation_diagnostics(jax.device_get(self.representation_step(state, self._x)))
            self.tracker.add(step, diag.pop("shared"))
            out.update(diag)
        self.last_step = step
        return out

    def close(self) -> None:
        """Stops the eval iterator's prefetch thread and worker processes (an evaluation after this restarts them)."""
        if self._batches is not None:
            self._batches.close()
