"""The pure training and evaluation steps.

``make_train_step`` builds ``train_step(state, batch) -> (state, metrics)``: one forward pass of the shared trunk,
the per-task losses, per-task gradients of the shared parameters from :func:`corrjax.mtl.value_and_task_grad`
(task-specific heads get only their own task's gradient), the optax chain (multi-task aggregator, then the
optimiser) with the task losses as extra args, and the non-finite guard: when any task loss or the update is
non-finite the whole update is dropped (state unchanged except the step and skip counters). A non-finite gradient
makes the update non-finite, unless the optax chain removes it on purpose (``optax.zero_nans()``), in which case
the step is kept. ``make_eval_step``
returns the per-task outputs of a batch, ``make_noise_scale_step`` the gradient noise scale and
``make_representation_step`` the representations the CKA diagnostics are computed from. Everything here is pure and
knows nothing of meshes: :func:`corrjax.train.sharding.jit_steps` jits the steps with their shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import corrjax.mtl
from corrjax.data import TaskSpec
from corrjax.train.regularizers import flatten_representation
from corrjax.train.state import TrainState, merge_model

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def shared_gradient_cosine(task_grads: Any, shared: Any | None, num_tasks: int) -> jax.Array:
    """``(T, T)`` :func:`corrjax.mtl.task_gradient_cosine` of the task gradients restricted to the shared parameters
    (all of them if ``shared`` is None); all NaN when no parameter is shared (the task gradients then have no common
    coordinates)."""
    leaves = jax.tree.leaves(task_grads)
    if shared is not None:
        leaves = [g for g, s in zip(leaves, jax.tree.leaves(shared), strict=True) if s]
    if not leaves:
        return jnp.full((num_tasks, num_tasks), jnp.nan, jnp.float32)
    return corrjax.mtl.task_gradient_cosine(leaves)


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
        metrics["train/grad_cosine"] = shared_gradient_cosine(grads, shared, num_tasks)
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
        n = jax.tree.leaves(batch["x"])[0].shape[0]
        half = n // 2
        halves = [jax.tree.map(lambda v: v[:half], batch), jax.tree.map(lambda v: v[half : 2 * half], batch)]
        g1, g2 = (jax.grad(summed)(state.params, state.rest, h) for h in halves)
        small = 0.5 * (optax.tree.norm(g1, squared=True) + optax.tree.norm(g2, squared=True))
        big = optax.tree.norm(jax.tree.map(lambda a, b: 0.5 * (a + b), g1, g2), squared=True)
        g_sq, trace = noise_terms_from_two_batches(small, big, half, 2 * half)
        return {"train/noise_scale": trace / g_sq, "train/grad_sq_norm": g_sq, "train/trace_cov": trace}

    return noise_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """``eval_step(state, batch) -> {task: output}`` (the outputs only)."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        model = merge_model(graphdef, state.params, state.rest)
        return dict(model(batch["x"]))

    return eval_step


def make_representation_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, jax.Array], dict[str, jax.Array]]:
    """``(state, x) -> {"shared": (n, D), ["experts": (E, n, h), "task_reps": (T, n, h), "gate_usage": (T, E)]}``:
    the flattened shared representation and, for mixture-of-experts models (those with ``gate_weights``), each
    expert's output, each task's gated mixture of them and the mean gate weights."""

    def representation_step(state: TrainState, x: jax.Array) -> dict[str, jax.Array]:
        model = merge_model(graphdef, state.params, state.rest)
        z = model.features(x)
        out = {"shared": flatten_representation(z)}
        if hasattr(model, "gate_weights"):
            gates = model.gate_weights(x)
            names = list(gates)
            out["gate_usage"] = jnp.stack([gates[n].mean(0) for n in names])
            if isinstance(z, jax.Array) and z.ndim == 3 and all(g.shape[-1] == z.shape[1] for g in gates.values()):
                out["experts"] = jnp.moveaxis(z, 1, 0)
                out["task_reps"] = jnp.stack([jnp.einsum("ne,neh->nh", gates[n], z) for n in names])
        return out

    return representation_step
