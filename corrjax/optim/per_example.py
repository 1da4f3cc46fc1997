"""Exact per-example gradient moments: the mean gradient and the per-coordinate sum of squared deviations.

``per_example_moments`` returns ``(mean_grad, sum_sq_diff_grads, sample_size)``, the statistics that
:func:`corrjax.optim.scale_by_grad_variance` (``source="batch"``) and :func:`corrjax.optim.gradient_noise_scale`
take as extra args (the names of ``optax.experimental.aggregating``).

Two paths, chosen per parameter leaf:

- generic: ``vmap(grad(loss_fn))`` over a microbatch, then a two-pass (centred) mean and sum of squares;
- fast (the BackPACK idea, Dangel, Kunstner & Hennig, ICLR 2020, arXiv:1912.10985): for kernels of Flax NNX
  ``nnx.Linear`` and ``nnx.Conv`` layers, the per-example gradient is a function of the layer's input and output
  cotangent, which are captured by intercepting the layer's ``dot_general``/``conv_general_dilated`` while the loss is
  traced and adding a zero perturbation to its output (whose gradient is the output cotangent). For a Dense kernel with
  one input row per example the per-example gradients ``a_i g_i^T`` are never materialised (see
  :func:`_dense_moments` for the exact, centred formula); with several rows per example (sequences) and for
  convolutions the kernel's per-example gradients are materialised for that layer only.

Microbatches are merged with Chan et al.'s pairwise formula, so nothing is ever a one-pass raw sum of squares over
the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from corrjax._checks import check_choice

__all__ = ["fast_path_mask", "per_example_moments"]

logger = logging.getLogger(__name__)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------------
# Layer interception


@dataclass
class _Call:
    """One intercepted kernel use: which param leaf, which op, and the op's static configuration."""

    leaf: int
    kind: str  # "dense" | "conv"
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: jax.ShapeDtypeStruct
    rhs_dtype: Any


