"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of McCandlish et al. (2018) as a pass-through transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "GradientNoiseScaleState",
    "gradient_noise_scale",
    "noise_scale_ema",
    "noise_terms_from_moments",
    "noise_terms_from_two_batches",
]


class GradientNoiseScaleState(NamedTuple):
    """State of :func:`gradient_noise_scale`; the estimates are float32 scalars whatever the gradients' dtype.

    Attributes:
      count: number of updates so far, int32 scalar.
      grad_sq_norm: bias-corrected EMA of the unbiased estimate of ``|G|^2`` (true gradient's squared norm).
      trace_cov: bias-corrected EMA of the estimate of ``tr(Sigma)`` (per-example gradient covariance trace).
      noise_scale: ``trace_cov / grad_sq_norm`` (``inf`` while ``grad_sq_norm <= 0``): the estimate of B_simple.
    """

    count: chex.Array
    grad_sq_norm: chex.Array
    trace_cov: chex.Array
    noise_scale: chex.Array


def _sum_sq(tree: Any) -> chex.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("gradient_noise_scale needs at least one array leaf in the updates")
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    return sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)


def _sum(tree: Any) -> chex.Array:
    leaves = jax.tree.leaves(tree)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    return sum(jnp.sum(x.astype(dtype)) for x in leaves)


def noise_terms_from_moments(
    mean_grad: Any, sum_sq_diff_grads: Any, sample_size: chex.Numeric
) -> tuple[chex.Array, chex.Array]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from one batch's per-example moments.

    ``tr(Sigma) = sum(sum_sq_diff_grads) / (n - 1)`` (per-example covariance trace) and
    ``|G|^2 = |mean_grad|^2 - tr(Sigma) / n`` (``E|G_B|^2 = |G|^2 + tr(Sigma)/B``), McCandlish et al. (2018), App. A.
    """
    n = jnp.asarray(sample_size, jnp.float32)
    trace = _sum(sum_sq_diff_grads) / (n - 1)
    g2 = _sum_sq(mean_grad) - trace / n
    return g2, trace


def noise_terms_from_two_batches(
    sq_norm_small: chex.Numeric, sq_norm_big: chex.Numeric, batch_small: chex.Numeric, batch_big: chex.Numeric
) -> tuple[chex.Array, chex.Array]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from mean-gradient squared norms at two batch sizes (McCandlish, App. A.1).

    With ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``:
    ``|G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and
    ``tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)``. In data-parallel training, ``G_small`` is
    one device's mean gradient and ``G_big`` the all-reduced one.
    """
    s, b = jnp.asarray(sq_norm_small, jnp.float32), jnp.asarray(sq_norm_big, jnp.float32)
    bs, bb = jnp.asarray(batch_small, jnp.float32), jnp.asarray(batch_big, jnp.float32)
    g2 = (bb * b - bs * s) / (bb - bs)
    trace = (s - b) / (1 / bs - 1 / bb)
    return g2, trace


def noise_scale_ema(
    state: GradientNoiseScaleState, grad_sq_norm: chex.Numeric, trace_cov: chex.Numeric, decay: chex.Numeric = 0.99
) -> GradientNoiseScaleState:
    """One step of :func:`gradient_noise_scale`'s smoothing: the bias-corrected EMAs (``decay``) of the unbiased
    estimates ``grad_sq_norm`` (``|G|^2``) and ``trace_cov`` (``tr(Sigma)``), and their ratio ``B_simple``.

    McCandlish et al. (2018), Appendix A.1: the ratio of single-batch estimates is biased and very noisy, so the
    two estimators are averaged over steps *before* the ratio is taken. Start from ``GradientNoiseScaleState`` of
    zeros (``gradient_noise_scale().init(None)``); the state keeps its dtypes (a stable scan carry). Pure and
    jittable (``decay`` may be an array)."""
    count = optax.safe_increment(state.count)
    d = jnp.asarray(decay, jnp.float32)
    correction = 1 - d ** count.astype(jnp.float32)
    # The stored fields are bias-corrected; undo the correction of the previous step to get the raw EMAs.
    prev = 1 - d ** state.count.astype(jnp.float32)
    raw_g2 = d * state.grad_sq_norm * prev + (1 - d) * grad_sq_norm
    raw_tr = d * state.trace_cov * prev + (1 - d) * trace_cov
    g2_hat, tr_hat = raw_g2 / correction, raw_tr / correction
    ratio = jnp.where(g2_hat > 0, tr_hat / jnp.where(g2_hat > 0, g2_hat, 1), jnp.inf)
    # float64 gradients (x64) make the estimates float64; the state keeps its init dtypes (a stable scan carry).
    keep = lambda x, old: jnp.asarray(x).astype(old.dtype)
    return GradientNoiseScaleState(
        count=count,
        grad_sq_norm=keep(g2_hat, state.grad_sq_norm),
        trace_cov=keep(tr_hat, state.trace_cov),
        noise_scale=keep(ratio, state.noise_scale),
    )


