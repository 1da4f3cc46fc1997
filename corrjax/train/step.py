"""The pure training and evaluation steps.

``make_train_step`` builds ``train_step(state, batch) -> (state, metrics)``: one forward pass of the shared trunk,
the per-task losses, per-task gradients of the shared parameters from :func:`corrjax.mtl.value_and_task_grad`
(task-specific heads get only their own task's gradient), the optax chain (multi-task aggregator, then the
optimiser) with the task losses as extra args, and the non-finite guard: when any task loss or the update is
non-finite the whole update is dropped (state unchanged except the step and skip counters). The step's metrics
include the task weights of a weighting that keeps them in its state (:func:`task_weights`, as
``train/weights/<task>``). A non-finite gradient
makes the update non-finite, unless the optax chain removes it on purpose (``optax.zero_nans()``), in which case
the step is kept. Mixed precision
(:mod:`corrjax.train.precision`): model outputs and representations are upcast to float32 before any loss, metric or
regulariser, and a float16 run scales its losses dynamically. Gradient accumulation (``grad_accum_steps``,
:mod:`corrjax.train.accumulate`) splits the batch into micro-batches inside the step and averages their
task-stacked gradients before the aggregator runs once. The task Gramian is computed once
(:class:`corrjax.mtl.TaskGramian`) and shared by the ``train/grad_cosine`` diagnostic and the aggregator.
The gradient noise scale comes from the two halves of the batch, inside the train step where the
losses allow it and from ``make_noise_scale_step`` at log steps otherwise. ``make_eval_step``
returns the per-task outputs of a batch and
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
import corrjax.optim
from corrjax.data import TaskSpec
from corrjax.train import accumulate
from corrjax.train.precision import DynamicLossScale, upcast
from corrjax.train.regularizers import flatten_representation
from corrjax.train.state import TrainState, merge_model
from corrjax.train.tasks import stacked_losses

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _shared_leaves(task_grads: Any, shared: Any | None) -> list[jax.Array]:
    leaves = jax.tree.leaves(task_grads)
    if shared is not None:
        leaves = [g for g, s in zip(leaves, jax.tree.leaves(shared), strict=True) if s]
    return leaves


def shared_task_gramian(task_grads: Any, shared: Any | None) -> corrjax.mtl.TaskGramian:
    """The :class:`corrjax.mtl.TaskGramian` of the task gradients restricted to the shared parameters (all of them if
    ``shared`` is None): the leaves the aggregator behind :func:`corrjax.mtl.shared_only` receives, so passing it as
    ``task_gramian=`` lets the aggregator reuse it. Its ``value`` is None when no parameter is shared."""
    return corrjax.mtl.TaskGramian.of(_shared_leaves(task_grads, shared))


def shared_gradient_cosine(
    task_grads: Any, shared: Any | None, num_tasks: int, gramian: corrjax.mtl.TaskGramian | None = None
) -> jax.Array:
    """``(T, T)`` :func:`corrjax.mtl.task_gradient_cosine` of the task gradients restricted to the shared parameters
    (all of them if ``shared`` is None), from ``gramian`` (:func:`shared_task_gramian`) when given; all NaN when no
    parameter is shared (the task gradients then have no common coordinates)."""
    gramian = shared_task_gramian(task_grads, shared) if gramian is None else gramian
    if gramian.value is None:
        return jnp.full((num_tasks, num_tasks), jnp.nan, jnp.float32)
    return corrjax.mtl.cosine_from_gramian(gramian.value)


def task_weights(opt_state: Any, num_tasks: int) -> jax.Array | None:
    """The ``(T,)`` task weights a loss weighting or aggregator of the optax chain applied at its last update: the
    first ``weights`` field of shape ``(T,)`` in ``opt_state`` (``UncertaintyWeightingState``, ``DWAState``,
    ``GradNormState``, ``FAMOState``, ``GeometricMeanState``, STCH, IMTL-L, MoCo, DB-MTL, SDMGrad, ExcessMTL keep
    one), or None when the chain has none (mean, PCGrad, MGDA, ... keep no weights in their state)."""
    for _, value in optax.tree_utils.tree_get_all_with_path(opt_state, "weights"):
        if isinstance(value, jax.Array) and value.shape == (num_tasks,):
            return value
    return None


def summed_task_gradient(task_grads: Any, shared: Any | None, task_axis: int = 0) -> Any:
    """The gradient of the summed task losses from :func:`corrjax.mtl.value_and_task_grad`'s task-stacked one: the
    shared leaves summed over their task axis (``task_axis``), the task-specific leaves (already the summed loss's
    gradient) as they are. ``shared`` None: every leaf has the task axis."""
    if shared is None:
        return jax.tree.map(lambda g: g.sum(task_axis), task_grads)
    return jax.tree.map(
        lambda s, g: jax.tree.map(lambda x: x.sum(task_axis), g) if s else g, shared, task_grads, is_leaf=_is_flag
    )


def _is_flag(x: Any) -> bool:
    return isinstance(x, bool)


def _halves(batch: Batch) -> Batch:
    """Every leaf ``(n, ...)`` -> ``(n // 2, 2, ...)`` (``n`` even): consecutive pairs of examples, so that axis 1
    indexes the two halves of the batch (its even and odd examples). A pair sits on one device whenever each device
    holds an even number of rows, so the split moves no data; an explicitly sharded batch keeps its example axis's
    sharding on the pair axis."""

    def split(v: jax.Array) -> jax.Array:
        shape = (v.shape[0] // 2, 2, *v.shape[1:])
        sharding = jax.typeof(v).sharding
        spec = tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))
        if any(p is not None for p in spec):  # explicit sharding in the type (an Explicit mesh axis)
            out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0], None, *spec[1:]))
            return jax.lax.reshape(v, shape, out_sharding=out)
        return v.reshape(shape)

    return jax.tree.map(split, batch)


def two_halves_noise_terms(half_grads: Any, half_size: int) -> tuple[jax.Array, jax.Array]:
    """Unbiased ``(|G|^2, tr(Sigma))`` (:func:`corrjax.optim.noise_terms_from_two_batches`) from the gradients
    ``(2, ...)`` of one loss on the two halves of a batch: ``|G_{B/2}|^2`` is their mean squared norm and
    ``|G_B|^2`` the squared norm of their mean (the whole batch's gradient when the loss is a per-example mean)."""
    from corrjax.optim import noise_terms_from_two_batches

    small = 0.5 * sum(optax.tree.norm(jax.tree.map(lambda g, i=i: g[i], half_grads), squared=True) for i in (0, 1))
    big = optax.tree.norm(jax.tree.map(lambda g: g.mean(0), half_grads), squared=True)
    return noise_terms_from_two_batches(small, big, half_size, 2 * half_size)


def _noise_metrics(noise: Any) -> Metrics:
    return {
        "train/noise_scale": noise.noise_scale,
        "train/grad_sq_norm": noise.grad_sq_norm,
        "train/trace_cov": noise.trace_cov,
    }


def make_train_step(
    graphdef: nnx.GraphDef,
    tasks: Sequence[TaskSpec],
    loss_fns: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]],
    tx: optax.GradientTransformationExtraArgs,
    shared: Any,
    *,
    regularizer: Callable[[jax.Array], jax.Array] | None = None,
    regularizer_weight: float = 0.0,
    task_grad_constraint: Callable[[Any, Any], Any] | None = None,
    task_batch_size: int | None = None,
    grad_accum_steps: int = 1,
    loss_scale: DynamicLossScale | None = None,
    noise_scale_decay: float | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure step. ``shared`` is :func:`corrjax.models.shared_mask` of the model; ``regularizer`` maps
    the shared representation ``model.features(x)`` to a scalar whose ``regularizer_weight / T`` multiple is added
    to every task loss (so it enters the summed objective once with ``regularizer_weight``).
    ``task_grad_constraint(task_grads, params) -> task_grads`` (identity when None) is applied to the task-stacked
    gradients before the optax chain: :func:`corrjax.train.sharding.task_grad_constraint` keeps them FSDP-sharded.

    ``task_batch_size`` is :func:`corrjax.mtl.value_and_task_grad`'s (tasks pulled back per vmapped group; None:
    by backend). ``grad_accum_steps`` ``k > 1`` splits every batch into ``k`` micro-batches (its size must be a
    multiple of ``k``) whose losses and task-stacked gradients are averaged (:func:`corrjax.train.accumulate.
    accumulate`) before the aggregator and optimiser run once. ``loss_scale`` (float16 runs) enables dynamic loss
    scaling; the state must then carry its :class:`~corrjax.train.precision.LossScaleState`.

    Metrics: ``train/loss`` (the objective: the summed task losses plus ``regularizer_weight`` times the
    regulariser), ``train/<task>/loss`` (each task's own loss, without the regulariser), ``train/regularizer`` (its
    unweighted value, with a regulariser), ``train/update_norm`` and ``train/grad_cosine``.

    ``noise_scale_decay`` (a float): McCandlish et al.'s (2018) gradient noise scale from the gradients the step
    computes anyway. The task gradients are taken on the two halves of the batch (its even and odd examples; one
    ``vmap`` over them: the same work as the whole batch) and averaged, which for per-example-mean losses is
    exactly the whole batch's gradient; the halves' gradients of the summed loss give the unbiased two-batch
    estimates of ``|G|^2`` and ``tr(Sigma)`` (:func:`two_halves_noise_terms`), smoothed by
    :func:`corrjax.optim.noise_scale_ema` in ``state.noise_scale`` and reported as ``train/noise_scale``,
    ``train/grad_sq_norm`` and ``train/trace_cov`` at every step. Only for per-example-mean task losses, no
    regulariser, an even batch, no accumulation and no loss scaling (a batch-level loss of the halves is not that
    of the batch): :func:`make_noise_scale_step` serves the other runs."""
    names = [t.name for t in tasks]
    num_tasks = len(names)
    if noise_scale_decay is not None and (regularizer is not None or grad_accum_steps != 1 or loss_scale is not None):
        raise ValueError(
            "the in-step noise scale (`noise_scale_decay`) needs a run without a regularizer, gradient accumulation "
            "or loss scaling"
        )

    def losses_fn(params, rest, batch, scale):
        model = merge_model(graphdef, params, rest)
        z = model.features(batch["x"])
        # Mixed precision: losses and the regulariser in float32 whatever the compute dtype.
        outputs = upcast(model.from_features(z, batch["x"]))
        task_losses = stacked_losses(loss_fns, names, outputs, batch)
        losses, reg = task_losses, jnp.zeros((), task_losses.dtype)
        if regularizer is not None:
            reg = regularizer(upcast(flatten_representation(z)))
            losses = task_losses + (regularizer_weight / num_tasks) * reg
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        # Loss scaling: the differentiated losses are scaled, the reported ones (aux) are not.
        scaled = losses if scale is None else losses * scale
        return scaled, (new_rest, losses, reg, task_losses)

    task_grad = corrjax.mtl.value_and_task_grad(losses_fn, has_aux=True, shared=shared, task_batch_size=task_batch_size)

    def micro_step(params, rest, batch, scale):
        (_, (new_rest, losses, reg, task_losses)), grads = task_grad(params, rest, batch, scale)
        return new_rest, (losses, reg, task_losses, grads)

    def gradients(state: TrainState, batch: Batch, scale: Any):
        """``(new_rest, (losses, reg, task_losses, task-stacked grads), noise-scale state)`` of one batch."""
        if noise_scale_decay is None:
            if grad_accum_steps == 1:
                return *micro_step(state.params, state.rest, batch, scale), state.noise_scale
            return *accumulate.accumulate(
                lambda rest, mb: micro_step(state.params, rest, mb, scale), state.rest, batch, grad_accum_steps
            ), state.noise_scale
        n = jax.tree.leaves(batch["x"])[0].shape[0]
        if n % 2:
            raise ValueError(f"the in-step noise scale needs an even batch size, got {n}")
        step_halves = jax.vmap(micro_step, in_axes=(None, None, 1, None))
        rest, (losses, reg, task_losses, half_grads) = step_halves(state.params, state.rest, _halves(batch), scale)
        g2, trace = two_halves_noise_terms(summed_task_gradient(half_grads, shared, task_axis=1), n // 2)
        noise = corrjax.optim.noise_scale_ema(state.noise_scale, g2, trace, noise_scale_decay)
        out = (losses.mean(0), reg.mean(0), task_losses.mean(0), jax.tree.map(lambda g: g.mean(0), half_grads))
        return jax.tree.map(lambda r: r[0], rest), out, noise

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        scale = None if loss_scale is None else state.loss_scale.scale
        # --- task gradients: one pass, the mean over grad_accum_steps micro-batches, or the two halves' mean.
        new_rest, (losses, reg, task_losses, grads), noise = gradients(state, batch, scale)
        if task_grad_constraint is not None:
            grads = task_grad_constraint(grads, state.params)
        # --- loss scaling (float16): unscale; overflow makes the update non-finite and the guard below skips it.
        grads_finite = jnp.array(True)
        if loss_scale is not None:
            grads = jax.tree.map(
                lambda g: (g / scale.astype(jnp.promote_types(g.dtype, jnp.float32))).astype(g.dtype), grads
            )
            grads_finite = _all_finite(grads)
        # --- the task Gramian, computed once: the aggregator (extra arg task_gramian) and the diagnostics share it.
        gramian = shared_task_gramian(grads, shared)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, task_losses=losses, task_gramian=gramian)
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
            noise_scale=keep(noise, state.noise_scale),
        )
        if loss_scale is not None:
            new_state = new_state.replace(loss_scale=loss_scale.adjust(state.loss_scale, finite & grads_finite))
        metrics = {"train/loss": losses.sum(), "train/finite": finite}
        for i, n in enumerate(names):
            metrics[f"train/{n}/loss"] = task_losses[i]
        if regularizer is not None:
            metrics["train/regularizer"] = reg
        metrics["train/update_norm"] = optax.tree.norm(updates)
        metrics["train/grad_cosine"] = shared_gradient_cosine(grads, shared, num_tasks, gramian)
        weights = task_weights(opt_state, num_tasks)
        if weights is not None:  # learned / loss-based task weights (uw, dwa, gradnorm, famo, ...)
            for i, n in enumerate(names):
                metrics[f"train/weights/{n}"] = weights[i]
        if loss_scale is not None:
            metrics["train/loss_scale"] = state.loss_scale.scale
        if noise_scale_decay is not None:
            metrics.update(_noise_metrics(new_state.noise_scale))
        return new_state, metrics

    return train_step


def make_noise_scale_step(
    graphdef: nnx.GraphDef,
    tasks: Sequence[TaskSpec],
    loss_fns: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]],
    decay: float = 0.99,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """``(state, batch) -> (state, metrics)`` for the runs whose train step cannot estimate the noise scale itself
    (batch-level losses, a regulariser, an odd batch; see :func:`make_train_step`): McCandlish et al.'s (2018)
    simple noise scale ``B_simple = tr(Sigma) / |G|^2`` of the summed task loss (without the regulariser) from the
    gradients of the two halves of the batch (:func:`two_halves_noise_terms`), one more forward and backward pass
    over the batch, run at log steps. The estimates are smoothed by :func:`corrjax.optim.noise_scale_ema`
    (``decay`` per call) in ``state.noise_scale``; the metrics are the smoothed ``train/noise_scale``,
    ``train/grad_sq_norm`` and ``train/trace_cov``."""
    names = [t.name for t in tasks]

    def summed(params, rest, batch):
        outputs = upcast(merge_model(graphdef, params, rest)(batch["x"]))
        return stacked_losses(loss_fns, names, outputs, batch).sum()

    def noise_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        half = jax.tree.leaves(batch["x"])[0].shape[0] // 2
        halves = _halves(jax.tree.map(lambda v: v[: 2 * half], batch))
        half_grads = jax.vmap(jax.grad(summed), in_axes=(None, None, 1))(state.params, state.rest, halves)
        g2, trace = two_halves_noise_terms(half_grads, half)
        noise = corrjax.optim.noise_scale_ema(state.noise_scale, g2, trace, decay)
        finite = jnp.isfinite(g2) & jnp.isfinite(trace)
        noise = jax.tree.map(lambda a, b: jnp.where(finite, a, b), noise, state.noise_scale)
        return state.replace(noise_scale=noise), _noise_metrics(noise)

    return noise_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """``eval_step(state, batch) -> {task: output}`` (the outputs only)."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        model = merge_model(graphdef, state.params, state.rest)
        return dict(upcast(model(batch["x"])))

    return eval_step


def make_representation_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, jax.Array], dict[str, jax.Array]]:
    """``(state, x) -> {"shared": (n, D), ["experts": (E, n, h), "task_reps": (T, n, h), "gate_usage": (T, E)]}``:
    the flattened shared representation and, for mixture-of-experts models (those with ``gate_weights``), each
    expert's output, each task's gated mixture of them and the mean gate weights."""

    def representation_step(state: TrainState, x: jax.Array) -> dict[str, jax.Array]:
        model = merge_model(graphdef, state.params, state.rest)
        z = upcast(model.features(x))
        out = {"shared": flatten_representation(z)}
        if hasattr(model, "gate_weights"):
            gates = upcast(model.gate_weights(x))
            names = list(gates)
            out["gate_usage"] = jnp.stack([gates[n].mean(0) for n in names])
            if isinstance(z, jax.Array) and z.ndim == 3 and all(g.shape[-1] == z.shape[1] for g in gates.values()):
                out["experts"] = jnp.moveaxis(z, 1, 0)
                out["task_reps"] = jnp.stack([jnp.einsum("ne,neh->nh", gates[n], z) for n in names])
        return out

    return representation_step