@dataclass
class _Tap:
    """Active interception: maps ``id(kernel array)`` to a leaf index; records calls (discover) or perturbs (apply)."""

    ids: dict[int, int]
    mode: str  # "discover" | "apply"
    perturbations: Sequence[Any] = ()
    calls: list[_Call] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)

    def wrap(self, leaf: int, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def tapped(lhs: Any, rhs: Any, *args: Any, **kwargs: Any) -> Any:
            if kind == "dense" and not _standard_dense(lhs, rhs, args, kwargs):
                return fn(lhs, rhs, *args, **kwargs)  # untapped: the leaf stays on the generic path
            if self.mode == "discover":
                # The kernel is replaced by a constant, so any other use of the leaf is visible in the jaxpr.
                y = fn(lhs, jnp.zeros(rhs.shape, rhs.dtype), *args, **kwargs)
                out = jax.ShapeDtypeStruct(y.shape, y.dtype)
                self.calls.append(_Call(leaf, kind, fn, args, dict(kwargs), out, rhs.dtype))
                return y
            y = fn(lhs, rhs, *args, **kwargs)
            j = len(self.inputs)
            self.inputs.append(lhs)
            return y + self.perturbations[j].astype(y.dtype)

        return tapped


def _standard_dense(lhs: Any, rhs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Only ``lhs[..., in] @ kernel[in, out]`` has the outer-product per-example gradient."""
    dims = args[0] if args else kwargs.get("dimension_numbers")
    try:
        (lc, rc), (lb, rb) = dims
        return tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2
    except (TypeError, ValueError):
        return False


_STATE = threading.local()
_PATCH_LOCK = threading.RLock()  # re-entrant: a loss may itself call per_example_moments


def _active_tap() -> _Tap | None:
    return getattr(_STATE, "tap", None)


def _dense_ok(module: Any) -> bool:
    return getattr(module, "kernel", None) is not None and module.kernel.get_value().ndim == 2


def _conv_ok(module: Any) -> bool:
    return getattr(module, "kernel", None) is not None and getattr(module, "mask", None) is None


def _make_call(orig: Callable[..., Any], attr: str, kind: str, ok: Callable[[Any], bool]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        tap = _active_tap()
        if tap is None or not ok(self):
            return orig(self, *args, **kwargs)
        leaf = tap.ids.get(id(self.kernel.get_value()))
        if leaf is None:
            return orig(self, *args, **kwargs)
        fn = getattr(self, attr)
        object.__setattr__(self, attr, tap.wrap(leaf, kind, fn))
        try:
            return orig(self, *args, **kwargs)
        finally:
            object.__setattr__(self, attr, fn)

    call._corrjax_original = orig  # type: ignore[attr-defined]
    return call


@contextlib.contextmanager
def _intercept(tap: _Tap) -> Iterator[_Tap]:
    """Installs ``tap`` and intercepts ``nnx.Linear``/``nnx.Conv`` calls while the loss is traced."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency, but the generic path does not need it
        yield tap
        return
    with _PATCH_LOCK:
        saved = (nnx.Linear.__call__, nnx.Conv.__call__)
        # When nested, wrap the true originals (never our own wrapper) so a call is tapped once.
        base = [getattr(f, "_corrjax_original", f) for f in saved]
        nnx.Linear.__call__ = _make_call(base[0], "dot_general", "dense", _dense_ok)
        nnx.Conv.__call__ = _make_call(base[1], "conv_general_dilated", "conv", _conv_ok)
        previous, _STATE.tap = _active_tap(), tap
        try:
            yield tap
        finally:
            _STATE.tap = previous
            nnx.Linear.__call__, nnx.Conv.__call__ = saved


# ----------------------------------------------------------------------------------------------------------------
# Moments


def _cdtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _two_pass(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean, sum of squared deviations)`` over axis 0 of explicit per-example values, centred (exact)."""
    g = g.astype(_cdtype(g.dtype))
    mean = jnp.mean(g, axis=0)
    return mean, jnp.sum(jnp.square(g - mean), axis=0)


def _dense_moments(a: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Moments of the per-example Dense-kernel gradients ``a_i g_i^T`` without materialising them.

    ``a``: ``(n, in)`` layer inputs; ``g``: ``(n, out)`` output cotangents. With ``u_i = a_i - abar`` and
    ``w_i = g_i - gbar``, ``d_i = a_i g_i^T - abar gbar^T = abar w_i^T + u_i g_i^T`` exactly, so

    .. math:: \sum_i d_i^2 = \bar a^2 \otimes \sum_i w_i^2 + 2\,\bar a \odot U^T (W \odot G) + (U^2)^T G^2

    (elementwise squares, three matmuls), and the sum of squared deviations is
    ``sum_i d_i^2 - n * mean(d)^2`` with ``mean(d) = U^T G / n``. This is the shifted-data formula with the shift
    ``abar gbar^T``: the offsets of the activations and of the cotangents (the usual source of cancellation, e.g.
    post-ReLU activations or inputs with a large mean) are removed exactly; what remains cancels only in proportion to
    ``n * mean(d)^2 / sum_i (d_i - mean(d))^2``, i.e. when the correlation part of the mean gradient dominates the
    per-example spread. The result is clamped at 0.
    """
    cdt = _cdtype(jnp.promote_types(a.dtype, g.dtype))
    a, g = a.astype(cdt), g.astype(cdt)
    n = a.shape[0]
    abar, gbar = jnp.mean(a, axis=0), jnp.mean(g, axis=0)
    u, w = a - abar, g - gbar
    mean_d = jnp.matmul(u.T, g, precision=_HIGHEST) / n
    mean = jnp.outer(abar, gbar) + mean_d
    sq = (
        jnp.outer(jnp.square(abar), jnp.sum(jnp.square(w), axis=0))
        + 2 * abar[:, None] * jnp.matmul(u.T, w * g, precision=_HIGHEST)
        + jnp.matmul(jnp.square(u).T, jnp.square(g), precision=_HIGHEST)
    )
    return mean, jnp.maximum(sq - n * jnp.square(mean_d), 0)


def _merge(
    count_a: jax.Array, mean_a: jax.Array, m2_a: jax.Array, count_b: Any, mean_b: jax.Array, m2_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Chan, Golub & LeVeque's pairwise merge of (count, mean, sum of squared deviations)."""
    total = count_a + count_b
    delta = mean_b - mean_a
    frac = jnp.asarray(count_b / total, mean_a.dtype)
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + jnp.square(delta) * jnp.asarray(count_a * frac, mean_a.dtype)
    return mean, m2


# ----------------------------------------------------------------------------------------------------------------
# Chunk functions: (leaves, chunk) -> (means, m2s), lists aligned with the flat params


def _loss_on(loss_fn: Callable[..., Any], treedef: Any) -> Callable[..., Any]:
    return lambda leaves, example: loss_fn(jax.tree.unflatten(treedef, list(leaves)), *example)


def _vmap_chunk(loss_fn: Callable[..., Any], treedef: Any) -> Callable[..., Any]:
    loss = _loss_on(loss_fn, treedef)

    def chunk(leaves: list[jax.Array], ex: tuple[Any, ...]) -> tuple[list[jax.Array], list[jax.Array]]:
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(leaves, ex)
        means, m2s = zip(*(_two_pass(g) for g in grads), strict=True)
        return list(means), list(m2s)

    return chunk


def _discover(loss_fn: Callable[..., Any], treedef: Any, leaves: list[Any], example: Any) -> list[_Call]:
    """Traces the loss on one example; returns the intercepted calls whose kernel has no other use."""
    loss = _loss_on(loss_fn, treedef)
    tap = _Tap(ids={}, mode="discover")

    def traced(ls: list[Any], ex: Any) -> Any:
        tap.ids = {id(x): i for i, x in enumerate(ls)}
        with _intercept(tap):
            return loss(ls, ex)

    abstract = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
    closed = jax.make_jaxpr(traced)(abstract, example)
    jaxpr = closed.jaxpr
    leaf_vars = jaxpr.invars[: len(leaves)]
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    counts: dict[int, int] = {}
    for c in tap.calls:
        counts[c.leaf] = counts.get(c.leaf, 0) + 1
    ok = {i for i, k in counts.items() if k == 1 and id(leaf_vars[i]) not in used}
    return [c for c in tap.calls if c.leaf in ok]


def _fast_chunk(loss_fn: Callable[..., Any], treedef: Any, calls: list[_Call]) -> Callable[..., Any]:
    loss = _loss_on(loss_fn, treedef)
    fast = {c.leaf: j for j, c in enumerate(calls)}

    def chunk(leaves: list[jax.Array], ex: tuple[Any, ...]) -> tuple[list[jax.Array], list[jax.Array]]:
        rest_idx = [i for i in range(len(leaves)) if i not in fast]
        n = jax.tree.leaves(ex)[0].shape[0]

        def per_example(rest: list[Any], perts: list[Any], example: Any) -> tuple[Any, list[Any]]:
            full = list(leaves)
            for i, r in zip(rest_idx, rest, strict=True):
                full[i] = r
            tap = _Tap(ids={id(leaves[i]): i for i in fast}, mode="apply", perturbations=perts)
            with _intercept(tap):
                value = loss(full, example)
            if len(tap.inputs) != len(calls):
                raise RuntimeError("per_example_moments: the loss traced differently from its discovery pass")
            return value, tap.inputs

        perts = [jnp.zeros((n, *c.out.shape), c.out.dtype) for c in calls]
        (rest_grads, cots), inputs = jax.vmap(
            jax.grad(per_example, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0)
        )([leaves[i] for i in rest_idx], perts, ex)

        means: list[Any] = [None] * len(leaves)
        m2s: list[Any] = [None] * len(leaves)
        for i, g in zip(rest_idx, rest_grads, strict=True):
            means[i], m2s[i] = _two_pass(g)
        for c, lhs, cot in zip(calls, inputs, cots, strict=True):
            kernel = leaves[c.leaf]
            if c.kind == "dense":
                d_in, d_out = kernel.shape
                a, g = lhs.reshape(n, -1, d_in), cot.reshape(n, -1, d_out)
                if a.shape[1] == 1:
                    mean, m2 = _dense_moments(a[:, 0], g[:, 0])
                else:
                    cdt = _cdtype(jnp.promote_types(a.dtype, g.dtype))
                    per = jnp.einsum("nri,nro->nio", a.astype(cdt), g.astype(cdt), precision=_HIGHEST)
                    mean, m2 = _two_pass(per)
            else:

                def one(x: Any, ct: Any, c: _Call = c, kernel: Any = kernel) -> Any:
                    f = lambda k: c.fn(x, k.astype(c.rhs_dtype), *c.args, **c.kwargs)
                    return jax.vjp(f, kernel)[1](ct)[0]

                mean, m2 = _two_pass(jax.vmap(one)(lhs, cot))
            means[c.leaf], m2s[c.leaf] = mean, m2
        return means, m2s

    return chunk


# ----------------------------------------------------------------------------------------------------------------
# Public API


def _batch_size(batch: tuple[Any, ...]) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("per_example_moments needs at least one batched argument after `params`")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(jnp.shape(x)) for x in leaves]
        raise ValueError(f"every `batch` leaf needs the same leading (example) axis; got shapes {shapes}")
    return sizes.pop()


def fast_path_mask(loss_fn: Callable[..., Any], params: Any, *batch: Any) -> Any:
    """Which parameter leaves :func:`per_example_moments` handles with the fast path (a pytree of Python bools).

    A leaf qualifies when it is the kernel of exactly one ``nnx.Linear`` (standard contraction) or ``nnx.Conv``
    (without ``mask``) call, and ``loss_fn`` uses it nowhere else. ``batch`` is as for :func:`per_example_moments`.
    """
    leaves, treedef = jax.tree.flatten(params)
    _batch_size(batch)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch)
    fast = {c.leaf for c in _discover(loss_fn, treedef, leaves, example)}
    return jax.tree.unflatten(treedef, [i in fast for i in range(len(leaves))])


def per_example_moments(
    loss_fn: Callable[..., Any],
    params: Any,
    *batch: Any,
    microbatch_size: int | None = None,
    method: str = "fast",
) -> tuple[Any, Any, int]:
    r"""Mean and per-coordinate sum of squared deviations of the per-example gradients.

    For per-example gradients ``g_i = grad(loss_fn)(params, *example_i)``, ``i = 1..n``, returns
    ``(mean_grad, sum_sq_diff_grads, sample_size)`` with ``mean_grad = mean_i g_i``,
    ``sum_sq_diff_grads = sum_i (g_i - mean_grad)^2`` (elementwise; ``/ (n - 1)`` is ``var(ddof=1)``) and
    ``sample_size = n`` (a Python int), ready to pass as extra args to
    :func:`corrjax.optim.scale_by_grad_variance` (``source="batch"``) and :func:`corrjax.optim.gradient_noise_scale`.

    Exactness: per microbatch, generic leaves and materialised kernels use a two-pass (centred) sum; Dense kernels
    with one row per example use the shifted formula of :func:`_dense_moments` (exact algebra, the activation and
    cotangent offsets removed before squaring); microbatches are merged with Chan's formula. Arithmetic is in
    float32 (float64 under x64 for float64 input); results have the params' structure in that precision.

    Args:
      loss_fn: ``loss_fn(params, *example) -> scalar`` for ONE example (no batch axis).
      params: the parameter pytree (e.g. ``nnx.state(model, nnx.Param)`` with ``nnx.merge`` inside ``loss_fn``).
      *batch: arrays or pytrees whose leaves all have the example axis first, length ``n``.
      microbatch_size: examples per chunk (default: all ``n`` at once); a remainder chunk is handled. Bounds memory
        to one chunk's per-example quantities.
      method: "fast" (default): intercept ``nnx.Linear``/``nnx.Conv`` kernels (see :func:`fast_path_mask`) and use
        ``vmap(grad)`` for every other leaf; "vmap": ``vmap(grad)`` for every leaf (the reference).

    Returns:
      ``(mean_grad, sum_sq_diff_grads, sample_size)``.

    Raises:
      ValueError: on batch leaves without a common leading axis, a bad ``microbatch_size`` or ``method``.

    References:
      Dangel, Kunstner & Hennig, `BackPACK <https://arxiv.org/abs/1912.10985>`_, ICLR 2020; Chan, Golub & LeVeque,
      "Algorithms for computing the sample variance", 1983.
    """
    check_choice(method, "method", ("fast", "vmap"))
    n = _batch_size(batch)
    if microbatch_size is None:
        microbatch_size = n
    if isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1:
        raise ValueError(f"`microbatch_size` must be a positive int, got {microbatch_size!r}")
    mb = min(microbatch_size, n)
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
        raise ValueError("`params` has no array leaves")

    calls: list[_Call] = []
    if method == "fast":
        example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch)
        calls = _discover(loss_fn, treedef, leaves, example)
    chunk = _fast_chunk(loss_fn, treedef, calls) if calls else _vmap_chunk(loss_fn, treedef)

    k, r = divmod(n, mb)
    full = jax.tree.map(lambda x: jnp.reshape(x[: k * mb], (k, mb, *jnp.shape(x)[1:])), batch)
    if k == 1:
        means, m2s = chunk(leaves, jax.tree.map(lambda x: x[0], full))
    else:

        def body(carry: Any, ex: Any) -> tuple[Any, None]:
            i, means, m2s = carry
            cm, cm2 = chunk(leaves, ex)
            count = (i * mb).astype(jnp.float32)
            merged = [_merge(count, a, b, mb, c, d) for a, b, c, d in zip(means, m2s, cm, cm2, strict=True)]
            return (i + 1, [m for m, _ in merged], [s for _, s in merged]), None

        shapes = jax.eval_shape(chunk, leaves, jax.tree.map(lambda x: x[0], full))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (_, means, m2s), _ = jax.lax.scan(body, (jnp.zeros([], jnp.int32), *zeros), full)
    if r:
        rest = jax.tree.map(lambda x: x[k * mb :], batch)
        cm, cm2 = chunk(leaves, rest)
        merged = [_merge(k * mb, a, b, r, c, d) for a, b, c, d in zip(means, m2s, cm, cm2, strict=True)]
        means, m2s = [m for m, _ in merged], [s for _, s in merged]
    return jax.tree.unflatten(treedef, means), jax.tree.unflatten(treedef, m2s), n
