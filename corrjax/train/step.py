"""The pure training and evaluation steps.

``make_train_step`` builds ``train_step(state, batch) -> (state, metrics)``: one forward pass of the shared trunk,
the per-task losses, per-task gradients of the shared parameters from :func:`corrjax.mtl.value_and_task_grad`
(task-specific heads get only their own task's gradient), the optax chain (multi-task aggregator, then the
optimiser) with the task losses as extra args, and the non-finite guard: when any task loss or the update is
non-finite the whole update is dropped (state unchanged except the step and skip counters). A non-finite gradient
makes the update non-finite, unless the optax chain removes it on purpose (``optax.zero_nans()``), in which case
the step is kept. ``make_eval_step``
returns the per-task outputs of a batch. :func:`jit_steps` jits both with explicit in/out shardings on the mesh's
data axis and donates the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import corrjax.mtl
from corrjax.data import TaskSpec
from corrjax.train.regularizers import flatten_representation
from corrjax.train.state import TrainState, merge_model

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def task_cosines(task_grads: Any, shared: Any | None) -> jax.Array:
    """``(T, T)`` cosine similarities of the task gradients restricted to the shared parameters (all of them if
    ``shared`` is None), reduced leaf by leaf; NaN where a task's gradient is zero."""
    leaves = jax.tree.leaves(task_grads)
    if shared is not None:
        flags = jax.tree.leaves(shared)
        leaves = [g for g, s in zip(leaves, flags, strict=True) if s]
    gram = sum(jnp.einsum("t...,u...->tu", g, g, precision=jax.lax.Precision.HIGHEST) for g in leaves)
    norms = jnp.sqrt(jnp.diagonal(gram))
    return jnp.clip(gram / (norms[:, None] * norms[None, :]), -1.0, 1.0)


def make_train_step(
    graphdef: nnx.GraphDef,
    tasks: Sequence[TaskSpec],
    loss_fns: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]],
    tx: optax.GradientTransformationExtraArgs,
    shared: Any,
    *,
    regularizer: Callable[[jax.Array], jax.Array] | None = None,
    regularizer_weight: float = 0.0,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure step. ``shared`` is :func:`corrjax.models.shared_mask` of the model; ``regularizer`` maps
    the shared representation ``model.features(x)`` to a scalar whose ``regularizer_weight / T`` multiple is added
    to every task loss (so it enters the summed objective once with ``regularizer_weight``)."""
    names = [t.name for t in tasks]
    num_tasks = len(names)

    def losses_fn(params, rest, batch):
        model = merge_model(graphdef, params, rest)
        z = model.features(batch["x"])
        outputs = model.from_features(z, batch["x"])
        losses = jnp.stack([loss_fns[n](outputs[n], batch[n]) for n in names])
        reg = jnp.zeros((), losses.dtype)
        if regularizer is not None:
            reg = regularizer(flatten_representation(z))
            losses = losses + (regularizer_weight / num_tasks) * reg
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return losses, (new_rest, reg)

    task_grad = corrjax.mtl.value_and_task_grad(losses_fn, has_aux=True, shared=shared)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        (losses, (new_rest, reg)), grads = task_grad(state.params, state.rest, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, task_losses=losses)
        params = optax.apply_updates(state.params, updates)
        finite = _all_finite(losses) & _all_finite(updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            rest=keep(new_rest, state.rest),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)),
            nonfinite_streak=streak,
            nonfinite_max_streak=jnp.maximum(state.nonfinite_max_streak, streak),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {"train/loss": losses.sum(), "train/finite": finite}
        for i, n in enumerate(names):
            metrics[f"train/{n}/loss"] = losses[i]
        if regularizer is not None:
            metrics["train/regularizer"] = reg
        metrics["train/update_norm"] = optax.tree.norm(updates)
        if shared is None or any(jax.tree.leaves(shared)):
            metrics["train/grad_cosine"] = task_cosines(grads, shared)
        else:  # no shared parameter (every leaf is one task's): the task gradients have no common coordinates
            metrics["train/grad_cosine"] = jnp.full((num_tasks, num_tasks), jnp.nan, losses.dtype)
        return new_state, metrics

    return train_step


def make_noise_scale_step(
    graphdef: nnx.GraphDef,
    tasks: Sequence[TaskSpec],
    loss_fns: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]],
) -> Callable[[TrainState, Batch], Metrics]:
    """``(state, batch) -> metrics``: McCandlish et al.'s (2018) simple noise scale ``B_simple = tr(Sigma) / |G|^2``
    of the summed task loss, from the two-batch estimator (:func:`corrjax.optim.noise_terms_from_two_batches`):
    the gradients of the two halves of the batch give ``|G_{B/2}|^2`` (their mean squared norm) and, averaged,
    ``|G_B|^2``. Costs one forward and backward pass over the batch; a single-batch estimate, so noisy."""
    from corrjax.optim import noise_terms_from_two_batches

    names = [t.name for t in tasks]

    def summed(params, rest, batch):
        outputs = merge_model(graphdef, params, rest)(batch["x"])
        return sum(loss_fns[n](outputs[n], batch[n]) for n in names)

    def noise_step(state: TrainState, batch: Batch) -> Metrics:
        n = batch["x"].shape[0]
        half = n // 2
        halves = [{k: v[:half] for k, v in batch.items()}, {k: v[half : 2 * half] for k, v in batch.items()}]
        g1, g2 = (jax.grad(summed)(state.params, state.rest, h) for h in halves)
        small = 0.5 * (optax.tree.norm(g1, squared=True) + optax.tree.norm(g2, squared=True))
        big = optax.tree.norm(jax.tree.map(lambda a, b: 0.5 * (a + b), g1, g2), squared=True)
        g_sq, trace = noise_terms_from_two_batches(small, big, half, 2 * half)
        return {"train/noise_scale": trace / g_sq, "train/grad_sq_norm": g_sq, "train/trace_cov": trace}

    return noise_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """``eval_step(state, batch) -> {task: output}`` (also ``"features"`` is not returned: outputs only)."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        model = merge_model(graphdef, state.params, state.rest)
        return dict(model(batch["x"]))

    return eval_step


def batch_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
    """Leading (example) axis split over the mesh's data axis."""
    return NamedSharding(mesh, P(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def jit_steps(train_step, eval_step, mesh: Mesh, axis_name: str = "data", *extra_steps):
    """Jits the steps with explicit shardings: state replicated, batch split over ``axis_name``, outputs
    replicated; the train step donates its input state so XLA updates parameters and optimiser state in place.
    ``extra_steps`` (``(state, batch) -> metrics`` diagnostics) are jitted like ``eval_step`` and returned after it."""
    rep, data = replicated(mesh), batch_sharding(mesh, axis_name)
    train = jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    others = [jax.jit(f, in_shardings=(rep, data), out_shardings=rep) for f in (eval_step, *extra_steps)]
    return (train, *others)
