"""Per-task gradients from one forward pass and vectorised VJPs.

``value_and_task_grad`` is ``jax.value_and_grad`` for a function returning a vector of ``T`` task losses: it runs the
forward pass once (``jax.vjp``) and pulls back the ``T`` one-hot cotangents, all in one compiled program: on
accelerators together with ``jax.vmap`` (one batched backward pass, the trunk's weight gradients become ``T``-batched
matmuls), on CPU one task at a time, which XLA's CPU runtime executes faster (see ``task_batch_size``).
Every leaf of the result carries a leading task axis ``T``: the rows of the task Jacobian, ready for the aggregators.

``value_and_rep_grad`` is the cheap "rep-grad" mode of LibMTL (Lin & Zhang, 2023): task gradients are taken with
respect to the shared representation ``z = trunk(params, ...)`` only; the aggregated representation gradient is then
pulled back through the trunk with a single VJP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _check_losses(losses: Any, where: str) -> Array:
    losses = jnp.asarray(losses)
    if losses.ndim != 1 or losses.shape[0] < 1:
        raise ValueError(f"{where} must return a 1-D vector of T >= 1 task losses, got shape {tuple(losses.shape)}")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"{where} must return floating task losses, got dtype {losses.dtype}")
    return losses


def _map_tasks(pullback: Callable[[Array], Any], cotangents: Array, batch_size: int | None) -> Any:
    """``pullback`` applied to each row of the ``(T, T)`` one-hot ``cotangents``, results stacked on a task axis."""
    num_tasks = cotangents.shape[0]
    if batch_size is None:
        batch_size = 1 if jax.default_backend() == "cpu" else num_tasks
    if batch_size >= num_tasks:
        return jax.vmap(pullback)(cotangents)
    # Unrolled groups, not a lax.map: inside a loop body XLA's CPU backend loses its fast convolution kernels.
    groups = [jax.vmap(pullback)(cotangents[i : i + batch_size]) for i in range(0, num_tasks, batch_size)]
    return jax.tree.map(lambda *g: jnp.concatenate(g, axis=0), *groups)


def _full_mask(shared: Any, tree: Any) -> list[bool]:
    """Broadcasts a (prefix) pytree of bools over ``tree`` and returns one Python bool per leaf of ``tree``."""
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), shared, tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`shared` must be a pytree of bools with the structure of (a prefix of) the differentiated argument; "
            f"got {jax.tree.structure(shared)} for {jax.tree.structure(tree)}"
        ) from e
    flags = jax.tree.leaves(full)
    for m in flags:
        if not isinstance(m, bool | jnp.bool_):
            raise TypeError(f"`shared` leaves must be Python bools (static), got {type(m).__name__}")
    return [bool(m) for m in flags]


def value_and_task_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    shared: Any = None,
    task_batch_size: int | None = None,
) -> Callable[..., tuple[Any, Any]]:
    """Creates a function returning the task losses and the task-stacked gradient of ``fun``.

    ``fun(*args)`` must return a vector of ``T`` task losses of shape ``(T,)`` (or ``(losses, aux)`` with
    ``has_aux=True``). The returned function gives ``(losses, grads)`` (``((losses, aux), grads)`` with ``has_aux``)
    like :func:`jax.value_and_grad`, where ``grads`` has the structure of ``args[argnums]`` and every leaf a leading
    task axis: ``grads[t]`` is the gradient of ``losses[t]`` (the same as ``jax.jacrev``). Cost: one forward pass and
    one ``T``-batched backward pass.

    With ``shared`` (a pytree of Python bools matching ``args[argnums]`` or a prefix of it, e.g. from
    ``corrjax.models.shared_mask``; a tuple of such trees for tuple ``argnums``), only leaves marked ``True`` get the
    task axis; task-specific leaves (heads) get the gradient of ``sum(losses)`` without the task axis, which for a
    head that only feeds its own task is exactly that task's gradient. They are computed with one extra unbatched
    pullback, so heads are never carried ``T`` times. Pair this with :func:`corrjax.mtl.shared_only`.

    Args:
      fun: function whose output is the ``(T,)`` vector of task losses.
      argnums: which positional argument(s) to differentiate, as in ``jax.grad``.
      has_aux: whether ``fun`` returns ``(losses, aux)``.
      shared: optional static mask of shared (trunk) parameters.
      task_batch_size: how many tasks each pullback handles: groups of this many one-hot cotangents are pulled
        back with one ``vmap`` each, the groups one after another in the same program (``>= T``: one ``T``-batched
        backward pass). ``None`` picks by backend: 1 on CPU, where ``T`` separate pullbacks measured faster than
        one batched pass for every trunk and ``T`` we benchmarked (MLP 1.0-1.2x, CNN 1.1-2.8x at ``T`` = 2..16;
        XLA's CPU runtime runs a ``T``-batched convolution backward slowly), and ``T`` on accelerators, where the
        batched matmuls fill the device. Smaller groups also bound the backward pass's peak memory.

    Returns:
      A function with the signature of ``fun`` returning ``(value, task_grads)``.
    """
    if task_batch_size is not None and (
        isinstance(task_batch_size, bool) or not isinstance(task_batch_size, int) or task_batch_size < 1
    ):
        raise ValueError(f"`task_batch_size` must be a positive int or None, got {task_batch_size!r}")
    multiple = not isinstance(argnums, int)
    argnums_t = tuple(argnums) if multiple else (argnums,)
    if multiple and shared is not None and not (isinstance(shared, tuple) and len(shared) == len(argnums_t)):
        raise ValueError(f"with tuple argnums={argnums_t}, `shared` must be a tuple of {len(argnums_t)} masks")

    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        for i in argnums_t:
            if i >= len(args):
                raise ValueError(f"argnums={argnums} refers past the {len(args)} positional arguments")
        primals = tuple(args[i] for i in argnums_t)

        def f(*diff: Any) -> Any:
            full = list(args)
            for i, d in zip(argnums_t, diff, strict=True):
                full[i] = d
            return fun(*full, **kwargs)

        if shared is None:
            out, vjp_fn, *aux = jax.vjp(f, *primals, has_aux=has_aux)
            losses = _check_losses(out, "`fun`")
            cts = jnp.eye(losses.shape[0], dtype=losses.dtype)
            grads = _map_tasks(vjp_fn, cts, task_batch_size)
            grads = grads if multiple else grads[0]
        else:
            tree = primals if multiple else primals[0]
            mask = _full_mask(shared, tree)
            leaves, treedef = jax.tree.flatten(tree)
            sh_idx = [i for i, m in enumerate(mask) if m]
            hd_idx = [i for i, m in enumerate(mask) if not m]

            def g(sh: list[Array], hd: list[Array]) -> Any:
                merged = list(leaves)
                for i, x in zip(sh_idx, sh, strict=True):
                    merged[i] = x
                for i, x in zip(hd_idx, hd, strict=True):
                    merged[i] = x
                rebuilt = jax.tree.unflatten(treedef, merged)
                return f(*rebuilt) if multiple else f(rebuilt)

            sh0 = [leaves[i] for i in sh_idx]
            hd0 = [leaves[i] for i in hd_idx]
            out, vjp_fn, *aux = jax.vjp(g, sh0, hd0, has_aux=has_aux)
            losses = _check_losses(out, "`fun`")
            cts = jnp.eye(losses.shape[0], dtype=losses.dtype)
            sh_g = _map_tasks(lambda c: vjp_fn(c)[0], cts, task_batch_size) if sh_idx else []
            hd_g = vjp_fn(jnp.ones_like(losses))[1] if hd_idx else []
            merged = [None] * len(leaves)
            for i, x in zip(sh_idx, sh_g, strict=True):
                merged[i] = x
            for i, x in zip(hd_idx, hd_g, strict=True):
                merged[i] = x
            grads = jax.tree.unflatten(treedef, merged)
        value = (losses, aux[0]) if has_aux else losses
        return value, grads

    return wrapped


class RepGrads(NamedTuple):
    """Result of :func:`value_and_rep_grad`.

    Attributes:
      rep: task-stacked gradients of the losses w.r.t. the representation ``z`` (leaves ``(T, *z_leaf.shape)``).
      heads: gradient of ``sum(losses)`` w.r.t. the head parameters (no task axis).
      pullback: ``pullback(dz) -> trunk-parameter gradient`` for a representation cotangent ``dz`` shaped like ``z``
        (one VJP through the trunk; call it on the aggregated ``rep``).
    """

    rep: Any
    heads: Any
    pullback: Callable[[Any], Any]


def value_and_rep_grad(
    trunk_fn: Callable[..., Any],
    head_fn: Callable[..., Any],
    has_aux: bool = False,
) -> Callable[..., tuple[Any, RepGrads]]:
    """Creates the "rep-grad" task gradient: per-task gradients w.r.t. the shared representation.

    ``trunk_fn(trunk_params, *args) -> z`` computes the shared representation (any pytree, e.g. ``(n, d)``
    features); ``head_fn(head_params, z, *args) -> losses`` (``(T,)``, or ``(losses, aux)`` with ``has_aux``) the task
    losses from it. The returned function ``(trunk_params, head_params, *args) -> (value, RepGrads)`` runs the trunk
    forward once, takes the ``T`` gradients w.r.t. ``z`` with one batched VJP through the heads only, and returns a
    ``pullback`` for the trunk. A training step aggregates ``rep`` with any aggregator and pulls the result back::

        value, rg = value_and_rep_grad(trunk, heads)(tp, hp, x, y)
        dz, agg_state = aggregator.update(rg.rep, agg_state)
        trunk_grads, head_grads = rg.pullback(dz), rg.heads

    The whole batch's representation gradient is one vector per task, as in LibMTL's ``rep_grad=True`` mode. Cost: one
    forward, ``T`` backward passes through the heads and one through the trunk, about a summed-loss step.
    """

    def wrapped(trunk_params: Any, head_params: Any, *args: Any, **kwargs: Any) -> tuple[Any, RepGrads]:
        z, trunk_vjp = jax.vjp(lambda p: trunk_fn(p, *args, **kwargs), trunk_params)
        out, head_vjp, *aux = jax.vjp(lambda hp, zz: head_fn(hp, zz, *args, **kwargs), head_params, z, has_aux=has_aux)
        losses = _check_losses(out, "`head_fn`")
        cts = jnp.eye(losses.shape[0], dtype=losses.dtype)
        rep = jax.vmap(lambda c: head_vjp(c)[1])(cts)
        heads = head_vjp(jnp.ones_like(losses))[0]
        value = (losses, aux[0]) if has_aux else losses
        return value, RepGrads(rep=rep, heads=heads, pullback=lambda dz: trunk_vjp(dz)[0])

    return wrapped


def shared_only(aggregator: optax.GradientTransformation, shared: Any) -> optax.GradientTransformationExtraArgs:
    """Applies ``aggregator`` to the shared leaves only; task-specific leaves pass through unchanged.

    The glue for ``value_and_task_grad(..., shared=mask)``, whose shared leaves carry the task axis and whose head
    leaves already hold their own task's gradient: ``optax.chain(shared_only(pcgrad(), mask), optax.adam(1e-3))``.
    Built on ``optax.masked`` (state is kept for the shared leaves only). A mask pytree without a shared leaf (no
    parameter reached by two tasks) leaves nothing to aggregate: the updates pass through unchanged.
    """
    if not callable(shared) and not any(bool(leaf) for leaf in jax.tree.leaves(shared)):
        return optax.with_extra_args_support(optax.identity())
    return optax.masked(aggregator, shared)