def gradient_noise_scale(*, decay: chex.Numeric = 0.99) -> optax.GradientTransformationExtraArgs:
    r"""Tracks McCandlish et al.'s simple noise scale ``B_simple = tr(Sigma) / |G|^2``; updates pass through unchanged.

    ``B_simple`` estimates the critical batch size: batches much smaller than it are noise dominated. Each step gives
    unbiased estimates of ``|G|^2`` and ``tr(Sigma)``; both are EMA-smoothed (``decay``, bias-corrected) *before*
    taking the ratio, as the paper recommends (the ratio of single-batch estimates is biased and very noisy). The
    estimate is read with ``optax.tree.get(opt_state, "noise_scale")``.

    Extra args, one of:

    - ``sum_sq_diff_grads`` (structure of the updates) and ``sample_size`` ``n``: the updates are the mean gradient
      of ``n`` examples (see :func:`corrjax.optim.per_example_moments`); :func:`noise_terms_from_moments`.
    - ``small_batch_sq_norm``, ``small_batch_size`` and ``sample_size``: the squared norm of a mean gradient over
      ``small_batch_size`` examples, the updates being the mean over ``sample_size`` examples (the paper's two-batch
      estimator; e.g. per-device vs all-reduced gradients); :func:`noise_terms_from_two_batches`.

    Place it first in the chain so it sees raw gradients. Under ``optax.MultiSteps`` it sees the averaged gradient,
    so pass statistics of the whole accumulated batch.

    Args:
      decay: EMA decay of the two estimates (may be an array).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GradientNoiseScaleState`.

    References:
      McCandlish, Kaplan, Amodei et al., `An Empirical Model of Large-Batch Training
      <https://arxiv.org/abs/1812.06162>`_, 2018, Section 2.2 and Appendix A.
    """

    def init_fn(params: optax.Params) -> GradientNoiseScaleState:
        del params
        z = jnp.zeros([], jnp.float32)
        return GradientNoiseScaleState(count=jnp.zeros([], jnp.int32), grad_sq_norm=z, trace_cov=z, noise_scale=z)

    def update_fn(
        updates: optax.Updates, state: GradientNoiseScaleState, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, GradientNoiseScaleState]:
        del params
        if extra.get("sum_sq_diff_grads") is not None and extra.get("sample_size") is not None:
            g2, trace = noise_terms_from_moments(updates, extra["sum_sq_diff_grads"], extra["sample_size"])
        elif all(extra.get(k) is not None for k in ("small_batch_sq_norm", "small_batch_size", "sample_size")):
            g2, trace = noise_terms_from_two_batches(
                extra["small_batch_sq_norm"], _sum_sq(updates), extra["small_batch_size"], extra["sample_size"]
            )
        else:
            raise ValueError(
                "gradient_noise_scale needs the extra args `sum_sq_diff_grads` and `sample_size`, or "
                "`small_batch_sq_norm`, `small_batch_size` and `sample_size`; got "
                f"{sorted(k for k, v in extra.items() if v is not None)}"
            )
        return updates, noise_scale_ema(state, g2, trace, decay)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
